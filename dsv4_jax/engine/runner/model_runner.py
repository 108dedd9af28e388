"""The device side of the engine: turns a ``StepPlan`` into jitted steps over the decode state.

The only engine module that imports jax. It owns, on device:

* the decode state (``kv_cache.init_state``: rings, tails, paged pools), donated to
  every step so XLA updates it in place;
* the SWA snapshot store (``kv_cache.init_snapshots``) for the ``full`` / ``checkpoint``
  prefix strategies;
* the penalty tables (per-slot output counts and prompt masks) the sampler reads.

One ``execute`` call: restore snapshots → reset / seed penalty tables for fresh works →
run the decode rows (T = 1) and the prefill chunks, grouped by length bucket (T = a power of
two ≥ 8, so a step's padding stays below twice its tokens), as one jitted call per group,
each padded to a power-of-two batch → save snapshots → one device-to-host copy per group of
the sampled tokens. Shapes come from a small set of buckets (``step_shapes``, which
``precompile`` compiles ahead of traffic), so steady-state serving does not recompile;
``compilations`` counts traces so a test can check that.

Host-side metadata (tokens, positions, slots, block tables, lengths, sampling arrays) is
built as numpy arrays and goes to the device once per call.

Decode lookahead (``lookahead=True``, ``lookahead.py``): before reading back a step's
tokens, ``execute`` dispatches the next decode step of the same sequences with those tokens
still on device, so the device runs it while the host reads back, post-processes and
schedules. A later ``execute`` takes a row for the decode work that is exactly the
continuation it assumed; other works run as usual. ``ahead.used`` / ``ahead.dropped`` count
rows taken and rows whose sequence ended first.

On a mesh (``mesh=``, e.g. ``mesh.parse_mesh("data=1,expert=8,tensor=1")``) the params,
state, snapshots and penalty tables are laid out by the rules table and each step's rows
are ordered by sequence shard (``runner.layout.RunnerLayout``); the model runs with
``ModelOptions(layout=...)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4_jax.config import Config
from dsv4_jax.engine.runner import sampling, speculative, steps
from dsv4_jax.engine.runner.layout import TABLE_DTYPES, RunnerLayout, tree_bytes
from dsv4_jax.engine.runner.lookahead import Lookahead, continuation
from dsv4_jax.engine.runner_api import RunnerLimits, SampleOut, SeqWork, StepPlan
from dsv4_jax.engine.sampling_params import SamplingParams
from dsv4_jax.intmath import next_pow2
from dsv4_jax.model import state as kvc
from dsv4_jax.model.accounting import kv_bytes, mtp_window_bytes
from dsv4_jax.model.transformer import ModelOptions
from dsv4_jax.parallel.rules import DEFAULT_RULES, Layout


class JaxModelRunner:
    """Implements ``runner_api.ModelRunner`` for one model replica (one device, or a mesh).

    ``mesh``: run split over it by ``rules`` (``sharding.DEFAULT_RULES``). Slots and blocks
    are split evenly over the sequence shards of the mesh; a work's blocks must come from its
    slot's shard (``slot_shard`` / ``shard_blocks`` tell the block manager which).
    """

    def __init__(
        self,
        cfg: Config,
        params,
        *,
        num_slots: int,
        num_blocks: int,
        block_tokens: int,
        max_blocks_per_seq: int,
        num_snapshots: int,
        max_batch: int,
        max_tokens_per_step: int,
        kv_format: str = "bf16",
        eos_token_id: int | None = None,
        opts: ModelOptions = ModelOptions(),
        dtype=jnp.bfloat16,
        mesh: jax.sharding.Mesh | None = None,
        rules: Mapping = DEFAULT_RULES,
        lookahead: bool = True,
        speculative_tokens: int = 0,
    ):
        if speculative_tokens < 0:
            raise ValueError(f"speculative_tokens must be >= 0, got {speculative_tokens}")
        if speculative_tokens and not cfg.num_nextn_predict_layers:
            raise ValueError(
                f"speculative_tokens={speculative_tokens} needs the checkpoint's MTP block, but its "
                "config has num_nextn_predict_layers=0"
            )
        if speculative_tokens and "mtp" not in params:
            raise ValueError(f"speculative_tokens={speculative_tokens}: the params hold no MTP block ('mtp')")
        layout = None if mesh is None else Layout.create(mesh, rules)
        opts = dataclasses.replace(opts, layout=layout)
        self.cfg, self.opts = cfg, opts
        self.cc = kvc.CacheConfig(
            num_slots=num_slots,
            num_blocks=num_blocks,
            max_blocks_per_seq=max_blocks_per_seq,
            block_tokens=block_tokens,
            fmt=kvc.KVFormat.parse(kv_format),
            dtype=dtype,
            mtp_layers=1 if speculative_tokens else 0,
        )
        self.cc.validate(cfg)
        self.placement = RunnerLayout(cfg, self.cc, layout, num_snapshots)
        # Held as a pure dict (values only): a tree of nnx Variables flattens in Python at every
        # call of the jitted step (~0.5 ms a step on the mid model); the graphdef restores the
        # modules and their metadata inside the trace (``transformer.as_model``).
        self.params = nnx.to_pure_dict(self.placement.place_params(params))
        acc = kv_bytes(cfg, self.cc.fmt, jnp.dtype(dtype).itemsize)
        self.limits = RunnerLimits(
            num_slots=num_slots,
            num_blocks=num_blocks,
            block_tokens=block_tokens,
            max_blocks_per_seq=max_blocks_per_seq,
            num_snapshots=num_snapshots,
            max_batch=max_batch,
            max_tokens_per_step=max_tokens_per_step,
            window=cfg.sliding_window,
            num_layers=cfg.num_hidden_layers,
            vocab_size=cfg.vocab_size,
            eos_token_id=cfg.eos_token_id if eos_token_id is None else eos_token_id,
            bytes_per_block=round(acc.bytes_per_token * block_tokens),
            bytes_per_slot=acc.fixed_bytes_per_seq
            + (mtp_window_bytes(cfg, self.cc.fmt, jnp.dtype(dtype).itemsize) if speculative_tokens else 0),
            num_seq_shards=self.placement.shards,
            max_draft_tokens=speculative_tokens,
        )
        self.state = self.placement.init_state()
        self.snapshots = self.placement.init_snapshots()
        self.counts, self.prompt_mask = (self.placement.init_table(d) for d in TABLE_DTYPES)
        self._counted: dict[int, int] = {}  # seq_id -> last position whose token is in the tables
        self.compilations = 0
        self.lookahead = lookahead and not speculative_tokens  # a verify step's continuation is not known
        self.ahead = Lookahead()  # dispatched lookahead rows not taken yet (and used / dropped counts)
        self._kw = dict(cfg=cfg, opts=opts, cache=self.cc, placement=self.placement)
        self._step = jax.jit(self._step_impl, donate_argnums=(1, 2, 3), static_argnames=("num_logprobs",))
        # Split at the logits (runner/steps.py): grammar masks are filled while the forward runs
        self._logits = jax.jit(self._logits_impl, donate_argnums=(1,))
        self._plp = jax.jit(self._plp_impl, donate_argnums=(1,), static_argnames=("num_top",))
        self._sample = jax.jit(self._sample_impl, donate_argnums=(0, 1), static_argnames=("num_logprobs",))
        self._spec = jax.jit(self._spec_impl, donate_argnums=(1, 2, 3), static_argnames=("num_logprobs", "k"))
        # i32[b,1]: the sampled token of row take[i] of a step where mine[i], else base[i] (one dispatch)
        self._pick = jax.jit(
            lambda sampled, take, mine, base: jnp.where(mine[:, None], sampled[take][:, None], base)
        )
        self._restore, self._save = self.placement.restore_fn, self.placement.save_fn
        # (cons, allow) -> None, filling grammar bitmasks; None: the constraints' own matchers.
        # Multi-host lockstep (engine/runner/lockstep.py) publishes them from process 0 and reads them elsewhere.
        self.fill_masks = None
        self._mark = self.placement.table_fn(sampling.update_counts)
        self._reset = self.placement.table_fn(sampling.reset_rows)

    @property
    def num_seq_shards(self) -> int:
        """Sequence shards of the mesh (1 without one): slots and blocks split evenly over them."""
        return self.placement.shards

    def slot_shard(self, slot: int) -> int:
        """The sequence shard a slot lives on (0 without a mesh)."""
        return self.placement.shard_of_slot(slot)

    def shard_blocks(self, shard: int) -> range:
        """Block ids a sequence in ``shard``'s slots may use."""
        n = self.placement.blocks_per_shard
        return range(shard * n, (shard + 1) * n)

    # ------------------------------------------------------------------ device functions
    def _step_impl(self, params, state, counts, pmask, *batch, num_logprobs):
        self.compilations += 1  # runs at trace time only
        return steps.fused(params, state, counts, pmask, *batch, num_logprobs=num_logprobs, **self._kw)

    def _logits_impl(self, params, state, tokens, positions, meta):
        self.compilations += 1
        return steps.last_logits(params, state, tokens, positions, meta, **self._kw)

    def _plp_impl(self, params, state, tokens, positions, meta, next_token, *, num_top):
        self.compilations += 1
        return steps.logits_and_prompt_logprobs(
            params, state, tokens, positions, meta, next_token, num_top=num_top, **self._kw
        )

    def _sample_impl(self, counts, pmask, logits, slots, sa, sample_mask, *, num_logprobs):
        self.compilations += 1
        return steps.sample_rows(
            counts, pmask, logits, slots, sa, sample_mask,
            placement=self.placement, layout=self.opts.layout, num_logprobs=num_logprobs,
        )  # fmt: skip

    def _spec_impl(self, params, state, counts, pmask, *batch, num_logprobs, k):
        self.compilations += 1  # runs at trace time only
        return speculative.step(
            params, state, counts, pmask, *batch,
            cfg=self.cfg, opts=self.opts, cache=self.cc, placement=self.placement,
            num_logprobs=num_logprobs, k_verify=k, k_draft=k,
        )  # fmt: skip

    # ------------------------------------------------------------------ host orchestration
    def execute(self, plan: StepPlan) -> dict[int, SampleOut]:
        works = plan.works
        if len(works) > self.limits.max_batch:
            raise ValueError(f"step plan has {len(works)} sequences; max_batch is {self.limits.max_batch}")
        if sum(len(w.tokens) for w in works) > self.limits.max_tokens_per_step:
            raise ValueError(f"step plan exceeds max_tokens_per_step={self.limits.max_tokens_per_step}")
        used, rest = self.ahead.take(works)
        for w in rest:
            if w.restore_snapshot is not None:
                self.state = self._restore(
                    self.state, jnp.int32(w.slot), self.snapshots, jnp.int32(w.restore_snapshot)
                )
        self._update_penalty_tables(rest)
        results = []
        for res in {id(p.res): p.res for _, p in used}.values():  # rows computed by earlier lookahead steps
            mine = [(w, p.row) for w, p in used if p.res is res]
            results.append(([w for w, _ in mine], ([r for _, r in mine], res, None)))
        # decode rows (1), prefill chunks by length bucket; chunks with prompt logprobs apart
        buckets: dict[tuple[int, bool], list[SeqWork]] = {}
        for w in rest:
            t = 1 if len(w.tokens) == 1 else next_pow2(len(w.tokens), 8)
            buckets.setdefault((t, _scores_prompt(w)), []).append(w)
        for _, group in sorted(buckets.items()):
            results.append((group, self._run_group(group)))
        for w in works:  # after every row of the slot is written (a lookahead row: by an earlier step)
            if w.save_snapshot is not None:
                self.snapshots = self._save(
                    self.snapshots, jnp.int32(w.save_snapshot), self.state, jnp.int32(w.slot)
                )
        if self.lookahead:
            self._dispatch_ahead(results)
        out: dict[int, SampleOut] = {}
        for group, (rows, res, plp) in results:
            res, plp = jax.device_get((res, plp))  # one transfer per group
            for i, w in zip(rows, group):
                if plp is not None and w.sampling.prompt_logprobs is not None:
                    entries = _prompt_logprobs(w, plp, i)
                    if entries is not None and not w.sample:
                        out[w.seq_id] = SampleOut(token=-1, prompt_logprobs=entries)
                if not w.sample:
                    continue
                if isinstance(res, speculative.SpecResult):
                    a = int(res.accepted[i])
                    emitted = [_sample_out(w, res, (i, j)) for j in range(a + 1)]
                    out[w.seq_id] = dataclasses.replace(
                        emitted[-1],
                        accepted=emitted[:-1],
                        drafts=[int(d) for d in res.drafts[i, : w.want_drafts]],
                    )
                    self._counted[w.seq_id] = w.start + w.num_known + a
                    continue
                self._counted[w.seq_id] = w.start + len(w.tokens)
                out[w.seq_id] = _sample_out(w, res, i)
                if plp is not None and w.sampling.prompt_logprobs is not None:
                    out[w.seq_id].prompt_logprobs = _prompt_logprobs(w, plp, i)
        self.ahead.expect({sid: o.token for sid, o in out.items() if o.token >= 0})
        return out

    def _dispatch_ahead(self, results) -> None:
        """Dispatch the decode step that continues this step's decode works (``lookahead.
        continuation`` says which qualify), fed by their sampled tokens where they lie, on device."""
        bt = self.limits.block_tokens
        src = [
            (w, rows_res[1], row)
            for group, rows_res in results
            for w, row in zip(group, rows_res[0])
            if len(w.tokens) == 1
        ]
        nxt = [(continuation(w, bt), res, row) for w, res, row in src]
        nxt = [(c, res, row) for c, res, row in nxt if c is not None]
        if not nxt:
            return
        works = [c for c, _, _ in nxt]
        rows, b = self.placement.arrange(works, self.limits.max_batch)
        tokens = np.zeros((b, 1), np.int32)
        for res in {id(r): r for _, r, _ in nxt}.values():  # usually one source step
            take = np.zeros(b, np.int32)
            mine = np.zeros(b, bool)
            for i, (_, r, row) in zip(rows, nxt):
                if r is res:
                    take[i], mine[i] = row, True
            tokens = self._pick(res.tokens, take, mine, tokens)
        res = self._run_group(works, tokens_on_device=tokens)[1]
        self.ahead.add(works, rows, res)

    def _run_group(self, group: list[SeqWork], tokens_on_device=None):
        """Dispatch one jitted step for ``group`` (all T = 1, or prefill chunks of one length
        bucket); returns the rows, the sampled results and the prompt logprobs (None unless a
        work asked), on device. ``tokens_on_device`` i32[b,1] replaces the works' tokens (a
        lookahead step's inputs, sampled by the step before)."""
        rows, b = self.placement.arrange(group, self.limits.max_batch)  # row of each work, batch size
        t = 1 if all(len(w.tokens) == 1 for w in group) else next_pow2(max(len(w.tokens) for w in group), 8)
        num_logprobs = SamplingParams.MAX_LOGPROBS if any(w.sampling.logprobs for w in group) else 0
        args = self._inputs(group, rows, b, t, tokens_on_device)
        cons = [(i, w.constraint) for i, w in zip(rows, group) if w.sample and w.constraint is not None]
        plp = [w for w in group if _scores_prompt(w)]
        if self.limits.max_draft_tokens and not plp:
            k = max([w.num_drafts for w in group] + [w.want_drafts for w in group if w.sample])
            if k > self.limits.max_draft_tokens:
                raise ValueError(
                    f"{k} drafts in a step; the runner verifies at most {self.limits.max_draft_tokens}"
                )
            # Two programs per shape, not one per depth: a group with any draft verifies and drafts
            # at the runner's depth (rows use what they asked for), so the load-adaptive depth and
            # the end of a request never compile anything new mid-serving.
            k = self.limits.max_draft_tokens if k else 0
            if cons:  # the verify samples inside the one call: masks before dispatch
                args = self._with_masks(args, cons, b)
            res, self.state, self.counts, self.prompt_mask = self._spec(*args, num_logprobs=num_logprobs, k=k)
            return rows, res, None
        if not cons and not plp:
            res, self.state, self.counts, self.prompt_mask = self._step(*args[:9], num_logprobs=num_logprobs)
            return rows, res, None
        # Split at the logits: dispatch the forward, fill the grammar masks on the host while
        # it runs, then sample (runner/steps.py). Prompt logprobs ride on the same split.
        params, state, counts, pmask, tokens, positions, meta, sa, sample_mask = args[:9]
        out = None
        if plp:
            num_top = max(w.sampling.prompt_logprobs for w in plp)
            logits, out, self.state = self._plp(
                params, state, tokens, positions, meta, args[-1], num_top=num_top
            )  # fmt: skip
        else:
            logits, self.state = self._logits(params, state, tokens, positions, meta)
        if cons:
            sa = self._with_masks(args, cons, b)[7]
        res, self.counts, self.prompt_mask = self._sample(
            counts, pmask, logits, meta.slots, sa, sample_mask, num_logprobs=num_logprobs
        )
        return rows, res, out

    def _with_masks(self, args: tuple, cons: list, b: int) -> tuple:
        """``args`` with the sampling arrays' grammar bitmasks filled for the constrained rows
        (``cons``: (row, constraint)); free rows allow every token."""
        allow = np.full((b, sampling.mask_words(self.cfg.vocab_size)), -1, np.int32)
        if self.fill_masks is None:
            from dsv4_jax.engine import constraints  # llguidance loads only once a grammar is used

            constraints.fill_masks(cons, allow)
        else:
            self.fill_masks(cons, allow)
        sa = args[7]._replace(allow=self.placement.put_batch(allow))
        return (*args[:7], sa, *args[8:])

    def _inputs(self, group, rows, b: int, t: int, tokens_on_device=None) -> tuple:
        """The jitted step's arguments for ``group`` in ``rows`` of a ``[b, t]`` step (rows of
        no work are padding: no slot, nothing written)."""
        mb = self.cc.max_blocks_per_seq
        tokens = np.zeros((b, t), np.int32)
        positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
        slots = np.full(b, self.cc.num_slots, np.int32)  # padding rows: no slot, nothing written
        table = np.zeros((b, mb), np.int32)
        lengths = np.zeros(b, np.int32)
        state_start = np.zeros(b, np.int32)
        cached_until = np.zeros(b, np.int32)
        sample_mask = np.zeros(b, bool)
        commit = np.zeros(b, np.int32)
        n_drafts = np.zeros(b, np.int32)
        next_token = np.full(b, -1, np.int32)
        for i, w in zip(rows, group):
            n = len(w.tokens)
            commit[i], n_drafts[i] = w.num_known, w.num_drafts
            if w.next_token is not None:
                next_token[i] = w.next_token
            if len(w.block_ids) > mb:
                raise ValueError(f"seq {w.seq_id}: {len(w.block_ids)} blocks > max_blocks_per_seq={mb}")
            tokens[i, :n] = w.tokens
            positions[i] = w.start + np.arange(t)
            slots[i], lengths[i] = w.slot, n
            table[i, : len(w.block_ids)] = w.block_ids
            state_start[i], cached_until[i] = w.state_start, w.cached_until
            sample_mask[i] = w.sample
        params, seeds, index = [SamplingParams(temperature=0.0)] * b, [0] * b, [0] * b
        for i, w in zip(rows, group):
            params[i], seeds[i], index[i] = w.sampling, w.seed, w.sample_index
        sa = sampling.sampling_arrays(params, seeds, index, pad_to=b)
        spec = bool(self.limits.max_draft_tokens)
        meta = kvc.StepMeta(slots, table, lengths, state_start, cached_until, commit if spec else None)
        if tokens_on_device is not None:
            tokens = tokens_on_device
        batch = (tokens, positions, meta, sa, sample_mask) + (
            (n_drafts, next_token) if spec else (next_token,)
        )
        return (self.params, self.state, self.counts, self.prompt_mask, *self.placement.put_batch(batch))

    # ------------------------------------------------------------------ step shapes
    def step_shapes(self) -> list[tuple[int, int]]:
        """Every ``(batch, tokens)`` this runner can dispatch under its limits: decode batches,
        and prefill groups of one length bucket ``t`` (chunks longer than t/2, or 2..8 tokens for
        t = 8) as many as fit the token budget."""
        lim, n_shards = self.limits, self.placement.shards
        per_shard = max(1, min(lim.max_batch, lim.num_slots // n_shards))

        def batches(n_max: int) -> set[int]:
            if n_shards == 1:
                return {min(next_pow2(n), max(lim.max_batch, n)) for n in range(1, n_max + 1)}
            return {next_pow2(k) * n_shards for k in range(1, min(n_max, per_shard) + 1)}

        shapes = {(b, 1) for b in batches(lim.max_batch)}
        longest = min(lim.max_tokens_per_step, lim.max_blocks_per_seq * lim.block_tokens)
        t = 8
        while t // 2 < longest:
            n_max = min(lim.max_batch, lim.max_tokens_per_step // (2 if t == 8 else t // 2 + 1))
            shapes |= {(b, t) for b in batches(n_max)}
            t *= 2
        return sorted(shapes, key=lambda s: (s[1], s[0]))

    def precompile(self, shapes=None, logprobs: bool = True) -> dict:
        """Compile the step for ``shapes`` (default ``step_shapes()``), without and (``logprobs``)
        with top-logprobs, ahead of traffic; a later step of the same shape reuses the
        executable. Returns the count, the seconds and the largest
        ``memory_analysis().temp_size_in_bytes`` (the step temporaries ``memory.plan`` reserves)."""
        import time

        t0, temps, n = time.monotonic(), 0, 0
        depths = sorted({0, self.limits.max_draft_tokens})
        for b, t in self.step_shapes() if shapes is None else shapes:
            args = self._inputs([], [], b, t)
            for lp in (0, SamplingParams.MAX_LOGPROBS) if logprobs else (0,):
                if self.limits.max_draft_tokens:  # without drafts, and at the runner's depth
                    lowered = [self._spec.lower(*args, num_logprobs=lp, k=k) for k in depths]
                else:
                    lowered = [self._step.lower(*args[:9], num_logprobs=lp)]
                for low in lowered:
                    mem = low.compile().memory_analysis()
                    temps, n = max(temps, int(mem.temp_size_in_bytes) if mem is not None else 0), n + 1
        return {"compiled": n, "seconds": time.monotonic() - t0, "temp_bytes": temps}

    def _update_penalty_tables(self, works: list[SeqWork]) -> None:
        """Reset fresh slots, then record every token the tables have not seen: prior tokens of
        a fresh work (prefix hits), prompt tokens of chunks, replayed outputs (resumption).
        Sampled tokens are recorded inside the step, so a decode input is never counted twice."""
        if not any(
            w.sampling.repetition_penalty != 1 or w.sampling.presence_penalty or w.sampling.frequency_penalty
            for w in works
        ):
            for w in works:  # keep the bookkeeping so a later penalised request is exact
                if w.fresh:
                    self._counted[w.seq_id] = w.start - 1
            return
        fresh = [w for w in works if w.fresh]
        if fresh:
            n = next_pow2(len(fresh))
            slots = np.full(n, self.cc.num_slots, np.int32)
            slots[: len(fresh)] = [w.slot for w in fresh]
            self.counts, self.prompt_mask = self._reset(
                self.counts, self.prompt_mask, slots, slots < self.cc.num_slots
            )
        rows: list[tuple[int, int, bool]] = []
        for w in works:
            if w.fresh:
                for p, tok in enumerate(w.prior_tokens or []):
                    rows.append((w.slot, tok, p < w.prompt_len))
                self._counted[w.seq_id] = w.start - 1
            done = self._counted.get(w.seq_id, w.start - 1)
            for p, tok in enumerate(w.tokens[: w.num_known], start=w.start):  # drafts are not the sequence's
                if p < w.prompt_len or p > done:
                    rows.append((w.slot, tok, p < w.prompt_len))
            self._counted[w.seq_id] = max(done, w.start + w.num_known - 1)
        if rows:
            n = next_pow2(len(rows), 8)
            arr = np.zeros((3, n), np.int32)
            arr[:, : len(rows)] = np.asarray(rows, np.int32).T
            valid = np.arange(n) < len(rows)
            self.counts, self.prompt_mask = self._mark(
                self.counts, self.prompt_mask, arr[0], arr[1], arr[2].astype(bool), valid
            )

    def forget(self, seq_id: int) -> None:
        """Drop host bookkeeping of a finished or aborted sequence (and its lookahead row)."""
        self._counted.pop(seq_id, None)
        self.ahead.drop(seq_id)

    def held_bytes(self) -> dict[str, int]:
        """Bytes one device holds: ``weights`` (the params) and ``kv`` (decode state, snapshot
        store, penalty tables), measured on the live arrays (``memory.MemoryPlan`` plans them)."""
        return {
            "weights": tree_bytes(self.params),
            "kv": tree_bytes((self.state, self.snapshots, self.counts, self.prompt_mask)),
        }


def _scores_prompt(w: SeqWork) -> bool:
    """The work holds prompt positions whose next token's logprob its request asked for."""
    return w.sampling.prompt_logprobs is not None and w.start + 1 < w.prompt_len


def _prompt_logprobs(w: SeqWork, plp: steps.PromptLogprobs, i: int) -> tuple[int, list] | None:
    """(first position, entries) of the prompt tokens after ``w``'s chunk positions: position
    p's logits score the token at p + 1, which exists while p + 1 < ``prompt_len``."""
    n = min(len(w.tokens), w.prompt_len - 1 - w.start)
    if n <= 0:
        return None
    k = w.sampling.prompt_logprobs
    return w.start + 1, [
        (
            float(plp.logprob[i, j]),
            [(int(t), float(p)) for t, p in zip(plp.top_ids[i, j][:k], plp.top_logprobs[i, j][:k])],
        )
        for j in range(n)
    ]


def _sample_out(w: SeqWork, res, at) -> SampleOut:
    """The ``SampleOut`` of row ``at`` (``i`` of a step, or ``(i, j)`` of a speculative step)."""
    n = w.sampling.logprobs
    return SampleOut(
        token=int(res.tokens[at]),
        logprob=float(res.logprob[at]) if n is not None else None,
        top_logprobs=[(int(t), float(p)) for t, p in zip(res.top_ids[at][:n], res.top_logprobs[at][:n])]
        if n
        else ([] if n == 0 else None),
    )
