"""OLMoE (model_type `olmoe`) -> GGUF arch `olmoe`.

Attention has q_norm / k_norm over the whole projection ([n_head * head_dim]), which is why llama.cpp
requires n_kv_heads == n_heads (k_norm is created with n_embd). 64 experts, top-8, softmax, no
renormalization (norm_topk_prob False). `feed_forward_length` is the expert size (llama.cpp reads n_ff).
"""

from __future__ import annotations

from typing import Any

from moelite.errors import ConversionError

from . import LLAMA_NAMES, MOE_NAMES, SOFTMAX, Config, Family, common_hparams, stack_experts

# transformers' OlmoeConfig defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "num_hidden_layers": 16,
    "vocab_size": 50304,
    "hidden_size": 2048,
    "intermediate_size": 2048,
    "max_position_embeddings": 4096,
    "num_attention_heads": 16,
    "rms_norm_eps": 1e-05,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "norm_topk_prob": False,
    "rope_theta": 10000.0,
}


def hparams(c: Config) -> dict[str, Any]:
    if c.int("num_key_value_heads", default=c.int("num_attention_heads")) != c.int("num_attention_heads"):
        raise ConversionError(
            f"{c.src}: olmoe with num_key_value_heads != num_attention_heads cannot load in "
            f"llama.cpp (k_norm is [n_embd]); expected them equal"
        )
    return {
        **common_hparams(c),
        "expert_weights_norm": c.bool("norm_topk_prob", default=False),  # moelite extra
        "expert_gating_func": SOFTMAX,  # moelite extra
    }


TENSORS = {
    **LLAMA_NAMES,
    **MOE_NAMES,
    "model.layers.{bid}.self_attn.q_norm.weight": "blk.{bid}.attn_q_norm.weight",  # [n_head * head_dim]
    "model.layers.{bid}.self_attn.k_norm.weight": "blk.{bid}.attn_k_norm.weight",  # [n_kv * head_dim]
}


def sanitize(w, c: Config) -> None:
    stack_experts(
        w, c, "model.layers.{bid}.mlp.experts.{e}.{proj}.weight", "model.layers.{bid}.mlp.experts.{proj}.weight"
    )


FAMILY = Family(("olmoe",), "olmoe", hparams, TENSORS, sanitize, tokenizer_pre="olmo", defaults=DEFAULTS)
