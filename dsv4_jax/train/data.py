"""Training and evaluation data of the demo model, all generated on the machine (no download).

Natural text is the Python standard library's own source (code, comments and docstrings) of
a fixed list of modules plus the demo's small hand-written corpus; a byte-level BPE is
trained on it. A needle sample hides ``" The secret word is" + V + "."`` (V one token of
``VALUES``) at a chosen depth of a natural-text haystack and ends with the question
``"\\nWhat is the secret word? The secret word is"``: the next token must be V. Samples are
built at the token level, so the needle's tokens are the same wherever it lands.
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig

import numpy as np
from tokenizers import Tokenizer

# Modules whose source is the natural text (sorted, fixed: the corpus depends only on the
# Python version). Held out for evaluation haystacks: the last EVAL_FRACTION of the tokens.
MODULES = (
    "abc",
    "argparse",
    "base64",
    "bisect",
    "calendar",
    "cmd",
    "collections/__init__",
    "colorsys",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "difflib",
    "enum",
    "fnmatch",
    "fractions",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "heapq",
    "hmac",
    "html/__init__",
    "inspect",
    "ipaddress",
    "json/__init__",
    "json/decoder",
    "json/encoder",
    "keyword",
    "linecache",
    "locale",
    "logging/__init__",
    "mimetypes",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pprint",
    "queue",
    "quopri",
    "random",
    "reprlib",
    "sched",
    "secrets",
    "shlex",
    "shutil",
    "statistics",
    "string",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "traceback",
    "types",
    "typing",
    "uuid",
    "warnings",
    "weakref",
    "zipfile",
)
EVAL_FRACTION = 0.1
NEEDLE = " The secret word is"
QUESTION = "\nWhat is the secret word? The secret word is"
NUM_VALUES = 64
P_FAR = 0.8  # share of needle rows whose questions keep train_batch's min_gap


def stdlib_text() -> str:
    """The concatenated source of ``MODULES`` (missing ones skipped), one blank line between."""
    root = sysconfig.get_paths()["stdlib"]
    parts = []
    for m in MODULES:
        path = os.path.join(root, m + ".py")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                parts.append(f.read())
    return "\n\n".join(parts)


def pick_values(tok: Tokenizer, ids: np.ndarray, n: int = NUM_VALUES) -> np.ndarray:
    """The ``n`` single-token words (" word", 3+ ASCII letters) rarest in the text ``ids``:
    a needle's value then seldom occurs in the haystack too (ties: lower id first)."""
    counts = np.bincount(ids, minlength=tok.get_vocab_size())
    words = []
    for i in range(tok.get_vocab_size()):
        s = tok.decode([i])
        word = len(s) >= 4 and s[0] == " " and s[1:].isalpha() and s[1:].isascii()
        if word and tok.encode(s).ids == [i]:
            words.append(i)
    if len(words) < n:
        raise ValueError(f"tokenizer has only {len(words)} single-token words, need {n}")
    return np.asarray(sorted(sorted(words, key=lambda i: (counts[i], i))[:n]), np.int32)


@dataclasses.dataclass
class Corpus:
    """Tokenized natural text split into train / eval, and the needle's fixed token pieces."""

    train: np.ndarray  # i32[N]
    eval: np.ndarray  # i32[M]
    needle: np.ndarray  # " The secret word is"
    question: np.ndarray  # "\nWhat is the secret word? The secret word is"
    period: np.ndarray  # "."
    values: np.ndarray  # i32[NUM_VALUES]

    @classmethod
    def build(cls, tok: Tokenizer, extra_text: str = "") -> Corpus:
        ids = np.asarray(tok.encode(stdlib_text()).ids, np.int32)
        cut = int(len(ids) * (1 - EVAL_FRACTION))
        train = ids[:cut]
        if extra_text:
            train = np.concatenate([np.asarray(tok.encode(extra_text).ids, np.int32), train])
        enc = lambda s: np.asarray(tok.encode(s).ids, np.int32)
        return cls(train, ids[cut:], enc(NEEDLE), enc(QUESTION), enc("."), pick_values(tok, ids))

    def needle_sample(
        self, rng: np.random.RandomState, length: int, depth: float, value: int, split: str = "train"
    ) -> tuple[np.ndarray, int]:
        """``length`` tokens ending with the question, the needle at ``depth`` (0..1) of the
        haystack; returns (tokens i32[length], index of the needle's value token)."""
        text = self.train if split == "train" else self.eval
        needle = np.concatenate([self.needle, [value], self.period]).astype(np.int32)
        hay_len = length - len(needle) - len(self.question)
        if hay_len < 0 or hay_len > len(text):
            raise ValueError(f"needle_sample: length {length} does not fit")
        start = rng.randint(0, len(text) - hay_len + 1)
        hay = text[start : start + hay_len]
        at = round(depth * hay_len)
        seq = np.concatenate([hay[:at], needle, hay[at:], self.question]).astype(np.int32)
        return seq, at + len(self.needle)

    def text_sample(self, rng: np.random.RandomState, length: int) -> np.ndarray:
        start = rng.randint(0, len(self.train) - length)
        return self.train[start : start + length].astype(np.int32)


def train_batch(
    corpus: Corpus,
    rng: np.random.RandomState,
    batch: int,
    length: int,
    p_needle: float,
    max_questions: int = 1,
    p_copy: float = 0.0,
    min_gap: int = 0,
):
    """One batch: tokens i32[B,L+1] (inputs [:, :-1], targets [:, 1:]) and three masks f32[B,L]:
    natural-text targets (not the unguessable needle value), the needle answers, and the
    input positions that hold a needle's value (the needle's own, earlier answers': what an
    answer retrieves; ``loss.retrieval_hint``).

    A needle sample is ``hay N hay Q V hay Q V ... Q V``: the needle N, then 1..``max_questions``
    questions Q each followed by the value V, the last one ending the row. In a share ``P_FAR``
    of the needle rows every haystack piece after N holds at least ``min_gap`` tokens (fewer
    questions are asked when they do not fit; the other rows keep questions inside the window too):
    with ``min_gap`` > the sliding window, no answer can be copied from N or from an earlier
    answer through the window, so every answer needs the compressed path (CSA entries picked by
    the indexer). The rest of each row's haystack is cut uniformly. Every answer is supervised.

    With probability ``p_copy`` a natural-text row instead holds a random token string twice
    (16-48 tokens, the second copy 0-200 tokens after the first): the second copy is predictable
    only by copying, the signal that grows induction heads fast; the first copy is not scored."""
    toks = np.zeros((batch, length + 1), np.int32)
    text = np.ones((batch, length), np.float32)
    answer = np.zeros((batch, length), np.float32)
    source = np.zeros((batch, length), np.float32)
    for b in range(batch):
        if rng.random_sample() < p_needle:
            v = int(corpus.values[rng.randint(len(corpus.values))])
            needle = np.concatenate([corpus.needle, [v], corpus.period]).astype(np.int32)
            qa = np.concatenate([corpus.question, [v]]).astype(np.int32)
            nq = rng.randint(1, max_questions + 1)
            gap = min_gap if rng.random_sample() < P_FAR else 0
            while nq > 1 and length + 1 - len(needle) - nq * (len(qa) + gap) < 0:
                nq -= 1
            hay_len = length + 1 - len(needle) - nq * len(qa)
            free = hay_len - nq * gap
            if free < 0:
                raise ValueError(f"train_batch: length {length} cannot hold a question {gap} tokens on")
            start = rng.randint(0, len(corpus.train) - hay_len + 1)
            hay = corpus.train[start : start + hay_len]
            cuts = np.diff([0, *sorted(rng.randint(0, free + 1, size=nq)), free])  # nq+1 pieces
            sizes = cuts + np.asarray([0] + [gap] * nq)
            edges = np.concatenate([[0], np.cumsum(sizes)])
            parts, answers = [hay[: edges[1]], needle], []
            vi = int(edges[1]) + len(corpus.needle)
            for k in range(nq):
                parts.append(hay[edges[k + 1] : edges[k + 2]])
                parts.append(qa)
                answers.append(sum(len(x) for x in parts) - 1)
            toks[b] = np.concatenate(parts)
            text[b, vi - 1] = 0.0  # the needle's own value follows its marker: noise to predict
            source[b, vi] = 1.0
            for a in answers:  # target index a-1 predicts token a (= V)
                text[b, a - 1] = 0.0
                answer[b, a - 1] = 1.0
                if a < length:
                    source[b, a] = 1.0
        else:
            toks[b] = corpus.text_sample(rng, length + 1)
            if rng.random_sample() < p_copy:
                n = rng.randint(16, 49)
                i = rng.randint(0, length + 1 - 2 * n)
                j = min(i + n + rng.randint(0, 201), length + 1 - n)
                seg = rng.randint(2, int(corpus.values.max()) + 1, size=n)
                toks[b, i : i + n] = seg
                toks[b, j : j + n] = seg
                text[b, max(i - 1, 0) : i + n - 1] = 0.0
    return toks, text, answer, source
