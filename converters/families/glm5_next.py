"""GLM-5.3-Flash (model_type `glm5_next`, its text model `glm5_next_text`) -> GGUF arch `glm5-next`.

A multimodal checkpoint (`Glm5NextForConditionalGeneration`: `model.language_model.*`, `model.visual.*`,
`lm_head`); the text model is converted, the vision tower dropped. Its blocks compose three mechanisms:
- KDA layers (`layer_types` "linear_attention", Kimi-Linear's mixer; see kimi_linear.py for the names): q/k/v_proj,
  one depthwise conv per projection (the release's q/k/v_conv1d; transformers holds them fused as `conv1d` [3C, 1,
  K] in memory), the low-rank decay f_a/f_b with dt_bias and A_log (ssm_a = -exp(A_log) [H], llama.cpp's 1-D
  shape), the bounded ("safe") gate lb * sigmoid(exp(A_log) (f + dt)) when `linear_lower_bound` (the release's
  `linear_attn_config.gate_lower_bound`) is set, the gated output norm;
- NoPE MLA layers ("indexed_attention"; qk_rope_head_dim 0: the latent alone in the cache) with the KPool DSA
  indexer: DeepSeek-V3.2's lightning indexer (deepseek_v32.py) scoring pools of `index_kpool` keys, each pool's key
  a per-channel softmax over its slots of `index_kpool_compress_gate x + index_kpool_compress_ape` (-> llama.cpp's
  `blk.N.indexer_compressor_{gate,ape}.weight`, F32); the top index_topk / index_kpool pools plus the incomplete tail
  pool (`index_kpool_always_select_tail`, the only mode supported) are attended; `indexer_types` per layer (a
  "shared" MLA layer reuses the pools of the full MLA layer right before it, transformers' IndexShare);
- mHC around every mixer and FFN (`hc_{attn,ffn}_{fn,base,scale}` -> `blk.N.hc_{attn,ffn}_{fn,base,scale}.weight`,
  F32): pre / post sigmoid gates and a Sinkhorn-normalised comb between the `hc_mult` (4) streams; the output
  head is the streams' mean (no tensors).
FFNs: DeepSeek-V3's (dense layers first per `mlp_layer_types`, then sigmoid + bias routing renormalised x
routed_scaling_factor, one shared expert), every SwiGLU (dense, shared, routed) clamped at `swiglu_limit` on the gate
before the SiLU -> `swiglu_clamp_exp` / `_shexp` per layer as llama.cpp writes them. MTP layers are dropped.

Config keys: transformers' names (`linear_num_heads`, `linear_head_dim`, `linear_conv_kernel_dim`,
`linear_lower_bound`, `hc_*`, `index_kpool*`, `mlp_layer_types`) or the release's (`linear_attn_config`,
`first_k_dense_replace`), from `text_config`.
"""

from __future__ import annotations

import math
from typing import Any

from moelite.errors import ConversionError

from ..lazy import Lazy
from . import SIGMOID, Config, Family, drop_layers_beyond, leading_dense_layers, neg_exp, strip_prefix, unfuse_experts
from .deepseek_v2 import ATTN, MLP
from .deepseek_v2 import hparams as v2_hparams
from .deepseek_v2 import sanitize as v2_sanitize
from .deepseek_v32 import TENSORS as DSA_TENSORS
from .deepseek_v32 import indexer_hparams, indexer_types
from .kimi_linear import _linear, check_kda_heads, conv_to_3d, kda_tensor_names

# transformers' Glm5NextTextConfig defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "vocab_size": 154880,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 45,
    "num_attention_heads": 64,
    "n_shared_experts": 1,
    "n_routed_experts": 288,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 0,
    "v_head_dim": 256,
    "qk_nope_head_dim": 256,
    "n_group": 1,
    "topk_group": 1,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "max_position_embeddings": 1048576,
    "rms_norm_eps": 1e-5,
    "index_topk": 2048,
    "index_head_dim": 128,
    "index_n_heads": 32,
    "swiglu_limit": 10.0,
    "linear_head_dim": 128,
    "linear_num_heads": 64,
    "linear_conv_kernel_dim": 4,
    "hc_mult": 4,
    "hc_eps": 1e-6,
    "hc_sinkhorn_iters": 20,
    "index_kpool": 16,
    "index_kpool_always_select_tail": True,
}

L = "model.layers.{bid}"
TENSORS = {
    **DSA_TENSORS,
    **kda_tensor_names(ATTN),
    **{f"{ATTN}.{x}_proj.weight": f"blk.{{bid}}.ssm_{x}.weight" for x in ("f_a", "f_b", "g_a", "g_b")},
    ATTN + ".indexer.index_kpool_compress_gate": "blk.{bid}.indexer_compressor_gate.weight",  # [d_idx, H]
    ATTN + ".indexer.index_kpool_compress_ape": "blk.{bid}.indexer_compressor_ape.weight",  # [kpool, d_idx]
    **{
        f"{L}.hc_{s}_{part}": f"blk.{{bid}}.hc_{s}_{part}.weight"  # [(2 + hc) hc, hc H], [(2 + hc) hc], [3]
        for s in ("attn", "ffn")
        for part in ("fn", "base", "scale")
    },
}


def mla_layers(c: Config) -> list[bool]:
    """Per layer: MLA (True) or KDA, from `layer_types` (transformers' default: MLA at il % 4 == 3)."""
    types = c.get("layer_types", default=None)
    if types is None:
        return [il % 4 == 3 for il in range(c.n_layer)]
    kinds = {"linear_attention", "indexed_attention", "full_attention"}
    if not isinstance(types, list) or len(types) != c.n_layer or set(types) - kinds:
        raise ConversionError(
            f"{c.src}: key layer_types must list {c.n_layer} entries of 'linear_attention' / 'indexed_attention'"
        )
    return [t != "linear_attention" for t in types]


def kda_lower_bound(c: Config) -> float | None:
    """The KDA decay's lower bound (the bounded gate), None for the softplus gate; transformers' rule: the release's
    `linear_attn_config.gate_lower_bound` over `linear_lower_bound`, -5 when `safe_gate` (default true) leaves none."""
    lb = c.get("linear_lower_bound", default=-5.0)
    la = c.get("linear_attn_config", default=None) or {}
    if la:
        lb = la.get("gate_lower_bound", lb)
        if la.get("safe_gate", True) and lb is None:
            lb = -5.0
    if lb is not None and (isinstance(lb, bool) or not isinstance(lb, (int, float)) or not -math.inf < lb < 0):
        raise ConversionError(f"{c.src}: key linear_lower_bound / gate_lower_bound = {lb!r}: expected a number < 0")
    return None if lb is None else float(lb)


def hparams(c: Config) -> dict[str, Any]:
    check_kda_heads(c, "glm5-next")
    if c.int("qk_rope_head_dim") != 0 or c.get("mla_use_nope", default=True) is not True:
        raise ConversionError(
            f"{c.src}: keys qk_rope_head_dim = {c.int('qk_rope_head_dim')}, mla_use_nope = "
            f"{c.get('mla_use_nope', default=True)!r}: expected GLM-5.3-Flash's NoPE MLA (no rope dims)"
        )
    if c.get("hidden_act", default="silu") != "silu" or c.get("mhc", default=True) is not True:
        raise ConversionError(f"{c.src}: keys hidden_act / mhc: expected 'silu' and mHC on")
    kv = v2_hparams(c, default_gating=SIGMOID)
    if c.int("n_group", default=1) == 1 and c.int("topk_group", default=1) == 1:
        kv.pop("expert_group_count", None)  # no group routing (llama.cpp's converter writes no groups)
        kv.pop("expert_group_used_count", None)
    mla = mla_layers(c)
    kv["attention.head_count_kv"] = [1 if m else 0 for m in mla]  # llama.cpp tells the layer kinds apart by it
    kv["leading_dense_block_count"] = leading_dense_layers(c)
    kv["ssm.conv_kernel"] = int(_linear(c, "short_conv_kernel_size", "linear_conv_kernel_dim"))
    kv["kda.head_dim"] = int(_linear(c, "head_dim", "linear_head_dim"))
    lb = kda_lower_bound(c)
    if lb is not None:
        kv["kda.gate_lower_bound"] = lb
    kv.update(indexer_hparams(c))
    kv["attention.layer_norm_epsilon"] = 1e-6  # the indexer keys' LayerNorm (llama.cpp reads it, default 0)
    kv.update(kpool_hparams(c, mla))
    kv.update(mhc_hparams(c))
    limit = c.float("swiglu_limit")
    if not 0.0 <= limit < math.inf:
        raise ConversionError(f"{c.src}: key swiglu_limit = {limit}: expected a finite limit >= 0 (0: none)")
    if limit > 0.0:  # dense, shared and routed SwiGLUs alike
        kv["swiglu_clamp_exp"] = [limit] * c.n_layer
        kv["swiglu_clamp_shexp"] = [limit] * c.n_layer
    return kv


def kpool_hparams(c: Config, mla: list[bool]) -> dict[str, Any]:
    """KPool's pool size and IndexShare pattern: a 'shared' MLA layer right after a full MLA layer (what
    transformers' decoder hands the selection through)."""
    r, top_k, tail = c.int("index_kpool"), c.int("index_topk"), c.get("index_kpool_always_select_tail")
    if not 2 <= r <= 4096 or top_k % r or tail is not True:
        raise ConversionError(
            f"{c.src}: keys index_kpool = {r}, index_topk = {top_k}, index_kpool_always_select_tail = {tail!r}: "
            f"expected a pool of 2..4096 keys dividing index_topk, with the tail pool always selected"
        )
    types = indexer_types(c) or [True] * c.n_layer
    for il, (full, m) in enumerate(zip(types, mla)):
        if m and not full and not (il > 0 and mla[il - 1] and types[il - 1]):
            raise ConversionError(
                f"{c.src}: key indexer_types: MLA layer {il} is 'shared' but layer {il - 1} is no full MLA layer "
                f"(transformers hands the selection to the next layer only)"
            )
    return {
        "attention.indexer.kpool": r,
        "attention.indexer.kpool_select_tail": True,
        "attention.indexer.types": types,
    }


def mhc_hparams(c: Config) -> dict[str, Any]:
    n, eps, iters = c.int("hc_mult"), c.float("hc_eps"), c.int("hc_sinkhorn_iters")
    if n != 4 or not 0.0 <= eps < math.inf or not 1 <= iters <= 1000:
        raise ConversionError(
            f"{c.src}: keys hc_mult = {n}, hc_eps = {eps}, hc_sinkhorn_iters = {iters}: expected 4 streams (ggml's "
            f"mHC ops and llama.cpp take 4), a finite epsilon >= 0 and 1..1000 Sinkhorn iterations"
        )
    return {
        "hyper_connection.count": n,
        "hyper_connection.sinkhorn_iterations": iters,
        "hyper_connection.epsilon": eps,
    }


# transformers' in-memory names (a checkpoint saved without its reverse mapping) -> the release's
_RELEASE_NAMES = (
    (".self_attn.forget_gate.", ".self_attn."),
    (".attn_hc.", ".hc_attn_"),
    (".ffn_hc.", ".hc_ffn_"),
)


def _split_conv(w: dict[str, Lazy], a: str) -> None:
    """transformers' fused depthwise conv [3C, 1, K] (q, k, v channels) -> the release's q/k/v_conv1d [C, 1, K]."""
    t = w.pop(f"{a}.conv1d.weight")
    c = t.shape[0] // 3
    for i, x in enumerate("qkv"):
        w[f"{a}.{x}_conv1d.weight"] = t.map(lambda v, i=i: v[i * c : (i + 1) * c], (c, *t.shape[1:]), f".{x}")


def sanitize(w, c: Config) -> None:
    strip_prefix(w, (("model.language_model.", "model."),), drop=("model.visual.",))
    for name in list(w):
        for old, new in _RELEASE_NAMES:
            if old in name:
                w[name.replace(old, new)] = w.pop(name)
                break
    drop_layers_beyond(w, c)  # the MTP layers
    types = indexer_types(c)
    for il, full in enumerate(types or []):
        if not full and any(n.startswith(ATTN.format(bid=il) + ".indexer.") for n in w):
            raise ConversionError(
                f"{c.src}: layer {il} is 'shared' in indexer_types but its checkpoint holds indexer tensors"
            )
    n_head = c.int("num_attention_heads")
    for bid in range(c.n_layer):
        a = ATTN.format(bid=bid)
        if f"{a}.conv1d.weight" in w:
            _split_conv(w, a)
        if f"{a}.A_log" in w:
            neg_exp(w, f"{a}.A_log", (n_head,))  # [H], as llama.cpp's glm5-next converter writes it
            conv_to_3d(w, a)
    unfuse_experts(w, c, MLP + ".experts")
    v2_sanitize(w, c)  # kv_b split into k_b / v_b, per-expert tensors stacked


FAMILY = Family(("glm5_next_text",), "glm5-next", hparams, TENSORS, sanitize, tokenizer_pre="glm4", defaults=DEFAULTS)
