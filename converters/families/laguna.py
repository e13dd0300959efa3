"""poolside Laguna (model_type `laguna`) -> GGUF arch `laguna`.

Per layer: RMSNorm -> GQA attention whose query-head count varies per layer (`num_attention_heads_per_layer`; the kv
heads are model-wide), per-head q/k RMSNorm, RoPE (NeoX) per layer type from `rope_parameters` keyed by
`full_attention` / `sliding_attention` (the full layers partial, and YaRN where their entry says so; the sliding layers
plain RoPE with their own theta and rotated dims), and a softplus output gate `g_proj` on the normed input:
o = attn * softplus(g_proj x) before o_proj, one gate per head (`gating` true / "per-head": g_proj [n_head, H]) or per
element ("per-element": [n_head * head_dim, H]) -> + residual; RMSNorm -> the dense layers first (`mlp_layer_types`) a
SwiGLU MLP, the rest MoE: sigmoid scores, top-k on score + `e_score_correction_bias`, renormalised x
`moe_routed_scaling_factor`, plus one shared expert of width `shared_expert_intermediate_size` -> + residual.

GGUF as llama.cpp's converter writes it: `attention.head_count` per layer, `rope.dimension_count` (full layers) and
`rope.dimension_count_swa` / `rope.freq_base_swa` (sliding layers), `attention.sliding_window`, the expert and shared
widths, sigmoid gating with `expert_weights_norm` true (transformers always renormalises). llama.cpp takes the layer
pattern from `attention.sliding_window_pattern` when the file has it, else full attention at il % 4 == 0: this
converter always writes the array (llama.cpp's converter does not), and writes no window when no layer slides
(transformers' default `layer_types` is all full attention). A router logit softcap is refused by name: llama.cpp's
laguna graph has none.
"""

from __future__ import annotations

from typing import Any

from moelite.errors import ConversionError

from . import (
    LLAMA_NAMES,
    SIGMOID,
    Config,
    Family,
    common_hparams,
    leading_dense_layers,
    sliding_layers,
    stack_experts,
    unfuse_experts,
)

ATTN = "model.layers.{bid}.self_attn"
MLP = "model.layers.{bid}.mlp"

# transformers' LagunaConfig defaults: the value of a key read here that config.json omits (rope_parameters: what
# its __post_init__ sets when the key is absent)
DEFAULTS = {
    "vocab_size": 100352,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 40,
    "num_attention_heads": 48,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-06,
    "sliding_window": 512,
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
    "num_experts_per_tok": 8,
    "num_experts": 256,
    "head_dim": 128,
    "gating": True,
    "moe_routed_scaling_factor": 1.0,
    "moe_router_logit_softcapping": 0.0,
    "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.5},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
    },
}


def heads_per_layer(c: Config) -> list[int]:
    heads = c.get("num_attention_heads_per_layer", default=None)
    if heads is None:
        return [c.int("num_attention_heads")] * c.n_layer
    if (
        not isinstance(heads, list)
        or len(heads) != c.n_layer
        or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in heads)
    ):
        raise ConversionError(f"{c.src}: key num_attention_heads_per_layer must list {c.n_layer} positive integers")
    return heads


def layer_rope(c: Config, kind: str) -> dict[str, Any] | None:
    """The RoPE entry of one layer type (`full_attention` / `sliding_attention`) of the per-type rope_parameters."""
    rp = c.get("rope_parameters")
    if not isinstance(rp, dict) or not isinstance(rp.get("full_attention"), dict):
        raise ConversionError(
            f"{c.src}: key rope_parameters must hold a 'full_attention' entry (Laguna ropes per layer type)"
        )
    entry = rp.get(kind)
    return entry if isinstance(entry, dict) else None


def hparams(c: Config) -> dict[str, Any]:
    if c.float("moe_router_logit_softcapping"):
        raise ConversionError(
            f"{c.src}: moe_router_logit_softcapping = {c.float('moe_router_logit_softcapping')} is "
            f"not supported: the laguna GGUF has no router softcap (llama.cpp's graph applies none)"
        )
    gating = c.get("gating")
    if gating not in (True, "per-head", "per-element"):
        raise ConversionError(f"{c.src}: key gating = {gating!r}: expected true, 'per-head' or 'per-element'")
    hd, n = c.head_dim, c.n_layer
    full, swa = layer_rope(c, "full_attention"), layer_rope(c, "sliding_attention")
    pattern = sliding_layers(c) or [False] * n
    window = c.int("sliding_window", default=0) or 0
    if any(pattern) and (window <= 0 or swa is None):
        raise ConversionError(
            f"{c.src}: layer_types has sliding_attention layers but sliding_window = {window} / "
            f"rope_parameters has no 'sliding_attention' entry"
        )
    kv = {
        **common_hparams(c),
        "vocab_size": c.int("vocab_size"),
        "attention.head_count": heads_per_layer(c),
        "attention.key_length": hd,
        "attention.value_length": hd,
        "rope.dimension_count": int(hd * float(full.get("partial_rotary_factor", 1.0))),  # theta, YaRN: common
        "leading_dense_block_count": leading_dense_layers(
            c, c.get("mlp_layer_types", default=None) or ["dense"] + ["sparse"] * (n - 1)
        ),
        "expert_feed_forward_length": c.int("moe_intermediate_size"),
        "expert_shared_feed_forward_length": c.int("shared_expert_intermediate_size"),
        "expert_weights_norm": True,  # LagunaTopKRouter always renormalises
        "expert_weights_scale": c.float("moe_routed_scaling_factor"),
        "expert_gating_func": SIGMOID,
    }
    if any(pattern):  # a window only where layers slide (llama.cpp: no window, all full)
        kv.update(
            {
                "attention.sliding_window": window,
                "attention.sliding_window_pattern": pattern,
                "rope.freq_base_swa": float(swa.get("rope_theta", 10000.0)),
                "rope.dimension_count_swa": int(hd * float(swa.get("partial_rotary_factor", 1.0))),
            }
        )
    return kv


TENSORS = {
    **LLAMA_NAMES,
    ATTN + ".q_norm.weight": "blk.{bid}.attn_q_norm.weight",  # [head_dim]
    ATTN + ".k_norm.weight": "blk.{bid}.attn_k_norm.weight",
    ATTN + ".g_proj.weight": "blk.{bid}.attn_gate.weight",  # [n_head(il) (* head_dim), H]
    MLP + ".gate_proj.weight": "blk.{bid}.ffn_gate.weight",  # dense layers [I, H]
    MLP + ".up_proj.weight": "blk.{bid}.ffn_up.weight",
    MLP + ".down_proj.weight": "blk.{bid}.ffn_down.weight",
    MLP + ".gate.weight": "blk.{bid}.ffn_gate_inp.weight",  # [E, H]
    MLP + ".gate.e_score_correction_bias": "blk.{bid}.exp_probs_b.bias",  # [E] (transformers' name)
    MLP + ".experts.e_score_correction_bias": "blk.{bid}.exp_probs_b.bias",  # (the release checkpoints')
    MLP + ".experts.gate_proj.weight": "blk.{bid}.ffn_gate_exps.weight",  # [E, I, H]
    MLP + ".experts.up_proj.weight": "blk.{bid}.ffn_up_exps.weight",
    MLP + ".experts.down_proj.weight": "blk.{bid}.ffn_down_exps.weight",  # [E, H, I]
    **{
        MLP + f".{s}.{p}_proj.weight": f"blk.{{bid}}.ffn_{p}_shexp.weight"  # [I_shared, H]
        for s in ("shared_expert", "shared_experts")
        for p in ("gate", "up", "down")
    },
}


def sanitize(w, c: Config) -> None:
    unfuse_experts(w, c, MLP + ".experts")
    stack_experts(w, c, MLP + ".experts.{e}.{proj}.weight", MLP + ".experts.{proj}.weight")


FAMILY = Family(("laguna",), "laguna", hparams, TENSORS, sanitize, tokenizer_pre="laguna", defaults=DEFAULTS)
