"""Qwen3-MoE (model_type `qwen3_moe`) -> GGUF arch `qwen3moe`.

Per-layer: RMSNorm -> GQA attention with per-head q_norm/k_norm [head_dim] -> RMSNorm -> softmax router
over E experts, top-k, renormalized when norm_topk_prob (real checkpoints: True) -> SwiGLU experts.
"""

from __future__ import annotations

from typing import Any

from . import LLAMA_NAMES, MOE_NAMES, SOFTMAX, Config, Family, common_hparams, stack_experts

# transformers' Qwen3MoeConfig defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "num_hidden_layers": 24,
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "max_position_embeddings": 32768,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 768,
    "norm_topk_prob": False,
    "rope_theta": 10000.0,
}


def hparams(c: Config) -> dict[str, Any]:
    return {
        **common_hparams(c),
        "attention.key_length": c.head_dim,
        "attention.value_length": c.head_dim,
        "expert_feed_forward_length": c.int("moe_intermediate_size"),  # I
        "expert_weights_norm": c.bool("norm_topk_prob", default=False),  # moelite extra
        "expert_gating_func": SOFTMAX,  # moelite extra
    }


TENSORS = {
    **LLAMA_NAMES,
    **MOE_NAMES,
    "model.layers.{bid}.self_attn.q_norm.weight": "blk.{bid}.attn_q_norm.weight",  # [head_dim]
    "model.layers.{bid}.self_attn.k_norm.weight": "blk.{bid}.attn_k_norm.weight",  # [head_dim]
}


def sanitize(w, c: Config) -> None:
    # experts.e.{gate,up}_proj [I, H], down_proj [H, I] -> [E, I, H] / [E, H, I]
    stack_experts(
        w, c, "model.layers.{bid}.mlp.experts.{e}.{proj}.weight", "model.layers.{bid}.mlp.experts.{proj}.weight"
    )


FAMILY = Family(("qwen3_moe",), "qwen3moe", hparams, TENSORS, sanitize, tokenizer_pre="qwen2", defaults=DEFAULTS)
