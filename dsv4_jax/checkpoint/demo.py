"""Build ``checkpoints/demo/``: a tiny DeepSeek-V4 in the exact published format.

    python scripts/make_demo_checkpoint.py [OUT_DIR]      # default: checkpoints/demo

Same tensor names, dtypes and layout as ``deepseek-ai/DeepSeek-V4-Flash``
(ARCHITECTURE.md §8): FP8 e4m3 linears with UE8M0 128x128 block scales, MXFP4
routed experts (two e2m1 per I8 byte, one UE8M0 scale per 32 inputs), ``tid2eid``
as I64, F32 ``ape`` / mHC / sinks / router bias, BF16 elsewhere, sharded with a
``model.safetensors.index.json``. The config covers every layer kind with the
shipped ratios (layer 0 SWA, 1 CSA m=4, 2 HCA m=128, then the SWA MTP block),
hash routing (layers 0-1) and top-k routing (layer 2, MTP), 16 indexer heads
(HF_ORACLE.md §8.1), and widths that are multiples of 128 so every FP8 block and
every MXFP4 group is full. Weights are random (numpy ``RandomState``, seeded per
tensor name), so the output is byte-identical on every run; a test rebuilds it
and compares with the committed files.

The tokenizer is a byte-level BPE trained with the ``tokenizers`` library on the
small corpus below, with DeepSeek's special tokens (§9): ``<｜begin▁of▁sentence｜>``
id 0 and ``<｜end▁of▁sentence｜>`` id 1 first, the chat markers appended after the
BPE vocabulary as the real ``tokenizer.json`` does (there at 128803+).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from dsv4_jax.checkpoint.safetensors_writer import native_tensors, random_value, write_native
from dsv4_jax.config import Config, YarnScaling
from dsv4_jax.model.params import native_names

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
SEED = 0
BPE_VOCAB = 1000  # learned entries incl. BOS/EOS; the added tokens follow; config vocab 1024 pads
DEMO = dict(
    vocab_size=1024,
    hidden_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    head_dim=128,
    qk_rope_head_dim=64,
    q_lora_rank=128,
    o_groups=2,
    o_lora_rank=128,
    sliding_window=128,
    index_n_heads=16,
    index_head_dim=128,
    index_topk=16,
    compress_ratios=(0, 4, 128, 0),
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
    num_hash_layers=2,
    routed_scaling_factor=1.5,
    rope_theta=10000.0,
    compress_rope_theta=160000.0,
    rope_scaling=YarnScaling(16.0, 65536, 32.0, 1.0),
    max_position_embeddings=65536,
    weight_dtype="fp8",
    expert_dtype="fp4",
)
# Shards as in the real checkpoint: embeddings first, layers, then the MTP block last.
SHARDS = [["globals"], ["layers.0", "layers.1"], ["layers.2", "mtp.0"]]
EXTRA_CONFIG = {"torch_dtype": "bfloat16", "attention_bias": False, "attention_dropout": 0.0}

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
# (content, special): special tokens are dropped by decode(skip_special_tokens=True).
ADDED = [
    ("<｜User｜>", True),
    ("<｜Assistant｜>", True),
    ("<think>", False),
    ("</think>", False),
    ("｜DSML｜", False),
    ("<｜latest_reminder｜>", True),
]

CORPUS = """\
The quick brown fox jumps over the lazy dog. A model reads tokens and writes tokens, one at a time.
DeepSeek-V4 is a mixture-of-experts language model. Each layer mixes four residual streams with a
doubly stochastic matrix, attends over a sliding window of recent tokens, and, in compressed layers,
over summaries of older blocks of tokens. The lightning indexer scores the compressed entries and
keeps the best few for every query. Routed experts are chosen per token; a shared expert always runs.
Weights ship in eight-bit floating point with power-of-two block scales, and the routed experts in
four-bit floating point, two values per byte, with one scale for every thirty-two values.
Serving a model means batching requests, caching keys and values, and returning text as it is made.
A checkpoint is a directory of files: a config, an index, shards of tensors, and a tokenizer.
The loader reads one tensor at a time, checks its name, shape and type, and places it on the device.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096 65536 1048576 3.14159 2.71828
Dates and times: 2026-04-24, 12:30, 7 p.m., Monday, Tuesday, Wednesday, Thursday, Friday, weekend.
def forward(params, tokens, positions):
    x = embed(params, tokens)
    for layer in params["layers"]:
        x = block(layer, x, positions)
    return head(params, x)
for i in range(10):
    print(f"step {i}: loss={loss:.4f}")
import numpy as np; import jax.numpy as jnp; x = np.zeros((4, 8), dtype=np.float32)
User: What is the capital of France? Assistant: The capital of France is Paris.
User: Write a short poem about the sea. Assistant: Grey waves fold on the shore, the gulls call, and the
tide goes out and comes back, as it always has, as it always will.
User: How many legs does a spider have? Assistant: A spider has eight legs.
User: Translate "good morning" into French. Assistant: "Bonjour."
User: Explain attention in one sentence. Assistant: Each token looks at the others and takes a weighted
average of their values, with weights from how well its query matches their keys.
Once upon a time there was a small village by a river. Every morning the baker opened her shop, the
children ran to school, and the old fisherman sat on the bridge with his line in the water. One day a
stranger arrived with a map and a question, and nothing in the village was the same after that.
The weather today is sunny with a light breeze; tomorrow, clouds and rain are expected in the afternoon.
Mathematics: (a + b)^2 = a^2 + 2ab + b^2; sqrt(16) = 4; 7 * 8 = 56; 100 / 4 = 25; 2^10 = 1024.
Lists: apples, oranges, bananas, grapes; red, green, blue, yellow; north, south, east, west.
JSON: {"name": "demo", "layers": 3, "experts": 8, "ok": true, "scores": [0.5, 0.25, 0.125]}
Questions are answered, programs are written, stories are told, and mistakes are fixed, step by step.
"""


def train_tokenizer(lines=None) -> Tokenizer:
    """Byte-level BPE with BOS id 0, EOS id 1 and the chat markers after the learned vocabulary,
    learned from ``lines`` (default: ``CORPUS``; ``dsv4_jax.train.demo`` adds its natural text)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        special_tokens=[BOS, EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS.splitlines() if lines is None else lines, trainer)
    tok.add_tokens([AddedToken(c, special=s, normalized=False) for c, s in ADDED])
    return tok


def tokenizer_config() -> dict:
    """``tokenizer_config.json`` with the published model's fields (§9)."""

    def added(content: str) -> dict:
        return {
            "__type": "AddedToken",
            "content": content,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        }

    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": added(BOS),
        "clean_up_tokenization_spaces": False,
        "eos_token": added(EOS),
        "legacy": True,
        "model_max_length": 1048576,
        "pad_token": added(EOS),
        "sp_model_kwargs": {},
        "unk_token": None,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def _dump(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def build(out_dir: str, cfg: Config | None = None, params=None, tok: Tokenizer | None = None) -> None:
    """Write the demo directory: random weights (``params=None``, seeded per tensor) or the
    given float param tree (``dsv4_jax.train.demo``), quantized to the published format."""
    cfg = cfg or Config(**DEMO)
    if params is None:
        values = lambda spec: random_value(spec, cfg, SEED)
    else:
        named = native_names(params)
        values = lambda spec: np.asarray(named[spec.name])
    write_native(out_dir, cfg, SHARDS, lambda spec: native_tensors(spec, values(spec)), EXTRA_CONFIG)
    tok = tok or train_tokenizer()
    if tok.get_vocab_size() > cfg.vocab_size:
        raise SystemExit(f"tokenizer has {tok.get_vocab_size()} entries > vocab_size {cfg.vocab_size}")
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    _dump(os.path.join(out_dir, "tokenizer_config.json"), tokenizer_config())
    _dump(
        os.path.join(out_dir, "generation_config.json"),
        {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 1.0, "top_p": 1.0},
    )
    for name in os.listdir(out_dir):  # safetensors writes 0600; make the files readable like the rest
        os.chmod(os.path.join(out_dir, name), 0o644)


def main(argv=None) -> int:
    """``scripts/make_demo_checkpoint.py [OUT_DIR]``: the random-weight demo (``build``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "out_dir",
        nargs="?",
        default=os.path.join(ROOT, "checkpoints", "demo"),
        help="output directory (default: checkpoints/demo)",
    )
    out = ap.parse_args(argv).out_dir
    build(out)
    print(f"wrote {out}")
    return 0
