"""Cohere North (model_type `cohere2_moe`) -> GGUF arch `cohere2moe`.

Per layer, a Command-R parallel block: n = norm(x) (RMSNorm when `rms_norm_eps` is set, else LayerNorm without
bias), x + attn(n) + ffn(n); no second norm. Attention: GQA, interleaved-pair RoPE (ggml's normal mode) on the
sliding-window layers, none on the full-attention ones, except that the leading dense layers keep it when
`prefix_dense_sliding_window_pattern` is 1 (transformers' force_rope). FFN: the leading dense layers
(`mlp_layer_types`, width `prefix_dense_intermediate_size`) a SwiGLU MLP; the rest MoE: top-k on the raw router
logits, then softmax over the k (`expert_selection_fn` "softmax", the class default: the same weights as softmax
over all experts then renormalised), or sigmoid of the k, renormalised when `norm_topk_prob`; plus
`num_shared_experts` shared experts combined as (routed + shared) / 2 (`average`). Logits x `logit_scale`.

What llama.cpp reads or hardcodes, and what this converter therefore writes or refuses:
- `expert_gating_func`: llama.cpp takes sigmoid when the key is absent, and its converter never writes it, so a
  checkpoint with the default softmax selection runs as sigmoid there; written here always.
- the shared expert: llama.cpp's graph averages (its converter refuses `sum`): `sum` is refused here by name.
- RoPE on the leading dense layers: llama.cpp always (force_rope); transformers only with
  prefix_dense_sliding_window_pattern 1. moelite writes what transformers does as `moelite.rope_dense_lead`
  (llama.cpp ignores the key: a checkpoint with another prefix pattern runs differently there).
MTP: North's release appends `num_nextn_predict_layers` blocks at model.layers.{n_layer + i} (a full-attention MoE
decoder block plus eh_proj / enorm / hnorm / shared_head.norm); kept as llama.cpp's converter keeps them,
blk.{n_layer + i} with nextn.* names, `nextn_predict_layers` counted in block_count (the sliding pattern lists the
trunk only, as llama.cpp writes it). Loaded for speculative decoding, never run on the main path.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moelite.errors import ConversionError

from . import (
    MTP_NAMES,
    SIGMOID,
    SOFTMAX,
    Config,
    Family,
    common_hparams,
    leading_dense_layers,
    n_nextn,
    sliding_layers,
    stack_experts,
    unfuse_experts,
    with_mtp_layers,
)
from .glm4_moe import DEEPSEEK_MOE_NAMES

ATTN = "model.layers.{bid}.self_attn"
MLP = "model.layers.{bid}.mlp"

# transformers' Cohere2MoeConfig defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "vocab_size": 256000,
    "hidden_size": 8192,
    "intermediate_size": 22528,
    "logit_scale": 0.0625,
    "num_hidden_layers": 40,
    "num_attention_heads": 64,
    "head_dim": 128,
    "max_position_embeddings": 8192,
    "layer_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "num_experts_per_tok": 2,
    "num_experts": 8,
    "num_shared_experts": 0,
    "shared_expert_combination_strategy": "average",
    "expert_selection_fn": "softmax",
    "prefix_dense_sliding_window_pattern": 1,
    "norm_topk_prob": True,
    "sliding_window_pattern": 4,
}


def swa_pattern(c: Config, n_dense: int) -> list[bool]:
    """Per layer: sliding (True) or full attention, as Cohere2MoeConfig derives `layer_types`."""
    n = c.n_layer
    flags = sliding_layers(c)
    if flags is not None:
        return flags
    pre, rest = c.int("prefix_dense_sliding_window_pattern"), c.int("sliding_window_pattern")
    if pre < 1 or rest < 1:
        raise ConversionError(
            f"{c.src}: keys prefix_dense_sliding_window_pattern / sliding_window_pattern must be >= 1"
        )
    return [(i + 1) % pre != 0 for i in range(n_dense)] + [(i + 1) % rest != 0 for i in range(n - n_dense)]


def hparams(c: Config) -> dict[str, Any]:
    if c.get("sliding_window", default=None) is None:
        raise ConversionError(
            f"{c.src}: sliding_window null is not supported: the cohere2moe GGUF requires "
            f"`attention.sliding_window` (llama.cpp reads it unconditionally)"
        )
    n_ff_exp, n_shared = c.int("intermediate_size"), c.int("num_shared_experts")
    if n_shared > 0 and c.get("shared_expert_combination_strategy") != "average":
        raise ConversionError(
            f"{c.src}: shared_expert_combination_strategy = "
            f"{str(c.get('shared_expert_combination_strategy'))[:40]} is not supported: the "
            f"cohere2moe GGUF averages routed and shared experts (llama.cpp hardcodes 'average')"
        )
    selection = c.get("expert_selection_fn")
    if selection not in ("softmax", "sigmoid"):
        raise ConversionError(
            f"{c.src}: key expert_selection_fn = {str(selection)[:40]}: expected 'softmax' or 'sigmoid'"
        )
    n_dense = leading_dense_layers(c, default=0)
    rms = c.get("rms_norm_eps", default=None)  # null (the class default): LayerNorm
    kv = {
        **common_hparams(Config({**c.d, "rms_norm_eps": 1.0}, c.src, c.defaults)),
        "block_count": c.n_layer + n_nextn(c),
        "nextn_predict_layers": n_nextn(c) or None,
        "attention.layer_norm_rms_epsilon": c.float("rms_norm_eps") if rms is not None else None,
        "attention.layer_norm_epsilon": c.float("layer_norm_eps"),
        # the dense layers' width (llama.cpp's converter: prefix_dense_intermediate_size first)
        "feed_forward_length": c.int("prefix_dense_intermediate_size", default=n_ff_exp),
        "vocab_size": c.int("vocab_size"),
        "logit_scale": c.float("logit_scale"),
        "attention.sliding_window": c.int("sliding_window"),
        "attention.sliding_window_pattern": swa_pattern(c, n_dense),
        "leading_dense_block_count": n_dense,
        "expert_feed_forward_length": n_ff_exp,
        # softmax over the top-k logits = softmax over all, then the top-k renormalised
        "expert_gating_func": SOFTMAX if selection == "softmax" else SIGMOID,
        "expert_weights_norm": selection == "softmax" or c.bool("norm_topk_prob"),
        "rope.dimension_count": c.head_dim,
        "rope.scaling.type": "none",
        "moelite.rope_dense_lead": c.int("prefix_dense_sliding_window_pattern") == 1,
    }
    if n_shared > 0:
        kv.update({"expert_shared_count": n_shared, "expert_shared_feed_forward_length": n_ff_exp * n_shared})
    return kv


TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{bid}.input_layernorm.weight": "blk.{bid}.attn_norm.weight",  # the block's one norm
    ATTN + ".q_proj.weight": "blk.{bid}.attn_q.weight",
    ATTN + ".k_proj.weight": "blk.{bid}.attn_k.weight",
    ATTN + ".v_proj.weight": "blk.{bid}.attn_v.weight",
    ATTN + ".o_proj.weight": "blk.{bid}.attn_output.weight",
    **DEEPSEEK_MOE_NAMES,  # dense layers [I_dense, H], router, experts, shared experts [n_shared * I, H]
    **MTP_NAMES,  # blk.{n_layer + i}.nextn.*: eh_proj [H, 2H], enorm / hnorm / shared_head_norm [H], head, embed
}


def drop_zero_biases(w, c: Config) -> None:
    """Attention biases (`attention_bias`): llama.cpp's cohere2moe graph has none, and its converter drops them
    when all zero (as a release may ship them) and refuses them otherwise: the same here, by name."""
    for name in [n for n in w if n.endswith(".bias") and ".self_attn." in n]:
        if np.any(w[name].load() != 0):
            raise ConversionError(
                f"{w[name].src}: tensor {name} is not zero: attention biases are not supported (the cohere2moe "
                f"GGUF has none: llama.cpp's graph and converter refuse them)"
            )
        del w[name]


def sanitize(w, c: Config) -> None:
    drop_zero_biases(w, c)
    c_all = with_mtp_layers(c)  # trunk + MTP blocks
    unfuse_experts(w, c_all, MLP + ".experts")
    stack_experts(w, c_all, MLP + ".experts.{e}.{proj}.weight", MLP + ".experts.{proj}.weight")


FAMILY = Family(
    ("cohere2_moe",),
    "cohere2moe",
    hparams,
    TENSORS,
    sanitize,
    tokenizer_pre="cohere2moe",
    defaults=DEFAULTS,
    keep_mtp=True,
)
