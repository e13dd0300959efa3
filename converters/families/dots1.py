"""dots.llm1 (model_type `dots1`) -> GGUF arch `dots1`.

Qwen3-style attention (per-head q/k RMSNorm before NeoX RoPE) with DeepSeek-V3-style MoE (see glm4_moe.py):
leading dense layers, sigmoid scores + `e_score_correction_bias`, groups, renormalised weights x
`routed_scaling_factor`, shared experts. transformers' Dots1Config has no `scoring_func`; the real config
does: sigmoid either way. Note: llama.cpp's dots1 loader sizes attn_k/attn_v for MHA only (n_kv_heads =
n_heads, as the real model); moelite runs GQA too.
"""

from __future__ import annotations

from typing import Any

from . import LLAMA_NAMES, SIGMOID, SOFTMAX, Config, Family, common_hparams, stack_experts
from .glm4_moe import ATTN, DEEPSEEK_MOE_NAMES, MLP, deepseek_moe_hparams

# transformers' Dots1Config defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "num_hidden_layers": 62,
    "vocab_size": 152064,
    "hidden_size": 4608,
    "intermediate_size": 10944,
    "max_position_embeddings": 2048,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "rms_norm_eps": 1e-06,
    "first_k_dense_replace": 0,
    "moe_intermediate_size": 1408,
    "routed_scaling_factor": 1.0,
    "norm_topk_prob": False,
    "n_group": 1,
    "topk_group": 1,
    "rope_theta": 10000.0,
}


def hparams(c: Config) -> dict[str, Any]:
    gating = {"softmax": SOFTMAX, "sigmoid": SIGMOID}.get(c.get("scoring_func", default="sigmoid"), SIGMOID)
    return {
        **common_hparams(c),
        **deepseek_moe_hparams(c, gating=gating),
        "attention.key_length": c.head_dim,
        "attention.value_length": c.head_dim,
    }


TENSORS = {
    **LLAMA_NAMES,
    **DEEPSEEK_MOE_NAMES,
    ATTN + ".q_norm.weight": "blk.{bid}.attn_q_norm.weight",  # [head_dim]
    ATTN + ".k_norm.weight": "blk.{bid}.attn_k_norm.weight",
}


def sanitize(w, c: Config) -> None:
    stack_experts(w, c, MLP + ".experts.{e}.{proj}.weight", MLP + ".experts.{proj}.weight")


FAMILY = Family(("dots1",), "dots1", hparams, TENSORS, sanitize, tokenizer_pre="qwen2", defaults=DEFAULTS)
