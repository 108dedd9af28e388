"""Training the demo model (``scripts/train_demo.py``): generated data, the loss, the indexer KL.

``data``: the natural-text corpus (the Python standard library's own source and docstrings),
its tokenizer and the needle-in-a-haystack samples; ``loss``: next-token cross-entropy under
the sparse (top-k) selection, plus the lightning indexer's KL loss towards the main
attention (docs/NEEDLE.md), with the checkpoint's FP8 / MXFP4 weight rounding simulated;
``mtp``: the MTP phase (the main model frozen, the MTP block learns to draft token t+2) and
the draft agreement on held-out text; ``demo``: the curriculum (``PHASES``), the optimizer and
the export, the main of the script.
"""
