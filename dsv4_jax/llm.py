"""The offline Python API (vLLM's ``LLM`` shape):

    from dsv4_jax import LLM, SamplingParams
    llm = LLM("checkpoints/demo", profile="chat")
    outs = llm.generate(["Hello", [0, 41, 609]], SamplingParams(temperature=0, max_tokens=32))
    for delta in llm.stream("Hello", SamplingParams(max_tokens=32)):
        print(delta.text, end="")

``LLM.__init__`` loads the checkpoint and tokenizer, resolves the endpoint profile
(``engine/profiles.py``; ``swa_strategy`` and any ``EngineConfig`` field override it), sizes
the pools from the state's byte accounting and builds the device-side ``JaxModelRunner``;
everything after that is the host engine (``engine/llm_engine.py``). ``LLM.from_engine``
wraps an engine built around any other runner (tests use a fake one).

A prompt is a string (tokenized without added special tokens: build chat prompts with the
DeepSeek markers yourself) or a list of token ids. ``Output.token_ids`` / ``Output.text`` hold
the completion only.

Both calls read the engine's ``RequestOutput``s (``engine/output.py``) and nothing else of a
running request: ``stream`` yields them as they come (``StreamOutput`` is the same type), and
``generate`` folds a request's outputs into one ``Output``, so the two agree by construction.
"""

from __future__ import annotations

import collections
import dataclasses
import numbers
import os
from collections.abc import Iterator, Sequence

from dsv4_jax.engine.llm_engine import LLMEngine
from dsv4_jax.engine.output import RequestOutput, TokenLogprobs
from dsv4_jax.engine.profiles import PoolPlan, make_config, resolve_kv_format
from dsv4_jax.engine.request import RequestMetrics
from dsv4_jax.engine.sampling_params import SamplingParams

Prompt = str | Sequence[int]


@dataclasses.dataclass
class Output:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]  # the completion, including a final EOS / stop token
    text: str  # the completion's text, without the EOS / stop token or matched stop string
    finish_reason: str | None  # "stop" | "length" | "abort"
    stop_reason: int | str | None  # the stop token id or stop string, if one ended it
    logprobs: list[TokenLogprobs] | None  # per token (logprob, top [(id, logprob)]) if params.logprobs
    metrics: RequestMetrics  # arrival / first token / finish times, per-token times
    # per prompt token (the first None): its logprob given the tokens before it, and the top
    # alternatives, if params.prompt_logprobs (teacher forcing; max_tokens=0 only scores)
    prompt_logprobs: list[TokenLogprobs | None] | None = None


# One streaming delta (``token_ids``, ``text``, ``logprobs`` since the previous one, ``finished``,
# ``finish_reason``, token counts so far): the engine's own output type.
StreamOutput = RequestOutput


def _device_memory() -> tuple[str, int, int | None]:
    """``(backend, bytes, in use)`` for the memory plan, measured after the weights are
    placed: host memory on CPU; the first local device's limit and use on accelerators."""
    import jax

    backend = jax.default_backend()
    if backend == "cpu":
        return backend, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), None
    stats = jax.local_devices()[0].memory_stats() or {}
    return backend, stats.get("bytes_limit", 0), stats.get("bytes_in_use", 0)


def _is_token_list(p) -> bool:
    return not isinstance(p, str) and all(isinstance(t, numbers.Integral) for t in p)


class LLM:
    """Load a checkpoint and serve it in process.

    Held format and kernels (``dsv4_jax.held``; docs/SERVING.md "Held formats and kernels"):
    ``weights="auto"`` holds FP8 / MXFP4 weights packed on accelerators and dequantized to
    float32 on CPU (the fastest there); ``kernels="auto"`` runs the Pallas kernels on GPU and
    their jnp references elsewhere. ``dtype`` (``"bfloat16"`` / ``"float32"``) names the
    compute dtype instead (with ``weights="auto"``: weights dequantized into it).

    Numerics (docs/SERVING.md "Numerics modes"): ``qat=None`` applies the reference's QAT
    rounding (FP8 KV rows, Hadamard + FP4 indexer keys, FP8 activations before FP8/FP4 GEMMs)
    when the checkpoint is in the published QAT-trained format, as DeepSeek's
    ``inference/model.py`` does; ``qat=False`` runs the HF port's unquantized math. The KV
    storage format (``kv_format``, an engine argument) defaults to what is lossless in that
    mode: ``fp8-fp4`` with QAT, ``bf16`` without; an FP8 format with ``qat=False`` is refused
    unless ``allow_lossy_kv=True``.

    MTP speculative decoding (docs/ENGINE.md): ``speculative_tokens=k`` drafts up to k tokens
    per step with the checkpoint's MTP block (0: off). Not given: the profile's depth on
    accelerators, off on CPU, where a verify step costs more than its drafts return.
    """

    def __init__(
        self,
        checkpoint_dir: str,
        profile: str | None = None,
        swa_strategy: str | None = None,
        *,
        weights: str = "auto",
        kernels: str = "auto",
        dtype: str | None = None,
        qat: bool | None = None,
        allow_lossy_kv: bool = False,
        mesh=None,
        **engine_args,
    ):
        import jax  # the device side; the engine itself stays host-only
        import jax.numpy as jnp

        from dsv4_jax import held, memory
        from dsv4_jax.checkpoint import load_checkpoint, load_tokenizer
        from dsv4_jax.model.transformer import ModelOptions

        config = make_config(profile, swa_strategy, **engine_args)
        self.held = held.resolve(weights, kernels, dtype, backend=jax.default_backend())
        layout = None
        if mesh is not None:  # params restored straight into their shards; pools split per sequence shard
            from dsv4_jax.parallel.rules import DEFAULT_RULES, Layout

            layout = Layout.create(mesh, DEFAULT_RULES)
        cfg, params = load_checkpoint(
            checkpoint_dir, getattr(jnp, self.held.dtype), storage=self.held.storage, mesh=mesh
        )
        self.qat = cfg.qat_trained if qat is None else bool(qat)
        if "speculative_tokens" not in engine_args and jax.default_backend() == "cpu":
            # MTP drafts by default where they pay: on accelerators a verify step reads the weights
            # once for k + 1 positions. On XLA:CPU a verify step costs 1.7-2.2 decode steps on the
            # demo, more than its acceptance returns (docs/PERF.md "MTP speculative decoding").
            config = dataclasses.replace(config, speculative_tokens=0)
        if config.speculative_tokens and not (cfg.num_nextn_predict_layers and "mtp" in params):
            if engine_args.get("speculative_tokens"):
                raise ValueError(
                    f"speculative_tokens={config.speculative_tokens}: {checkpoint_dir} has no MTP block "
                    f"(num_nextn_predict_layers={cfg.num_nextn_predict_layers}) to draft with"
                )
            config = dataclasses.replace(config, speculative_tokens=0)  # the profile's default: off
        config = dataclasses.replace(
            config, kv_format=resolve_kv_format(config.kv_format, self.qat, allow_lossy_kv)
        )
        tokenizer = load_tokenizer(checkpoint_dir, cfg)
        for r in sorted({r for r in cfg.compress_ratios if r}):
            if config.block_tokens % r:
                raise ValueError(
                    f"block_tokens={config.block_tokens} must be a multiple of compress ratio {r}"
                )
        backend, device_bytes, in_use = _device_memory()
        self.memory = memory.plan(
            cfg, config, params, layout=layout, backend=backend, device_bytes=device_bytes, device_used=in_use
        )
        pools = self.memory.pools

        from dsv4_jax.engine.runner.model_runner import JaxModelRunner

        runner = JaxModelRunner(
            cfg,
            params,
            num_slots=pools.num_slots,
            num_blocks=pools.num_blocks,
            block_tokens=config.block_tokens,
            max_blocks_per_seq=pools.max_blocks_per_seq,
            num_snapshots=pools.num_snapshots,
            max_batch=config.max_batch,
            max_tokens_per_step=config.max_tokens_per_step,
            kv_format=config.kv_format,
            eos_token_id=cfg.eos_token_id,
            mesh=mesh,
            lookahead=config.decode_lookahead,
            speculative_tokens=config.speculative_tokens,
            opts=ModelOptions(sim_quant=self.qat, kernels=self.held.kernels),
        )
        self.model_config = cfg
        self.pools: PoolPlan | None = pools
        self._init(LLMEngine(runner, config, tokenizer, max_model_len=pools.max_model_len))

    def precompile(self, logprobs: bool = True) -> dict:
        """Compile every step shape the engine can emit under its profile
        (``JaxModelRunner.step_shapes``) before serving, and put the compiled steps' largest
        temporaries into ``memory`` in place of the reserve. On an accelerator where they exceed
        the reserve the pools were planned too large: the log says by how much and which knob
        to turn (the persistent compile cache makes the next start quick)."""
        import jax
        from absl import logging

        out = self.engine.runner.precompile(logprobs=logprobs)
        m = self.memory
        self.memory = dataclasses.replace(
            m, temps=out["temp_bytes"], temps_source=f"memory_analysis of {out['compiled']} compiled steps"
        )
        if jax.default_backend() != "cpu" and self.memory.temps > m.temps:  # the reserve was too small
            logging.warning(
                "the compiled steps need %.2f GiB of temporaries, %.2f GiB more than the pools were planned "
                "around; lower --gpu-memory-utilization or --kv-cache-bytes, or --max-tokens-per-step",
                self.memory.temps / 2**30,
                (self.memory.temps - m.temps) / 2**30,
            )
        return out

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
        """An ``LLM`` over an existing engine (any runner)."""
        llm = cls.__new__(cls)
        llm.model_config, llm.pools, llm.qat, llm.held, llm.memory = None, None, None, None, None
        llm._init(engine)
        return llm

    def _init(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._queues: dict[str, collections.deque[RequestOutput]] = {}

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Output]:
        """Run every prompt to completion (batched together); outputs in prompt order."""
        if isinstance(prompts, str) or (len(prompts) and _is_token_list(prompts)):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        ids: list[str] = []
        try:
            for p, sp in zip(prompts, params):
                ids.append(self.engine.add_request(p, sp))
                self._queues[ids[-1]] = collections.deque()
            queues = [self._queues[r] for r in ids]
            while not all(q and q[-1].finished for q in queues):
                self._pump()
        except BaseException:
            for r in ids:
                self.engine.abort(r)
                self.engine.release(r)
            raise
        finally:
            for r in ids:
                self._queues.pop(r, None)
        return [self._output(self.engine.release(r), q) for r, q in zip(ids, queues)]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[StreamOutput]:
        """Yield the engine's outputs as the request generates. Other requests in the engine
        (other streams, ``generate`` calls) progress too. Closing the generator early aborts
        the request."""
        rid = self.engine.add_request(prompt, params)
        q = self._queues[rid] = collections.deque()
        try:
            while True:
                while q:
                    d = q.popleft()
                    yield d
                    if d.finished:
                        return
                self._pump()
        finally:
            self._queues.pop(rid, None)
            self.engine.abort(rid)  # no-op when finished
            self.engine.release(rid)

    def _pump(self) -> None:
        """One engine step; each output goes to the queue of the call waiting for it."""
        for o in self.engine.step():
            q = self._queues.get(o.request_id)
            if q is not None:
                q.append(o)

    @staticmethod
    def _output(req, outs: Sequence[RequestOutput]) -> Output:
        """A finished request's outputs, concatenated (the prompt from its released request)."""
        last = outs[-1]
        return Output(
            request_id=last.request_id,
            prompt=req.prompt,
            prompt_token_ids=list(req.prompt_token_ids),
            token_ids=[t for o in outs for t in o.token_ids],
            text="".join(o.text for o in outs),
            finish_reason=last.finish_reason,
            stop_reason=last.stop_reason,
            logprobs=None if last.logprobs is None else [x for o in outs for x in o.logprobs],
            metrics=last.metrics,
            prompt_logprobs=req.prompt_logprobs,
        )

    def stats(self) -> dict:
        return self.engine.stats()
