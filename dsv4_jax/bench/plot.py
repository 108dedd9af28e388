"""The benchmark's PNG: latency against concurrency, throughput against context length, and
(with ``--decode-sweep``) per-token decode time against context.

One line per series: runs are grouped by endpoint profile (``--compare-profiles``) and by
the sweep variable that is not on the x axis. Matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import collections


def _concurrency(run: dict) -> float:
    c = run.get("max_concurrency")
    return float(c) if c else float(run["completed"] + run["failed"])  # unbounded: every request at once


def _context(run: dict) -> float:
    return run["total_input_tokens"] / max(1, run["completed"])


def plot(result: dict, path: str) -> str:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result.get("runs", [])
    decode = result.get("decode_sweep") or {}
    panels = 2 + bool(decode)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    ax = axes[0][0]
    series = collections.defaultdict(list)
    for r in runs:
        series[(r.get("profile"), r.get("input_len"))].append(r)
    for (profile, ilen), rs in sorted(series.items(), key=lambda kv: str(kv[0])):
        rs = sorted(rs, key=_concurrency)
        xs = [_concurrency(r) for r in rs]
        tag = " ".join(x for x in (profile, f"in={ilen}" if ilen else None) if x)
        for key, style in (("ttft_ms", "o-"), ("tpot_ms", "s--"), ("e2el_ms", "^:")):
            ys = [r[key]["p50"] for r in rs]
            if any(y is not None for y in ys):
                ax.plot(
                    xs,
                    [y if y is not None else float("nan") for y in ys],
                    style,
                    label=f"{key.split('_')[0].upper()} p50 {tag}".strip(),
                )
    ax.set(
        xlabel="max concurrency",
        ylabel="latency (ms)",
        title="Latency vs concurrency",
        xscale="log",
        yscale="log",
    )
    ticks = sorted({_concurrency(r) for r in runs})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)

    ax = axes[0][1]
    series = collections.defaultdict(list)
    for r in runs:
        series[(r.get("profile"), r.get("max_concurrency"))].append(r)
    for (profile, conc), rs in sorted(series.items(), key=lambda kv: str(kv[0])):
        rs = sorted(rs, key=_context)
        xs = [_context(r) for r in rs]
        tag = " ".join(x for x in (profile, f"conc={conc}" if conc else None) if x)
        ax.plot(xs, [r["output_throughput"] for r in rs], "o-", label=f"output tok/s {tag}".strip())
        ax.plot(xs, [r["total_token_throughput"] for r in rs], "s--", label=f"total tok/s {tag}".strip())
    ax.set(
        xlabel="mean prompt length (tokens)",
        ylabel="tokens / s",
        title="Throughput vs context length",
        xscale="log",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)

    if decode:
        ax = axes[0][2]
        for profile, rows in decode.items():
            rows = [r for r in rows if r["decode_ms_per_token"] is not None]
            ax.plot(
                [r["context"] for r in rows],
                [r["decode_ms_per_token"] for r in rows],
                "o-",
                label=profile or "decode",
            )
        ax.set(
            xlabel="context (tokens)",
            ylabel="ms / token (batch 1)",
            title="Decode time vs context",
            xscale="log",
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(result.get("title", "dsv4-jax benchmark"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
