"""The shape of the code (docs/CODE_MAP.md): imports flow one way (scripts → server → engine →
model → pallas_kernels), the host engine never loads jax, and ``dsv4_jax.model`` exports the
model's NNX modules. Scripts are checked in tests/server/test_scripts.py."""

from __future__ import annotations

import ast
import collections
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _module(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _area(module: str) -> str | None:
    """The folder a module belongs to: ``model``, ``engine``, ``engine.runner``, ..."""
    parts = module.split(".")
    if parts[0] == "pallas_kernels":
        return "pallas_kernels"
    if parts[0] != "dsv4_jax" or len(parts) < 2:
        return None
    if parts[1] == "engine" and len(parts) > 2 and parts[2] == "runner":
        return "engine.runner"
    return parts[1]


def _imports(path: pathlib.Path) -> set[str]:
    """Every module an import statement in the file names (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def _graph() -> dict[str, set[str]]:
    edges = collections.defaultdict(set)
    files = [*ROOT.glob("dsv4_jax/**/*.py"), *ROOT.glob("pallas_kernels/**/*.py")]
    for path in files:
        here = _area(_module(path))
        for name in _imports(path):
            there = _area(name)
            if there and there != here:
                edges[here].add(there)
    return edges


# What each folder may import (besides itself and the leaf modules config / intmath / quant).
ALLOWED = {
    "pallas_kernels": set(),
    "model": {"pallas_kernels"},
    "parallel": {"model", "pallas_kernels"},
    "engine": set(),
    "engine.runner": {"engine", "model", "parallel", "pallas_kernels"},
}
LEAVES = {"config", "intmath", "quant"}


def test_imports_flow_one_way():
    edges = _graph()
    for area, allowed in ALLOWED.items():
        extra = edges.get(area, set()) - allowed - LEAVES
        assert not extra, f"{area}/ imports {sorted(extra)}"
    assert "pallas_kernels" not in edges  # the kernel package imports only jax and numpy
    for area in ("server", "engine", "model", "parallel"):
        assert "bench" not in edges.get(area, set()), area
    # no cycle between folders
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in edges.get(node, ()):
            assert state.get(nxt) != 1, f"import cycle: {' → '.join([*path, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in list(edges):
        if node not in state:
            visit(node, [node])


def test_host_engine_never_loads_jax():
    """Importing every host module of the engine (all of ``engine/`` but ``runner/``) leaves jax unloaded."""
    mods = [_module(p) for p in sorted((ROOT / "dsv4_jax" / "engine").glob("*.py"))]
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in mods)
        + "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'jaxlib'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    assert len(mods) >= 9  # the scan saw the engine's files


def test_model_exports_its_nnx_modules():
    from flax import nnx

    import dsv4_jax.model as m

    for name in (
        "DeepseekV4",
        "Block",
        "MTPBlock",
        "Attention",
        "Compressor",
        "Indexer",
        "MoE",
        "MHC",
        "Embedding",
    ):
        assert issubclass(getattr(m, name), nnx.Module), name
