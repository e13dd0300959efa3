"""Arcee Trinity (model_type `afmoe`) -> GGUF arch `afmoe`.

Per layer, sandwich norms: RMSNorm -> GQA attention with per-head q/k RMSNorm and a per-element sigmoid output gate
(`self_attn.gate_proj` [n_head * head_dim, H] on the normed input: o = attn * sigmoid(gate) before o_proj) ->
RMSNorm (post_attention_layernorm) -> + residual; RMSNorm (pre_mlp_layernorm) -> the first `num_dense_layers` layers
a dense SwiGLU, the rest MoE: sigmoid scores, top-k on score + `expert_bias`, renormalised (+1e-20) x
`route_scale`, plus `num_shared_experts` shared experts (width moe_intermediate_size x count) -> RMSNorm
(post_mlp_layernorm) -> + residual. Sliding-window layers rotate q/k (NeoX RoPE); full-attention layers are NoPE.
Embeddings x sqrt(hidden_size) when `mup_enabled`.

What llama.cpp hardcodes rather than reads (its afmoe graph), which this converter therefore requires of the
checkpoint instead of writing a file llama.cpp would run differently:
- the muP scale sqrt(H), always: `mup_enabled` must be true (every Trinity release);
- NoPE on layers (il + 1) % 4 == 0: the full-attention layers must be exactly those (`layer_types` or
  `global_attn_every_n_layers` = 4); the sliding-window pattern is written too (`attention.sliding_window_pattern`).
Routing renormalisation: transformers always renormalises; llama.cpp's converter writes `expert_weights_norm` only
from the release key `route_norm` (which AfmoeConfig drops), so its file from a transformers-saved config runs
unnormalised. This converter writes it true always, as transformers computes.
"""

from __future__ import annotations

from typing import Any

from moelite.errors import ConversionError

from . import LLAMA_NAMES, SIGMOID, Config, Family, common_hparams, sliding_layers, stack_experts, unfuse_experts
from .glm4_moe import DEEPSEEK_MOE_NAMES

ATTN = "model.layers.{bid}.self_attn"
MLP = "model.layers.{bid}.mlp"
NOPE_STEP = 4  # llama.cpp's n_no_rope_layer_step (afmoe graph): not in the GGUF

# transformers' AfmoeConfig defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "vocab_size": 200192,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 32,
    "num_dense_layers": 1,
    "num_attention_heads": 16,
    "head_dim": 128,
    "max_position_embeddings": 16384,
    "rms_norm_eps": 1e-05,
    "num_experts": 64,
    "num_experts_per_tok": 6,
    "num_shared_experts": 2,
    "route_scale": 1.0,
    "global_attn_every_n_layers": 4,
    "sliding_window": 1024,
    "mup_enabled": False,
    "rope_theta": 10000.0,
}


def swa_pattern(c: Config) -> list[bool]:
    """Per layer: sliding (True) or full attention, as AfmoeConfig derives `layer_types`."""
    n = c.n_layer
    flags = sliding_layers(c)
    if flags is not None:
        return flags
    every = c.int("global_attn_every_n_layers")
    if every < 1:
        raise ConversionError(f"{c.src}: key global_attn_every_n_layers = {every}: expected >= 1")
    return [(i + 1) % every != 0 for i in range(n)]


def hparams(c: Config) -> dict[str, Any]:
    if not c.bool("mup_enabled"):
        raise ConversionError(
            f"{c.src}: mup_enabled = false is not supported: the afmoe GGUF always scales the "
            f"embeddings by sqrt(hidden_size) (llama.cpp hardcodes it)"
        )
    if c.get("sliding_window", default=None) is None:
        raise ConversionError(
            f"{c.src}: sliding_window null is not supported: the afmoe GGUF runs sliding-window "
            f"layers (llama.cpp ropes only layers it does not take for NoPE ones)"
        )
    pattern = swa_pattern(c)
    want = [(i + 1) % NOPE_STEP != 0 for i in range(c.n_layer)]
    if pattern != want:
        raise ConversionError(
            f"{c.src}: full-attention (NoPE) layers at {[i for i, s in enumerate(pattern) if not s]}:"
            f" the afmoe GGUF takes every {NOPE_STEP}th layer (il + 1) % {NOPE_STEP} == 0 for them "
            f"(llama.cpp hardcodes it)"
        )
    n_ff_exp, n_shared = c.int("moe_intermediate_size"), c.int("num_shared_experts")
    kv = {
        **common_hparams(c),
        "vocab_size": c.int("vocab_size"),
        "attention.key_length": c.head_dim,
        "attention.value_length": c.head_dim,
        "attention.sliding_window": c.int("sliding_window"),
        "attention.sliding_window_pattern": pattern,
        "leading_dense_block_count": c.int("num_dense_layers"),
        "expert_feed_forward_length": n_ff_exp,
        "expert_shared_count": n_shared,
        "expert_weights_scale": c.float("route_scale"),
        "expert_weights_norm": True,  # AfmoeTokenChoiceRouter renormalises whatever route_norm says
        "expert_gating_func": SIGMOID,
    }
    return kv


TENSORS = {
    **LLAMA_NAMES,
    "model.layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.post_attention_norm.weight",  # sandwich
    "model.layers.{bid}.pre_mlp_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    "model.layers.{bid}.post_mlp_layernorm.weight": "blk.{bid}.post_ffw_norm.weight",
    ATTN + ".q_norm.weight": "blk.{bid}.attn_q_norm.weight",  # [head_dim]
    ATTN + ".k_norm.weight": "blk.{bid}.attn_k_norm.weight",
    ATTN + ".gate_proj.weight": "blk.{bid}.attn_gate.weight",  # [n_head * head_dim, H]
    **DEEPSEEK_MOE_NAMES,  # dense, experts, shared experts
    MLP + ".router.gate.weight": "blk.{bid}.ffn_gate_inp.weight",  # [E, H]
    MLP + ".expert_bias": "blk.{bid}.exp_probs_b.bias",  # [E]
}


def sanitize(w, c: Config) -> None:
    unfuse_experts(w, c, MLP + ".experts")
    stack_experts(w, c, MLP + ".experts.{e}.{proj}.weight", MLP + ".experts.{proj}.weight")


FAMILY = Family(("afmoe",), "afmoe", hparams, TENSORS, sanitize, tokenizer_pre="afmoe", defaults=DEFAULTS)
