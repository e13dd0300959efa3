"""Phi-3.5-MoE (model_type `phimoe`) -> GGUF arch `phimoe`.

llama.cpp's converter does not handle PhimoeForCausalLM, but its runtime knows arch `phimoe`
(src/models/phimoe.cpp); these are its names. LayerNorm with bias (attn_norm, ffn_norm, output_norm),
q/k/v/o biases, lm_head bias (`output.bias`), NEOX rope (no permutation), 16 experts top-2 with the
sparsemixer router (llama.cpp approximates it with softmax + renormalized top-2). Long-context
checkpoints use longrope: per-dimension factors become `rope_factors_long/short.weight`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..lazy import const
from . import LLAMA_NAMES, SOFTMAX, Config, Family, common_hparams, stack_experts

# transformers' PhimoeConfig defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "num_hidden_layers": 32,
    "vocab_size": 32064,
    "hidden_size": 4096,
    "intermediate_size": 6400,
    "max_position_embeddings": 131072,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "num_local_experts": 16,
    "num_experts_per_tok": 2,
    "router_jitter_noise": 0.01,
    "rope_theta": 1000000.0,
}


def hparams(c: Config) -> dict[str, Any]:
    rp = c.rope()
    kv = {
        **common_hparams(c),
        "vocab_size": c.int("vocab_size"),
        "rope.dimension_count": c.head_dim,
        "expert_weights_norm": True,  # moelite extra
        "expert_gating_func": SOFTMAX,  # moelite extra
        "expert_router_jitter": c.float("router_jitter_noise", default=0.01),  # moelite extra: sparsemixer eps
    }
    if rp.get("rope_type") in ("longrope", "su") and rp.get("long_factor"):
        orig = int(rp.get("original_max_position_embeddings") or c.int("original_max_position_embeddings"))
        scale = c.int("max_position_embeddings") / orig
        kv["rope.scaling.type"] = "longrope"
        kv["rope.scaling.original_context_length"] = orig
        kv["rope.scaling.attn_factor"] = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0
    return kv


MOE = "model.layers.{bid}.block_sparse_moe"
TENSORS = {
    **LLAMA_NAMES,
    "model.norm.bias": "output_norm.bias",
    "lm_head.bias": "output.bias",
    "model.layers.{bid}.input_layernorm.bias": "blk.{bid}.attn_norm.bias",
    "model.layers.{bid}.post_attention_layernorm.bias": "blk.{bid}.ffn_norm.bias",
    "model.layers.{bid}.self_attn.q_proj.bias": "blk.{bid}.attn_q.bias",
    "model.layers.{bid}.self_attn.k_proj.bias": "blk.{bid}.attn_k.bias",
    "model.layers.{bid}.self_attn.v_proj.bias": "blk.{bid}.attn_v.bias",
    "model.layers.{bid}.self_attn.o_proj.bias": "blk.{bid}.attn_output.bias",
    MOE + ".gate.weight": "blk.{bid}.ffn_gate_inp.weight",  # [E, H]
    MOE + ".experts.w1.weight": "blk.{bid}.ffn_gate_exps.weight",  # [E, I, H]
    MOE + ".experts.w3.weight": "blk.{bid}.ffn_up_exps.weight",  # [E, I, H]
    MOE + ".experts.w2.weight": "blk.{bid}.ffn_down_exps.weight",  # [E, H, I]
    "rope_factors_long.weight": "rope_factors_long.weight",  # [head_dim / 2]
    "rope_factors_short.weight": "rope_factors_short.weight",  # [head_dim / 2]
}


def sanitize(w, c: Config) -> None:
    stack_experts(w, c, MOE + ".experts.{e}.{proj}.weight", MOE + ".experts.{proj}.weight", ("w1", "w2", "w3"))
    rp = c.rope()
    if rp.get("rope_type") in ("longrope", "su") and rp.get("long_factor"):
        for kind in ("long", "short"):
            w[f"rope_factors_{kind}.weight"] = const(
                np.asarray(rp[f"{kind}_factor"], np.float32), f"config.json rope {kind}_factor"
            )


FAMILY = Family(("phimoe",), "phimoe", hparams, TENSORS, sanitize, tokenizer_pre="default", defaults=DEFAULTS)
