"""scripts/bench_kernels.py (``dsv4_jax.bench.kernels``): ``--help`` without a GPU, refusal to
produce numbers on CPU, and the must-move byte accounting against SERVING.md §3 (V4-Flash
decode, batch 1)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsv4_jax.bench import kernels as bench

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_kernels.py"


def test_help_works_without_a_gpu():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0 and "--smoke" in out.stdout and "must move" in out.stdout.lower()


def test_no_numbers_without_a_gpu(tmp_path, capsys):
    assert bench.main(["--json", str(tmp_path / "x.json")]) == 2
    assert "not a GPU" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


QO = 4 * 64 * 512  # bf16 q in + o out of 64 heads × 512 dims: as large as a third of the rows


@pytest.mark.parametrize(
    "kind,ctx,fmt,expect",
    [
        ("attention_csa", 1 << 20, "fp8_ds_mla", (128 + 512) * 584 + QO + 8 * 512),  # rows: 0.30 + 0.075 MB
        ("attention_hca", 1 << 20, "fp8_ds_mla", (128 + 8192) * 584 + QO + 4 * 4096),  # rows: 4.86 MB
        ("attention_csa", 8192, "bf16", (128 + 512) * 1024 + QO + 8 * 512),
        (
            "indexer",
            1 << 20,
            "fp8",
            262144 * 132 + 2 * 64 * 128 + 4 * 64 + 8 * 512 + 4 * 4096,
        ),  # 34.6 MB of keys
        ("indexer", 1 << 20, "fp4", 262144 * 68 + 2 * 64 * 128 + 4 * 64 + 8 * 512 + 4 * 4096),
    ],
)
def test_must_move_bytes_match_the_roofline(kind, ctx, fmt, expect):
    nbytes, flops = bench.must_move(kind, 1, ctx, bench.FLASH, fmt)
    assert nbytes == expect
    assert bench.must_move(kind, 8, ctx, bench.FLASH, fmt)[0] == 8 * expect
    per_row = 4 * 64 * 512 if kind.startswith("attention") else 2 * 64 * 128 + 3 * 64
    assert flops % per_row == 0


def test_moe_bytes_match_the_roofline():
    nbytes, flops = bench.must_move("moe", 1, 0, bench.FLASH, "mxfp4", touched=6)
    assert abs(nbytes * 43 / 1e9 - 3.45) < 0.01  # routed experts, all 43 layers: 3.45 GB
    assert flops == 2 * 6 * 3 * 2048 * 4096
