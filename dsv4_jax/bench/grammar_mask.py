"""Grammar engines on our vocabularies: compile time and next-token mask time per token.

Why it exists: constrained decoding (engine/constraints.py) fills one next-token bitmask per
constrained row per step on the host, so the engine is chosen by its mask time on our
vocabularies (and by what it costs to install: ``make serve`` must not pull torch). This
measures the two engines the field uses, llguidance (vLLM's ``guidance`` backend, what the
server runs) and xgrammar (vLLM's and SGLang's default), when they are importable; an
engine that is not installed gets a row saying so.

    python scripts/bench_grammar_mask.py --vocab demo --out grammar.json
    PYTHONPATH=. /tmp/xgvenv/bin/python scripts/bench_grammar_mask.py   # both engines

Vocabularies:

* ``demo``: ``checkpoints/demo/tokenizer.json`` (1006 tokens, masks as wide as the demo
  model's vocab, 1024).
* ``large``: a byte-level BPE the size of DeepSeek-V4's vocabulary (129,280), trained here
  on the Python standard library's sources and numpy's (~40 MB of text, ~7 s on two cores;
  no hub at run time), with DeepSeek's special tokens; cached under ``--cache-dir``.
  Python-trained merges are ASCII-heavy where DeepSeek's are multilingual, but the mask cost
  is set by the vocabulary's size and the grammar state, and inside a JSON string (most of
  a tool call's tokens) nearly every token is allowed either way.

Grammars, both JSON schemas with each engine's default whitespace handling (flexible):

* ``tool_args``: a typical tool's arguments (six properties: strings, an enum, bounded
  integers, an array of enums; three required; no additional properties);
* ``json_object``: ``{"type": "object"}``, what ``response_format: json_object`` asks for
  (xgrammar with ``strict_mode=False``, else it forbids every undeclared property).

What is timed, per engine, vocabulary and grammar:

* import (``import_ms``, once per process; only the first vocabulary's row sees it) and
  tokenizer set-up (once per server): llguidance's ``LLTokenizer``, xgrammar's
  ``TokenizerInfo`` (from a ``transformers`` tokenizer) plus ``GrammarCompiler``;
* compile: schema to a matcher ready to mask, nothing cached (xgrammar's compiler cache is
  off: a cache hit in a server makes its compile ~free for a repeated schema); median;
* per-token mask: a fresh matcher (as each request gets) driven through a valid JSON
  instance tokenized by the same tokenizer, then EOS; before each token the next-token
  bitmask is filled (that call alone is timed) and the token is checked against it. One
  untimed warm-up pass, then ``--reps`` passes over eight different instances; mean, p50,
  p99 and max over every token, and the first mask (a cold matcher) separately;
* batch-8: eight fresh matchers (the eight instances) filled together each step, llguidance
  through ``LLExecutor`` (``fill_next_token_bitmask_par``), xgrammar through
  ``BatchGrammarMatcher.batch_fill_next_token_bitmask``; µs per step over the steps where
  all eight rows are live. The same eight filled one after another by the single-matcher
  call are timed beside it (``batch_serial_us_per_step``): on a two-core machine a pool has
  little to spread over, and its hand-off can cost more than it saves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DEMO_TOKENIZER = ROOT / "checkpoints" / "demo" / "tokenizer.json"
EOS = "<｜end▁of▁sentence｜>"
# The demo tokenizer's special tokens (DeepSeek-V4's chat markup), given to the large one too.
SPECIALS = [
    "<｜begin▁of▁sentence｜>",
    EOS,
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
    "｜DSML｜",
    "<｜latest_reminder｜>",
]
LARGE_VOCAB = 129280  # DeepSeek-V4's vocab_size (config.py)
ENGINES = ("llguidance", "xgrammar")
BATCH = 8

TOOL_SCHEMA = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "City and country, e.g. Paris, France"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "include": {
            "type": "array",
            "items": {"type": "string", "enum": ["temperature", "precipitation", "wind", "humidity"]},
        },
        "query": {"type": "string", "description": "Free-text question about the forecast"},
        "max_results": {"type": "integer"},
    },
    "required": ["location", "unit", "days"],
    "additionalProperties": False,
}


def _tool(loc, unit, days, include=None, query=None, max_results=None) -> dict:
    out = {"location": loc, "unit": unit, "days": days}
    for k, v in (("include", include), ("query", query), ("max_results", max_results)):
        if v is not None:
            out[k] = v
    return out


TOOL_INSTANCES = [
    _tool("Paris, France", "celsius", 5, ["temperature", "wind"], "Will it rain on the picnic?", 3),
    _tool("Zürich, Switzerland", "celsius", 14, ["precipitation"], "snow above 2000 m this week", 10),
    _tool("San Francisco, California, United States", "fahrenheit", 3, None, "fog in the morning?"),
    _tool("東京, Japan", "celsius", 7, ["temperature", "precipitation", "wind", "humidity"], None, 25),
    _tool("Reykjavík, Iceland", "celsius", 2, ["wind"], "gusts over 20 m/s near the harbour", 1),
    _tool("Austin, TX", "fahrenheit", 10, ["humidity", "temperature"], "best evening for a run", 5),
    _tool("Cape Town, South Africa", "celsius", 1, [], "is it safe to hike Table Mountain today"),
    _tool("Mumbai, India", "celsius", 6, ["precipitation", "humidity"], "monsoon onset", 7),
]

OBJECT_INSTANCES = [
    {"name": "Ada Lovelace", "born": 1815, "fields": ["mathematics", "computing"], "active": False},
    {"order_id": "A-10023", "items": [{"sku": "X1", "qty": 2, "price": 9.99}], "paid": True, "note": None},
    {"answer": "The capital of Australia is Canberra.", "confidence": 0.92, "sources": []},
    {"city": "München", "temp_c": -3.5, "forecast": {"tomorrow": "snow", "day_after": "clear"}},
    {"summary": "Three bugs fixed; two open.", "open": [412, 415], "closed": [398, 401, 407]},
    {"user": {"id": 7, "roles": ["admin", "dev"]}, "ts": "2025-01-31T12:00:00Z", "ok": True},
    {"title": "東京の天気", "lang": "ja", "tags": ["weather", "tokyo"], "score": 4.5e-2},
    {"steps": ["parse", "plan", "act"], "retries": 0, "error": None, "elapsed_ms": 128.25},
]

GRAMMARS = {
    "tool_args": (TOOL_SCHEMA, TOOL_INSTANCES),
    "json_object": ({"type": "object"}, OBJECT_INSTANCES),
}


# ---- vocabularies ---------------------------------------------------------------------


def _corpus_files() -> list[Path]:
    """The standard library's .py files (no site-packages), then numpy's, in a fixed order."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(np.__file__).parent]
    files = []
    for root in roots:
        for d, dirs, names in os.walk(root):
            dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "dist-packages"))
            files += [Path(d) / n for n in sorted(names) if n.endswith(".py")]
    return files


def build_large_tokenizer(cache_dir: Path, vocab_size: int = LARGE_VOCAB) -> Path:
    """A byte-level BPE of ``vocab_size`` tokens (specials included), trained on local Python
    sources; cached in ``cache_dir`` (the training text is ~40 MB, reaching 129,280)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = cache_dir / f"bpe-{vocab_size}-stdlib-numpy{np.__version__}.json"
    if path.exists():
        return path
    texts = []
    for f in _corpus_files():
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIALS,
    )
    tok.train_from_iterator(texts, trainer)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tok.save(str(tmp))
    tmp.replace(path)
    return path


def load_vocab(name: str, cache_dir: Path, demo_tokenizer: Path = DEMO_TOKENIZER) -> dict:
    """``{"name", "tokenizer", "n_vocab", "eos", "source"}`` for ``demo`` or ``large``."""
    from tokenizers import Tokenizer

    if name == "demo":
        path = Path(demo_tokenizer)
        config = path.parent / "config.json"
        tok = Tokenizer.from_file(str(path))
        n_vocab = json.loads(config.read_text())["vocab_size"] if config.exists() else tok.get_vocab_size()
    elif name == "large":
        path = build_large_tokenizer(cache_dir)
        tok = Tokenizer.from_file(str(path))
        n_vocab = max(LARGE_VOCAB, tok.get_vocab_size())
    else:
        raise ValueError(f"unknown vocabulary {name!r}")
    eos = tok.token_to_id(EOS)
    if eos is None:
        raise ValueError(f"{path} has no {EOS} token")
    return {"name": name, "tokenizer": tok, "n_vocab": n_vocab, "eos": eos, "source": str(path)}


# ---- engines --------------------------------------------------------------------------


class Llguidance:
    name = "llguidance"

    @staticmethod
    def load() -> None:
        import llguidance.numpy  # noqa: F401

    def __init__(self, vocab: dict, threads: int | None):
        import llguidance
        import llguidance.numpy

        self.llg = llguidance
        self.llt = llguidance.LLTokenizer(
            vocab["tokenizer"].to_str(), n_vocab=vocab["n_vocab"], eos_token=vocab["eos"]
        )
        self.executor = llguidance.LLExecutor(threads) if threads else llguidance.LLExecutor()

    @staticmethod
    def version() -> str:
        from importlib.metadata import version

        return version("llguidance")

    def compile(self, schema: dict):
        return self.llg.LLMatcher.grammar_from_json_schema(schema)

    def matcher(self, compiled):
        m = self.llg.LLMatcher(self.llt, compiled, log_level=0)
        if m.is_error():
            raise RuntimeError(m.get_error())
        return m

    def fill(self, m, mask: np.ndarray) -> None:  # mask: i32[1, W]
        m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)

    def fill_batch(self, ms: list, mask: np.ndarray) -> None:  # mask: i32[B, W]
        self.llg.numpy.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(ms)], mask)

    def accept(self, m, token: int) -> bool:
        return m.consume_token(token) and not m.is_error()

    def finished(self, m) -> bool:
        return m.is_stopped() or m.is_accepting()


class Xgrammar:
    name = "xgrammar"

    @staticmethod
    def load() -> None:
        import transformers  # noqa: F401
        import xgrammar  # noqa: F401

    def __init__(self, vocab: dict, threads: int | None):
        import transformers
        import xgrammar

        self.xgr = xgrammar
        hf = transformers.PreTrainedTokenizerFast(tokenizer_object=vocab["tokenizer"])
        info = xgrammar.TokenizerInfo.from_huggingface(
            hf, vocab_size=vocab["n_vocab"], stop_token_ids=[vocab["eos"]]
        )
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        self.batch = xgrammar.BatchGrammarMatcher(threads) if threads else xgrammar.BatchGrammarMatcher()

    @staticmethod
    def version() -> str:
        from importlib.metadata import version

        return version("xgrammar")

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(schema, strict_mode=False)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m, mask: np.ndarray) -> None:
        m.fill_next_token_bitmask(mask, 0)

    def fill_batch(self, ms: list, mask: np.ndarray) -> None:
        self.batch.batch_fill_next_token_bitmask(ms, mask)

    def accept(self, m, token: int) -> bool:
        return m.accept_token(token)

    def finished(self, m) -> bool:
        return m.is_terminated()


ENGINE_CLASSES = {"llguidance": Llguidance, "xgrammar": Xgrammar}


def installed(engine: str) -> bool:
    from importlib.util import find_spec

    return find_spec(engine) is not None


# ---- measurement ----------------------------------------------------------------------


def _allowed(mask_row: np.ndarray, token: int) -> bool:
    return bool((int(mask_row[token // 32]) >> (token % 32)) & 1)


def _stats(us: list[float]) -> dict:
    a = np.asarray(us, np.float64)
    return {
        "mean": float(a.mean()),
        "p50": float(np.percentile(a, 50)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
        "n": int(a.size),
    }


def _drive(engine, compiled, tokens: list[int], mask: np.ndarray, where: str) -> list[float]:
    """One fresh matcher through ``tokens``: the µs of each mask fill."""
    m = engine.matcher(compiled)
    out = []
    for i, t in enumerate(tokens):
        t0 = time.perf_counter_ns()
        engine.fill(m, mask)
        out.append((time.perf_counter_ns() - t0) / 1e3)
        if not _allowed(mask[0], t):
            raise AssertionError(f"{where}: token {i} ({t}) is masked out")
        if not engine.accept(m, t):
            raise AssertionError(f"{where}: token {i} ({t}) was refused")
    if not engine.finished(m):
        raise AssertionError(f"{where}: the matcher did not finish after EOS")
    return out


def _drive_batch(engine, compiled, seqs: list[list[int]], mask: np.ndarray, pool: bool) -> list[float]:
    """``len(seqs)`` fresh matchers filled each step, by the engine's batch call (``pool``) or
    one after another: µs per step while all are live."""
    ms = [engine.matcher(compiled) for _ in seqs]
    out = []
    for step in range(min(len(s) for s in seqs)):
        t0 = time.perf_counter_ns()
        if pool:
            engine.fill_batch(ms, mask)
        else:
            for i, m in enumerate(ms):
                engine.fill(m, mask[i : i + 1])
        out.append((time.perf_counter_ns() - t0) / 1e3)
        for i, (m, s) in enumerate(zip(ms, seqs)):
            if not _allowed(mask[i], s[step]) or not engine.accept(m, s[step]):
                raise AssertionError(f"batch row {i}: token {step} ({s[step]}) refused")
    return out


def measure(engine_name: str, vocab: dict, *, reps: int, compile_reps: int, batch_reps: int, threads) -> list:
    """One result row per grammar for ``engine_name`` on ``vocab``."""
    cls = ENGINE_CLASSES[engine_name]
    t0 = time.perf_counter()
    cls.load()  # the first call in a process times the import (xgrammar's brings torch)
    import_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    engine = cls(vocab, threads)
    setup_ms = (time.perf_counter() - t0) * 1e3
    tok, eos, width = vocab["tokenizer"], vocab["eos"], (vocab["n_vocab"] + 31) // 32
    rows = []
    for gname, (schema, instances) in GRAMMARS.items():
        seqs = [
            tok.encode(json.dumps(x, ensure_ascii=False), add_special_tokens=False).ids + [eos]
            for x in instances
        ]
        compile_ms = []
        for _ in range(max(1, compile_reps)):
            t0 = time.perf_counter()
            compiled = engine.compile(schema)
            engine.matcher(compiled)
            compile_ms.append((time.perf_counter() - t0) * 1e3)
        mask = np.zeros((1, width), np.int32)
        where = f"{engine_name}/{vocab['name']}/{gname}"
        _drive(engine, compiled, seqs[0], mask, where)  # warm-up, untimed
        per_token, first = [], []
        for r in range(reps):
            us = _drive(engine, compiled, seqs[r % len(seqs)], mask, where)
            first.append(us[0])
            per_token += us
        bmask = np.zeros((BATCH, width), np.int32)
        batch, serial = [], []
        for _ in range(batch_reps):
            bseqs = [seqs[i % len(seqs)] for i in range(BATCH)]
            batch += _drive_batch(engine, compiled, bseqs, bmask, pool=True)
            serial += _drive_batch(engine, compiled, bseqs, bmask, pool=False)
        rows.append(
            {
                "engine": engine_name,
                "vocab": vocab["name"],
                "grammar": gname,
                "installed": True,
                "import_ms": import_ms,
                "tokenizer_setup_ms": setup_ms,
                "compile_ms": float(np.median(compile_ms)),
                "compile_ms_min": float(min(compile_ms)),
                "first_mask_us": float(np.mean(first)) if first else None,
                "mask_us": _stats(per_token) if per_token else None,
                "tokens_per_instance": [len(s) for s in seqs],
                "batch": BATCH,
                "batch_us_per_step": _stats(batch) if batch else None,
                "batch_serial_us_per_step": _stats(serial) if serial else None,
            }
        )
    return rows


def _fmt(x, nd=1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def table(res: dict) -> str:
    head = (
        "| engine | vocab | grammar | tokenizer setup ms | compile ms | first mask µs "
        "| mask µs/token mean | p50 | p99 | batch-8 µs/step mean | p50 | 8 one by one µs/step |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in res["results"]:
        v = res["vocabs"][r["vocab"]]
        vname = f"{r['vocab']} ({v['tokens']} tok, W={v['n_vocab']})"
        if not r["installed"]:
            lines.append(f"| {r['engine']} | {vname} | {r['grammar']} | not installed |" + " |" * 7)
            continue
        m, b = r["mask_us"] or {}, r["batch_us_per_step"] or {}
        b1 = r["batch_serial_us_per_step"] or {}
        lines.append(
            f"| {r['engine']} | {vname} | {r['grammar']} | {_fmt(r['tokenizer_setup_ms'])} "
            f"| {_fmt(r['compile_ms'], 2)} | {_fmt(r['first_mask_us'])} | {_fmt(m.get('mean'))} "
            f"| {_fmt(m.get('p50'))} | {_fmt(m.get('p99'))} | {_fmt(b.get('mean'))} | {_fmt(b.get('p50'))} "
            f"| {_fmt(b1.get('mean'))} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", choices=["demo", "large", "all"], default="all")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated: llguidance,xgrammar")
    p.add_argument("--reps", type=int, default=40, help="timed single-matcher passes per grammar")
    p.add_argument("--compile-reps", type=int, default=5)
    p.add_argument("--batch-reps", type=int, default=10, help="timed batch-8 passes per grammar")
    p.add_argument("--threads", type=int, default=None, help="batch pool threads (default: each engine's)")
    p.add_argument(
        "--cache-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "dsv4-grammar-bench")
    )
    p.add_argument("--demo-tokenizer", default=str(DEMO_TOKENIZER))
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in engines:
        if e not in ENGINE_CLASSES:
            p.error(f"unknown engine {e!r}")
    vocab_names = ["demo", "large"] if args.vocab == "all" else [args.vocab]
    res = {
        "env": {
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "python": sys.version.split()[0],
            "threads": args.threads,
            "versions": {e: (ENGINE_CLASSES[e].version() if installed(e) else None) for e in engines},
        },
        "params": {"reps": args.reps, "compile_reps": args.compile_reps, "batch_reps": args.batch_reps},
        "vocabs": {},
        "results": [],
    }
    for vn in vocab_names:
        t0 = time.perf_counter()
        vocab = load_vocab(vn, Path(args.cache_dir), Path(args.demo_tokenizer))
        res["vocabs"][vn] = {
            "tokens": vocab["tokenizer"].get_vocab_size(),
            "n_vocab": vocab["n_vocab"],
            "eos": vocab["eos"],
            "source": vocab["source"],
            "load_s": time.perf_counter() - t0,
        }
        for e in engines:
            if not installed(e):
                res["results"] += [
                    {"engine": e, "vocab": vn, "grammar": g, "installed": False} for g in GRAMMARS
                ]
                continue
            res["results"] += measure(
                e,
                vocab,
                reps=args.reps,
                compile_reps=args.compile_reps,
                batch_reps=args.batch_reps,
                threads=args.threads,
            )
    print(table(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    return 0
