"""Qwen1.5/Qwen2-MoE (model_type `qwen2_moe`) -> GGUF arch `qwen2moe`.

Like qwen3moe but attention q/k/v have biases, no q/k norms, top-k weights are NOT renormalized
(norm_topk_prob False in real checkpoints), and every layer adds a shared expert scaled by
sigmoid(shared_expert_gate(x)).
"""

from __future__ import annotations

from typing import Any

from . import LLAMA_NAMES, MOE_NAMES, SOFTMAX, Config, Family, common_hparams, stack_experts

# transformers' Qwen2MoeConfig defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "num_hidden_layers": 24,
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "max_position_embeddings": 32768,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "rms_norm_eps": 1e-06,
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632,
    "norm_topk_prob": False,
    "rope_theta": 10000.0,
}


def hparams(c: Config) -> dict[str, Any]:
    return {
        **common_hparams(c),
        "expert_feed_forward_length": c.int("moe_intermediate_size"),  # I
        "expert_shared_feed_forward_length": c.int("shared_expert_intermediate_size"),  # S
        "expert_weights_norm": c.bool("norm_topk_prob", default=False),  # moelite extra
        "expert_gating_func": SOFTMAX,  # moelite extra
    }


TENSORS = {
    **LLAMA_NAMES,
    **MOE_NAMES,
    "model.layers.{bid}.self_attn.q_proj.bias": "blk.{bid}.attn_q.bias",
    "model.layers.{bid}.self_attn.k_proj.bias": "blk.{bid}.attn_k.bias",
    "model.layers.{bid}.self_attn.v_proj.bias": "blk.{bid}.attn_v.bias",
    "model.layers.{bid}.mlp.shared_expert.gate_proj.weight": "blk.{bid}.ffn_gate_shexp.weight",  # [S, H]
    "model.layers.{bid}.mlp.shared_expert.up_proj.weight": "blk.{bid}.ffn_up_shexp.weight",  # [S, H]
    "model.layers.{bid}.mlp.shared_expert.down_proj.weight": "blk.{bid}.ffn_down_shexp.weight",  # [H, S]
    "model.layers.{bid}.mlp.shared_expert_gate.weight": "blk.{bid}.ffn_gate_inp_shexp.weight",  # [1, H]
}


def sanitize(w, c: Config) -> None:
    stack_experts(
        w, c, "model.layers.{bid}.mlp.experts.{e}.{proj}.weight", "model.layers.{bid}.mlp.experts.{proj}.weight"
    )


FAMILY = Family(("qwen2_moe",), "qwen2moe", hparams, TENSORS, sanitize, tokenizer_pre="qwen2", defaults=DEFAULTS)
