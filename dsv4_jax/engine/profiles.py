"""Engine configuration and named endpoint profiles (SERVING.md §2.3, §1.6; docs/PROFILES.md).

V4's savings are workload-dependent: short chat is bound by weights and MoE and wants small
chunks and cheap prefix hits, while 100K+ decode-heavy work is bound by KV capacity and
wants compact storage and SWA recompute. A profile is one frozen ``EngineConfig`` that fixes
the knobs that must agree between the engine and the model runner: block size, token budget
per step, batch, SWA strategy, snapshot interval, KV storage format, pool sizes.

``make_config(profile, swa_strategy=None, **overrides)`` is the single entry point (used by
``LLM`` and by ``add_cli_args`` / ``config_from_args`` for ``--profile``-style flags).
``plan_pools`` turns a config plus the per-unit byte costs of the state accounting into
pool sizes; it takes plain numbers so this module, like all of ``engine/`` except the
model runner, never imports jax.
"""

from __future__ import annotations

import argparse
import dataclasses

SWA_STRATEGIES = ("full", "checkpoint", "recompute")
KV_FORMATS = ("bf16", "fp8", "fp8-fp4")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    block_tokens: int = 256  # native positions per logical block (a multiple of every compress ratio)
    max_tokens_per_step: int = 4096  # token budget per step: prefill chunks + decodes
    max_batch: int = 64  # sequences per step (and running at once)
    max_model_len: int | None = None  # context limit; None: the checkpoint's max_position_embeddings
    swa_strategy: str = "checkpoint"  # full | checkpoint | recompute (SERVING.md §1.6)
    checkpoint_interval: int = 4096  # tokens between SWA snapshots for "checkpoint"
    kv_format: str | None = None  # bf16 | fp8 | fp8-fp4 (kv_cache.KVFormat.parse); None: follows QAT
    enable_prefix_cache: bool = True
    num_slots: int | None = None  # state slots; None: max_batch
    num_snapshots: int = 256  # SWA snapshot store entries (full / checkpoint)
    num_blocks: int | None = None  # pool blocks; None: as many as the KV budget holds (at most slots × max)
    kv_cache_bytes: int | None = None  # KV budget: blocks + slots + snapshots; None: from memory (kv_budget)
    gpu_memory_utilization: float = 0.9  # accelerators: share of device memory the runner may hold
    seed: int = 0  # draws the seeds of requests that gave none
    decode_lookahead: bool = True  # dispatch the next decode step before reading back this one (lookahead.py)
    # MTP speculative decoding (runner/speculative.py, docs/PROFILES.md "Draft depth"): drafts per
    # step at low load (0: off), full depth while at most ``spec_full_batch`` sequences run,
    # none from ``spec_off_batch`` on, fewer in between (``draft_depth``).
    speculative_tokens: int = 0
    spec_full_batch: int = 4
    spec_off_batch: int = 32

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"EngineConfig.{field}: {why} (got {getattr(self, field)!r})")

        for f in ("block_tokens", "max_tokens_per_step", "max_batch", "checkpoint_interval"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                bad(f, "must be a positive integer")
        if self.swa_strategy not in SWA_STRATEGIES:
            bad("swa_strategy", f"must be one of {SWA_STRATEGIES}")
        if self.kv_format is not None and self.kv_format not in KV_FORMATS:
            bad("kv_format", f"must be one of {KV_FORMATS} or None (follow the QAT mode)")
        if self.swa_strategy == "checkpoint" and self.checkpoint_interval % self.block_tokens:
            bad("checkpoint_interval", f"must be a multiple of block_tokens={self.block_tokens}")
        if self.num_snapshots < 0:
            bad("num_snapshots", "must be >= 0")
        if self.enable_prefix_cache and self.swa_strategy != "recompute" and self.num_snapshots == 0:
            bad("num_snapshots", f"swa_strategy={self.swa_strategy!r} keeps SWA snapshots; give it some")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            bad("gpu_memory_utilization", "must be in (0, 1]")
        if not isinstance(self.speculative_tokens, int) or not 0 <= self.speculative_tokens <= MAX_DRAFTS:
            bad("speculative_tokens", f"must be an integer in [0, {MAX_DRAFTS}]")
        if not 1 <= self.spec_full_batch < self.spec_off_batch:
            bad("spec_off_batch", f"must exceed spec_full_batch={self.spec_full_batch} >= 1")
        for f in ("max_model_len", "num_slots", "num_blocks", "kv_cache_bytes"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or v < 1):
                bad(f, "must be a positive integer or None")

    @property
    def snapshot_interval(self) -> int | None:
        """Positions between SWA snapshots: every block (full), every p tokens (checkpoint),
        none (recompute, or no prefix cache)."""
        if not self.enable_prefix_cache or self.swa_strategy == "recompute":
            return None
        return self.block_tokens if self.swa_strategy == "full" else self.checkpoint_interval

    def draft_depth(self, running: int) -> int:
        """Drafts per sequence for a step with ``running`` sequences (SERVING.md §2.3: SGLang
        turns MTP off at saturation). A draft is cheap while a step is bound by reading the
        weights, which a small batch is; as the batch fills the step turns compute-bound and a
        rejected draft costs as much as a real token. So: ``speculative_tokens`` up to
        ``spec_full_batch`` sequences, none from ``spec_off_batch``, and linearly fewer between."""
        k, lo, hi = self.speculative_tokens, self.spec_full_batch, self.spec_off_batch
        if running <= lo:
            return k
        if running >= hi:
            return 0
        return k * (hi - running) // (hi - lo)


MAX_DRAFTS = 7  # a verify row is at most 2·7 + 1 = 15 tokens: the 16-token chunk bucket

PROFILES: dict[str, EngineConfig] = {
    # Short contexts (<= 32K), interactive: small blocks so short shared prefixes still hit
    # (the minimum hit is one block), a small token budget so prefill chunks never stall
    # decodes for long, and full SWA snapshots per block (cheap at short context) so a hit
    # costs no recompute at all.
    "chat": EngineConfig(
        block_tokens=128,
        max_tokens_per_step=2048,
        max_batch=128,
        max_model_len=32768,
        swa_strategy="full",
        num_snapshots=512,
        # Latency first: three drafts (published acceptance plateaus near k = 3) while a step
        # holds up to 8 sequences, none from 64.
        speculative_tokens=3,
        spec_full_batch=8,
        spec_off_batch=64,
    ),
    # Mixed traffic up to 128K: snapshots every 4K tokens bound the replay on a hit to 4K
    # while storing 1/32 of what full SWA caching would.
    "balanced": EngineConfig(
        block_tokens=256,
        max_tokens_per_step=4096,
        max_batch=64,
        max_model_len=131072,
        swa_strategy="checkpoint",
        checkpoint_interval=4096,
        num_snapshots=256,
        speculative_tokens=2,
        spec_full_batch=4,
        spec_off_batch=32,
    ),
    # Decode-heavy 100K+ work (agents, coding, research): capacity first. No SWA storage at
    # all; a hit replays window × layers tokens (5,504 for Flash) over cached compressed
    # entries, exact, whatever the prefix length. Large chunks for 100K prompts; few
    # sequences, each with a long context.
    "long-context": EngineConfig(
        block_tokens=256,
        max_tokens_per_step=8192,
        max_batch=16,
        max_model_len=None,
        swa_strategy="recompute",
        num_snapshots=0,
        # Few, long sequences: one draft, off once half the batch runs.
        speculative_tokens=1,
        spec_full_batch=2,
        spec_off_batch=8,
    ),
}
DEFAULT_PROFILE = "balanced"


def make_config(profile: str | None = None, swa_strategy: str | None = None, **overrides) -> EngineConfig:
    """The named profile (default ``balanced``) with ``swa_strategy`` and field overrides applied."""
    name = DEFAULT_PROFILE if profile is None else profile
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; known: {sorted(PROFILES)}")
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown engine argument(s) {unknown}; EngineConfig fields: {sorted(fields)}")
    base = PROFILES[name]
    if swa_strategy is not None:
        overrides["swa_strategy"] = swa_strategy
        # A recompute profile keeps no snapshots; switching it to a snapshot strategy needs some.
        if swa_strategy != "recompute" and base.num_snapshots == 0 and "num_snapshots" not in overrides:
            overrides["num_snapshots"] = 256
    return dataclasses.replace(base, **overrides)


def resolve_kv_format(kv_format: str | None, qat: bool, allow_lossy_kv: bool = False) -> str:
    """The KV storage format to serve with, given the numerics mode (docs/SERVING.md "Numerics").

    With the reference's QAT rounding in the forward (``qat``, ARCHITECTURE.md §2, §11.2) every
    stored row is already on the storage grid: the nope dims of KV rows on FP8 with the codec's
    power-of-two scales, indexer keys on FP4 after the Hadamard. FP8 rows and FP4 indexer keys
    then store exactly what the model computed, so ``fp8-fp4`` is the default. Without QAT the
    model never rounds its rows, FP8 storage would round them, and answers change (docs/PERF.md
    "KV storage formats"): the default is ``bf16``, and an FP8 format needs ``allow_lossy_kv``.
    """
    if kv_format is None:
        return "fp8-fp4" if qat else "bf16"
    if kv_format not in KV_FORMATS:
        raise ValueError(f"kv_format must be one of {KV_FORMATS}, got {kv_format!r}")
    if not qat and kv_format != "bf16" and not allow_lossy_kv:
        raise ValueError(
            f"kv_format={kv_format!r} with qat=False: the model does not round its KV rows to FP8 / FP4 "
            f"without QAT, so storing them in {kv_format} changes answers (docs/PERF.md, 'KV storage "
            f"formats'). Serve with QAT on (the default for V4 checkpoints), use kv_format='bf16', or pass "
            f"allow_lossy_kv=True (--allow-lossy-kv) to accept the drift."
        )
    return kv_format


# ----------------------------------------------------------------------------- KV budget
HOST_KV_BYTES = 4 << 30  # CPU: the KV budget's ceiling (a laptop stays usable)
HOST_KV_SHARE = 8  # CPU: at most 1/8 of physical memory
TEMP_RESERVE_BYTES = 2 << 30  # accelerators: compiled-step temporaries (docs/PERF.md "Step memory")


def kv_budget(
    ec: EngineConfig,
    backend: str,
    *,
    host_total: int = 0,
    device_limit: int = 0,
    device_used: int = 0,
    temps: int = TEMP_RESERVE_BYTES,
):
    """``(bytes, why)``: one device's KV budget (pools, slots, tables and snapshots) when
    ``ec.kv_cache_bytes`` does not give one, like vLLM's ``--gpu-memory-utilization``.
    Accelerators: ``gpu_memory_utilization`` of the device's memory, less what the weights
    use (``device_used``) and the step temporaries (``temps``: the compiled steps' measured
    ``memory_analysis``, else ``TEMP_RESERVE_BYTES``; flat in ``max_model_len``:
    ``bench/step_memory.py``). CPU: a stated host budget for the whole process,
    ``min(HOST_KV_BYTES, host_total / HOST_KV_SHARE)``."""
    if ec.kv_cache_bytes is not None:
        return ec.kv_cache_bytes, "kv_cache_bytes"
    if backend == "cpu":
        b = min(HOST_KV_BYTES, host_total // HOST_KV_SHARE) if host_total else HOST_KV_BYTES
        return b, f"host budget min({HOST_KV_BYTES >> 30} GiB, RAM/{HOST_KV_SHARE})"
    free = int(ec.gpu_memory_utilization * device_limit) - device_used - temps
    return max(free, 0), (
        f"{ec.gpu_memory_utilization:.0%} of {device_limit / 2**30:.1f} GiB after {device_used / 2**30:.2f} GiB "
        f"of weights and {temps / 2**30:.2f} GiB of step temporaries"
    )


class PoolsDoNotFit(ValueError):
    """The KV budget cannot hold one sequence at ``max_model_len`` (``budget``: one device's)."""

    def __init__(self, message: str, budget: int):
        super().__init__(message)
        self.budget = budget


def snapshots_split(num_snapshots: int, shards: int) -> bool:
    """Whether the snapshot store is split over the sequence shards (it is when it divides
    evenly; otherwise every device keeps the whole store, and a copy still moves one slot)."""
    return shards > 1 and num_snapshots % shards == 0


@dataclasses.dataclass(frozen=True)
class PoolPlan:
    """Pool sizes for the model runner, and their bytes (``budget``: what sized them, if any).

    What the runner allocates for them (``memory.allocated`` checks it): ``num_blocks``
    pool blocks, ``num_slots`` slots of windows and tails plus a row of each penalty table,
    and a snapshot store of ``max(num_snapshots, 1)`` slot copies (one unused entry when the
    strategy keeps none), split over ``shards`` sequence shards (the store only when it
    divides evenly).
    """

    num_slots: int
    num_blocks: int
    num_snapshots: int
    max_blocks_per_seq: int
    max_model_len: int
    bytes_per_block: int
    bytes_per_slot: int
    budget: str = ""
    table_bytes_per_slot: int = 0
    shards: int = 1
    block_tokens: int = 256

    @property
    def snapshot_entries(self) -> int:
        return max(self.num_snapshots, 1)

    @property
    def total_bytes(self) -> int:
        """Bytes over all devices that hold a part (a replicated store counted once)."""
        return (
            self.num_blocks * self.bytes_per_block
            + self.num_slots * (self.bytes_per_slot + self.table_bytes_per_slot)
            + self.snapshot_entries * self.bytes_per_slot
        )

    @property
    def bytes_per_shard(self) -> int:
        """Bytes on one device of a sequence shard."""
        n = self.shards
        snaps = (
            self.snapshot_entries // n if snapshots_split(self.snapshot_entries, n) else self.snapshot_entries
        )
        return (
            self.num_blocks // n * self.bytes_per_block
            + self.num_slots // n * (self.bytes_per_slot + self.table_bytes_per_slot)
            + snaps * self.bytes_per_slot
        )

    def seqs_at(self, context: int) -> int:
        """Sequences of ``context`` tokens the pools and slots hold at once (blocks round up;
        each shard's blocks serve its own slots)."""
        need = cdiv(context, self.block_tokens)
        return self.shards * min(self.num_slots // self.shards, self.num_blocks // self.shards // need)


def plan_pools(
    ec: EngineConfig,
    bytes_per_token: float,
    bytes_per_slot: int,
    max_position_embeddings: int,
    shards: int = 1,
    budget: tuple[int, str] | None = None,
    table_bytes_per_slot: int = 0,
) -> PoolPlan:
    """Pool sizes for ``ec``. ``bytes_per_token`` / ``bytes_per_slot``: the state accounting's
    per-token cost of all compressed pools and fixed per-sequence cost (windows + tails), as
    ``kv_accounting.kv_bytes(cfg, fmt)`` gives them; a snapshot costs what a slot does, and a
    slot also holds ``table_bytes_per_slot`` of penalty tables. ``shards``: sequence shards of
    a data-parallel runner; slots are rounded up and blocks down to a multiple of it (each
    shard gets an equal part, and one sequence's blocks must fit in one part). Blocks:
    ``ec.num_blocks``, else as many as the budget holds (``ec.kv_cache_bytes`` over all shards,
    else ``budget``, ``kv_budget``'s answer for one device, which each shard gets), never more
    than every slot at ``max_model_len``; with neither, every slot at ``max_model_len``."""
    max_len = min(ec.max_model_len or max_position_embeddings, max_position_embeddings)
    max_blocks = cdiv(max_len, ec.block_tokens)
    max_len = min(max_len, max_blocks * ec.block_tokens)
    per_block = round(bytes_per_token * ec.block_tokens)
    slots = -(-(ec.num_slots or ec.max_batch) // shards) * shards
    snaps = ec.num_snapshots if ec.snapshot_interval else 0
    plan = PoolPlan(
        slots, 0, snaps, max_blocks, max_len, per_block, int(bytes_per_slot), "", table_bytes_per_slot, shards,
        ec.block_tokens,
    )  # fmt: skip
    why = ""
    if ec.num_blocks is not None:
        blocks = ec.num_blocks
    elif ec.kv_cache_bytes is not None or budget is not None:
        if ec.kv_cache_bytes is not None:
            per_shard, why = ec.kv_cache_bytes // shards, "kv_cache_bytes"
        else:
            per_shard, why = budget
        left = per_shard - plan.bytes_per_shard  # slots, tables and the store (no blocks yet)
        blocks = min(left // per_block if left > 0 else 0, slots // shards * max_blocks) * shards
        if blocks // shards < max_blocks:
            per = "" if shards == 1 else f" on each of {shards} sequence shards"
            raise PoolsDoNotFit(
                f"the KV budget of {per_shard:,} B{per} ({why}) leaves {max(blocks // shards, 0)} blocks after "
                f"{slots // shards} slots ({bytes_per_slot + table_bytes_per_slot:,} B each with penalty tables) "
                f"and {snaps} snapshots of {bytes_per_slot:,} B; one sequence at max_model_len={max_len} needs "
                f"{max_blocks} blocks of {per_block:,} B. Raise kv_cache_bytes (--kv-cache-bytes) or "
                f"lower max_model_len / num_slots / num_snapshots.",
                per_shard,
            )
        why = f"{per_shard / 2**30:.2f} GiB per device: {why}"
    else:
        blocks = slots * max_blocks
    if blocks % shards:
        raise ValueError(
            f"num_blocks={blocks} must be a multiple of the {shards} sequence shards of the mesh"
        )
    return dataclasses.replace(plan, num_blocks=blocks, budget=why)


# ----------------------------------------------------------------------------- CLI flags
def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """``--profile``, ``--swa-strategy`` and the main overrides, for scripts and the server."""
    g = parser.add_argument_group("engine")
    g.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default=None,
        help=f"endpoint profile (default {DEFAULT_PROFILE}); docs/PROFILES.md says which to use",
    )
    g.add_argument(
        "--swa-strategy", choices=SWA_STRATEGIES, default=None, help="override the profile's SWA strategy"
    )
    for name, typ in (
        ("block-tokens", int),
        ("max-tokens-per-step", int),
        ("max-batch", int),
        ("max-model-len", int),
        ("checkpoint-interval", int),
        ("num-snapshots", int),
        ("num-blocks", int),
        ("num-slots", int),
        ("kv-cache-bytes", int),
        ("gpu-memory-utilization", float),
        ("kv-format", str),
    ):
        g.add_argument(f"--{name}", type=typ, default=None)
    g.add_argument(
        "--speculative-tokens",
        type=int,
        default=None,
        help="MTP drafts per step at low load, 0 = off (default: the profile's; docs/PROFILES.md)",
    )
    g.add_argument(
        "--spec-full-batch", type=int, default=None, help="running sequences up to which all drafts run"
    )
    g.add_argument(
        "--spec-off-batch", type=int, default=None, help="running sequences from which no draft runs"
    )
    g.add_argument("--no-prefix-cache", action="store_true")
    g.add_argument(
        "--no-decode-lookahead",
        action="store_true",
        help="read back each step's tokens before dispatching the next (engine/lookahead.py)",
    )


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    keys = (
        "block_tokens",
        "max_tokens_per_step",
        "max_batch",
        "max_model_len",
        "checkpoint_interval",
        "num_snapshots",
        "num_blocks",
        "num_slots",
        "kv_cache_bytes",
        "gpu_memory_utilization",
        "kv_format",
        "speculative_tokens",
        "spec_full_batch",
        "spec_off_batch",
    )
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if getattr(args, "no_prefix_cache", False):
        overrides["enable_prefix_cache"] = False
    if getattr(args, "no_decode_lookahead", False):
        overrides["decode_lookahead"] = False
    return make_config(args.profile, args.swa_strategy, **overrides)


from dsv4_jax.intmath import cdiv
