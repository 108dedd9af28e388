"""`python scripts/generate.py`: batch generation from a JSONL file, offline, resumable.

    python scripts/generate.py --input prompts.jsonl --output outputs.jsonl --max-tokens 64

Input, one JSON object per line: ``{"prompt": "text" | [token ids]}`` or ``{"messages":
[{"role": "user", "content": "..."}], "thinking": false}`` (rendered with DeepSeek-V4's chat
encoding, as the server does), an optional ``"id"``, and optional per-line sampling fields
that override the flags: ``max_tokens temperature top_p top_k min_p repetition_penalty
presence_penalty frequency_penalty seed stop stop_token_ids ignore_eos``.

Output, one line per input line, written as each request finishes (so in completion order;
``index`` is the input line number): ``{"id", "index", "text", "token_ids", "finish_reason",
"usage", "metrics"}`` plus ``"reasoning_content"`` for thinking chats, or ``{"id", "index",
"error"}`` for a line the engine refused (it does not stop the run). ``metrics`` holds TTFT and
end-to-end seconds and, when MTP drafts ran for the request, its drafts verified and accepted,
acceptance rate and mean acceptance length (tokens per verify step); the run's totals, with the
acceptance rate per draft position, are printed at the end.

The requests go through the same ``LLMEngine`` the server uses, on this thread (no HTTP),
with up to ``--max-in-flight`` requests queued in the engine at once. Resuming: lines already
in the output file (matched by ``id``, else by ``index``) are skipped, so rerunning the
same command after an interruption finishes the rest; ``--overwrite`` starts over.

Several hosts (``--coordinator HOST:PORT --num-processes N --process-id I`` on each, the same
command otherwise): process 0 reads the input, schedules and writes the output; the others
replay its steps over the global mesh (``engine/runner/lockstep.py``), so the output is the one a
single process would write. If a process dies, process 0 exits with status 3; rerun to resume.

This module sits beside ``llm.py`` and ``launch.py``, not in ``bench/``: it is offline serving
(the server's engine without HTTP) that users run for its outputs, not a measurement.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from absl import app, logging
from absl.flags import argparse_flags

from dsv4_jax.bench.data import jsonl_records

SAMPLING_KEYS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
)


def parse_args(argv: list[str]):
    """The flags of ``argv`` (``argv[0]``, the program name, is skipped: absl's ``flags_parser``)."""
    from dsv4_jax import launch

    p = argparse_flags.ArgumentParser(
        description="Batch generation from a JSONL of prompts (dsv4-jax, offline)."
    )
    p.add_argument("--input", required=True, help="JSONL of {'prompt': ...} or {'messages': [...]} lines")
    p.add_argument(
        "--output", required=True, help="JSONL of results (appended to; existing lines are skipped)"
    )
    p.add_argument("--overwrite", action="store_true", help="ignore and replace an existing output file")
    p.add_argument(
        "--max-in-flight", type=int, default=None, help="requests in the engine at once (default 4x batch)"
    )
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("sampling defaults (a line's own fields override them)")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    launch.add_model_args(p)
    return p.parse_args(argv[1:])


def read_records(path: str) -> list[dict]:
    out = []
    try:
        for n, rec in jsonl_records(path):
            if not isinstance(rec, dict) or ("prompt" in rec) == ("messages" in rec):
                raise SystemExit(f"{path}:{n}: each line needs exactly one of 'prompt' or 'messages'")
            out.append(rec)
    except ValueError as e:  # a line that is not JSON: the message names the file and line
        raise SystemExit(str(e)) from None
    return out


def key(rec: dict, index: int) -> str:
    return f"id:{rec['id']}" if rec.get("id") is not None else f"index:{index}"


def load_done(path: str) -> set[str]:
    """Keys of the results already in ``path``; a torn last line (killed mid-write) is cut off."""
    done: set[str] = set()
    if not os.path.exists(path):
        return done
    good = 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                r = json.loads(raw)
            except json.JSONDecodeError:
                break
            if not raw.endswith(b"\n"):
                break
            good += len(raw)
            done.add(key(r, r.get("index")))
    if good != os.path.getsize(path):
        with open(path, "rb+") as f:
            f.truncate(good)
    return done


def sampling_for(rec: dict, defaults: dict):
    from dsv4_jax.engine.sampling_params import SamplingParams

    kw = dict(defaults)
    kw.update({k: rec[k] for k in SAMPLING_KEYS if k in rec})
    for k in ("stop", "stop_token_ids"):
        if isinstance(kw.get(k), str):
            kw[k] = (kw[k],)
        elif k in kw and kw[k] is not None:
            kw[k] = tuple(kw[k])
    return SamplingParams(**kw)


def prompt_for(rec: dict, tokenizer):
    """(engine prompt, thinking?) for one input line."""
    from dsv4_jax.server import encoding

    if "prompt" in rec:
        return rec["prompt"], False
    thinking = bool(rec.get("thinking", False))
    if tokenizer is None:
        raise ValueError("chat messages need a tokenizer")
    return tokenizer.encode(encoding.render(rec["messages"], thinking=thinking)).ids, thinking


def generate_jsonl(
    engine,
    records: list[dict],
    out_path: str,
    defaults: dict,
    *,
    max_in_flight: int = 64,
    progress: bool = True,
    profiler=None,
    overwrite: bool = False,
) -> dict:
    """Run every record not yet in ``out_path`` through ``engine``; returns counts."""
    from tqdm import tqdm

    from dsv4_jax.engine.request import RequestRefused
    from dsv4_jax.server import encoding

    if overwrite and os.path.exists(out_path):
        os.remove(out_path)
    done = load_done(out_path)
    todo = [(i, r) for i, r in enumerate(records) if key(r, i) not in done]
    counts = {"skipped": len(records) - len(todo), "ok": 0, "errors": 0}
    bar = tqdm(
        total=len(records), initial=counts["skipped"], unit="req", disable=not progress, desc="generate"
    )
    pending = iter(todo)
    in_flight: dict[str, tuple[int, dict, bool]] = {}
    with open(out_path, "a", encoding="utf-8") as out:

        def write(obj):
            out.write(json.dumps(obj, ensure_ascii=False) + "\n")
            out.flush()
            bar.update(1)

        try:
            while True:
                while len(in_flight) < max_in_flight and (item := next(pending, None)) is not None:
                    i, rec = item
                    try:
                        prompt, thinking = prompt_for(rec, engine.tokenizer)
                        rid = engine.add_request(prompt, sampling_for(rec, defaults))
                    except (RequestRefused, ValueError, TypeError, KeyError) as e:
                        counts["errors"] += 1
                        write({"id": rec.get("id"), "index": i, "error": f"{type(e).__name__}: {e}"})
                        continue
                    in_flight[rid] = (i, rec, thinking)
                if not in_flight:
                    break
                with profiler.step() if profiler is not None else contextlib.nullcontext():
                    outs = engine.step()
                for o in outs:
                    if o.finished and o.request_id in in_flight:
                        i, rec, thinking = in_flight.pop(o.request_id)
                        write(_result(engine.release(o.request_id), rec, i, thinking, encoding))
                        counts["ok"] += 1
        except KeyboardInterrupt:
            for rid in in_flight:
                engine.abort(rid)
            logging.warning(
                "interrupted: %d line(s) not written; rerun the same command to resume", len(in_flight)
            )
            raise
        finally:
            bar.close()
            if profiler is not None:
                profiler.close()
    return counts


def _result(req, rec: dict, index: int, thinking: bool, encoding) -> dict:
    m = req.metrics
    res = {
        "id": rec.get("id"),
        "index": index,
        "text": req.output_text,
        "token_ids": list(req.output_token_ids),
        "finish_reason": req.finish_reason.value if req.finish_reason else None,
    }
    if thinking:
        res["reasoning_content"], res["text"] = encoding.split_reasoning(req.output_text)
    res["usage"] = {
        "prompt_tokens": len(req.prompt_token_ids),
        "completion_tokens": len(req.output_token_ids),
    }
    res["metrics"] = {"ttft_s": m.ttft, "e2e_s": m.e2e}
    if m.draft_tokens:  # MTP drafts ran for this request
        res["metrics"].update(
            draft_tokens=m.draft_tokens,
            accepted_tokens=m.accepted_tokens,
            acceptance_rate=m.acceptance_rate,
            mean_acceptance_length=m.mean_acceptance_length,
        )
    return res


def spec_counters(engine) -> dict:
    """The engine's MTP counters, flat (``dsv4_jax.bench.client.SPEC_KEYS`` and per position)."""
    from dsv4_jax.bench.client import SPEC_KEYS

    stats = engine.stats()
    pos = {
        k: v for k, v in stats.items() if k.startswith(("spec_draft_tokens_pos", "spec_accepted_tokens_pos"))
    }
    return {**{k: stats.get(k, 0) for k in SPEC_KEYS}, **pos}


def spec_report(before: dict, after: dict) -> str | None:
    """One line on the MTP drafts verified between two ``spec_counters``, or None if none were."""
    from dsv4_jax.bench.client import counter_delta, spec_summary

    s = spec_summary(counter_delta(before, after))
    if not s["spec_draft_tokens"]:
        return None
    per_pos = " ".join(
        "-" if r is None else f"{100 * r:.1f}%" for r in s["spec_acceptance_rate_per_position"]
    )
    return (
        f"speculative decoding: {s['spec_accepted_tokens']} of {s['spec_draft_tokens']} drafts accepted "
        f"({100 * s['spec_acceptance_rate']:.1f}%), mean acceptance length "
        f"{s['spec_mean_acceptance_length']:.2f} tokens per verify step; per draft position: {per_pos}"
    )


def run(args) -> int:
    """Build the engine from the model flags and generate every line of ``--input`` not yet done."""
    from dsv4_jax import launch

    llm = launch.build_llm(args)
    group = launch.join_group(llm) if args.coordinator is not None else None
    if group is not None:
        if not group.leader:
            return group.follow()  # process 0 reads the input and writes the output
        group.watch(_group_failed)
    records = read_records(args.input)
    defaults = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "ignore_eos": args.ignore_eos,
    }
    t0, spec_before = time.monotonic(), spec_counters(llm.engine)
    counts = generate_jsonl(
        llm.engine,
        records,
        args.output,
        defaults,
        max_in_flight=args.max_in_flight or 4 * llm.engine.limits.max_batch,
        progress=not args.no_progress,
        profiler=launch.make_profiler(args, llm.engine),
        overwrite=args.overwrite,
    )
    print(
        f"{counts['ok']} generated, {counts['errors']} refused, {counts['skipped']} already done "
        f"in {time.monotonic() - t0:.1f} s -> {args.output}"
    )
    if (line := spec_report(spec_before, spec_counters(llm.engine))) is not None:
        print(line)
    if group is not None:
        group.close()
    return 0


def _group_failed(reason: str) -> None:
    """Several processes: one died, hung or failed a step. The lines written so far stay
    (rerunning the same command resumes); exit non-zero rather than wait in a collective."""
    logging.error("the multi-host group lost a process (%s); rerun to resume", reason)
    os._exit(3)


def main(argv: list[str] | None = None):
    """``scripts/generate.py``: ``argv`` as ``sys.argv`` (default: the command line); exits."""
    app.run(run, argv=argv, flags_parser=parse_args)
