"""ERNIE-4.5 MoE (model_type `ernie4_5_moe`, e.g. ERNIE-4.5-21B-A3B) -> GGUF arch `ernie4_5-moe`.

Per layer: RMSNorm -> GQA attention (no biases), RoPE on interleaved pairs (ggml NORM: no Q/K permutation)
-> RMSNorm -> dense SwiGLU before `moe_layer_start_index`, then every `moe_layer_interval`-th layer MoE:
softmax over `moe_num_experts`, top-`moe_k` selected on probs + `moe_statics.e_score_correction_bias`, weights
= the unbiased probs renormalised (llama.cpp hard-codes it), plus `moe_num_shared_experts` shared experts of
width moe_intermediate_size each. Real checkpoints may fuse `qkv_proj` and `up_gate_proj` and prefix `ernie.`;
the MTP block (`model.mtp_*`) is dropped on purpose.
"""

from __future__ import annotations

from typing import Any

from moelite.errors import ConversionError

from ..lazy import rows
from . import LLAMA_NAMES, MOE_NAMES, SOFTMAX, Config, Family, common_hparams, split_halves, stack_experts

ATTN = "model.layers.{bid}.self_attn"
MLP = "model.layers.{bid}.mlp"


# transformers' Ernie4_5_MoeConfig defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "num_hidden_layers": 28,
    "vocab_size": 103424,
    "hidden_size": 2560,
    "intermediate_size": 12288,
    "max_position_embeddings": 131072,
    "num_attention_heads": 20,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-05,
    "moe_num_experts": 64,
    "moe_k": 6,
    "moe_intermediate_size": 1536,
    "moe_layer_start_index": 1,
    "moe_layer_interval": 1,
    "moe_layer_end_index": -1,
    "moe_num_shared_experts": 2,
    "rope_theta": 500000.0,
}


def hparams(c: Config) -> dict[str, Any]:
    if c.has("moe_layer_end_index") and c.int("moe_layer_end_index") not in (-1, c.n_layer - 1):
        raise ConversionError(
            f"{c.src}: moe_layer_end_index = {c.int('moe_layer_end_index')} (dense layers after the "
            f"MoE ones) is not supported by llama.cpp's ernie4_5-moe nor moelite"
        )
    n_shared = c.int("moe_num_shared_experts", default=0)
    kv = {
        **common_hparams(c),
        "expert_count": c.int("moe_num_experts"),
        "expert_used_count": c.int("moe_k"),
        "interleave_moe_layer_step": c.int("moe_layer_interval", default=1),
        "leading_dense_block_count": c.int("moe_layer_start_index", default=0),
        "expert_feed_forward_length": c.int("moe_intermediate_size"),
        "expert_shared_count": n_shared,
        "expert_gating_func": SOFTMAX,  # moelite extra
        "expert_weights_norm": True,  # moelite extra (llama.cpp: always)
    }
    if n_shared:
        kv["expert_shared_feed_forward_length"] = c.int("moe_intermediate_size") * n_shared
    return kv


TENSORS = {
    **LLAMA_NAMES,
    **MOE_NAMES,
    MLP + ".gate_proj.weight": "blk.{bid}.ffn_gate.weight",  # dense layers
    MLP + ".up_proj.weight": "blk.{bid}.ffn_up.weight",
    MLP + ".down_proj.weight": "blk.{bid}.ffn_down.weight",
    MLP + ".shared_experts.gate_proj.weight": "blk.{bid}.ffn_gate_shexp.weight",  # [n_shared * I, H]
    MLP + ".shared_experts.up_proj.weight": "blk.{bid}.ffn_up_shexp.weight",
    MLP + ".shared_experts.down_proj.weight": "blk.{bid}.ffn_down_shexp.weight",
    MLP + ".moe_statics.e_score_correction_bias": "blk.{bid}.exp_probs_b.bias",  # [1, E] -> [E]
}


def sanitize(w, c: Config) -> None:
    for name in [n for n in w if n.startswith("ernie.")]:
        w["model." + name[len("ernie.") :]] = w.pop(name)
    n_head, n_kv, hd = c.int("num_attention_heads"), c.int("num_key_value_heads"), c.head_dim
    for bid in range(c.n_layer):
        a, m = ATTN.format(bid=bid), MLP.format(bid=bid)
        if f"{a}.qkv_proj.weight" in w:  # [(n_head + 2 n_kv) hd, H]
            qkv = w.pop(f"{a}.qkv_proj.weight")
            q, k = n_head * hd, n_kv * hd
            for part, sl in (("q", slice(0, q)), ("k", slice(q, q + k)), ("v", slice(q + k, q + 2 * k))):
                w[f"{a}.{part}_proj.weight"] = rows(qkv, sl, 0)
        if f"{m}.up_gate_proj.weight" in w:  # [2I, H]: gate rows, then up
            split_halves(w, f"{m}.up_gate_proj.weight", f"{m}.gate_proj.weight", f"{m}.up_proj.weight", axis=0)
        bias = f"{m}.moe_statics.e_score_correction_bias"
        if bias in w and len(w[bias].shape) == 2:
            t = w[bias]
            w[bias] = t.map(lambda a: a.reshape(-1), (t.shape[-1],), "")
    stack_experts(w, c, MLP + ".experts.{e}.{proj}.weight", MLP + ".experts.{proj}.weight")


FAMILY = Family(
    ("ernie4_5_moe",),
    "ernie4_5-moe",
    hparams,
    TENSORS,
    sanitize,
    skip=(r"^model\.mtp_",),
    tokenizer_pre="llama-spm",
    defaults=DEFAULTS,
)
