"""LFM2-MoE (model_type `lfm2_moe`, e.g. LFM2-8B-A1B) -> GGUF arch `lfm2moe`.

Hybrid: `layer_types` "conv" layers are gated short convolutions (in_proj [H -> 3H] = b, c, x; y = c * conv_L(b * x);
out_proj; the conv state is the last L - 1 inputs), "full_attention" layers are GQA with per-head q/k RMSNorm and
NeoX RoPE. Pre-norms `operator_norm` / `ffn_norm`; the first `num_dense_layers` are dense SwiGLU (w1/w3/w2),
the rest MoE: sigmoid scores, top-k selected on score + `expert_bias`, renormalised (llama.cpp always). The final
norm is HF's `embedding_norm` (applied after the last layer), written as llama.cpp names it: token_embd_norm.
`attention.head_count_kv` is per layer, 0 on conv layers (llama.cpp derives "recurrent" from it).
"""

from __future__ import annotations

from typing import Any

from moelite.errors import ConversionError

from . import SIGMOID, Config, Family, common_hparams, squeeze_conv, stack_experts

L = "model.layers.{bid}"


# transformers' Lfm2MoeConfig defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "num_hidden_layers": 32,
    "vocab_size": 65536,
    "hidden_size": 2048,
    "intermediate_size": 7168,
    "max_position_embeddings": 128000,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "norm_eps": 1e-05,
    "num_experts": 32,
    "num_experts_per_tok": 4,
    "conv_L_cache": 3,
    "conv_bias": False,
    "num_dense_layers": 2,
    "moe_intermediate_size": 1792,
    "routed_scaling_factor": 1.0,
    "rope_theta": 1000000.0,
}


def hparams(c: Config) -> dict[str, Any]:
    types = c.get("layer_types")
    if not isinstance(types, list) or len(types) != c.n_layer or set(types) - {"conv", "full_attention"}:
        raise ConversionError(f"{c.src}: layer_types must list {c.n_layer} entries of 'conv' / 'full_attention'")
    if c.bool("conv_bias", default=False):
        raise ConversionError(f"{c.src}: conv_bias = true is not supported (llama.cpp's short conv has no bias)")
    kv_heads = c.int("num_key_value_heads")
    return {
        **common_hparams(c),
        "attention.head_count_kv": [0 if t == "conv" else kv_heads for t in types],
        "shortconv.l_cache": c.int("conv_L_cache"),
        "leading_dense_block_count": c.int("num_dense_layers", default=0),
        "expert_feed_forward_length": c.int("moe_intermediate_size"),
        "expert_gating_func": SIGMOID,
        "expert_weights_norm": True,  # moelite extra (llama.cpp: always)
        "expert_weights_scale": c.float("routed_scaling_factor", default=1.0),
        "vocab_size": c.int("vocab_size"),
    }


TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.embedding_norm.weight": "token_embd_norm.weight",  # the final norm (llama.cpp's name)
    "lm_head.weight": "output.weight",
    L + ".operator_norm.weight": "blk.{bid}.attn_norm.weight",
    L + ".ffn_norm.weight": "blk.{bid}.ffn_norm.weight",
    L + ".conv.conv.weight": "blk.{bid}.shortconv.conv.weight",  # [H, 1, L] -> [H, L]
    L + ".conv.in_proj.weight": "blk.{bid}.shortconv.in_proj.weight",  # [3H, H]
    L + ".conv.out_proj.weight": "blk.{bid}.shortconv.out_proj.weight",
    L + ".self_attn.q_proj.weight": "blk.{bid}.attn_q.weight",
    L + ".self_attn.k_proj.weight": "blk.{bid}.attn_k.weight",
    L + ".self_attn.v_proj.weight": "blk.{bid}.attn_v.weight",
    L + ".self_attn.out_proj.weight": "blk.{bid}.attn_output.weight",
    L + ".self_attn.q_layernorm.weight": "blk.{bid}.attn_q_norm.weight",
    L + ".self_attn.k_layernorm.weight": "blk.{bid}.attn_k_norm.weight",
    L + ".feed_forward.w1.weight": "blk.{bid}.ffn_gate.weight",  # dense layers
    L + ".feed_forward.w3.weight": "blk.{bid}.ffn_up.weight",
    L + ".feed_forward.w2.weight": "blk.{bid}.ffn_down.weight",
    L + ".feed_forward.gate.weight": "blk.{bid}.ffn_gate_inp.weight",  # [E, H]
    L + ".feed_forward.expert_bias": "blk.{bid}.exp_probs_b.bias",  # [E]
    L + ".feed_forward.experts.w1.weight": "blk.{bid}.ffn_gate_exps.weight",
    L + ".feed_forward.experts.w3.weight": "blk.{bid}.ffn_up_exps.weight",
    L + ".feed_forward.experts.w2.weight": "blk.{bid}.ffn_down_exps.weight",
}


def sanitize(w, c: Config) -> None:
    for bid in range(c.n_layer):
        name = L.format(bid=bid) + ".conv.conv.weight"
        if name in w:
            squeeze_conv(w, name)
    stack_experts(
        w,
        c,
        L + ".feed_forward.experts.{e}.{proj}.weight",
        L + ".feed_forward.experts.{proj}.weight",
        ("w1", "w2", "w3"),
    )


FAMILY = Family(("lfm2_moe",), "lfm2moe", hparams, TENSORS, sanitize, tokenizer_pre="lfm2", defaults=DEFAULTS)
