"""The DeepSeek-V4 model as Flax NNX modules, its forward pass and its decode state.

Modules (one per component, the tree mirrors the checkpoint's names):
``DeepseekV4`` (transformer.py) → ``Embedding``, ``Block`` / ``MTPBlock`` (block.py) →
``MHC`` / ``HCHead`` (mhc.py), ``Attention`` (attention.py) with its ``Compressor``
(compressor.py) and ``Indexer`` (indexer.py), ``MoE`` with ``Router``, ``Experts`` and
``SharedExpert`` (moe.py); ``Linear`` / ``RMSNorm`` (layers.py).

Files by role: ``layers`` (parameter creation, logical axes), ``ops`` (norms, RoPE, Hadamard,
QAT rounding), the module files above with their math, ``attention_state`` (attention over
the decode state), ``state`` (typed decode state, row storage), ``accounting`` (state bytes),
``params`` (init, abstract tree, the checkpoint's native view), ``transformer`` (the model and
``forward``).
"""

from dsv4_jax.model.attention import Attention
from dsv4_jax.model.block import Block, MTPBlock
from dsv4_jax.model.compressor import Compressor
from dsv4_jax.model.indexer import Indexer
from dsv4_jax.model.layers import Buffer, Linear, RMSNorm
from dsv4_jax.model.mhc import MHC, HCHead
from dsv4_jax.model.moe import Experts, ExpertStack, MoE, Router, SharedExpert
from dsv4_jax.model.params import count_params, init_params, param_infos
from dsv4_jax.model.transformer import (
    DeepseekV4,
    Embedding,
    ModelOptions,
    forward,
    forward_streams,
    mtp_forward,
)

__all__ = [
    "MHC",
    "Attention",
    "Block",
    "Buffer",
    "Compressor",
    "DeepseekV4",
    "Embedding",
    "ExpertStack",
    "Experts",
    "HCHead",
    "Indexer",
    "Linear",
    "MTPBlock",
    "MoE",
    "ModelOptions",
    "RMSNorm",
    "Router",
    "SharedExpert",
    "count_params",
    "forward",
    "forward_streams",
    "init_params",
    "mtp_forward",
    "param_infos",
]
