"""The one exception type of checkpoint I/O.

A user who points the loader at a broken or mismatched directory must learn what
to fix: every ``CheckpointError`` names the file and, where there is one, the
tensor (ARCHITECTURE.md §8 for what a well-formed checkpoint holds). It is a
``ValueError`` so callers that already catch bad input keep working.
"""


class CheckpointError(ValueError):
    """A checkpoint cannot be read as asked; the message names the file and tensor."""
