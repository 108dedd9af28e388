"""Step temporaries against ``max_model_len``, compiled from abstract inputs (no weights).

    python scripts/step_memory.py --json     # Flash width, 64K and 1M, decode and 8K prefill

For each ``max_model_len`` it compiles the serving step (``transformer.forward`` over the
decode state, state donated, last-token logits: what ``JaxModelRunner`` compiles) for

* ``decode``: ``batch`` sequences, one token each;
* ``prefill``: one sequence, one chunk of ``prefill_tokens`` tokens,

on a model of the chosen width with one layer of each kind (SWA, CSA, HCA; layer 0 routes by
hash as V4's first layers do), and prints XLA's ``compiled.memory_analysis()``: temporaries
(``temp_bytes``), arguments and outputs. Every input is a ``ShapeDtypeStruct``, so nothing of
the model or of the pools is allocated: Flash width compiles on a laptop.

The pools are sized for one sequence at ``max_model_len`` (their bytes are arguments, not
temporaries, and the plan sizes them: ``memory_plan``). What must not grow with
``max_model_len`` is ``temp_bytes``: every path reads the paged state in chunks
(``pallas_kernels.paging``), so the 64K and 1M figures agree (docs/PERF.md "Step memory").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax
import jax.numpy as jnp

from dsv4_jax.config import Config, preset
from dsv4_jax.intmath import cdiv
from dsv4_jax.model import state as kvc
from dsv4_jax.model.params import abstract_params
from dsv4_jax.model.transformer import ModelOptions, forward

LENGTHS = (1 << 16, 1 << 20)


def one_layer_per_kind(cfg: Config) -> Config:
    """``cfg`` with three layers: SWA (hash-routed), CSA, HCA, using its own ratios."""
    csa = min(r for r in cfg.compress_ratios if r)
    hca = max(r for r in cfg.compress_ratios if r)
    return dataclasses.replace(cfg, num_hidden_layers=3, compress_ratios=(0, csa, hca, 0), num_hash_layers=1)


def step_memory(
    cfg: Config,
    max_model_len: int,
    kind: str,
    *,
    batch: int = 64,
    prefill_tokens: int = 8192,
    block_tokens: int = 256,
    kv_format: str = "fp8-fp4",
    dtype=jnp.bfloat16,
    opts: ModelOptions = ModelOptions(),
) -> dict:
    """One row: XLA's memory analysis of the compiled step (bytes)."""
    b, t = (batch, 1) if kind == "decode" else (1, prefill_tokens)
    max_blocks = cdiv(max_model_len, block_tokens)
    cc = kvc.CacheConfig(
        num_slots=b,
        num_blocks=max_blocks,
        max_blocks_per_seq=max_blocks,
        block_tokens=block_tokens,
        fmt=kvc.KVFormat.parse(kv_format),
        dtype=dtype,
    )
    params = abstract_params(cfg, dtype, include_mtp=False)
    state = jax.eval_shape(lambda: kvc.init_state(cfg, cc))
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    meta = kvc.StepMeta(i32(b), i32(b, max_blocks), i32(b))
    step = jax.jit(
        lambda p, tok, pos, s, m: forward(p, tok, pos, s, m, cfg=cfg, opts=opts, cache=cc, last_only=True),
        donate_argnums=(3,),
    )
    mem = step.lower(params, i32(b, t), i32(b, t), state, meta).compile().memory_analysis()
    return {
        "kind": kind,
        "max_model_len": max_model_len,
        "batch": b,
        "tokens": t,
        "temp_bytes": int(mem.temp_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="flash", help="width to compile (config preset), default flash")
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="max_model_len values")
    ap.add_argument("--batch", type=int, default=64, help="decode batch")
    ap.add_argument("--prefill-tokens", type=int, default=8192, help="prefill chunk length")
    ap.add_argument("--kv-format", default="fp8-fp4")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    cfg = one_layer_per_kind(preset(args.preset))
    rows = [
        step_memory(
            cfg,
            n,
            kind,
            batch=args.batch,
            prefill_tokens=args.prefill_tokens,
            kv_format=args.kv_format,
        )
        for kind in ("decode", "prefill")
        for n in (int(x) for x in args.lengths.split(","))
    ]
    if args.json:
        json.dump({"preset": args.preset, "layers": "swa,csa,hca", "rows": rows}, sys.stdout, indent=1)
        print()
        return 0
    print(f"{args.preset} width, one layer per kind, {args.kv_format} KV, bf16")
    print(f"{'kind':8} {'max_model_len':>13} {'batch×T':>9} {'temp MiB':>10} {'args MiB':>10}")
    for r in rows:
        print(
            f"{r['kind']:8} {r['max_model_len']:>13,} {r['batch']}×{r['tokens']:<7} "
            f"{r['temp_bytes'] / 2**20:>10.1f} {r['argument_bytes'] / 2**20:>10.1f}"
        )
    return 0
