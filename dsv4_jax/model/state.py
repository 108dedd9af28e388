"""The decode state of every layer kind, as typed pytrees (ARCHITECTURE.md §5.5, §10; SERVING.md §1).

``DecodeState.layers`` holds one registered dataclass per layer, by kind: ``SWAState``
(``window``), ``HCAState`` (+ ``cmp``, ``tail``) and ``CSAState`` (+ ``idx``, ``itail``).
Per layer, for a fixed number of sequence *slots* and a shared pool of *blocks*:

* ``window`` — the SWA ring of every layer: ``[slots, W, K]``; position p of the
  sequence in slot s lives in row ``p mod W``.
* ``cmp`` — compressed KV entries of CSA and HCA layers, paged:
  ``[blocks, block_tokens/m, K]``. Entry w of a sequence lives in block
  ``block_table[w·m // block_tokens]``, row ``w mod (block_tokens/m)``.
* ``idx`` — CSA indexer keys, paged the same way: ``[blocks, block_tokens/4, Di]``.
* ``tail`` / ``itail`` — compressor tails (``Tail``: fp32 ``k`` and ``g``, ``ape`` already
  added): per slot the projected kv and gate rows of the current partial block, and for
  overlap (CSA) compressors also the previous complete block: ``[slots, 2m or m, c·Dc]`` each.

An SWA snapshot store (``init_snapshots``) has the same types with the block-indexed fields
(``cmp``, ``idx``) left ``None``: only the slot-indexed parts are saved and restored.

One logical block covers ``block_tokens`` native positions in every layer, so one
block table per sequence addresses every pool (SERVING.md fact 2). The block ids and
slots are the engine's; this module only knows shapes, layouts and formats.

Storage formats (``KVFormat``): main rows ``dense`` (the cache dtype, bf16 by default,
as the reference stores them) or ``fp8`` (584 B/row at K=512: e4m3 nope dims + bf16
RoPE dims + UE8M0 scales); indexer keys ``dense``, ``fp8`` (132 B) or ``fp4`` (68 B).
The codecs live in ``pallas_kernels.kv_format`` beside the kernels that read them.
At rest the state holds bf16 / e4m3 leaves as their bits (u16 / u8) so that a step's
writes stay in place (see "storage" below); ``take_rows`` returns the float view.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dsv4_jax.config import Config
from pallas_kernels import kv_format

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class KVFormat:
    """How rows are stored: ``main`` in {dense, fp8}, ``index`` in {dense, fp8, fp4}."""

    main: str = "dense"
    index: str = "dense"

    def __post_init__(self):
        if self.main not in ("dense", "fp8"):
            raise ValueError(f"KVFormat.main: expected 'dense' or 'fp8', got {self.main!r}")
        if self.index not in ("dense", "fp8", "fp4"):
            raise ValueError(f"KVFormat.index: expected 'dense', 'fp8' or 'fp4', got {self.index!r}")

    @classmethod
    def parse(cls, name: str) -> KVFormat:
        """``bf16`` | ``fp8`` (FP8 main + FP8 indexer) | ``fp8-fp4`` (FP8 main + FP4 indexer)."""
        table = {"bf16": cls(), "dense": cls(), "fp8": cls("fp8", "fp8"), "fp8-fp4": cls("fp8", "fp4")}
        if name not in table:
            raise ValueError(f"kv format: unknown name {name!r}; known: {sorted(table)}")
        return table[name]


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Static sizes of the state: slots (sequences held at once) and the block pool."""

    num_slots: int
    num_blocks: int
    max_blocks_per_seq: int
    block_tokens: int = 256
    fmt: KVFormat = KVFormat()
    dtype: Any = jnp.bfloat16  # dense storage dtype
    mtp_layers: int = 0  # MTP blocks whose SWA windows the state holds (speculative decoding)

    def validate(self, cfg: Config) -> None:
        ratios = {r for r in cfg.compress_ratios if r}
        for r in ratios:
            if self.block_tokens % r:
                raise ValueError(f"block_tokens={self.block_tokens} must be a multiple of compress ratio {r}")
        for name in ("num_slots", "num_blocks", "max_blocks_per_seq", "block_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CacheConfig.{name} must be positive, got {getattr(self, name)}")

    @property
    def max_tokens_per_seq(self) -> int:
        return self.max_blocks_per_seq * self.block_tokens


class StepMeta(NamedTuple):
    """Per-step batch metadata, built by the runner as arrays (one transfer per step).

    ``slots`` i32[B]: state slot of each row. ``block_table`` i32[B, max_blocks]: block ids
    of each sequence (entries past its last block may hold anything). ``lengths`` i32[B]:
    valid tokens of this call per row; the rest of the T axis is padding and writes nothing.

    For a prefix-cache replay (the ``recompute`` SWA strategy, SERVING.md §1.6):
    ``state_start`` i32[B]: window and tail rows at positions below it do not exist (the
    slot is fresh, the replay starts there); ``cached_until`` i32[B]: compressed entries
    covering positions below it come from the shared cache and are never rewritten.
    ``None`` means 0 for every row (an ordinary sequence).

    For speculative decoding (docs/ENGINE.md "MTP"): ``commit`` i32[B]: only the first
    ``commit`` tokens of each row are known to be the sequence's; their window and tail rows
    are written. The rest (draft tokens under verification) are attended to inside the chunk
    and never enter the ring or a tail. ``None`` means ``lengths`` (every token commits).
    """

    slots: jax.Array
    block_table: jax.Array
    lengths: jax.Array
    state_start: jax.Array | None = None
    cached_until: jax.Array | None = None
    commit: jax.Array | None = None


# ----------------------------------------------------------------------------- typed state
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Tail:
    """A compressor's tail rows: projected kv ``k`` and gate logits ``g`` (``ape`` added),
    f32[slots, R, c·Dc] each; start of sequence: k = 0, g = −∞ (§5.5)."""

    k: jax.Array
    g: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SWAState:
    """An SWA-only layer: the window ring [slots, W, K] (a row store: array or ``Fp8Rows``)."""

    window: Any

    SLOT_FIELDS = ("window",)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class HCAState(SWAState):
    """An HCA layer: the ring, the paged compressed pool [blocks, block_tokens/m, K] and the
    compressor tail (``cmp`` is ``None`` in a snapshot store)."""

    cmp: Any = None
    tail: Tail | None = None

    SLOT_FIELDS = ("window", "tail")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class CSAState(HCAState):
    """A CSA layer: an HCA layer's parts plus the paged indexer keys [blocks, block_tokens/4, Di]
    and the indexer compressor's tail."""

    idx: Any = None
    itail: Tail | None = None

    SLOT_FIELDS = ("window", "tail", "itail")


LayerState = SWAState | HCAState | CSAState


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Every main layer's state, in layer order, then the MTP blocks' windows when the cache
    config holds them (``CacheConfig.mtp_layers``); or an SWA snapshot store of the same shape."""

    layers: list


# ----------------------------------------------------------------------------- rows
def _rope_dim(cfg: Config) -> int:
    return cfg.qk_rope_head_dim


def alloc_main(prefix: tuple[int, ...], cfg: Config, cc: CacheConfig, poison: bool):
    if cc.fmt.main == "fp8":
        return stored(
            kv_format.allocate_rows(prefix, "fp8_ds_mla", cfg.head_dim, _rope_dim(cfg), poison=poison)
        )
    fill = jnp.nan if poison else 0.0
    return stored(jnp.full(prefix + (cfg.head_dim,), fill, cc.dtype))


def alloc_index(prefix: tuple[int, ...], cfg: Config, cc: CacheConfig, poison: bool):
    if cc.fmt.index != "dense":
        return stored(
            kv_format.allocate_rows(prefix, f"indexer_{cc.fmt.index}", cfg.index_head_dim, poison=poison)
        )
    fill = jnp.nan if poison else 0.0
    return stored(jnp.full(prefix + (cfg.index_head_dim,), fill, cc.dtype))


def encode_main(rows: jax.Array, cfg: Config, cc: CacheConfig):
    if cc.fmt.main == "fp8":
        return kv_format.quantize_kv(rows, _rope_dim(cfg))
    return rows.astype(cc.dtype)


def encode_index(rows: jax.Array, cc: CacheConfig):
    if cc.fmt.index != "dense":
        return kv_format.quantize_indexer_keys(rows, cc.fmt.index)
    return rows.astype(cc.dtype)


def decode_main(rows, dtype) -> jax.Array:
    return kv_format.dequantize_kv(rows, dtype)


def decode_index(rows, dtype) -> jax.Array:
    return kv_format.dequantize_indexer_keys(rows, dtype)


# ----------------------------------------------------------------------------- storage
# At rest a row store holds bits, not floats: bf16 leaves as u16, e4m3 leaves as u8.
# Reason: XLA's CPU backend computes bf16 and fp8 in f32 ("float normalisation"), so a
# scatter into a bf16 / fp8 pool became convert(pool) → dynamic-update-slice → convert back
# plus a copy: every decode step read and rewrote every pool whole, 1.2 s per step at 16,384
# blocks (docs/PERF.md "Decode"). An integer scatter has nothing to convert and stays in
# place in the donated buffer. Bitcasting at each write does not do instead: the CPU backend
# materialises a whole-array bitcast-convert as a loop, i.e. a copy. Readers gather rows
# first and view only those as floats (``take_rows``).
_BITS = {jnp.dtype(jnp.bfloat16): jnp.uint16, jnp.dtype(jnp.float8_e4m3fn): jnp.uint8}


def stored(rows):
    """A row container (logical dtypes) → its at-rest form (bf16 / e4m3 leaves as bits)."""
    return jax.tree.map(lambda a: kv_format._view(a, _BITS.get(jnp.dtype(a.dtype), a.dtype)), rows)


# The inverse of ``stored`` (bitcasts only). Meant for a few gathered rows; on a whole pool the
# CPU backend copies it.
logical = kv_format.logical


def take_rows(store, idx: jax.Array):
    """Gather along the leading axis of every leaf of a row store (ids clamped in range);
    the gathered rows come back in their logical dtypes."""
    return logical(jax.tree.map(lambda a: jnp.take(a, idx, axis=0, mode="clip"), store))


def put_rows(store, idx: tuple[jax.Array, ...], rows):
    """Scatter ``rows`` (same container type, logical dtypes) at ``idx``; out-of-range
    indices are dropped. The scatter moves bits, in place.

    A scatter of a single row (batch-1 decode) would be simplified into a
    dynamic-update-slice, which XLA's CPU fusion may duplicate into the readers of the new
    pool, so that the old buffer must survive the update: a whole-pool copy. One extra
    dropped index keeps it a scatter."""
    want = logical(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), store))
    bits = stored(jax.tree.map(lambda w, r: r.astype(w.dtype), want, rows))
    lead = jax.tree.leaves(store)[0].shape[0]
    idx = tuple(
        jnp.concatenate([i.reshape(-1), jnp.full((1,), lead if k == 0 else 0, i.dtype)])
        for k, i in enumerate(jnp.broadcast_arrays(*idx))
    )
    n = idx[0].shape[0]

    def put(a, r):
        r = r.reshape(n - 1, *a.shape[len(idx) :])  # rows in index order
        r = jnp.concatenate([r, jnp.zeros((1, *r.shape[1:]), r.dtype)])  # the dropped one
        return a.at[idx].set(r, mode="drop")

    return jax.tree.map(put, store, bits)


# ----------------------------------------------------------------------------- state
def tail_rows(cfg: Config, ratio: int) -> int:
    """Tail rows a compressor keeps: previous + current block (overlap) or current block."""
    return 2 * ratio if ratio == cfg.compress_rate_csa else ratio


def init_state(cfg: Config, cc: CacheConfig, *, poison: bool = False) -> DecodeState:
    """An empty state for ``cfg`` (main layers). ``poison`` fills every row store with NaN so a
    read of anything not written by the sequence itself shows up in tests; tails start as
    k = 0, g = −∞ (the start-of-sequence value, §5.5) unless poisoned too.
    """
    cc.validate(cfg)
    layers: list[LayerState] = []
    for i in range(cfg.num_hidden_layers):
        window = alloc_main((cc.num_slots, cfg.sliding_window), cfg, cc, poison)
        kind = cfg.attn_kind(i)
        if kind == "swa":
            layers.append(SWAState(window))
            continue
        m = cfg.compress_ratio(i)
        cmp = alloc_main((cc.num_blocks, cc.block_tokens // m), cfg, cc, poison)
        tail = _tail(cc.num_slots, tail_rows(cfg, m), (2 if kind == "csa" else 1) * cfg.head_dim, poison)
        if kind == "hca":
            layers.append(HCAState(window, cmp, tail))
            continue
        idx = alloc_index((cc.num_blocks, cc.block_tokens // m), cfg, cc, poison)
        itail = _tail(cc.num_slots, tail_rows(cfg, m), 2 * cfg.index_head_dim, poison)
        layers.append(CSAState(window, cmp, tail, idx, itail))
    for _ in range(cc.mtp_layers):  # §7: the MTP block is SWA-only; its ring follows the main ones
        layers.append(SWAState(alloc_main((cc.num_slots, cfg.sliding_window), cfg, cc, poison)))
    return DecodeState(layers)


def init_snapshots(cfg: Config, cc: CacheConfig, num: int) -> DecodeState:
    """A store of ``num`` SWA snapshots: each holds one slot's windows and tails (every layer),
    as taken at a block boundary, for the ``full`` / ``checkpoint`` prefix strategies."""
    per_slot = init_state(cfg, dataclasses.replace(cc, num_slots=max(num, 1), num_blocks=1))
    return DecodeState([slot_parts(layer) for layer in per_slot.layers])


def slot_parts(layer: LayerState) -> LayerState:
    """A layer state with only its slot-indexed fields (the block-indexed pools dropped)."""
    return dataclasses.replace(
        layer, **{f.name: None for f in dataclasses.fields(layer) if f.name not in layer.SLOT_FIELDS}
    )


def copy_slot(dst: DecodeState, dst_index: jax.Array, src: DecodeState, src_index: jax.Array) -> DecodeState:
    """``dst[dst_index] = src[src_index]`` for the slot-indexed parts of every layer
    (state → snapshot store to save, store → state to restore)."""
    layers = []
    for d, s in zip(dst.layers, src.layers):
        moved = {
            key: put_rows(getattr(d, key), (dst_index[None],), take_rows(getattr(s, key), src_index[None]))
            for key in d.SLOT_FIELDS
        }
        layers.append(dataclasses.replace(d, **moved))
    return DecodeState(layers)


def _tail(slots: int, rows: int, chans: int, poison: bool) -> Tail:
    if poison:
        return Tail(
            jnp.full((slots, rows, chans), jnp.nan, F32), jnp.full((slots, rows, chans), jnp.nan, F32)
        )
    return Tail(jnp.zeros((slots, rows, chans), F32), jnp.full((slots, rows, chans), -jnp.inf, F32))


def state_axes(state) -> Any:
    """Logical axis names of every state leaf (for the sharding rules table)."""

    def axes(path, leaf):
        keys = [getattr(p, "name", getattr(p, "key", None)) for p in path]
        kind = next(k for k in keys if k in ("window", "cmp", "idx", "tail", "itail"))
        lead = {
            "window": ("kv_slot", "window"),
            "cmp": ("kv_block", "kv_entry"),
            "idx": ("kv_block", "kv_entry"),
            "tail": ("kv_slot", "tail_row"),
            "itail": ("kv_slot", "tail_row"),
        }[kind]
        return lead + ("kv_dim",) * (leaf.ndim - 2)

    return jax.tree_util.tree_map_with_path(axes, state)
