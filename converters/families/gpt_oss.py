"""GPT-OSS (model_type `gpt_oss`) -> GGUF arch `gpt-oss`.

Attention with biases and learned per-head sinks (`attn_sinks.weight` [n_head]); layers alternate
sliding-window / full attention (`layer_types`), written as the bool array
`attention.sliding_window_pattern` (llama.cpp's load_swa_pattern reads it; true = sliding).
Experts are fused on disk, (in, out) order with gate/up interleaved:
  gate_up_proj [E, H, 2I] -> transpose -> [E, 2I, H] -> gate = rows 0::2, up = rows 1::2 (each [E, I, H])
  gate_up_proj_bias [E, 2I] -> gate [..., 0::2], up [..., 1::2]
  down_proj [E, I, H] -> transpose -> [E, H, I]
Real checkpoints store experts as MXFP4 (`*_blocks` [E, out, in/32, 16] + `*_scales` [E, out, in/32]),
already (out, in): they stay MXFP4, repacked into ggml's block layout (see lazy.mxfp4_from_hf).
Router: top-k on logits, softmax over the k selected (`expert_gating_func` = 3, SOFTMAX_WEIGHT).
SwiGLU variant with clamp 7.0 and alpha 1.702 (llama.cpp hard-codes both).
"""

from __future__ import annotations

from typing import Any

from ..lazy import mxfp4_from_hf, transpose_last
from . import LLAMA_NAMES, Config, Family, common_hparams, split_interleaved

SOFTMAX_WEIGHT = 3


# transformers' GptOssConfig defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "num_hidden_layers": 36,
    "vocab_size": 201088,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "max_position_embeddings": 131072,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "rms_norm_eps": 1e-05,
    "num_local_experts": 128,
    "num_experts_per_tok": 4,
    "sliding_window": 128,
    "rope_theta": 150000.0,
    "rope_parameters": {
        "rope_type": "yarn",
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 4096,
        "rope_theta": 150000.0,
    },
}


def hparams(c: Config) -> dict[str, Any]:
    layer_types = c.get("layer_types", default=None) or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(c.n_layer)
    ]
    return {
        **common_hparams(c),
        "attention.key_length": c.head_dim,
        "attention.value_length": c.head_dim,
        "attention.sliding_window": c.int("sliding_window"),
        "attention.sliding_window_pattern": [t == "sliding_attention" for t in layer_types],  # moelite extra
        "expert_feed_forward_length": c.int("intermediate_size"),
        "expert_gating_func": SOFTMAX_WEIGHT,  # moelite extra
        "expert_weights_norm": False,  # moelite extra (softmax over top-k already sums to 1)
    }


MLP = "model.layers.{bid}.mlp"
TENSORS = {
    **{k: v for k, v in LLAMA_NAMES.items() if "post_attention_layernorm" not in k},
    "model.layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.post_attention_norm.weight",
    "model.layers.{bid}.self_attn.q_proj.bias": "blk.{bid}.attn_q.bias",
    "model.layers.{bid}.self_attn.k_proj.bias": "blk.{bid}.attn_k.bias",
    "model.layers.{bid}.self_attn.v_proj.bias": "blk.{bid}.attn_v.bias",
    "model.layers.{bid}.self_attn.o_proj.bias": "blk.{bid}.attn_output.bias",
    "model.layers.{bid}.self_attn.sinks": "blk.{bid}.attn_sinks.weight",  # [n_head]
    MLP + ".router.weight": "blk.{bid}.ffn_gate_inp.weight",  # [E, H]
    MLP + ".router.bias": "blk.{bid}.ffn_gate_inp.bias",  # [E]
    MLP + ".experts.gate_proj": "blk.{bid}.ffn_gate_exps.weight",  # [E, I, H]
    MLP + ".experts.up_proj": "blk.{bid}.ffn_up_exps.weight",  # [E, I, H]
    MLP + ".experts.down_proj": "blk.{bid}.ffn_down_exps.weight",  # [E, H, I]
    MLP + ".experts.gate_proj_bias": "blk.{bid}.ffn_gate_exps.bias",  # [E, I]
    MLP + ".experts.up_proj_bias": "blk.{bid}.ffn_up_exps.bias",  # [E, I]
    MLP + ".experts.down_proj_bias": "blk.{bid}.ffn_down_exps.bias",  # [E, H]
}


def sanitize(w, c: Config) -> None:
    for bid in range(c.n_layer):
        x = MLP.format(bid=bid) + ".experts"
        if f"{x}.gate_up_proj_blocks" in w:  # MXFP4: [E, 2I(out), H/32, 16], rows interleaved gate/up
            blocks, scales = w.pop(f"{x}.gate_up_proj_blocks"), w.pop(f"{x}.gate_up_proj_scales")
            fused = mxfp4_from_hf(blocks, scales)  # [E, 2I, H] MXFP4
            w[f"{x}.gate_up_proj_T"] = fused
            split_interleaved(w, f"{x}.gate_up_proj_T", f"{x}.gate_proj", f"{x}.up_proj", axis=-2)
            w[f"{x}.down_proj"] = mxfp4_from_hf(w.pop(f"{x}.down_proj_blocks"), w.pop(f"{x}.down_proj_scales"))
        if f"{x}.gate_up_proj" in w:  # float: [E, H, 2I] -> [E, 2I, H]
            w[f"{x}.gate_up_proj_T"] = transpose_last(w.pop(f"{x}.gate_up_proj"))
            split_interleaved(w, f"{x}.gate_up_proj_T", f"{x}.gate_proj", f"{x}.up_proj", axis=-2)
            w[f"{x}.down_proj"] = transpose_last(w[f"{x}.down_proj"])  # [E, I, H] -> [E, H, I]
        if f"{x}.gate_up_proj_bias" in w:  # [E, 2I]
            split_interleaved(w, f"{x}.gate_up_proj_bias", f"{x}.gate_proj_bias", f"{x}.up_proj_bias", axis=-1)


FAMILY = Family(("gpt_oss",), "gpt-oss", hparams, TENSORS, sanitize, tokenizer_pre="gpt-4o", defaults=DEFAULTS)
