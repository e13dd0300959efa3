"""MiniMax-M2 / M2.x (model_type `minimax_m2`) -> GGUF arch `minimax-m2`.

Per layer: RMSNorm -> GQA attention with q/k RMSNorm over the whole projection (n_head * head_dim and
n_kv_heads * head_dim, before the head split, as OLMoE) and partial NeoX RoPE (`rotary_dim` in the real
config, `partial_rotary_factor` in transformers') -> RMSNorm -> MoE: sigmoid scores, selection on score +
`e_score_correction_bias`, renormalised weights (llama.cpp hard-codes it); mixtral-style experts w1/w3/w2.
"""

from __future__ import annotations

from typing import Any

from . import LLAMA_NAMES, SIGMOID, Config, Family, common_hparams, stack_experts
from .glm4_moe import rotary_dims

ATTN = "model.layers.{bid}.self_attn"
MOE = "model.layers.{bid}.block_sparse_moe"


# transformers' MiniMaxM2Config defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "num_hidden_layers": 62,
    "vocab_size": 200064,
    "hidden_size": 3072,
    "intermediate_size": 1536,
    "max_position_embeddings": 196608,
    "num_attention_heads": 48,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-06,
    "num_local_experts": 256,
    "num_experts_per_tok": 8,
    "rope_theta": 5000000.0,
}


def hparams(c: Config) -> dict[str, Any]:
    hd = c.head_dim
    return {
        **common_hparams(c),
        "attention.key_length": hd,
        "attention.value_length": hd,
        "rope.dimension_count": rotary_dims(c, hd),
        "expert_feed_forward_length": c.int("intermediate_size"),
        "expert_gating_func": SIGMOID,
        "expert_weights_norm": True,  # moelite extra (llama.cpp: always)
    }


TENSORS = {
    **LLAMA_NAMES,
    ATTN + ".q_norm.weight": "blk.{bid}.attn_q_norm.weight",  # [n_head * head_dim]
    ATTN + ".k_norm.weight": "blk.{bid}.attn_k_norm.weight",  # [n_kv_heads * head_dim]
    MOE + ".gate.weight": "blk.{bid}.ffn_gate_inp.weight",  # [E, H]
    MOE + ".e_score_correction_bias": "blk.{bid}.exp_probs_b.bias",  # [E]
    MOE + ".experts.w1.weight": "blk.{bid}.ffn_gate_exps.weight",  # [E, I, H]
    MOE + ".experts.w3.weight": "blk.{bid}.ffn_up_exps.weight",  # [E, I, H]
    MOE + ".experts.w2.weight": "blk.{bid}.ffn_down_exps.weight",  # [E, H, I]
}


def sanitize(w, c: Config) -> None:
    stack_experts(w, c, MOE + ".experts.{e}.{proj}.weight", MOE + ".experts.{proj}.weight", ("w1", "w2", "w3"))


FAMILY = Family(
    ("minimax_m2",), "minimax-m2", hparams, TENSORS, sanitize, tokenizer_pre="minimax-m2", defaults=DEFAULTS
)
