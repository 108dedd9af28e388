"""Which native tensors a config implies, in which format, and the checks against a directory.

The param tree mirrors the native names (``params.py``), so each leaf maps to
one checkpoint tensor, except the routed experts, which are stacked: the leaf
``layers.{i}.ffn.experts.w1.weight`` [E, I, D] gathers ``layers.{i}.ffn.experts.{j}.w1.weight``
for j < E. Quantized weights add a sibling ``.scale`` tensor (ARCHITECTURE.md §8).

Storage format per leaf, from the config (``quantization_config`` / ``expert_dtype``):

* ``fp8``: the linears the published checkpoint stores as F8_E4M3 + F8_E8M0 block
  scales (attention ``wq_a wq_b wkv wo_a wo_b``, ``indexer.wq_b``, shared experts,
  MTP ``e_proj h_proj``), when the config declares ``quant_method: fp8``;
* ``mxfp4``: routed experts with ``expert_dtype: fp4`` (I8 packed + E8M0 per 32);
  ``fp8`` for ``expert_dtype: fp8``;
* ``float``: everything else (BF16 / F32 / F16 accepted), and every linear of an
  unquantized config;
* ``index``: ``ffn.gate.tid2eid`` (I64 in the checkpoint, I32 accepted).

``validate`` checks the whole directory against this before a byte of data is
read, so a mismatch never ends in a partial load.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp

from dsv4_jax.checkpoint import placement
from dsv4_jax.checkpoint.errors import CheckpointError
from dsv4_jax.checkpoint.safetensors_io import SafetensorsCheckpoint
from dsv4_jax.config import Config
from dsv4_jax.model.params import ArrayInfo, param_infos
from dsv4_jax.quant import MXFP4_BLOCK

FLOAT_DTYPES = ("BF16", "F32", "F16")
INDEX_DTYPES = ("I64", "I32")
_EXPERTS = re.compile(r"^(?P<pre>.*\.ffn\.experts)\.(?P<w>w[123])\.weight$")
_FP8_LINEARS = re.compile(
    r"(^|\.)(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|ffn\.shared_experts\.w[123]|e_proj|h_proj)\.weight$"
)
_LAYER = re.compile(r"^(layers|mtp)\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """One param-tree leaf and the native tensors it is read from.

    ``sources``: one weight name, or E names (one per expert) stacked on axis 0.
    ``fmt``: "fp8" | "mxfp4" | "float" | "index". ``block``: the scale block.
    """

    name: str
    info: ArrayInfo
    fmt: str
    block: tuple[int, int] | None
    sources: tuple[str, ...]

    @property
    def stacked(self) -> bool:
        return _EXPERTS.match(self.name) is not None

    @property
    def source_shape(self) -> tuple[int, ...]:
        """Logical (dequantized) shape of one source tensor."""
        return self.info.shape[1:] if self.stacked else self.info.shape

    @property
    def quantized(self) -> bool:
        return self.fmt in ("fp8", "mxfp4")

    def data_shape(self) -> tuple[int, ...]:
        o, i = self.source_shape
        return (o, i // 2) if self.fmt == "mxfp4" else (o, i)

    def scale_shape(self) -> tuple[int, ...]:
        (o, i), (bo, bi) = self.source_shape, self.block
        return (math.ceil(o / bo), math.ceil(i / bi))

    def tensors(self) -> list[str]:
        """Every native tensor name this leaf reads (weights, then scales)."""
        out = list(self.sources)
        if self.quantized:
            out += [scale_name(s) for s in self.sources]
        return out


def scale_name(weight_name: str) -> str:
    return weight_name[: -len("weight")] + "scale"


def leaf_format(name: str, cfg: Config) -> tuple[str, tuple[int, int] | None]:
    """Storage format and scale block of the leaf named ``name`` under ``cfg``."""
    fp8_block = tuple(cfg.weight_block_size)
    if name.endswith(".tid2eid"):
        return "index", None
    if _EXPERTS.match(name):
        kind = cfg.expert_dtype or ("fp8" if cfg.weight_dtype == "fp8" else "bf16")
        if kind == "fp4":
            return "mxfp4", MXFP4_BLOCK
        return ("fp8", fp8_block) if kind == "fp8" else ("float", None)
    if _FP8_LINEARS.search(name) and cfg.weight_dtype == "fp8":
        return "fp8", fp8_block
    return "float", None


_F32_NATIVE = re.compile(r"(hc_(attn|ffn|head)_(fn|base|scale)|attn_sink|\.ape|\.gate\.bias)$")


def native_float_dtype(name: str) -> str:
    """The dtype the published checkpoint stores an unquantized tensor in (§8 table)."""
    return "F32" if _F32_NATIVE.search(name) else "BF16"


def leaf_specs(names: list[str], infos: list[ArrayInfo], cfg: Config) -> list[LeafSpec]:
    """``LeafSpec`` for parallel lists of native leaf names and ``ArrayInfo``s."""
    specs = []
    for name, info in zip(names, infos):
        fmt, block = leaf_format(name, cfg)
        m = _EXPERTS.match(name)
        if m:
            sources = tuple(f"{m['pre']}.{j}.{m['w']}.weight" for j in range(info.shape[0]))
        else:
            sources = (name,)
        spec = LeafSpec(name, info, fmt, block, sources)
        if spec.fmt == "mxfp4" and spec.source_shape[1] % 2:
            raise CheckpointError(
                f"config.json: {name} has an odd input dim {spec.source_shape[1]}; FP4 packs pairs"
            )
        specs.append(spec)
    return specs


def chunk_specs(cfg: Config, key: str) -> list[LeafSpec]:
    """The ``LeafSpec``s of one chunk (``placement.chunk_keys``), in tree order."""
    infos = param_infos(cfg, jnp.float32, include_mtp=True)
    names = placement.get_chunk(placement.leaf_names(infos), key)
    sub = placement.get_chunk(infos, key)
    return leaf_specs(
        jax.tree.leaves(names), jax.tree.leaves(sub, is_leaf=lambda x: isinstance(x, ArrayInfo)), cfg
    )


# ----------------------------------------------------------------------------- validation
def _hint(name: str, cfg: Config, missing: bool) -> str:
    """Which config.json field decides whether ``name`` should exist, for error messages."""
    m = _LAYER.match(name)
    if m is None:
        return ""
    kind, idx = m.group(1), int(m.group(2))
    if kind == "layers" and idx >= cfg.num_hidden_layers:
        return f"config.json has num_hidden_layers={cfg.num_hidden_layers}"
    if kind == "mtp" and idx >= cfg.num_nextn_predict_layers:
        return f"config.json has num_nextn_predict_layers={cfg.num_nextn_predict_layers}"
    layer = idx if kind == "layers" else cfg.num_hidden_layers + idx
    e = re.search(r"\.experts\.(\d+)\.", name)
    if e and int(e.group(1)) >= cfg.n_routed_experts:
        return f"config.json has n_routed_experts={cfg.n_routed_experts}"
    if ".compressor." in name or ".indexer." in name:
        return f"config.json has compress_ratios[{layer}]={cfg.compress_ratios[layer]} ({cfg.attn_kind(layer)} layer)"
    if ".tid2eid" in name or ".gate.bias" in name:
        return f"config.json has num_hash_layers={cfg.num_hash_layers} (layer {layer} is {cfg.mlp_kind(layer)}-routed)"
    if name.endswith(".scale"):
        if missing:
            return "config.json declares this weight quantized (quantization_config / expert_dtype)"
        return "config.json declares this weight unquantized (quantization_config / expert_dtype)"
    return ""


def _with_hint(msg: str, name: str, cfg: Config, missing: bool) -> str:
    h = _hint(name, cfg, missing)
    return f"{msg} ({h})" if h else msg


def _check_entry(
    ckpt: SafetensorsCheckpoint, name: str, dtypes: tuple[str, ...], shape: tuple[int, ...], why: str
) -> None:
    e = ckpt.entry(name)
    if e.dtype not in dtypes:
        raise CheckpointError(
            f"{e.filename}: tensor {name}: dtype {e.dtype}, expected {' or '.join(dtypes)} ({why})"
        )
    if tuple(e.shape) != tuple(shape):
        raise CheckpointError(
            f"{e.filename}: tensor {name}: shape {list(e.shape)}, expected {list(shape)} "
            f"(the shape config.json implies; {why}): the config does not match the weights"
        )


def _check_leaf(ckpt: SafetensorsCheckpoint, spec: LeafSpec, cfg: Config) -> None:
    if spec.fmt == "float":
        for s in spec.sources:
            _check_entry(ckpt, s, FLOAT_DTYPES, spec.source_shape, "an unquantized float tensor")
    elif spec.fmt == "index":
        _check_entry(ckpt, spec.sources[0], INDEX_DTYPES, spec.source_shape, "the hash-routing table")
    else:
        wdt = "F8_E4M3" if spec.fmt == "fp8" else "I8"
        why = (
            f"FP8 e4m3 with {spec.block[0]}x{spec.block[1]} UE8M0 block scales"
            if spec.fmt == "fp8"
            else "MXFP4: two e2m1 per byte, one UE8M0 scale per 32 inputs"
        )
        for s in spec.sources:
            _check_entry(ckpt, s, (wdt, "U8") if spec.fmt == "mxfp4" else (wdt,), spec.data_shape(), why)
            _check_entry(ckpt, scale_name(s), ("F8_E8M0",), spec.scale_shape(), why)


def validate(ckpt: SafetensorsCheckpoint, specs: list[LeafSpec], cfg: Config) -> None:
    """Raise ``CheckpointError`` unless the directory holds exactly the tensors ``specs`` need.

    Order of checks: missing tensors, unexpected tensors, then dtype and shape of each.
    """
    expected: set[str] = set()
    for spec in specs:
        expected.update(spec.tensors())
    present = set(ckpt.entries)
    missing = sorted(expected - present)
    if missing:
        first = missing[0]
        more = f" and {len(missing) - 1} more (e.g. {', '.join(missing[1:4])})" if len(missing) > 1 else ""
        raise CheckpointError(
            _with_hint(f"{ckpt.directory}: missing tensor {first}{more}: not in any shard", first, cfg, True)
        )
    unexpected = sorted(present - expected)
    if unexpected:
        first = unexpected[0]
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise CheckpointError(
            _with_hint(f"{ckpt.entry(first).filename}: unexpected tensor {first}{more}", first, cfg, False)
        )
    for spec in specs:
        _check_leaf(ckpt, spec, cfg)
