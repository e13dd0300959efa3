"""Tencent Hy4 (model_type `hy_v4`) -> GGUF arch `hy_v4`.

DeepSeek-V3.2's block (MLA with DSA, GLM-5.2's IndexShare; see deepseek_v32.py) with:
- iHC (independent hyper-connections): the residual stream is `hc_mult` streams; around the attention and the MLP
  of every layer `hc_fn` [2 hc, hc H] / `hc_base` [2 hc] / `hc_scale` [2] make the streams' pre weights (their
  mixture is the sublayer's input) and post weights (how much of its output each stream takes); the head
  mixes the streams once more (`hc_head_*`, hc coefficients). GGUF: `blk.N.hc_{attn,ffn}_{fn,base,scale}.weight`,
  `output_hc_{fn,base,scale}.weight`, keys `hyper_connection.{count, epsilon, magnitude}`; the fn matrices F32.
- a per-element sigmoid gate on the attention output (`self_attn.linear_gate` [n_head v, H] -> attn_gate) and
  learned attention sinks (`learnable_sink_param` [n_head] -> attn_sinks);
- the indexer's RoPE on the last qk_rope_head_dim dims of its heads (DeepSeek-V3.2: the first);
- routed experts clamped on the gate before the SiLU (`swiglu_limit` -> `swiglu_clamp_exp` per layer; the dense
  MLP and the shared expert are not clamped), sigmoid + bias routing renormalised x routed_scaling_factor.
The MTP layers (`model.mtp_layers.*`) are dropped, as llama.cpp's converter drops them.

Two layouts of the same weights are read: the release's (`layers.N.hc_attn_layer.hc_pre.hc_fn`,
`hc_head.hc_head_fn`, `mlp.gate_proj`) and what transformers 5.25's save_pretrained writes, whose reverse
renaming misplaces two rules (`layers.N.hc_pre.hc_attn_layer.hc_fn`, `hc_pre.hc_head.hc_head_fn`, the MLP's gate as
`mlp.linear_gate`); both load back into transformers alike.
"""

from __future__ import annotations

import re
from typing import Any

from moelite.errors import ConversionError

from . import SIGMOID, Config, Family, leading_dense_layers, unfuse_experts
from .deepseek_v2 import ATTN, MLP
from .deepseek_v2 import hparams as v2_hparams
from .deepseek_v2 import sanitize as v2_sanitize
from .deepseek_v32 import TENSORS as DSA_TENSORS
from .deepseek_v32 import check_full_rope, indexer_hparams, indexer_types

# transformers' HYV4Config defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "vocab_size": 120832,
    "hidden_size": 2816,
    "intermediate_size": 6912,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 34,
    "num_attention_heads": 32,
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-5,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "routed_scaling_factor": 2.827,
    "norm_topk_prob": True,
    "n_group": 1,
    "topk_group": 1,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 192,
    "qk_rope_head_dim": 64,
    "v_head_dim": 256,
    "index_topk": 2048,
    "index_head_dim": 128,
    "index_n_heads": 16,
    "hc_mult": 4,
    "hc_magnitude": 2.0,
    "hc_eps": 1e-6,
    "swiglu_limit": 10.0,
}

HC = {"hc_attn_layer": "hc_attn", "hc_mlp_layer": "hc_ffn"}
TENSORS = {
    **DSA_TENSORS,
    ATTN + ".linear_gate.weight": "blk.{bid}.attn_gate.weight",  # [n_head * v, H], sigmoid per element
    ATTN + ".learnable_sink_param": "blk.{bid}.attn_sinks.weight",  # [n_head]
    **{
        f"model.layers.{{bid}}.{hf}.hc_pre.hc_{part}": f"blk.{{bid}}.{gg}_{part}.weight"
        for hf, gg in HC.items()
        for part in ("fn", "base", "scale")  # [2 hc, hc H], [2 hc], [2]
    },
    **{f"model.hc_head.hc_head_{part}": f"output_hc_{part}.weight" for part in ("fn", "base", "scale")},
}


def hparams(c: Config) -> dict[str, Any]:
    kv = v2_hparams(c, default_gating=SIGMOID)
    if c.int("n_group", default=1) == 1 and c.int("topk_group", default=1) == 1:
        kv.pop("expert_group_count", None)  # no group routing (llama.cpp's converter drops the keys too)
        kv.pop("expert_group_used_count", None)
    kv["leading_dense_block_count"] = leading_dense_layers(c)
    check_full_rope(c)
    kv.update(indexer_hparams(c, nope_too=True))
    types = indexer_types(c) or [True] * c.n_layer  # no indexer_types: every layer runs its own
    kv["attention.indexer.types"] = types
    limit = c.float("swiglu_limit")
    if not 0.0 <= limit < float("inf"):
        raise ConversionError(f"{c.src}: key swiglu_limit = {limit}: expected a finite limit >= 0 (0: none)")
    if limit > 0.0:
        kv["swiglu_clamp_exp"] = [limit] * c.n_layer  # routed experts only: the dense MLP and shared expert are not
    n, eps, mag = c.int("hc_mult"), c.float("hc_eps"), c.float("hc_magnitude")
    if not 2 <= n <= 64 or not 0.0 <= eps < float("inf") or not 0.0 < mag < float("inf"):
        raise ConversionError(
            f"{c.src}: keys hc_mult = {n}, hc_eps = {eps}, hc_magnitude = {mag}: expected 2..64 streams, a finite "
            f"epsilon >= 0 and a finite magnitude > 0"
        )
    kv["hyper_connection.count"] = n
    kv["hyper_connection.epsilon"] = eps
    kv["hyper_connection.magnitude"] = mag
    return kv


# transformers' save_pretrained layout -> the release's (the rules its reverse mapping misplaces)
_RELEASE_NAMES = (
    (
        re.compile(r"^model\.layers\.(\d+)\.hc_pre\.(hc_attn_layer|hc_mlp_layer)\.(hc_\w+)$"),
        r"model.layers.\1.\2.hc_pre.\3",
    ),
    (re.compile(r"^model\.hc_pre\.hc_head\.(hc_head_\w+)$"), r"model.hc_head.\1"),
    (re.compile(r"^(model\.layers\.\d+\.mlp(?:\.shared_experts)?)\.linear_gate\.weight$"), r"\1.gate_proj.weight"),
)


def sanitize(w, c: Config) -> None:
    for name in list(w):
        for rx, repl in _RELEASE_NAMES:
            new = rx.sub(repl, name)
            if new != name:
                w[new] = w.pop(name)
                break
    for name in [n for n in w if n.startswith("model.mtp_layers.")]:
        del w[name]  # the MTP layers: dropped (llama.cpp's hy_v4 converter drops them too)
    for il, full in enumerate(indexer_types(c) or []):
        if not full and any(n.startswith(ATTN.format(bid=il) + ".indexer.") for n in w):
            raise ConversionError(
                f"{c.src}: layer {il} is 'shared' in indexer_types but its checkpoint holds indexer tensors"
            )
    unfuse_experts(w, c, MLP + ".experts")
    v2_sanitize(w, c)  # kv_b split into k_b / v_b, per-expert tensors stacked


FAMILY = Family(("hy_v4",), "hy_v4", hparams, TENSORS, sanitize, tokenizer_pre="hy_v4", defaults=DEFAULTS)
