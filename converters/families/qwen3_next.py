"""Qwen3-Next (model_type `qwen3_next`, e.g. Qwen3-Next-80B-A3B) -> GGUF arch `qwen3next`.

The Qwen3.5 hybrid (qwen3_5_moe.py: Gated DeltaNet 3 of 4 layers, gated attention, (1+w) norms folded, sigmoid-
gated shared expert) with two differences in the DeltaNet input projections:
- `in_proj_qkvz` is fused per k-head group as [q_g, k_g, v_g (r heads), z_g (r heads)]: regrouped here into
  attn_qkv = [q all heads, k all heads, v all heads] (the conv's channel order) and attn_gate = z, as llama.cpp does;
- `in_proj_ba` stays fused as ssm_ba [H, 2 Hv], per group [b_g, a_g]; the graph splits it.
No V-head reorder: the qwen3next graph repeats q/k heads interleaved (v head j reads k head j / r).
Dense MLP layers (`mlp_only_layers`, `decoder_sparse_step`) are written as ffn_gate/up/down.
The MTP block (`mtp.*`, Qwen3.5's layout) is kept as blk.{n_layer}.* with nextn.* (speculative="mtp" runs it); the
release's config.json does not say how many there are: the converter counts `mtp.layers.{i}` in the checkpoint, as
llama.cpp's converter does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import (
    Config,
    Family,
    fold_zero_centred_norms,
    neg_exp,
    release_mtp_layers,
    squeeze_conv,
    stack_experts,
    strip_prefix,
    with_mtp_layers,
)
from .qwen3_5_moe import LA, L
from .qwen3_5_moe import TENSORS as QWEN35_TENSORS
from .qwen3_5_moe import hparams as qwen35_hparams

TENSORS = {
    **{k: v for k, v in QWEN35_TENSORS.items() if ".in_proj_" not in k},
    LA + ".in_proj_qkv.weight": "blk.{bid}.attn_qkv.weight",  # regrouped from in_proj_qkvz
    LA + ".in_proj_z.weight": "blk.{bid}.attn_gate.weight",
    LA + ".in_proj_ba.weight": "blk.{bid}.ssm_ba.weight",  # [2 Hv, H], per group [b_g, a_g]
    L + ".mlp.gate_proj.weight": "blk.{bid}.ffn_gate.weight",  # dense layers
    L + ".mlp.up_proj.weight": "blk.{bid}.ffn_up.weight",
    L + ".mlp.down_proj.weight": "blk.{bid}.ffn_down.weight",
}


# transformers' Qwen3NextConfig defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "num_hidden_layers": 48,
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "max_position_embeddings": 32768,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "rms_norm_eps": 1e-06,
    "num_experts": 512,
    "num_experts_per_tok": 10,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.25,
    "full_attention_interval": 4,
}


def hparams(c: Config) -> dict[str, Any]:
    kv = qwen35_hparams(c)
    kv.pop("rope.dimension_sections", None)  # plain NeoX RoPE, no M-RoPE
    return kv


def split_qkvz(w, name: str, hk: int, dk: int, r: int, dv: int) -> tuple[Any, Any]:
    """in_proj_qkvz [Hk (2 dk + 2 r dv), H] -> (qkv [2 Hk dk + Hk r dv, H], z [Hk r dv, H])."""
    t = w.pop(name)
    H = t.shape[1]
    per = 2 * dk + 2 * r * dv

    def parts(a):
        g = a.reshape(hk, per, H)
        q, k = g[:, :dk], g[:, dk : 2 * dk]
        v, z = g[:, 2 * dk : 2 * dk + r * dv], g[:, 2 * dk + r * dv :]
        return np.concatenate([q.reshape(-1, H), k.reshape(-1, H), v.reshape(-1, H)]), z.reshape(-1, H)

    qkv = t.map(lambda a: parts(a)[0], (hk * (2 * dk + r * dv), H), ".qkv")
    z = t.map(lambda a: parts(a)[1], (hk * r * dv, H), ".z")
    return qkv, z


def sanitize(w, c: Config) -> None:
    strip_prefix(w, (("model.mtp.", "mtp."),))
    release_mtp_layers(w, c, "qwen3next")  # mtp.* -> model.layers.{n_layer}.* (norms still (1+w): folded below)
    hk, hv = c.int("linear_num_key_heads"), c.int("linear_num_value_heads")
    dk, dv = c.int("linear_key_head_dim"), c.int("linear_value_head_dim")
    fold_zero_centred_norms(w, keep=("linear_attn.norm.weight",))
    for bid in range(c.n_layer):
        la = LA.format(bid=bid)
        if f"{la}.in_proj_qkvz.weight" not in w:
            continue
        w[f"{la}.in_proj_qkv.weight"], w[f"{la}.in_proj_z.weight"] = split_qkvz(
            w, f"{la}.in_proj_qkvz.weight", hk, dk, hv // hk, dv
        )
        squeeze_conv(w, f"{la}.conv1d.weight")
        neg_exp(w, f"{la}.A_log")
    stack_experts(w, with_mtp_layers(c), L + ".mlp.experts.{e}.{proj}.weight", L + ".mlp.experts.{proj}.weight")


FAMILY = Family(
    ("qwen3_next",),
    "qwen3next",
    hparams,
    TENSORS,
    sanitize,
    tokenizer_pre="qwen2",
    defaults=DEFAULTS,
    keep_mtp=True,
    mtp_from_checkpoint=True,
)
