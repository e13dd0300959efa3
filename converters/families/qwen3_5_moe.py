"""Qwen3.5 / Qwen3.6 MoE (model_type `qwen3_5_moe_text`, or `qwen3_5_moe` with a `text_config`) -> GGUF arch
`qwen35moe`.

Hybrid, `layer_types` (default: full attention every `full_attention_interval` = 4th layer):
  linear_attention: Gated DeltaNet (mixer_recurrent.cpp): in_proj_qkv -> causal conv (kernel 4, no bias) ->
    silu -> q, k (L2-normed), v; beta = sigmoid(in_proj_b), g = softplus(in_proj_a + dt_bias) * -exp(A_log);
    gated RMSNorm (plain weight) * silu(in_proj_z); out_proj. Written as llama.cpp does: attn_qkv, attn_gate,
    ssm_conv1d, ssm_dt.bias, ssm_a (= -exp(A_log)), ssm_beta, ssm_alpha, ssm_norm, ssm_out, with the V heads
    **reordered** from HF's grouped order (k head g: v heads g r .. g r + r - 1) to the tiled order ggml's
    gated_delta_net broadcasts with (v head p reads k head p mod Hk): every V-indexed row/column moves.
  full_attention: q_proj emits [q_h | gate_h] per head; per-head q/k RMSNorm; partial NeoX RoPE (interleaved
    M-RoPE, equal to NeoX for text); output * sigmoid(gate) -> o_proj.
Every layer: softmax top-k experts (always renormalised) + a sigmoid-gated shared expert. All RMSNorms except
the DeltaNet's gated one are zero-centred (x * (1 + w)): +1 is folded into those weights, as llama.cpp does.
The MTP block (`mtp.*`: `mtp_num_hidden_layers` full-attention MoE layers with fc / pre_fc_norm_* / norm) is kept
as llama.cpp's converter keeps it, blk.{n_layer}.* with nextn.* (speculative="mtp" runs it: csrc/mtp.cpp); the
vision tower is dropped.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moelite.errors import ConversionError

from . import (
    LLAMA_NAMES,
    MOE_NAMES,
    MTP_NAMES,
    SOFTMAX,
    Config,
    Family,
    common_hparams,
    fold_zero_centred_norms,
    mtp_hparams,
    neg_exp,
    release_mtp_layers,
    squeeze_conv,
    stack_experts,
    strip_prefix,
    with_mtp_layers,
)

L = "model.layers.{bid}"
LA = L + ".linear_attn"


# transformers' Qwen3_5MoeTextConfig defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "num_hidden_layers": 40,
    "vocab_size": 248320,
    "hidden_size": 2048,
    "max_position_embeddings": 32768,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "rms_norm_eps": 1e-06,
    "num_experts": 256,
    "num_experts_per_tok": 8,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.25,
    "full_attention_interval": 4,
}


def _layer_types(c: Config) -> list[str]:
    types = c.get("layer_types", default=None)
    if types is None:
        n = c.int("full_attention_interval", default=4)
        types = ["full_attention" if (i + 1) % n == 0 else "linear_attention" for i in range(c.n_layer)]
    if not isinstance(types, list) or len(types) != c.n_layer or set(types) - {"full_attention", "linear_attention"}:
        raise ConversionError(
            f"{c.src}: layer_types must list {c.n_layer} entries of full_attention / linear_attention"
        )
    return types


def _layer_pattern(c: Config, types: list[str]) -> dict[str, Any]:
    """`full_attention_interval` when the layers follow it (what llama.cpp writes), else the per-layer array."""
    n = c.int("full_attention_interval", default=4)
    if types == ["full_attention" if (i + 1) % n == 0 else "linear_attention" for i in range(c.n_layer)]:
        return {"full_attention_interval": n}
    return {"attention.recurrent_layers": [t == "linear_attention" for t in types]}


def hparams(c: Config) -> dict[str, Any]:
    rp = c.rope()
    hd = c.head_dim
    hk, hv = c.int("linear_num_key_heads"), c.int("linear_num_value_heads")
    dk, dv = c.int("linear_key_head_dim"), c.int("linear_value_head_dim")
    if dk != dv or hv % hk:
        raise ConversionError(
            f"{c.src}: linear_key_head_dim {dk} != linear_value_head_dim {dv} or value heads {hv} "
            f"not a multiple of key heads {hk}: not supported (ggml's gated_delta_net)"
        )
    types = _layer_types(c)
    sections = list(rp.get("mrope_section") or [11, 11, 10])
    kv = {
        **common_hparams(c),
        "attention.key_length": hd,
        "attention.value_length": hd,
        "rope.dimension_count": int(
            hd * float(rp.get("partial_rotary_factor", c.get("partial_rotary_factor", default=0.25)))
        ),
        "rope.dimension_sections": (sections + [0, 0, 0, 0])[:4],
        "ssm.conv_kernel": c.int("linear_conv_kernel_dim"),
        "ssm.state_size": dk,
        "ssm.group_count": hk,
        "ssm.time_step_rank": hv,
        "ssm.inner_size": dv * hv,
        **_layer_pattern(c, types),
        "expert_feed_forward_length": c.int("moe_intermediate_size"),
        "expert_shared_feed_forward_length": c.int("shared_expert_intermediate_size"),
        "expert_gating_func": SOFTMAX,  # moelite extra
        "expert_weights_norm": True,  # moelite extra (always renormalised)
        **mtp_hparams(c),
    }
    return kv


TENSORS = {
    **LLAMA_NAMES,
    **MOE_NAMES,
    # llama.cpp's qwen35moe loads the pre-FFN norm under this name (the runtime takes it as ffn_norm)
    L + ".post_attention_layernorm.weight": "blk.{bid}.post_attention_norm.weight",
    L + ".self_attn.q_norm.weight": "blk.{bid}.attn_q_norm.weight",
    L + ".self_attn.k_norm.weight": "blk.{bid}.attn_k_norm.weight",
    L + ".mlp.shared_expert.gate_proj.weight": "blk.{bid}.ffn_gate_shexp.weight",
    L + ".mlp.shared_expert.up_proj.weight": "blk.{bid}.ffn_up_shexp.weight",
    L + ".mlp.shared_expert.down_proj.weight": "blk.{bid}.ffn_down_shexp.weight",
    L + ".mlp.shared_expert_gate.weight": "blk.{bid}.ffn_gate_inp_shexp.weight",  # [1, H]
    LA + ".in_proj_qkv.weight": "blk.{bid}.attn_qkv.weight",  # [2 Hk dk + Hv dv, H]
    LA + ".in_proj_z.weight": "blk.{bid}.attn_gate.weight",  # [Hv dv, H]
    LA + ".conv1d.weight": "blk.{bid}.ssm_conv1d.weight",  # [C, 1, K] -> [C, K]
    LA + ".dt_bias": "blk.{bid}.ssm_dt.bias",  # [Hv]
    LA + ".A_log": "blk.{bid}.ssm_a",  # [Hv], written as -exp(A_log)
    LA + ".in_proj_b.weight": "blk.{bid}.ssm_beta.weight",  # [Hv, H]
    LA + ".in_proj_a.weight": "blk.{bid}.ssm_alpha.weight",  # [Hv, H]
    LA + ".norm.weight": "blk.{bid}.ssm_norm.weight",  # [dv], plain weight
    LA + ".out_proj.weight": "blk.{bid}.ssm_out.weight",  # [H, Hv dv]
    **MTP_NAMES,
}


def tiled_order(hk: int, hv: int) -> np.ndarray:
    """HF v head index for each GGUF position: position p = i * hk + g holds HF head g * r + i (r = hv / hk)."""
    r = hv // hk
    return np.array([g * r + i for i in range(r) for g in range(hk)])


def reorder_v(w, name: str, order: np.ndarray, d: int, axis: int, start: int = 0) -> None:
    """Permute the V-head blocks (d rows/columns each) of w[name] along axis, from offset `start`."""
    t = w[name]
    n = len(order) * d
    idx = np.concatenate(
        [
            np.arange(t.shape[axis])[:start],
            (start + (order[:, None] * d + np.arange(d)[None, :])).reshape(-1),
            np.arange(t.shape[axis])[start + n :],
        ]
    )
    w[name] = t.map(lambda a: np.take(a, idx, axis=axis), t.shape, ".vheads")


def sanitize(w, c: Config) -> None:
    strip_prefix(
        w, (("model.language_model.", "model."), ("model.mtp.", "mtp.")), drop=("model.visual.", "model.vision_tower.")
    )
    release_mtp_layers(w, c, "qwen35moe")  # mtp.* -> model.layers.{n_layer}.* (norms still (1+w): folded below)
    hk, hv = c.int("linear_num_key_heads"), c.int("linear_num_value_heads")
    dk, dv = c.int("linear_key_head_dim"), c.int("linear_value_head_dim")
    order = tiled_order(hk, hv)
    fold_zero_centred_norms(w, keep=("linear_attn.norm.weight",))
    for bid in range(c.n_layer):
        la = LA.format(bid=bid)
        if f"{la}.conv1d.weight" not in w:
            continue
        squeeze_conv(w, f"{la}.conv1d.weight")
        neg_exp(w, f"{la}.A_log")
        if hk != hv:
            reorder_v(w, f"{la}.in_proj_qkv.weight", order, dv, 0, start=2 * hk * dk)
            reorder_v(w, f"{la}.conv1d.weight", order, dv, 0, start=2 * hk * dk)
            reorder_v(w, f"{la}.in_proj_z.weight", order, dv, 0)
            for n in ("in_proj_b.weight", "in_proj_a.weight", "A_log", "dt_bias"):
                reorder_v(w, f"{la}.{n}", order, 1, 0)
            reorder_v(w, f"{la}.out_proj.weight", order, dv, 1)
    stack_experts(w, with_mtp_layers(c), L + ".mlp.experts.{e}.{proj}.weight", L + ".mlp.experts.{proj}.weight")


FAMILY = Family(
    ("qwen3_5_moe_text",),
    "qwen35moe",
    hparams,
    TENSORS,
    sanitize,
    tokenizer_pre="qwen35",
    defaults=DEFAULTS,
    keep_mtp=True,
)
