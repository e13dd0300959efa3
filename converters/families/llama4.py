"""Llama-4 Scout / Maverick, text part (model_type `llama4_text`, or `llama4` with a `text_config`) -> GGUF
arch `llama4`.

Per layer: RMSNorm -> GQA attention; 3 of 4 layers RoPE (complex form on interleaved pairs = ggml NORM, no
Q/K permutation) + weightless q/k RMSNorm + chunked attention (8192), every 4th layer NoPE with attention
temperature (llama.cpp hard-codes 8192 / 0.1 / 4, so a converted model must use them: checked below) ->
RMSNorm -> every `interleave_moe_layer_step`-th layer MoE: top-1 of E on the router logits, weight =
sigmoid(logit) applied to the expert *input*, plus a shared expert; other layers a dense SwiGLU of width
`intermediate_size_mlp`. Experts are fused on disk in (in, out) layout: gate_up_proj [E, H, 2I] and
down_proj [E, I, H]; they are transposed and gate/up split, as llama.cpp's converter does. The vision tower
and projector of `Llama4ForConditionalGeneration` are dropped.
"""

from __future__ import annotations

from typing import Any

from moelite.errors import ConversionError

from ..lazy import transpose_last
from . import LLAMA_NAMES, Config, Family, common_hparams, split_halves, strip_prefix

FF = "model.layers.{bid}.feed_forward"


# transformers' Llama4TextConfig defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "num_hidden_layers": 48,
    "vocab_size": 202048,
    "hidden_size": 5120,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-05,
    "num_local_experts": 16,
    "num_experts_per_tok": 1,
    "intermediate_size_mlp": 16384,
    "interleave_moe_layer_step": 1,
    "attention_chunk_size": 8192,
    "floor_scale": 8192,
    "attn_scale": 0.1,
    "rope_theta": 500000.0,
}


def hparams(c: Config) -> dict[str, Any]:
    chunk = c.get("attention_chunk_size", default=None)  # absent: 8192; an explicit null: none
    if chunk not in (None, 8192) or c.get("floor_scale") != 8192 or c.get("attn_scale") != 0.1:
        raise ConversionError(
            f"{c.src}: attention_chunk_size / floor_scale / attn_scale differ from 8192 / 8192 / "
            f"0.1, which llama.cpp hard-codes for llama4 (the GGUF cannot carry them)"
        )
    nope = c.get("no_rope_layers", default=None)
    if nope and [int(x) for x in nope] != [int((i + 1) % 4 != 0) for i in range(c.n_layer)]:
        raise ConversionError(f"{c.src}: no_rope_layers is not 'NoPE every 4th layer', which llama.cpp hard-codes")
    kv = {
        **common_hparams(c),
        "feed_forward_length": c.int("intermediate_size_mlp"),
        "expert_feed_forward_length": c.int("intermediate_size"),
        "interleave_moe_layer_step": c.int("interleave_moe_layer_step", default=1),
        "attention.key_length": c.head_dim,
        "attention.value_length": c.head_dim,
    }
    if chunk is None:
        kv["attention.sliding_window"] = 0  # no chunking: RoPE on every layer
    return kv


TENSORS = {
    **LLAMA_NAMES,
    FF + ".router.weight": "blk.{bid}.ffn_gate_inp.weight",  # [E, H]
    FF + ".experts.gate_proj.weight": "blk.{bid}.ffn_gate_exps.weight",  # [E, I, H]
    FF + ".experts.up_proj.weight": "blk.{bid}.ffn_up_exps.weight",
    FF + ".experts.down_proj.weight": "blk.{bid}.ffn_down_exps.weight",  # [E, H, I]
    FF + ".shared_expert.gate_proj.weight": "blk.{bid}.ffn_gate_shexp.weight",
    FF + ".shared_expert.up_proj.weight": "blk.{bid}.ffn_up_shexp.weight",
    FF + ".shared_expert.down_proj.weight": "blk.{bid}.ffn_down_shexp.weight",
    FF + ".gate_proj.weight": "blk.{bid}.ffn_gate.weight",  # dense layers
    FF + ".up_proj.weight": "blk.{bid}.ffn_up.weight",
    FF + ".down_proj.weight": "blk.{bid}.ffn_down.weight",
}


def sanitize(w, c: Config) -> None:
    strip_prefix(
        w,
        (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")),
        drop=("vision_model.", "multi_modal_projector."),
    )
    for bid in range(c.n_layer):
        f = FF.format(bid=bid)
        if f"{f}.experts.gate_up_proj" in w:  # [E, H, 2I] -> [E, 2I, H]
            w[f"{f}.experts.gate_up"] = transpose_last(w.pop(f"{f}.experts.gate_up_proj"))
            split_halves(w, f"{f}.experts.gate_up", f"{f}.experts.gate_proj.weight", f"{f}.experts.up_proj.weight")
        if f"{f}.experts.down_proj" in w:  # [E, I, H] -> [E, H, I]
            w[f"{f}.experts.down_proj.weight"] = transpose_last(w.pop(f"{f}.experts.down_proj"))


FAMILY = Family(("llama4_text",), "llama4", hparams, TENSORS, sanitize, tokenizer_pre="llama4", defaults=DEFAULTS)
