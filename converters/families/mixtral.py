"""Mixtral (model_type `mixtral`) -> GGUF arch `llama`, as llama.cpp's converter writes it.

The `llama` arch uses ggml's NORM rope (adjacent pairs) while HF uses rotate_half, so attn_q / attn_k rows
are permuted per head (llama.cpp's converter does the same; a runtime reading `llama` GGUFs expects it).
Experts: 8 SwiGLU experts w1 (gate), w3 (up), w2 (down), softmax router, top-2, weights renormalized.
"""

from __future__ import annotations

from typing import Any

from ..lazy import permute_qk
from . import LLAMA_NAMES, SOFTMAX, Config, Family, common_hparams, stack_experts

# transformers' MixtralConfig defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "num_hidden_layers": 32,
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "rope_theta": 1000000.0,
}


def hparams(c: Config) -> dict[str, Any]:
    return {
        **common_hparams(c),
        "vocab_size": c.int("vocab_size"),
        "rope.dimension_count": c.head_dim,
        "expert_weights_norm": True,  # moelite extra: Mixtral renormalizes the top-k softmax weights
        "expert_gating_func": SOFTMAX,  # moelite extra
    }


MOE = "model.layers.{bid}.block_sparse_moe"
TENSORS = {
    **LLAMA_NAMES,
    MOE + ".gate.weight": "blk.{bid}.ffn_gate_inp.weight",  # [E, H]
    MOE + ".experts.w1.weight": "blk.{bid}.ffn_gate_exps.weight",  # [E, I, H]
    MOE + ".experts.w3.weight": "blk.{bid}.ffn_up_exps.weight",  # [E, I, H]
    MOE + ".experts.w2.weight": "blk.{bid}.ffn_down_exps.weight",  # [E, H, I]
}


def permute_attention(w, c: Config) -> None:
    """HF rotate_half q/k rows -> ggml NORM-rope order (shared with granitemoe)."""
    n_head, n_kv = c.int("num_attention_heads"), c.int("num_key_value_heads", default=c.int("num_attention_heads"))
    for bid in range(c.n_layer):
        for proj, n in (("q_proj", n_head), ("k_proj", n_kv)):
            for suffix in ("weight", "bias"):
                name = f"model.layers.{bid}.self_attn.{proj}.{suffix}"
                if name in w:
                    w[name] = permute_qk(w[name], n)


def sanitize(w, c: Config) -> None:
    permute_attention(w, c)
    # experts.e.w1/w3 [I, H], w2 [H, I] -> [E, I, H] / [E, H, I]
    stack_experts(w, c, MOE + ".experts.{e}.{proj}.weight", MOE + ".experts.{proj}.weight", ("w1", "w2", "w3"))


FAMILY = Family(("mixtral",), "llama", hparams, TENSORS, sanitize, tokenizer_pre="default", defaults=DEFAULTS)
