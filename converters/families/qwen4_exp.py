"""Qwen3.8-Flash-Next, the Qwen4 preview (model_type `qwen4_exp_text`, or `qwen4_exp` with a `text_config`) -> GGUF
arch `qwen4exp`.

Qwen3.5-MoE's hybrid (see qwen3_5_moe.py: Gated DeltaNet layers, gated full attention, softmax experts + a gated
shared expert; zero-centred norms folded +1, V heads reordered) with:
- hyper-connections in place of every layer norm: the residual is `hc_count` streams; around each sublayer a gated
  low-rank mix (`{attn,mlp}_hyper_connection.{hc_norm, input_mix_weight_down, input_mix_weight_up,
  block_inject_weight}` -> `blk.N.hc_{attn,ffn}_{norm,down,up,inject}.weight`), and a last one without inject
  (`hyper_connection_mixer.*` -> `output_hc_*`) that is the output norm. Keys `hyper_connection.{count, low_rank}`.
- the Gated DeltaNet's output gate is a sigmoid (`output_gate_type`: llama.cpp hardcodes it; silu is refused);
- QSA on the full-attention layers: a token indexer (`self_attn.indexer.index_qk_proj`, split into
  `indexer.{q_proj,k_proj}`, and its (1+w) norms `indexer.{q_norm,k_norm}`) scoring mean-pooled blocks of
  `indexer_compress_ratio` keys; keys `attention.indexer.{head_count, key_length, top_k}` (top_k: the token budget)
  and `attention.compress_ratios` (per layer, 0 on the others). transformers 5.25 renames `full_attention` to
  `indexed_attention` in layer_types; both names are read;
- the PLE n-gram hash embedding on one Gated DeltaNet layer: its table (`ple.ple_embedding.ngram_embedding.shard_i`,
  `split_ngram_parts` shards concatenated by rows -> `per_layer_token_embd.weight` {row_dim, rows}), the hash
  constants as u64 arrays (`ple.{layer_multipliers, head_offsets, head_vocab_sizes}`: 45-bit values, never through
  F32), `ple.{layers, ngram_size, heads_per_ngram, conv_kernel, eos_token_id}`, `embedding_length_per_layer_input`
  (the row dim), and the layer's projections / (1+w) norms / dilated conv (`blk.N.ple_*`).
The table is encoded and written shard by shard (Lazy.row_parts), never held whole. The MTP layer is dropped,
as llama.cpp's converter drops it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moelite.errors import ConversionError

from ..lazy import row_blocks, rows
from . import Config, Family, squeeze_conv
from .qwen3_5_moe import DEFAULTS as Q35_DEFAULTS
from .qwen3_5_moe import TENSORS as Q35_TENSORS
from .qwen3_5_moe import L
from .qwen3_5_moe import hparams as q35_hparams
from .qwen3_5_moe import sanitize as q35_sanitize

# transformers' Qwen4ExpTextConfig defaults: the value of a key read here that config.json omits
DEFAULTS = {
    # (the rope keys and full_attention_interval live in rope_parameters / layer_types in Qwen4ExpTextConfig)
    **{
        k: v
        for k, v in Q35_DEFAULTS.items()
        if k not in ("rope_theta", "partial_rotary_factor", "full_attention_interval")
    },
    "num_experts": 512,
    "num_experts_per_tok": 10,
    "hc_count": 4,
    "hc_lowrank": 320,
    "ple_conv_kernel_size": 4,
    "ngram_size": 3,
    "heads_per_ngram": 8,
    "split_ngram_parts": 512,
}

HC = {"attn_hyper_connection": "hc_attn", "mlp_hyper_connection": "hc_ffn"}
HC_PARTS = {
    "hc_norm": "norm",
    "input_mix_weight_down": "down",
    "input_mix_weight_up": "up",
    "block_inject_weight": "inject",
}
PLE = L + ".ple"
TENSORS = {
    **{k: v for k, v in Q35_TENSORS.items() if "layernorm" not in k and "post_attention" not in k},
    "model.norm.weight": None,  # no output norm: the hyper-connection mixer is the output norm
    **{f"{L}.{hf}.{p}.weight": f"blk.{{bid}}.{gg}_{q}.weight" for hf, gg in HC.items() for p, q in HC_PARTS.items()},
    **{
        f"model.hyper_connection_mixer.{p}.weight": f"output_hc_{q}.weight"
        for p, q in HC_PARTS.items()
        if q != "inject"
    },
    L + ".self_attn.indexer.q_proj.weight": "blk.{bid}.indexer.q_proj.weight",  # [n_idx d, H]
    L + ".self_attn.indexer.k_proj.weight": "blk.{bid}.indexer.k_proj.weight",  # [d, H] (one key head)
    L + ".self_attn.indexer.q_layernorm.weight": "blk.{bid}.indexer.q_norm.weight",  # [d], (1+w) folded
    L + ".self_attn.indexer.k_layernorm.weight": "blk.{bid}.indexer.k_norm.weight",
    "per_layer_token_embd.weight": "per_layer_token_embd.weight",  # [rows, row_dim]
    PLE + ".key_proj.weight": "blk.{bid}.ple_key.weight",  # [hc H, E_ple]
    PLE + ".value_proj.weight": "blk.{bid}.ple_value.weight",  # [H, E_ple]
    PLE + ".norm_key.weight": "blk.{bid}.ple_norm_key.weight",  # [hc H], (1+w) folded
    PLE + ".norm_query.weight": "blk.{bid}.ple_norm_query.weight",
    PLE + ".norm_conv.weight": "blk.{bid}.ple_norm_conv.weight",
    PLE + ".conv1d.weight": "blk.{bid}.ple_conv1d.weight",  # [hc H, 1, K] -> [hc H, K]
}
TENSORS = {k: v for k, v in TENSORS.items() if v is not None}
HASH_CONSTANTS = ("layer_multipliers", "ngram_heads_offsets", "ngram_heads_vocab_sizes")


def _layer_types(c: Config) -> list[str]:
    types = c.get("layer_types", default=None)
    if types is None:
        n = c.int("full_attention_interval", default=4)
        return ["full_attention" if (i + 1) % n == 0 else "linear_attention" for i in range(c.n_layer)]
    if not isinstance(types, list) or len(types) != c.n_layer:
        raise ConversionError(f"{c.src}: key layer_types must list {c.n_layer} entries")
    types = ["full_attention" if t == "indexed_attention" else t for t in types]
    if set(types) - {"full_attention", "linear_attention"}:
        raise ConversionError(f"{c.src}: key layer_types: expected linear_attention / indexed_attention entries")
    return types


def _q35_view(c: Config) -> Config:
    """The config as qwen3_5_moe.py reads it (transformers' indexed_attention is its full_attention)."""
    return Config({**c.d, "layer_types": _layer_types(c)}, c.src, c.defaults)


def ple_layers(c: Config) -> list[int]:
    """0-based PLE layers (config: 1-based `ple_layer_ids`); llama.cpp takes exactly one, a Gated DeltaNet layer."""
    ids = c.get("ple_layer_ids", default=None) or []
    types = _layer_types(c)
    if not isinstance(ids, list) or any(not isinstance(i, int) or not 1 <= i <= c.n_layer for i in ids):
        raise ConversionError(f"{c.src}: key ple_layer_ids must list 1-based layer ids in 1..{c.n_layer}")
    if len(ids) > 1 or any(types[i - 1] != "linear_attention" for i in ids):
        raise ConversionError(
            f"{c.src}: key ple_layer_ids = {ids}: one PLE layer, a linear_attention one, is supported (as llama.cpp)"
        )
    return [i - 1 for i in ids]


def hparams(c: Config) -> dict[str, Any]:
    kv = q35_hparams(_q35_view(c))
    gate = c.get("output_gate_type", default=None) or c.get("hidden_act", default="silu")
    if gate != "sigmoid":
        raise ConversionError(
            f"{c.src}: key output_gate_type = {gate!r}: only 'sigmoid' (the Gated DeltaNet's output gate) is supported; "
            f"llama.cpp's qwen4exp graph hardcodes it"
        )
    kv["hyper_connection.count"] = c.int("hc_count")
    kv["hyper_connection.low_rank"] = c.int("hc_lowrank")
    if kv["hyper_connection.count"] < 2 or kv["hyper_connection.low_rank"] < 1:
        raise ConversionError(f"{c.src}: keys hc_count / hc_lowrank: expected >= 2 streams and a rank >= 1")
    n_idx, d_idx = c.int("indexer_n_heads"), c.int("indexer_head_dim")
    budget, ratio = c.int("indexer_budget"), c.int("indexer_compress_ratio")
    if c.int("indexer_kv_heads", default=1) != 1 or min(n_idx, d_idx, budget, ratio) < 1 or budget % ratio:
        raise ConversionError(
            f"{c.src}: QSA keys indexer_n_heads = {n_idx}, indexer_head_dim = {d_idx}, indexer_budget = {budget}, "
            f"indexer_compress_ratio = {ratio}, indexer_kv_heads: expected positive values, one key head and a "
            f"budget divisible by the ratio"
        )
    kv["attention.indexer.head_count"] = n_idx
    kv["attention.indexer.key_length"] = d_idx
    kv["attention.indexer.top_k"] = budget
    kv["attention.compress_ratios"] = [ratio if t == "full_attention" else 0 for t in _layer_types(c)]
    ple = ple_layers(c)
    if ple:
        ngram, per = c.int("ngram_size"), c.int("heads_per_ngram")
        eos = c.get("eos_token_id", default=None)
        eos = eos[-1] if isinstance(eos, list) and eos else eos
        if not isinstance(eos, int) or ngram < 2 or per < 1:
            raise ConversionError(
                f"{c.src}: keys eos_token_id = {eos!r}, ngram_size = {ngram}, heads_per_ngram = {per}: PLE needs an "
                f"EOS id (its n-grams reset there), n-grams of >= 2 tokens and >= 1 head each"
            )
        kv["ple.layers"] = ple
        kv["ple.ngram_size"] = ngram
        kv["ple.heads_per_ngram"] = per
        kv["ple.conv_kernel"] = c.int("ple_conv_kernel_size")
        kv["ple.eos_token_id"] = eos
    return kv


def tensor_hparams(w, c: Config) -> dict[str, Any]:
    """The PLE layer's int64 hash constants (exact: 45-bit values never pass through F32) and its table's row width."""
    out: dict[str, Any] = {}
    for il in ple_layers(c):
        pre = f"{PLE.format(bid=il)}.ple_embedding."
        for name, key in zip(HASH_CONSTANTS, ("layer_multipliers", "head_offsets", "head_vocab_sizes")):
            t = w.get(pre + name)
            a = t.load() if t is not None else None
            if a is None or a.dtype != np.int64 or a.ndim != 1 or (a < 0).any():
                raise ConversionError(
                    f"{c.src}: the PLE layer {il} needs {pre}{name} as a 1-D non-negative int64 tensor in the checkpoint"
                )
            out[f"ple.{key}"] = a.astype(np.uint64)
        shard = next((t for n, t in w.items() if n.startswith(pre + "ngram_embedding.")), None)
        if shard is None:
            raise ConversionError(f"{c.src}: the PLE layer {il} has no n-gram table ({pre}ngram_embedding.shard_*)")
        out["embedding_length_per_layer_input"] = shard.shape[-1]
    return out


def sanitize(w, c: Config) -> None:
    q = _q35_view(c)
    # the QSA indexer's fused projection -> q (n_idx heads) and k (one head)
    n_q = c.int("indexer_n_heads") * c.int("indexer_head_dim")
    for bid in range(c.n_layer):
        name = f"{L.format(bid=bid)}.self_attn.indexer.index_qk_proj.weight"
        if name in w:
            t = w.pop(name)
            w[name.replace("index_qk_proj", "q_proj")] = rows(t, slice(0, n_q), axis=0)
            w[name.replace("index_qk_proj", "k_proj")] = rows(t, slice(n_q, t.shape[0]), axis=0)
    for il in ple_layers(c):
        pre = f"{PLE.format(bid=il)}.ple_embedding.ngram_embedding."
        shards = sorted(
            (n for n in w if n.startswith(pre)), key=lambda n: int(n[len(pre) :].split("_")[1].split(".")[0])
        )
        if not shards:
            raise ConversionError(f"{c.src}: the PLE layer {il} has no n-gram table ({pre}shard_*.weight)")
        w["per_layer_token_embd.weight"] = row_blocks([w.pop(n) for n in shards], pre + "shard_*")  # shard by shard
        for name in HASH_CONSTANTS:  # written as keys (tensor_hparams)
            del w[f"{PLE.format(bid=il)}.ple_embedding.{name}"]
        squeeze_conv(w, f"{PLE.format(bid=il)}.conv1d.weight")
        for n in ("norm_key", "norm_query", "norm_conv"):  # (1+w) norms whose names the generic +1 rule misses
            t = w[f"{PLE.format(bid=il)}.{n}.weight"]
            w[f"{PLE.format(bid=il)}.{n}.weight"] = t.map(lambda a: a + 1.0, t.shape, "+1")
    q35_sanitize(w, q)  # +1 on *norm.weight (hc_norm, indexer layernorms, q/k norms), V-head reorder, experts


FAMILY = Family(
    ("qwen4_exp_text",),
    "qwen4exp",
    hparams,
    TENSORS,
    sanitize,
    tokenizer_pre="qwen35",
    defaults=DEFAULTS,
    tensor_hparams=tensor_hparams,
)
