"""KV-state byte accounting (ARCHITECTURE.md §10): what one sequence costs per token of
context and in fixed per-sequence state, per layer kind and storage format.

Per token: a CSA layer stores one main row and one indexer key per ``m_csa`` tokens,
an HCA layer one main row per ``m_hca`` tokens; SWA-only layers store nothing that
grows. Fixed per sequence: a ``W``-row window in every layer and the fp32 compressor
tails (kv and gate rows; 2m rows for overlap compressors, m for HCA).

The same numbers size the engine's pools and its admission control, and a test
checks them against the bytes ``kv_cache.init_state`` actually allocates.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dsv4_jax.config import Config
from dsv4_jax.model.state import KVFormat, tail_rows
from pallas_kernels import kv_format


@dataclasses.dataclass(frozen=True)
class KVBytes:
    """Bytes for one sequence: ``per_kind`` per token of context, ``fixed`` per sequence."""

    per_kind: dict[str, float]
    fixed: dict[str, int]

    @property
    def bytes_per_token(self) -> float:
        return float(sum(self.per_kind.values()))

    @property
    def fixed_bytes_per_seq(self) -> int:
        return int(sum(self.fixed.values()))

    def total(self, context: int) -> float:
        """Bytes for a sequence of ``context`` tokens (asymptotic per-token cost + fixed state)."""
        return self.bytes_per_token * context + self.fixed_bytes_per_seq


def main_row_bytes(cfg: Config, fmt: KVFormat, dense_itemsize: int = 2) -> int:
    if fmt.main == "fp8":
        return kv_format.bytes_per_row("fp8_ds_mla", cfg.head_dim, cfg.qk_rope_head_dim)
    return dense_itemsize * cfg.head_dim


def index_row_bytes(cfg: Config, fmt: KVFormat, dense_itemsize: int = 2) -> int:
    if fmt.index == "dense":
        return dense_itemsize * cfg.index_head_dim
    return kv_format.bytes_per_row(f"indexer_{fmt.index}", cfg.index_head_dim)


def kv_bytes(cfg: Config, fmt: KVFormat = KVFormat(), dense_itemsize: int = 2) -> KVBytes:
    """Accounting for the main stack of ``cfg`` (the MTP block's window is listed separately)."""
    main = main_row_bytes(cfg, fmt, dense_itemsize)
    index = index_row_bytes(cfg, fmt, dense_itemsize)
    per_kind = {"csa_main": 0.0, "csa_index": 0.0, "hca_main": 0.0}
    fixed = {"window": 0, "csa_tail": 0, "csa_index_tail": 0, "hca_tail": 0}
    f32 = np.dtype(np.float32).itemsize
    for i in range(cfg.num_hidden_layers):
        kind, m = cfg.attn_kind(i), cfg.compress_ratio(i)
        fixed["window"] += cfg.sliding_window * main
        if kind == "csa":
            per_kind["csa_main"] += main / m
            per_kind["csa_index"] += index / m
            fixed["csa_tail"] += 2 * tail_rows(cfg, m) * 2 * cfg.head_dim * f32
            fixed["csa_index_tail"] += 2 * tail_rows(cfg, m) * 2 * cfg.index_head_dim * f32
        elif kind == "hca":
            per_kind["hca_main"] += main / m
            fixed["hca_tail"] += 2 * tail_rows(cfg, m) * cfg.head_dim * f32
    return KVBytes(per_kind, fixed)


def mtp_window_bytes(cfg: Config, fmt: KVFormat = KVFormat(), dense_itemsize: int = 2) -> int:
    """The MTP blocks' windows (not part of the main-stack accounting of §10.2)."""
    return cfg.num_nextn_predict_layers * cfg.sliding_window * main_row_bytes(cfg, fmt, dense_itemsize)


def table_rows(presets: dict[str, Config], formats=("bf16", "fp8", "fp8-fp4")) -> list[dict]:
    """One JSON-ready row per (preset, format): the interface of ``scripts/kv_table.py --json``."""
    rows = []
    for name, cfg in presets.items():
        for f in formats:
            acc = kv_bytes(cfg, KVFormat.parse(f))
            rows.append(
                {
                    "preset": name,
                    "format": f,
                    "bytes_per_token": acc.bytes_per_token,
                    "per_kind": acc.per_kind,
                    "fixed_bytes_per_seq": acc.fixed_bytes_per_seq,
                    "fixed": acc.fixed,
                    "mtp_window_bytes": mtp_window_bytes(cfg, KVFormat.parse(f)),
                    "gib_at_1m": acc.bytes_per_token * 2**20 / 2**30,
                }
            )
    return rows
