"""StepFun Step-3.5-Flash (model_type `step3p5`) and Step-3.7-Flash (`step3p7`, a vision wrapper around the same text
model under `text_config`) -> GGUF arch `step35`.

Per layer: (1+w) RMSNorm -> GQA attention (per-head (1+w) q/k RMSNorm, NeoX RoPE, kq scale 1/sqrt(head_dim)) whose
output is gated per head, o_h *= sigmoid(g_proj x)_h (g_proj [n_head, H] on the normed input) -> + residual; (1+w)
RMSNorm -> a SwiGLU MLP (the leading dense layers) or the MoE block: sigmoid scores, top-k on score + `router_bias`,
renormalised x `moe_router_scaling_factor`, plus a shared expert of width `share_expert_dim` -> + residual. Sliding
layers have their own query-head count (the kv heads are model-wide in transformers) and full RoPE on their own theta;
full layers rotate half the head. SwiGLU limits per layer (`swiglu_limits` routed, `swiglu_limits_shared` shared and
dense MLPs; 0 / null = none) clamp after the SiLU: min(silu(g), L) * clamp(u, -L, L).

Config: transformers' keys (layer_types, mlp_layer_types, num_sliding_attention_heads, a per-layer-type
rope_parameters) or the release config.json's (attention_other_setting, moe_layers_enum, rope_theta per layer,
partial_rotary_factors, num_attention_groups, moe_num_experts / moe_top_k, per-layer lists padded with the MTP
blocks), read from config.json directly: transformers 5.25 consumes the release keys, and llama.cpp's converter
through AutoConfig then fails (KeyError num_attention_groups). What neither gives takes StepFun's class defaults.

What llama.cpp hardcodes and this file honours: full layers rotate `rope.dimension_count` / 2 and sliding ones all of
it (so rope.dimension_count = head_dim, and partial rotary must be 0.5 on full and 1.0 on sliding layers, which its
converter asserts too); sigmoid gating when the key is absent; dense or MoE per layer by which tensors exist. The
(1+w) norms are stored with +1 folded in, as llama.cpp's converter does. expert_weights_norm is always written true:
transformers always renormalises (llama.cpp's converter writes it only from the release key `norm_expert_weight`).
Refused by name: a RoPE type other than default (llama3 factors), query_pre_attn_scalar other than head_dim, sliding
layers with another head size, norm_expert_weight false.

MTP: the release appends `num_nextn_predict_layers` blocks at model.layers.{n_layer + i} (a decoder block plus eh_proj
/ enorm / hnorm / transformer.shared_head); kept as llama.cpp does, blk.{n_layer + i} with nextn.* names and the
per-layer arrays counting them (transformers' class saves none).
"""

from __future__ import annotations

import math
from typing import Any

from moelite.errors import ConversionError

from . import (
    LLAMA_NAMES,
    SIGMOID,
    Config,
    Family,
    fold_zero_centred_norms,
    n_nextn,
    strip_prefix,
)

ATTN = "model.layers.{bid}.self_attn"

# transformers' Step3p7TextConfig defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "vocab_size": 128815,
    "hidden_size": 4096,
    "intermediate_size": 11264,
    "num_hidden_layers": 45,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-05,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 1280,
    "n_routed_experts": 288,
    "share_expert_dim": 1280,
    "moe_router_scaling_factor": 1.0,
    "rope_theta": 10000.0,
}
DENSE_LEAD = 3  # the class without mlp_layer_types / moe_layers_enum: layers 3.. are MoE


def per_layer(c: Config, key: str, default: Any) -> list:
    """A per-layer list of the trunk and its MTP blocks (the release pads them; transformers trims them): n_layer +
    nextn entries, the MTP entries `default` when the list stops at the trunk."""
    n, nextn = c.n_layer, n_nextn(c)
    v = c.get(key, default=None)
    if v is None:
        return [default] * (n + nextn)
    if not isinstance(v, list) or len(v) not in (n, n + nextn):
        raise ConversionError(f"{c.src}: key {key} must list {n} (or {n + nextn}, with the MTP blocks) entries")
    return v + [default] * (n + nextn - len(v))


def sliding(c: Config) -> list[bool]:
    types = per_layer(c, "layer_types", "full_attention")
    if not set(types) <= {"sliding_attention", "full_attention"}:
        raise ConversionError(f"{c.src}: key layer_types: expected 'sliding_attention' / 'full_attention' entries")
    return [t == "sliding_attention" for t in types]


def dense_lead(c: Config) -> int:
    types = c.get("mlp_layer_types", default=None)
    if types is None:
        enum = c.get("moe_layers_enum", default=None)
        if enum is None:
            return min(DENSE_LEAD, c.n_layer)
        items = enum.split(",") if isinstance(enum, str) else enum
        try:
            moe = {int(i) for i in items if str(i).strip()}
        except (TypeError, ValueError):
            raise ConversionError(f"{c.src}: key moe_layers_enum must list layer indices") from None
        types = ["sparse" if i in moe else "dense" for i in range(c.n_layer)]
    if not isinstance(types, list) or len(types) < c.n_layer:
        raise ConversionError(f"{c.src}: key mlp_layer_types must list {c.n_layer} entries")
    return next((i for i, t in enumerate(types[: c.n_layer]) if t == "sparse"), c.n_layer)


def number(c: Config, key: str, v: Any, kind: type = float) -> Any:
    """A nested value (rope_parameters / attention_other_setting entries) as a number, else ConversionError."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (kind is int and v != int(v)):
        raise ConversionError(
            f"{c.src}: key {key} = {str(v)[:40]}: expected {'an integer' if kind is int else 'a number'}"
        )
    return kind(v)


def rope(c: Config, swa: list[bool]) -> tuple[float, float]:
    """(full theta, sliding theta); partial rotary checked against what llama.cpp hardcodes (0.5 full, 1.0 sliding)."""
    rp = c.d.get("rope_parameters")
    if isinstance(rp, dict) and isinstance(rp.get("full_attention", rp.get("sliding_attention")), dict):
        kinds = {"full_attention": rp.get("full_attention"), "sliding_attention": rp.get("sliding_attention")}
        theta = {
            k: number(c, f"rope_parameters.{k}.rope_theta", e.get("rope_theta", 10000.0))
            for k, e in kinds.items()
            if isinstance(e, dict)
        }
        partial = {
            k: number(c, f"rope_parameters.{k}.partial_rotary_factor", e.get("partial_rotary_factor", 1.0))
            for k, e in kinds.items()
            if isinstance(e, dict)
        }
        types = [e.get("rope_type", "default") for e in kinds.values() if isinstance(e, dict)]
    else:
        n = c.n_layer + n_nextn(c)
        thetas = c.get("rope_theta")
        thetas = per_layer(c, "rope_theta", None) if isinstance(thetas, list) else [thetas] * n
        factors = per_layer(c, "partial_rotary_factors", None)
        thetas = [number(c, "rope_theta", t) for t in thetas]

        def kind(s: bool) -> str:
            return "sliding_attention" if s else "full_attention"

        theta = {kind(s): float(t) for s, t in zip(swa, thetas)}
        partial = {kind(s): 1.0 if f is None else number(c, "partial_rotary_factors", f) for s, f in zip(swa, factors)}
        scaling = c.d.get("rope_scaling") or {}
        types = [scaling.get("rope_type", scaling.get("type", "default"))] if isinstance(scaling, dict) else ["?"]
    if any(t != "default" for t in types):
        raise ConversionError(
            f"{c.src}: rope type {str(types)[:40]} is not supported (step35: plain RoPE; llama3 "
            f"rope factors are not written by this converter)"
        )
    for kind, want in (("full_attention", 0.5), ("sliding_attention", 1.0)):
        if kind in partial and partial[kind] != want:
            raise ConversionError(
                f"{c.src}: partial rotary factor {partial[kind]} on {kind} layers: expected {want} "
                f"(llama.cpp's step35 graph hardcodes half the head on full layers, all on sliding)"
            )
    full = theta.get("full_attention", theta.get("sliding_attention", 10000.0))
    return full, theta.get("sliding_attention", full)


def limits(c: Config, key: str) -> list[float]:
    vals = per_layer(c, key, 0.0)
    if any(v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0) for v in vals):
        raise ConversionError(f"{c.src}: key {key} must list non-negative numbers (0 / null: no clamp)")
    return [0.0 if v is None else float(v) for v in vals]


def hparams(c: Config) -> dict[str, Any]:
    hd, n_head = c.head_dim, c.int("num_attention_heads")
    n_kv = c.int("num_key_value_heads", "num_attention_groups")
    other = c.get("attention_other_setting", default=None) or {}
    if not isinstance(other, dict):
        raise ConversionError(f"{c.src}: key attention_other_setting must be an object")
    n_head_swa = c.int("num_sliding_attention_heads", default=None) or number(
        c, "attention_other_setting.num_attention_heads", other.get("num_attention_heads", n_head), int
    )
    n_kv_swa = number(c, "attention_other_setting.num_attention_groups", other.get("num_attention_groups", n_kv), int)
    if n_head_swa <= 0 or n_kv_swa <= 0 or n_head_swa % n_kv_swa:
        raise ConversionError(
            f"{c.src}: key attention_other_setting: {n_head_swa} query heads over {n_kv_swa} kv "
            f"heads on the sliding layers: expected a positive multiple"
        )
    if (
        number(c, "attention_other_setting.head_dim", other.get("head_dim", hd), int) != hd
        or c.get("query_pre_attn_scalar", default=hd) != hd
    ):
        raise ConversionError(
            f"{c.src}: keys attention_other_setting.head_dim / query_pre_attn_scalar: expected "
            f"{hd} (head_dim; the step35 GGUF has one head size and scale 1/sqrt(head_dim))"
        )
    if c.get("norm_expert_weight", default=True) is False:
        raise ConversionError(f"{c.src}: key norm_expert_weight false: transformers' Step-3.5 always renormalises")
    swa = sliding(c)
    full_theta, swa_theta = rope(c, swa)
    nextn = n_nextn(c)
    kv = {
        "block_count": c.n_layer + nextn,
        "context_length": c.int("max_position_embeddings"),
        "embedding_length": c.int("hidden_size"),
        "feed_forward_length": c.int("intermediate_size"),
        "vocab_size": c.int("vocab_size"),
        "attention.head_count": [n_head_swa if s else n_head for s in swa],
        "attention.head_count_kv": [n_kv_swa if s else n_kv for s in swa],
        "attention.key_length": hd,
        "attention.value_length": hd,
        "attention.layer_norm_rms_epsilon": c.float("rms_norm_eps"),
        "rope.dimension_count": hd,  # llama.cpp: full layers rotate half of it, sliding layers all of it
        "rope.freq_base": full_theta,
        "expert_count": c.n_expert,
        "expert_used_count": c.int("num_experts_per_tok", "moe_top_k"),
        "expert_feed_forward_length": c.int("moe_intermediate_size"),
        "expert_shared_feed_forward_length": c.int("share_expert_dim", "share_expert_dims"),
        "expert_weights_scale": c.float("moe_router_scaling_factor"),
        "expert_weights_norm": True,
        "expert_gating_func": SIGMOID,
        "leading_dense_block_count": dense_lead(c),
        "swiglu_clamp_exp": limits(c, "swiglu_limits"),
        "swiglu_clamp_shexp": limits(c, "swiglu_limits_shared"),
    }
    if any(swa):
        window = c.get("sliding_window", default=None)
        if window is None:
            raise ConversionError(f"{c.src}: layer_types has sliding_attention layers but no sliding_window")
        kv.update(
            {
                "attention.sliding_window": c.int("sliding_window"),
                "attention.sliding_window_pattern": swa,
                "rope.freq_base_swa": swa_theta,
            }
        )
    if nextn:
        kv["nextn_predict_layers"] = nextn
    return kv


TENSORS = {
    **LLAMA_NAMES,
    ATTN + ".q_norm.weight": "blk.{bid}.attn_q_norm.weight",  # [head_dim]
    ATTN + ".k_norm.weight": "blk.{bid}.attn_k_norm.weight",
    ATTN + ".g_proj.weight": "blk.{bid}.attn_gate.weight",  # [n_head(il), H]
    "model.layers.{bid}.mlp.gate_proj.weight": "blk.{bid}.ffn_gate.weight",  # dense layers [I, H]
    "model.layers.{bid}.mlp.up_proj.weight": "blk.{bid}.ffn_up.weight",
    "model.layers.{bid}.mlp.down_proj.weight": "blk.{bid}.ffn_down.weight",
    "model.layers.{bid}.moe.gate.weight": "blk.{bid}.ffn_gate_inp.weight",  # [E, H]
    "model.layers.{bid}.moe.router_bias": "blk.{bid}.exp_probs_b.bias",  # [E]
    "model.layers.{bid}.moe.gate_proj.weight": "blk.{bid}.ffn_gate_exps.weight",  # [E, I, H]
    "model.layers.{bid}.moe.up_proj.weight": "blk.{bid}.ffn_up_exps.weight",
    "model.layers.{bid}.moe.down_proj.weight": "blk.{bid}.ffn_down_exps.weight",  # [E, H, I]
    "model.layers.{bid}.share_expert.gate_proj.weight": "blk.{bid}.ffn_gate_shexp.weight",  # [I_shared, H]
    "model.layers.{bid}.share_expert.up_proj.weight": "blk.{bid}.ffn_up_shexp.weight",
    "model.layers.{bid}.share_expert.down_proj.weight": "blk.{bid}.ffn_down_shexp.weight",
    # MTP blocks (blk.{n_layer + i})
    "model.layers.{bid}.eh_proj.weight": "blk.{bid}.nextn.eh_proj.weight",  # [H, 2H]
    "model.layers.{bid}.enorm.weight": "blk.{bid}.nextn.enorm.weight",
    "model.layers.{bid}.hnorm.weight": "blk.{bid}.nextn.hnorm.weight",
    "model.layers.{bid}.transformer.shared_head.norm.weight": "blk.{bid}.nextn.shared_head_norm.weight",
    "model.layers.{bid}.transformer.shared_head.output.weight": "blk.{bid}.nextn.shared_head_head.weight",
}


def sanitize(w, c: Config) -> None:
    strip_prefix(
        w,
        (
            ("model.language_model.", "model."),
            ("language_model.model.", "model."),
            ("language_model.lm_head.", "lm_head."),
        ),
        drop=("vision_model.", "vit_large_projector.", "model.vision_model.", "model.vit_large_projector."),
    )
    for name in [n for n in w if n.endswith((".g_proj.weight", ".moe.gate.weight"))]:
        t = w[name]  # the release stores some as [.., 1, ..]: 2-D, as llama.cpp squeezes
        if len(t.shape) != 2:
            shape = tuple(d for d in t.shape if d != 1)
            w[name] = t.map(lambda a, s=shape: a.reshape(s), shape, "")
    fold_zero_centred_norms(w)  # (1+w) RMSNorms: +1 folded into every *norm.weight, as llama.cpp


FAMILY = Family(
    ("step3p5",), "step35", hparams, TENSORS, sanitize, tokenizer_pre="default", defaults=DEFAULTS, keep_mtp=True
)
