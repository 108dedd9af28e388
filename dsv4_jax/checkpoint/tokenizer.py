"""The checkpoint's tokenizer: ``tokenizer.json`` via the ``tokenizers`` library (ARCHITECTURE.md §9).

DeepSeek ships a byte-level BPE ``tokenizer.json`` and a ``tokenizer_config.json``
naming BOS ``<｜begin▁of▁sentence｜>`` and EOS ``<｜end▁of▁sentence｜>``; chat
prompts are built from the ``<｜User｜>`` / ``<｜Assistant｜>`` / ``<think>`` /
``</think>`` markers. The loader checks what the engine relies on: BOS and EOS
exist and carry the ids ``config.json`` declares, every chat marker is a single
token, and no token id falls outside the embedding table (``vocab_size``).
"""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer

from dsv4_jax.checkpoint.errors import CheckpointError
from dsv4_jax.config import Config

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
CHAT_MARKERS = ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>")


def _config_token(directory: str, key: str, default: str) -> str:
    """``bos_token`` / ``eos_token`` content from tokenizer_config.json (str or AddedToken dict)."""
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.exists(path):
        return default
    try:
        with open(path) as f:
            v = json.load(f).get(key, default)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return v.get("content", default) if isinstance(v, dict) else (v or default)


def load_tokenizer(directory: str, cfg: Config | None = None) -> Tokenizer:
    """``tokenizer.json`` of a checkpoint directory, checked against ``cfg`` (§9)."""
    directory = os.fspath(directory)
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{directory}: no tokenizer.json")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on parse errors
        raise CheckpointError(f"{path}: cannot parse ({e})") from None
    for key, default, want in (
        ("bos_token", BOS, None if cfg is None else cfg.bos_token_id),
        ("eos_token", EOS, None if cfg is None else cfg.eos_token_id),
    ):
        content = _config_token(directory, key, default)
        tid = tok.token_to_id(content)
        if tid is None:
            raise CheckpointError(f"{path}: {key} {content!r} is not in the vocabulary")
        if want is not None and tid != want:
            raise CheckpointError(f"{path}: {key} {content!r} has id {tid}, config.json says {key}_id={want}")
    for marker in CHAT_MARKERS:
        if tok.token_to_id(marker) is None:
            raise CheckpointError(f"{path}: chat marker {marker!r} is not a single token")
    if cfg is not None and tok.get_vocab_size() > cfg.vocab_size:
        raise CheckpointError(
            f"{path}: {tok.get_vocab_size()} tokens but config.json has vocab_size={cfg.vocab_size}; "
            f"ids past the embedding table would be out of range"
        )
    return tok
