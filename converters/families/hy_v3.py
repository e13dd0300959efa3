"""Tencent Hy3 (model_type `hy_v3`) -> GGUF arch `hy_v3`.

Per layer: RMSNorm -> GQA attention with per-head q/k RMSNorm before NeoX RoPE -> RMSNorm -> a dense SwiGLU
(`mlp_layer_types` "dense", by default the first layer) or the MoE block: sigmoid scores, top-k on score +
`expert_bias` (no groups), renormalised (+1e-20) x `router_scaling_factor`, plus a shared expert of width
moe_intermediate_size x num_shared_experts. The GGUF has no dense-layer key: llama.cpp (and moelite) tell dense
from MoE layers by the tensors each holds, so any `mlp_layer_types` is expressed.

Tensor names: the release layout (`mlp.router.gate`, `mlp.expert_bias`, `mlp.shared_mlp`, per-expert
`mlp.experts.{e}`), which transformers' save_pretrained writes back too; transformers' in-memory names are
accepted as well. MTP: the release checkpoint appends `num_nextn_predict_layers` decoder blocks at
`model.layers.{num_hidden_layers + i}` with `eh_proj` / `enorm` / `hnorm` / `final_layernorm`; they are kept as
llama.cpp does (blk.{n_layer + i}, nextn.*, `nextn_predict_layers` counted in block_count). transformers' class
ignores them.
"""

from __future__ import annotations

from typing import Any

from moelite.errors import ConversionError

from . import (
    LLAMA_NAMES,
    MOE_NAMES,
    MTP_NAMES,
    SIGMOID,
    Config,
    Family,
    common_hparams,
    n_nextn,
    stack_experts,
    with_mtp_layers,
)

ATTN = "model.layers.{bid}.self_attn"
MLP = "model.layers.{bid}.mlp"

# transformers' HYV3Config defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "num_hidden_layers": 80,
    "vocab_size": 120832,
    "hidden_size": 4096,
    "intermediate_size": 13312,
    "max_position_embeddings": 131072,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-05,
    "num_experts": 192,
    "num_experts_per_tok": 8,
    "num_shared_experts": 1,
    "moe_intermediate_size": 1536,
    "router_scaling_factor": 2.826,
    "rope_theta": 11158840.0,
}


def hparams(c: Config) -> dict[str, Any]:
    types = c.get("mlp_layer_types", default=None)
    if types is not None and (
        not isinstance(types, list) or len(types) != c.n_layer or not set(types) <= {"dense", "sparse"}
    ):
        raise ConversionError(f"{c.src}: key mlp_layer_types must list {c.n_layer} entries of 'dense' / 'sparse'")
    n_ff_exp = c.int("moe_intermediate_size")
    return {
        **common_hparams(c),
        "block_count": c.n_layer + n_nextn(c),
        "vocab_size": c.int("vocab_size"),
        "attention.key_length": c.head_dim,
        "attention.value_length": c.head_dim,
        "expert_feed_forward_length": n_ff_exp,
        "expert_shared_feed_forward_length": n_ff_exp * c.int("num_shared_experts"),
        "expert_weights_norm": c.bool("route_norm", default=True),
        "expert_weights_scale": c.float("router_scaling_factor"),
        "expert_gating_func": SIGMOID,
        "nextn_predict_layers": n_nextn(c) or None,
    }


TENSORS = {
    **LLAMA_NAMES,
    **MOE_NAMES,
    ATTN + ".q_norm.weight": "blk.{bid}.attn_q_norm.weight",  # [head_dim]
    ATTN + ".k_norm.weight": "blk.{bid}.attn_k_norm.weight",
    MLP + ".gate_proj.weight": "blk.{bid}.ffn_gate.weight",  # dense layers [I, H]
    MLP + ".up_proj.weight": "blk.{bid}.ffn_up.weight",
    MLP + ".down_proj.weight": "blk.{bid}.ffn_down.weight",
    MLP + ".router.gate.weight": "blk.{bid}.ffn_gate_inp.weight",  # [E, H] (release layout)
    MLP + ".expert_bias": "blk.{bid}.exp_probs_b",  # [E]; llama.cpp's hy_v3 name has no ".bias"
    MLP + ".e_score_correction_bias": "blk.{bid}.exp_probs_b",
    MLP + ".shared_mlp.gate_proj.weight": "blk.{bid}.ffn_gate_shexp.weight",  # [n_shared * I, H]
    MLP + ".shared_mlp.up_proj.weight": "blk.{bid}.ffn_up_shexp.weight",
    MLP + ".shared_mlp.down_proj.weight": "blk.{bid}.ffn_down_shexp.weight",
    MLP + ".shared_experts.gate_proj.weight": "blk.{bid}.ffn_gate_shexp.weight",
    MLP + ".shared_experts.up_proj.weight": "blk.{bid}.ffn_up_shexp.weight",
    MLP + ".shared_experts.down_proj.weight": "blk.{bid}.ffn_down_shexp.weight",
    **MTP_NAMES,
}


def sanitize(w, c: Config) -> None:
    n_layer, nextn = c.n_layer, n_nextn(c)
    for i in range(n_layer, n_layer + nextn):  # the MTP block's trailing norm, llama.cpp's shared_head_norm
        name = f"model.layers.{i}.final_layernorm.weight"
        if name in w:
            w[f"model.layers.{i}.shared_head.norm.weight"] = w.pop(name)
    c_all = with_mtp_layers(c)  # trunk + MTP blocks
    stack_experts(w, c_all, MLP + ".experts.{e}.{proj}.weight", MLP + ".experts.{proj}.weight")


FAMILY = Family(
    ("hy_v3",), "hy_v3", hparams, TENSORS, sanitize, tokenizer_pre="default", defaults=DEFAULTS, keep_mtp=True
)
