"""Ling-3.0 (model_type `bailing_hybrid`: Ling-3.0-tiny 7.9B-A1.3B, Ling-3.0-flash; release class
`BailingMoeV3ForCausalLM`) -> GGUF arch `bailingmoe3`.

Groups of `layer_group_size` layers: KDA layers (mixer_recurrent.cpp), then one MLA layer with RoPE (interleaved pairs,
ggml's NORM rope) and a per-head sigmoid output gate; FFNs DeepSeek-V3-style (the first `first_k_dense_replace`
dense, then grouped sigmoid routing with a selection bias, x routed_scaling_factor, shared experts) with per-layer
SwiGLU clamps after the SiLU. Written the way llama.cpp's converter writes it:
  KDA  attention.q/k/v_proj -> attn_q/k/v; q/k/v_conv1d [C, 1, K] -> ssm_conv1d_{q,k,v}; f_proj (the decay's, full
       rank) -> ssm_f_a; g_proj (the output gate's, full rank) -> ssm_g_a; b_proj -> ssm_beta; A_log [H] -> ssm_a
       [H, 1] = exp(A_log) (the bounded gate lb * sigmoid(exp(A_log) (f + dt)) multiplies by it); dt_bias ->
       ssm_dt.bias; o_norm -> ssm_norm; dense -> attn_output
  MLA  as deepseek_v2.py under `attention.`, g_proj [n_head, H] -> attn_gate; head_count_kv 1 on MLA layers, 0 on KDA
Names are the release's, which transformers 5.25 also saves (model.word_embeddings, attention., mlp.gate.expert_bias).
The KDA head size is `linear_head_dim` in a transformers-saved config, `head_dim` in the release's (transformers
rewrites head_dim to qk_rope_head_dim). MTP blocks (`num_nextn_predict_layers`) are dropped, as llama.cpp's `--no-mtp`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moelite.errors import ConversionError

from . import SIGMOID, Config, Family, drop_layers_beyond, leading_dense_layers, stack_experts
from .deepseek_v2 import split_kv_b
from .kimi_linear import conv_to_3d, kda_tensor_names, mla_hparams

# transformers' BailingHybridConfig defaults: the value of a key read here that config.json omits (rope_theta:
# its field says 6e6, its default_theta 1e4; the field is what it uses, read below)
DEFAULTS = {
    "num_hidden_layers": 42,
    "vocab_size": 157184,
    "hidden_size": 2560,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "max_position_embeddings": 262144,
    "num_attention_heads": 32,
    "rms_norm_eps": 1e-06,
    "num_local_experts": 512,
    "num_experts_per_tok": 8,
    "n_shared_experts": 1,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "first_k_dense_replace": 2,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "head_dim": 128,
    "short_conv_kernel_size": 4,
    "layer_group_size": 6,
    "kda_safe_gate": True,
    "kda_lower_bound": -5.0,
}


def mla_layers(c: Config) -> list[bool]:
    """Per layer: MLA (True) or KDA, from `layer_types`, else BailingHybridConfig's rule (the last of every
    `layer_group_size` layers)."""
    types = c.get("layer_types", default=None)
    if types is None:
        g = c.int("layer_group_size")
        return [(il + 1) % g == 0 for il in range(c.n_layer)]
    if not isinstance(types, list) or len(types) != c.n_layer or set(types) - {"full_attention", "linear_attention"}:
        raise ConversionError(
            f"{c.src}: key layer_types must list {c.n_layer} entries of 'full_attention' / 'linear_attention'"
        )
    return [t == "full_attention" for t in types]


def _limits(c: Config, *keys: str) -> list[float]:
    v = c.get(*keys, default=None)
    if v is None:
        return [0.0] * c.n_layer
    if not isinstance(v, list) or len(v) < c.n_layer or any(not isinstance(x, (int, float)) or x < 0 for x in v if x):
        raise ConversionError(f"{c.src}: key {keys[0]} must list {c.n_layer} non-negative limits (0: none)")
    return [float(x or 0.0) for x in v[: c.n_layer]]


def hparams(c: Config) -> dict[str, Any]:
    if not c.bool("kda_safe_gate"):
        raise ConversionError(
            f"{c.src}: kda_safe_gate = false is not supported (llama.cpp's bailingmoe3 has the bounded gate only)"
        )
    if c.get("score_function", default="sigmoid") != "sigmoid":  # transformers' router: sigmoid only
        raise ConversionError(f"{c.src}: score_function = {c.get('score_function')!r}: expected 'sigmoid'")
    lb = c.float("kda_lower_bound")
    if not lb < 0:
        raise ConversionError(f"{c.src}: kda_lower_bound = {lb}: expected < 0")
    dense = leading_dense_layers(c)
    # transformers clamps the shared experts only, never the dense MLPs (llama.cpp's build_ffn would, with this list)
    shexp = _limits(c, "share_expert_swiglu_limit_list", "swiglu_limits_shared")
    shexp = [0.0 if il < dense else v for il, v in enumerate(shexp)]
    I_exp, n_shared = c.int("moe_intermediate_size"), c.int("num_shared_experts", "n_shared_experts")
    kv: dict[str, Any] = {
        "block_count": c.n_layer,
        "context_length": c.int("model_max_length", "max_position_embeddings"),
        "embedding_length": c.int("hidden_size"),
        "feed_forward_length": c.int("intermediate_size"),
        "attention.head_count": c.int("num_attention_heads"),
        "attention.head_count_kv": [1 if m else 0 for m in mla_layers(c)],
        "rope.freq_base": float(c.rope().get("rope_theta", 6000000.0)),  # the class default: 6e6
        "attention.layer_norm_rms_epsilon": c.float("rms_norm_eps"),
        "expert_count": c.n_expert,
        "expert_used_count": c.int("num_experts_per_token", "num_experts_per_tok"),
        "vocab_size": c.int("vocab_size"),
        "ssm.conv_kernel": c.int("short_conv_kernel_size", "linear_conv_kernel_dim"),
        "kda.head_dim": c.int("linear_head_dim", "head_dim"),  # transformers saves head_dim = qk_rope_head_dim
        "kda.safe_gate": True,
        "kda.gate_lower_bound": lb,
        **mla_hparams(c),
        "expert_feed_forward_length": I_exp,
        "expert_shared_feed_forward_length": c.int("moe_shared_expert_intermediate_size", default=I_exp * n_shared),
        "expert_shared_count": n_shared,
        "leading_dense_block_count": dense,
        "expert_weights_scale": c.float("routed_scaling_factor"),
        "expert_weights_norm": c.bool("moe_renormalize", "norm_topk_prob"),
        "expert_gating_func": SIGMOID,
        "expert_group_count": c.int("num_expert_group", "n_group"),
        "expert_group_used_count": c.int("topk_group"),
        "swiglu_clamp_exp": _limits(c, "expert_swiglu_limit_list", "swiglu_limits"),
        "swiglu_clamp_shexp": shexp,
    }
    return kv


L = "model.layers.{bid}"
ATT = L + ".attention"
MLP = L + ".mlp"
TENSORS = {
    "model.word_embeddings.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    L + ".input_layernorm.weight": "blk.{bid}.attn_norm.weight",
    L + ".post_attention_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    **kda_tensor_names(ATT),
    ATT + ".f_proj.weight": "blk.{bid}.ssm_f_a.weight",  # [C, H] full rank
    ATT + ".g_proj.weight": "blk.{bid}.ssm_g_a.weight",  # [C, H] full rank (KDA layers)
    ATT + ".attn_gate.weight": "blk.{bid}.attn_gate.weight",  # [n_head, H] (MLA layers' g_proj, renamed)
    ATT + ".dense.weight": "blk.{bid}.attn_output.weight",
    ATT + ".q_a_proj.weight": "blk.{bid}.attn_q_a.weight",
    ATT + ".q_a_layernorm.weight": "blk.{bid}.attn_q_a_norm.weight",
    ATT + ".q_b_proj.weight": "blk.{bid}.attn_q_b.weight",
    ATT + ".kv_a_proj_with_mqa.weight": "blk.{bid}.attn_kv_a_mqa.weight",
    ATT + ".kv_a_layernorm.weight": "blk.{bid}.attn_kv_a_norm.weight",
    ATT + ".k_b_proj.weight": "blk.{bid}.attn_k_b.weight",
    ATT + ".v_b_proj.weight": "blk.{bid}.attn_v_b.weight",
    **{f"{MLP}.{x}_proj.weight": f"blk.{{bid}}.ffn_{x}.weight" for x in ("gate", "up", "down")},
    MLP + ".gate.weight": "blk.{bid}.ffn_gate_inp.weight",
    MLP + ".gate.expert_bias": "blk.{bid}.exp_probs_b.bias",
    **{f"{MLP}.experts.{x}_proj.weight": f"blk.{{bid}}.ffn_{x}_exps.weight" for x in ("gate", "up", "down")},
    **{f"{MLP}.shared_experts.{x}_proj.weight": f"blk.{{bid}}.ffn_{x}_shexp.weight" for x in ("gate", "up", "down")},
}


def sanitize(w, c: Config) -> None:
    drop_layers_beyond(w, c)  # MTP blocks
    n_head, nope, v = c.int("num_attention_heads"), c.int("qk_nope_head_dim"), c.int("v_head_dim")
    for bid, mla in enumerate(mla_layers(c)):
        a = ATT.format(bid=bid)
        if mla:
            if f"{a}.g_proj.weight" in w:
                w[f"{a}.attn_gate.weight"] = w.pop(f"{a}.g_proj.weight")
            if f"{a}.kv_b_proj.weight" in w:
                w[f"{a}.k_b_proj.weight"], w[f"{a}.v_b_proj.weight"] = split_kv_b(
                    w.pop(f"{a}.kv_b_proj.weight"), n_head, nope, v
                )
        elif f"{a}.A_log" in w:
            t = w[f"{a}.A_log"]
            n = math.prod(t.shape)
            w[f"{a}.A_log"] = t.map(lambda x: np.exp(x.astype(np.float32)).reshape(-1, 1), (n, 1), ".exp")
            conv_to_3d(w, a)
    stack_experts(w, c, MLP + ".experts.{e}.{proj}.weight", MLP + ".experts.{proj}.weight")


FAMILY = Family(
    ("bailing_hybrid",), "bailingmoe3", hparams, TENSORS, sanitize, tokenizer_pre="bailingmoe2", defaults=DEFAULTS
)
