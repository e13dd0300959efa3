"""GLM-4.5 / 4.5-Air / 4.6 / 4.7 (model_type `glm4_moe`) -> GGUF arch `glm4moe`.

Per layer: RMSNorm -> GQA attention with q/k/v biases (n_head * head_dim may differ from hidden_size), optional
per-head q/k RMSNorm (`use_qk_norm`), partial NeoX RoPE (`partial_rotary_factor`, 0.5) -> RMSNorm -> the
first `first_k_dense_replace` layers dense SwiGLU, the rest DeepSeek-V3-style MoE: sigmoid scores, selection on
score + `e_score_correction_bias` with group-limited top-k, renormalised weights x `routed_scaling_factor`,
plus `n_shared_experts` shared experts. The MTP layer(s) (`model.layers.{num_hidden_layers}..`: a decoder layer plus
eh_proj / enorm / hnorm / shared_head) are kept as llama.cpp's converter keeps them (blk.{n_layer + i}, nextn.*,
`nextn_predict_layers` counted in block_count); speculative="mtp" runs them (csrc/mtp.cpp).
"""

from __future__ import annotations

from typing import Any

from . import (
    LLAMA_NAMES,
    MOE_NAMES,
    MTP_NAMES,
    SIGMOID,
    Config,
    Family,
    common_hparams,
    mtp_hparams,
    stack_experts,
    with_mtp_layers,
)

ATTN = "model.layers.{bid}.self_attn"
MLP = "model.layers.{bid}.mlp"


# transformers' Glm4MoeConfig defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "num_hidden_layers": 46,
    "vocab_size": 151552,
    "hidden_size": 4096,
    "intermediate_size": 10944,
    "max_position_embeddings": 131072,
    "num_attention_heads": 96,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "n_routed_experts": 128,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 1,
    "moe_intermediate_size": 1408,
    "n_shared_experts": 1,
    "routed_scaling_factor": 1.0,
    "norm_topk_prob": True,
    "n_group": 1,
    "topk_group": 1,
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.5,
}


def rotary_dims(c: Config, head_dim: int, default: float = 1.0) -> int:
    """Rotated dims per head: `rotary_dim`, else head_dim x `partial_rotary_factor` (top level or in
    rope_parameters, transformers 5)."""
    if c.has("rotary_dim"):
        return c.int("rotary_dim")
    factor = c.rope().get("partial_rotary_factor", c.get("partial_rotary_factor", default=default))
    return int(head_dim * float(factor))


def deepseek_moe_hparams(c: Config, *, gating: int = SIGMOID, norm_default: bool = True) -> dict[str, Any]:
    """The DeepSeek-V3-style MoE keys shared by GLM-4.x MoE and dots1."""
    return {
        "leading_dense_block_count": c.int("first_k_dense_replace", default=0),
        "expert_feed_forward_length": c.int("moe_intermediate_size"),
        "expert_shared_count": c.int("n_shared_experts", default=0),
        "expert_weights_scale": c.float("routed_scaling_factor", default=1.0),
        "expert_weights_norm": c.bool("norm_topk_prob", default=norm_default),
        "expert_gating_func": gating,
        "expert_group_count": c.int("n_group", default=1),
        "expert_group_used_count": c.int("topk_group", default=1),
    }


def hparams(c: Config) -> dict[str, Any]:
    hd = c.head_dim
    return {
        **common_hparams(c),
        **deepseek_moe_hparams(c),
        "attention.key_length": hd,
        "attention.value_length": hd,
        "rope.dimension_count": rotary_dims(c, hd, default=0.5),
        "vocab_size": c.int("vocab_size"),
        **mtp_hparams(c),
    }


DEEPSEEK_MOE_NAMES = {
    **MOE_NAMES,
    MLP + ".gate_proj.weight": "blk.{bid}.ffn_gate.weight",  # dense layers [I, H]
    MLP + ".up_proj.weight": "blk.{bid}.ffn_up.weight",
    MLP + ".down_proj.weight": "blk.{bid}.ffn_down.weight",
    MLP + ".shared_experts.gate_proj.weight": "blk.{bid}.ffn_gate_shexp.weight",  # [n_shared * I, H]
    MLP + ".shared_experts.up_proj.weight": "blk.{bid}.ffn_up_shexp.weight",
    MLP + ".shared_experts.down_proj.weight": "blk.{bid}.ffn_down_shexp.weight",
    MLP + ".gate.e_score_correction_bias": "blk.{bid}.exp_probs_b.bias",  # [E]
}

TENSORS = {
    **LLAMA_NAMES,
    **DEEPSEEK_MOE_NAMES,
    # llama.cpp's glm4moe loads the pre-FFN norm under this name (the runtime takes it as ffn_norm)
    "model.layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.post_attention_norm.weight",
    ATTN + ".q_proj.bias": "blk.{bid}.attn_q.bias",
    ATTN + ".k_proj.bias": "blk.{bid}.attn_k.bias",
    ATTN + ".v_proj.bias": "blk.{bid}.attn_v.bias",
    ATTN + ".q_norm.weight": "blk.{bid}.attn_q_norm.weight",  # [head_dim] (use_qk_norm)
    ATTN + ".k_norm.weight": "blk.{bid}.attn_k_norm.weight",
    **MTP_NAMES,
}


def sanitize(w, c: Config) -> None:
    stack_experts(w, with_mtp_layers(c), MLP + ".experts.{e}.{proj}.weight", MLP + ".experts.{proj}.weight")


FAMILY = Family(
    ("glm4_moe",), "glm4moe", hparams, TENSORS, sanitize, tokenizer_pre="glm4", defaults=DEFAULTS, keep_mtp=True
)
