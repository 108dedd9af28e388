"""Memory plan: bytes per device for weights and KV state, and the resulting capacity, for
DeepSeek-V4 Flash and Pro on one node of 8 H200 or B200 and on 2 and 4 such nodes serving one
model (docs/MEMORY_PLAN.md).

Everything is derived from the config and the code that places arrays, never typed in:

* weights: the published checkpoint's storage of every param leaf (``checkpoint.layout``:
  FP8 block-scaled linears, MXFP4 routed experts, BF16/F32 rest), split by the rules table
  (``Layout.param_shardings`` on an abstract mesh of the cluster's shape), summed per device;
* KV: ``kv_accounting.kv_bytes`` per storage format, plus the per-slot penalty tables the
  runner keeps; a sequence's state lives on one sequence shard and is replicated over the
  mesh axes that do not split sequences;
* capacity: ``mem_fraction × HBM − weights`` per device, filled with KV;
* per profile (``serving_plans``): ``dsv4_jax.memory.plan``, the function the server sizes its
  pools with, on an abstract 8-device mesh with the default rules: weights held packed, pool
  blocks, slots, penalty tables and snapshots, the step temporaries' reserve.

    python scripts/memory_plan.py                  # tables
    python scripts/memory_plan.py --json           # the same numbers as JSON
    python scripts/memory_plan.py --write docs/MEMORY_PLAN.md
"""

from __future__ import annotations

import argparse
import json
import math
import os

import jax
from jax.sharding import AbstractMesh, AxisType

from dsv4_jax import held, memory
from dsv4_jax.config import Config, preset
from dsv4_jax.engine.profiles import PROFILES, PoolsDoNotFit, make_config
from dsv4_jax.engine.runner.layout import leaf_bytes
from dsv4_jax.model.accounting import kv_bytes, main_row_bytes
from dsv4_jax.model.params import count_params, from_native
from dsv4_jax.model.state import KVFormat
from dsv4_jax.parallel.rules import DEFAULT_RULES, Layout
from dsv4_jax.quant import QuantizedWeight

GB = 1e9
GPUS = {"H200": 141 * GB, "B200": 180 * GB}  # HBM per device (SERVING.md §3)
# One node of 8, and several (hosts × GPUs per host): the mesh is the same kind over all devices
# (docs/SERVING.md "One model across hosts"), so the plan depends on the device count only.
CLUSTERS = [
    ("8×H200", "H200", 8),
    ("8×B200", "B200", 8),
    ("2×8 H200", "H200", 16),
    ("4×8 H200", "H200", 32),
    ("2×8 B200", "B200", 16),
    ("4×8 B200", "B200", 32),
]
CONTEXTS = {"8K": 8192, "128K": 131072, "1M": 1 << 20}
FORMATS = ("bf16", "fp8", "fp8-fp4")
# Two rows of the rules table per cluster. "dp-attn" is DEFAULT_RULES; "tp-attn" is the
# table edit SGLang's TP8 corresponds to: heads split over the 'expert' axis, sequences only
# over 'data' (so every device of an expert group holds every sequence's state).
LAYOUTS = {
    "dp-attn": {},
    "tp-attn": {
        "batch": "data",
        "kv_slot": "data",
        "kv_block": "data",
        "q_heads": "expert",
        "heads": "expert",
        "o_lora": "expert",
        "vocab": "expert",
    },
}
# Published figures this plan is compared with (SERVING.md §0, §2.2, §3; ARCHITECTURE.md §8).
PUBLISHED = [
    ("flash", None, None, "weights_total_gb", 159.6, "Flash checkpoint, 46 shards (ARCHITECTURE §8)"),
    (
        "flash",
        "8×B200",
        "dp-attn",
        "seqs_8K_fp8",
        30000,
        "Flash 8×B200: ~1.2 TB free / 35 MB ≈ 30K seqs at 8K (SERVING §3)",
    ),
    (
        "flash",
        "8×B200",
        "dp-attn",
        "seqs_1M_fp8",
        300,
        "Flash 8×B200: ~1.2 TB / 4 GB ≈ 300 seqs at 1M (SERVING §3)",
    ),
    (
        "pro",
        "8×H200",
        "tp-attn",
        "seqs_9K_fp8",
        15,
        "Pro FP4 8×H200 SGLang: KV fits ~15 requests of 8K+1K (SERVING §2.2)",
    ),
    (
        "pro",
        "8×B200",
        "tp-attn",
        "tokens_fp8",
        3.7e6,
        "Pro HGX B200 (Together): KV ~1.2M → ~3.7M tokens per node (SERVING §2.2)",
    ),
]


def _kind(x) -> str:
    if isinstance(x, QuantizedWeight):
        return "mxfp4" if x.fmt == "mxfp4" else "fp8"
    return "other"


def weight_bytes(tree, lay: Layout | None = None, cfg: Config | None = None) -> dict[str, float]:
    """Bytes by storage kind (mxfp4 experts, fp8 linears, other), whole or on one device of ``lay``."""
    out = {"mxfp4": 0.0, "fp8": 0.0, "other": 0.0}
    is_q = lambda x: isinstance(x, QuantizedWeight)
    leaves = jax.tree.leaves(tree, is_leaf=is_q)
    shardings = [None] * len(leaves)
    if lay is not None:  # the rules read the model's variables: the native tree as the model's State
        shardings = jax.tree.leaves(lay.param_shardings(from_native(cfg, tree), cfg), is_leaf=is_q)
    for x, sh in zip(leaves, shardings):
        pairs = [(x.data, sh and sh.data), (x.scale, sh and sh.scale)] if is_q(x) else [(x, sh)]
        for arr, s in pairs:
            out[_kind(x)] += leaf_bytes(arr, s)
    return out


def plan(
    model: str,
    cfg: Config,
    tree,
    cluster: str,
    gpu: str,
    n: int,
    name: str,
    mem_fraction: float,
    block_tokens: int,
) -> dict:
    mesh = AbstractMesh((1, n, 1), ("data", "expert", "tensor"), axis_types=(AxisType.Auto,) * 3)
    lay = Layout.create(mesh, {**DEFAULT_RULES, **LAYOUTS[name]})
    w = weight_bytes(tree, lay, cfg)
    free = mem_fraction * GPUS[gpu] - sum(w.values())
    shards = lay.num_seq_shards
    row = {
        "model": model,
        "cluster": cluster,
        "gpu": gpu,
        "devices": n,
        "layout": name,
        "mesh": f"data=1,expert={n},tensor=1",
        "rules_edit": LAYOUTS[name],
        "seq_shards": shards,
        "kv_replication": n // shards,
        "weights_per_device": {**w, "total": sum(w.values())},
        "free_per_device": free,
        "kv": [],
    }
    penalty = 5 * cfg.vocab_size  # i32 output counts + bool prompt mask per slot
    for f in FORMATS:
        acc = kv_bytes(cfg, KVFormat.parse(f))
        fixed = acc.fixed_bytes_per_seq + penalty
        # What an engine that keeps every layer's SWA rows for the whole history (an SWA pool,
        # as vLLM/SGLang did at launch) would add per token; this engine keeps a 128-row ring.
        history = cfg.num_hidden_layers * main_row_bytes(cfg, KVFormat.parse(f))
        entry = {
            "format": f,
            "bytes_per_token": acc.bytes_per_token,
            "fixed_bytes_per_seq": fixed,
            "swa_history_bytes_per_token": history,
        }
        for suffix, per_token in (("", acc.bytes_per_token), ("_swa_history", acc.bytes_per_token + history)):

            def fits(t: int, per_token=per_token, fixed=fixed) -> int:
                """Sequences of ``t`` tokens the cluster holds (blocks round up)."""
                per_seq = per_token * math.ceil(t / block_tokens) * block_tokens + fixed
                return shards * max(0, math.floor(free / per_seq)) if free > 0 else 0

            entry.update(
                {
                    "tokens" + suffix: shards * max(0.0, free) / per_token,
                    "seqs" + suffix: {k: fits(t) for k, t in CONTEXTS.items()},
                    "seqs_9K" + suffix: fits(9216),
                }
            )
        row["kv"].append(entry)
    return row


SERVE_CLUSTERS = CLUSTERS  # the server's plan on every cluster the tables above cover
SERVE_CONTEXTS = {"128K": 131072, "1M": 1 << 20}


def serving_plans(mem_fraction: float = 0.9) -> list[dict]:
    """What ``LLM(dir, profile=...)`` plans with ``--mesh auto`` on each 8-GPU node, and on
    groups of 2 and 4 such nodes serving one model in lockstep (``--coordinator``): packed
    weights (``weights="auto"`` on GPU), the default rules (expert parallelism, sequences
    split over the devices), QAT's ``fp8-fp4`` KV, ``--max-model-len`` set to the context,
    ``memory.plan`` with the step temporaries' reserve (the server replaces it by the
    compiled steps' ``memory_analysis`` when it starts)."""

    rows = []
    for model in ("flash", "pro"):
        cfg = preset(model)
        params = memory.abstract_weights(cfg, held.resolve(backend="gpu"))
        for cluster, gpu, n in SERVE_CLUSTERS:
            mesh = AbstractMesh((1, n, 1), ("data", "expert", "tensor"), axis_types=(AxisType.Auto,) * 3)
            lay = Layout.create(mesh, DEFAULT_RULES)
            for profile in PROFILES:
                for ctx, length in SERVE_CONTEXTS.items():
                    ec = make_config(
                        profile,
                        max_model_len=length,
                        kv_format="fp8-fp4",
                        gpu_memory_utilization=mem_fraction,
                    )
                    row = {"model": model, "cluster": cluster, "profile": profile, "context": ctx}
                    try:
                        p = memory.plan(
                            cfg, ec, params, layout=lay, backend="gpu", device_bytes=int(GPUS[gpu])
                        )
                    except PoolsDoNotFit as e:
                        row.update(
                            fits=False,
                            why="no KV budget left after the weights and the reserve"
                            if e.budget <= 0
                            else "the KV budget holds less than one sequence at this context",
                        )
                    else:
                        row.update(
                            fits=True,
                            plan=p.as_dict(),
                            seqs=p.pools.seqs_at(length),
                            seqs_budget_holds=p.seqs_budget_holds(length),
                        )
                    rows.append(row)
    return rows


def build(mem_fraction: float = 0.9, block_tokens: int = 256) -> dict:
    models, plans = {}, []
    for model in ("flash", "pro"):
        cfg = preset(model)
        tree = memory.abstract_native(cfg)
        w = weight_bytes(tree)
        models[model] = {"weights": {**w, "total": sum(w.values())}, "params": count_params(cfg)}
        for cluster, gpu, n in CLUSTERS:
            for name in LAYOUTS:
                plans.append(plan(model, cfg, tree, cluster, gpu, n, name, mem_fraction, block_tokens))
    return {
        "assumptions": {
            "hbm_bytes": GPUS,
            "mem_fraction": mem_fraction,
            "block_tokens": block_tokens,
            "contexts": CONTEXTS,
            "weights_include_mtp": True,
        },
        "models": models,
        "plans": plans,
        "published": compare(models, plans),
        "serving": serving_plans(mem_fraction),
    }


def compare(models: dict, plans: list[dict]) -> list[dict]:
    out = []
    for model, cluster, name, key, published, what in PUBLISHED:
        row = {"claim": what, "model": model, "cluster": cluster, "layout": name, "published": published}
        if key == "weights_total_gb":
            row.update(ours=models[model]["weights"]["total"] / GB, ours_swa_history=None)
        else:
            p = next(r for r in plans if (r["model"], r["cluster"], r["layout"]) == (model, cluster, name))
            kv = next(k for k in p["kv"] if k["format"] == "fp8")
            for sfx in ("", "_swa_history"):
                row["ours" + sfx] = {
                    "seqs_8K_fp8": kv["seqs" + sfx]["8K"],
                    "seqs_1M_fp8": kv["seqs" + sfx]["1M"],
                    "seqs_9K_fp8": kv["seqs_9K" + sfx],
                    "tokens_fp8": kv["tokens" + sfx],
                }[key]
        out.append(row)
    return out


def _n(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}K" if x >= 1e4 else f"{x:.0f}"


def markdown(d: dict) -> str:
    lines = [
        "| model | weights total GB | MXFP4 experts GB | FP8 linears GB | BF16/F32 GB |",
        "|---|---|---|---|---|",
    ]
    for m, r in d["models"].items():
        w = r["weights"]
        lines.append(
            f"| {m} | {w['total'] / GB:.1f} | {w['mxfp4'] / GB:.1f} | {w['fp8'] / GB:.1f} | "
            f"{w['other'] / GB:.1f} |"
        )
    lines += [
        "",
        (
            "| model | cluster | layout | weights/device GB (MXFP4 + FP8 + other) | free KV/device GB | "
            "KV replicas | format | KV B/token | fixed MiB/seq | capacity tokens | seqs @8K | @128K | @1M |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in d["plans"]:
        w = p["weights_per_device"]
        for k in p["kv"]:
            fits = p["free_per_device"] > 0
            lines.append(
                f"| {p['model']} | {p['cluster']} | {p['layout']} | {w['total'] / GB:.1f} ({w['mxfp4'] / GB:.1f} + "
                f"{w['fp8'] / GB:.1f} + {w['other'] / GB:.1f}) | {p['free_per_device'] / GB:.1f} | "
                f"{p['kv_replication']} | {k['format']} | {k['bytes_per_token']:.0f} | "
                f"{k['fixed_bytes_per_seq'] / 2**20:.1f} | {_n(k['tokens']) if fits else 'does not fit'} | "
                + " | ".join(_n(k["seqs"][c]) for c in CONTEXTS)
                + " |"
            )
    lines += [
        "",
        "| model | node | profile | context | weights/GPU GB | KV budget/GPU GB | slots | concurrent seqs | KV budget holds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in d["serving"]:
        head = f"| {r['model']} | {r['cluster']} | {r['profile']} | {r['context']} |"
        if not r["fits"]:
            lines.append(f"{head} | | | | does not fit: {r['why']} | |")
            continue
        p = r["plan"]
        lines.append(
            f"{head} {p['weights'] / GB:.1f} | {p['budget'] / GB:.1f} | {p['pools']['num_slots']} | "
            f"{_n(r['seqs'])} | {_n(r['seqs_budget_holds'])} |"
        )
    lines += [
        "",
        "| published figure | published | ours (128-row SWA ring) | ours if every SWA row were kept |",
        "|---|---|---|---|",
    ]
    for c in d["published"]:
        pub = _n(c["published"]) if c["published"] > 1000 else c["published"]
        if c["ours_swa_history"] is None:
            lines.append(f"| {c['claim']} | {pub} GB | {c['ours']:.1f} GB | |")
        else:
            lines.append(
                f"| {c['claim']} | {pub} | {_n(c['ours'])} ({c['layout']}, FP8 KV) | "
                f"{_n(c['ours_swa_history'])} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    ap.add_argument(
        "--mem-fraction", type=float, default=0.9, help="usable fraction of HBM (rest: activations)"
    )
    ap.add_argument("--block-tokens", type=int, default=256, help="KV block size (sequences round up to it)")
    ap.add_argument("--write", metavar="PATH", help="also write the markdown document to PATH")
    args = ap.parse_args(argv)
    d = build(args.mem_fraction, args.block_tokens)
    print(json.dumps(d, indent=1) if args.json else markdown(d))
    if args.write:
        write_section(args.write, markdown(d))
    return 0


BEGIN, END = "<!-- memory_plan.py: begin -->", "<!-- memory_plan.py: end -->"


def write_section(path: str, table: str) -> None:
    """Replace the generated part of the document (between the markers) with ``table``; the
    prose around it is written by hand."""
    text = f"{BEGIN}\n{END}\n"
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    with open(path, "w") as f:
        f.write(f"{head}{BEGIN}\n{table}\n{END}{tail}")
