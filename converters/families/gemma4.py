"""Gemma-4 MoE, text part (model_type `gemma4_text`, or `gemma4` with a `text_config`; e.g. gemma-4-26B-A4B)
-> GGUF arch `gemma4`.

Per layer (`layer_types`: sliding / full, the last one full):
  attention: RMSNorm -> q/k/v (full layers with `attention_k_eq_v`: no v_proj, V = the raw k projection),
    per-head q/k RMSNorm, weightless V RMSNorm, RoPE (sliding: head_dim, theta 1e4; full: `global_head_dim`,
    "proportional" RoPE = NeoX over the whole head with factors 1e30 on the unrotated pairs, written as
    `rope_freqs`), scale 1 -> post-attention RMSNorm -> residual
  FFN: a dense GeGLU MLP (pre_feedforward_layernorm -> mlp -> post_feedforward_layernorm_1) in parallel with
    routed experts (pre_feedforward_layernorm_2 -> experts -> post_feedforward_layernorm_2); router input
    rms_norm(h) / sqrt(H) * `router.scale`, softmax top-k renormalised x `per_expert_scale`; sum ->
    post_feedforward_layernorm -> residual -> x `layer_scalar`
Embeddings x sqrt(H); final logits softcapped. Norms are plain-weight RMSNorms (no +1, unlike Gemma 2/3).
Experts stay fused as in the checkpoint: `ffn_gate_up_exps` [H, 2I, E] (gate rows first), as llama.cpp writes.
Per-layer embeddings (E2B/E4B) and KV sharing are not supported (those models are dense anyway).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moelite.errors import ConversionError

from ..lazy import const
from . import LLAMA_NAMES, Config, Family, common_hparams, strip_prefix

L = "model.layers.{bid}"


# transformers' Gemma4TextConfig defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "num_hidden_layers": 30,
    "vocab_size": 262144,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "max_position_embeddings": 131072,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "rms_norm_eps": 1e-06,
    "enable_moe_block": False,
    "hidden_size_per_layer_input": 256,
    "num_kv_shared_layers": 0,
    "sliding_window": 512,
    "global_head_dim": 512,
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
    },
    # layer_types: 5 sliding then 1 full, the last layer full (computed in _layer_types)
}


def _layer_types(c: Config) -> list[str]:
    types = c.get("layer_types", default=None)
    if types is None:  # the class default: 5 sliding : 1 full, the last one full
        types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(c.n_layer)]
        types[-1] = "full_attention"
    if not isinstance(types, list) or len(types) != c.n_layer:
        raise ConversionError(
            f"{c.src}: layer_types must list {c.n_layer} entries (sliding_attention / full_attention)"
        )
    return types


def _layer_value(c: Config, il: int, key: str) -> int:
    """head_dim / num_key_value_heads of layer il: transformers folds the full layers' values
    (`global_head_dim`, `num_global_key_value_heads` of the real config) into `per_layer_config`."""
    own = (c.d.get("per_layer_config") or {}).get(str(il)) or {}
    if key in own:
        return int(own[key])
    if _layer_types(c)[il] == "full_attention":
        glob = {"head_dim": "global_head_dim", "num_key_value_heads": "num_global_key_value_heads"}[key]
        if c.has(glob):
            return c.int(glob)
    return c.int(key)


def _full_head_dim(c: Config) -> int:
    dims = {_layer_value(c, il, "head_dim") for il, t in enumerate(_layer_types(c)) if t == "full_attention"}
    if len(dims) > 1:
        raise ConversionError(f"{c.src}: full-attention layers with different head_dim {sorted(dims)}")
    return dims.pop() if dims else c.head_dim


def _rope(c: Config, kind: str) -> dict[str, Any]:
    rp = c.get("rope_parameters")
    return dict(rp.get(kind) or {}) if isinstance(rp, dict) else {}


def hparams(c: Config) -> dict[str, Any]:
    if c.get("hidden_size_per_layer_input", default=0) or c.get("num_kv_shared_layers", default=0):
        raise ConversionError(
            f"{c.src}: per-layer embeddings / KV sharing (Gemma-4 E2B/E4B) are not supported; "
            f"moelite converts the Gemma-4 MoE models"
        )
    if not c.bool("enable_moe_block", default=False):
        raise ConversionError(f"{c.src}: enable_moe_block is false: a dense Gemma-4 model; moelite converts MoE models")
    swa = [t == "sliding_attention" for t in _layer_types(c)]
    hd_swa, hd_full = c.head_dim, _full_head_dim(c)
    full, sliding = _rope(c, "full_attention"), _rope(c, "sliding_attention")
    if full.get("rope_type", "proportional") not in ("proportional", "default"):
        raise ConversionError(f"{c.src}: full-attention rope_type {full.get('rope_type')!r}; expected proportional")
    kv = {
        **common_hparams(c),
        "expert_used_count": c.int("top_k_experts", "num_experts_per_tok"),
        "rope.freq_base": float(full.get("rope_theta", 1e6)),
        "rope.freq_base_swa": float(sliding.get("rope_theta", 1e4)),
        "attention.key_length": hd_full,
        "attention.value_length": hd_full,
        "attention.key_length_swa": hd_swa,
        "attention.value_length_swa": hd_swa,
        "attention.head_count_kv": [_layer_value(c, il, "num_key_value_heads") for il in range(c.n_layer)],
        "attention.sliding_window": c.int("sliding_window"),
        "attention.sliding_window_pattern": swa,
        "rope.dimension_count": hd_full,
        "rope.dimension_count_swa": int(hd_swa * float(sliding.get("partial_rotary_factor", 1.0))),
        "attention.shared_kv_layers": 0,
        "embedding_length_per_layer_input": 0,
        "expert_feed_forward_length": c.int("moe_intermediate_size"),
    }
    if c.get("final_logit_softcapping", default=None):
        kv["final_logit_softcapping"] = c.float("final_logit_softcapping")
    return kv


TENSORS = {
    **{k: v for k, v in LLAMA_NAMES.items() if "post_attention_layernorm" not in k},
    L + ".self_attn.q_norm.weight": "blk.{bid}.attn_q_norm.weight",
    L + ".self_attn.k_norm.weight": "blk.{bid}.attn_k_norm.weight",
    L + ".post_attention_layernorm.weight": "blk.{bid}.post_attention_norm.weight",
    L + ".pre_feedforward_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    L + ".post_feedforward_layernorm.weight": "blk.{bid}.post_ffw_norm.weight",
    L + ".pre_feedforward_layernorm_2.weight": "blk.{bid}.pre_ffw_norm_2.weight",
    L + ".post_feedforward_layernorm_1.weight": "blk.{bid}.post_ffw_norm_1.weight",
    L + ".post_feedforward_layernorm_2.weight": "blk.{bid}.post_ffw_norm_2.weight",
    L + ".layer_scalar": "blk.{bid}.layer_output_scale.weight",  # [1]
    L + ".mlp.gate_proj.weight": "blk.{bid}.ffn_gate.weight",
    L + ".mlp.up_proj.weight": "blk.{bid}.ffn_up.weight",
    L + ".mlp.down_proj.weight": "blk.{bid}.ffn_down.weight",
    L + ".router.proj.weight": "blk.{bid}.ffn_gate_inp.weight",  # [E, H]
    L + ".router.scale": "blk.{bid}.ffn_gate_inp.scale",  # [H]
    L + ".router.per_expert_scale": "blk.{bid}.ffn_down_exps.scale",  # [E]
    L + ".experts.gate_up_proj": "blk.{bid}.ffn_gate_up_exps.weight",  # [E, 2I, H]
    L + ".experts.down_proj": "blk.{bid}.ffn_down_exps.weight",  # [E, H, I]
    "rope_freqs.weight": "rope_freqs.weight",  # [global_head_dim / 2]
}


def sanitize(w, c: Config) -> None:
    strip_prefix(
        w,
        (("model.language_model.", "model."),),
        drop=("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio."),
    )
    # proportional RoPE on full layers: NeoX over global_head_dim with factor 1 on the first
    # partial_rotary_factor * head / 2 pairs and 1e30 (no rotation) on the rest
    hd_full = _full_head_dim(c)
    n_rot = int(hd_full * float(_rope(c, "full_attention").get("partial_rotary_factor", 1.0)) / 2)
    w["rope_freqs.weight"] = const(
        np.array([1.0] * n_rot + [1e30] * (hd_full // 2 - n_rot)), "generated: proportional RoPE factors"
    )


FAMILY = Family(("gemma4_text",), "gemma4", hparams, TENSORS, sanitize, tokenizer_pre="gemma4", defaults=DEFAULTS)
