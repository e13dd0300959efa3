"""Xiaomi MiMo-V2-Flash (model_type `mimo_v2_flash`; release `mimo_v2`) -> GGUF arch `mimo2`.

Per layer: RMSNorm -> GQA attention -> RMSNorm -> a dense SwiGLU (the first layer) or the MoE block: sigmoid
scores, top-k on score + `e_score_correction_bias` (groups), renormalised x `routed_scaling_factor`, no shared
expert. Attention: full-attention layers (the first and every 6th) have `num_key_value_heads`, no sinks and RoPE
theta 5e6; sliding-window layers have twice the KV heads (release key `swa_num_key_value_heads`), a learned
per-head sink (`attention_sink_bias`) and RoPE theta 1e4. q/k heads `head_dim` (192), v heads `v_head_dim` (128);
partial NeoX RoPE over int(head_dim x partial_rotary_factor) dims; V x `attention_value_scale`; kq scale
1/sqrt(head_dim).

Config: transformers' class (layer_types, mlp_layer_types, a per-layer-type rope_parameters, sliding_window) or the
release config.json (hybrid_layer_pattern 0/1, moe_layer_freq, rope_theta / swa_rope_theta / partial_rotary_factor,
swa_* head keys, sliding_window_size): both read here, config.json directly (transformers 5.25's AutoConfig rewrites
rope_parameters, and llama.cpp's converter then fails with KeyError 'partial_rotary_factor').
- sliding window: transformers (and the SGLang reference) attend `sliding_window_size` previous tokens plus the
  query, sliding_window = sliding_window_size + 1, which is what is written; llama.cpp's converter writes the
  release's raw `sliding_window` (128: one token fewer).
- SWA KV heads: transformers always takes 2 x num_key_value_heads (and its own layer pattern, ignoring
  hybrid_layer_pattern); the release states `swa_num_key_value_heads`, honoured when present, as llama.cpp does. swa_head_dim / swa_v_head_dim / swa_num_attention_heads must equal the full layers'
  (llama.cpp asserts it), `topk_method` must be noaux_tc and routing renormalised (llama.cpp hardcodes both).

MTP: the release keeps 3 blocks under `model.mtp.layers.{i}` (a decoder block with a dense MLP, SWA attention,
enorm / hnorm / eh_proj / final_layernorm); config.json has no count, llama.cpp hardcodes 3 and so does this file
(`num_nextn_predict_layers` when the config has it). They are written as llama.cpp does: blk.{n_layer + i},
nextn.*, final_layernorm -> layer_output_norm, block_count and the per-layer arrays counting them (SWA entries).
"""

from __future__ import annotations

import re
from typing import Any

from moelite.errors import ConversionError

from ..lazy import rows
from . import (
    LLAMA_NAMES,
    SIGMOID,
    Config,
    Family,
    common_hparams,
    leading_dense_layers,
    sliding_layers,
    stack_experts,
)
from .glm4_moe import DEEPSEEK_MOE_NAMES, MLP

ATTN = "model.layers.{bid}.self_attn"
N_MTP = 3  # MiMo-V2-Flash / V2.5 / V2.5-Pro ship 3 MTP blocks; config.json does not say (llama.cpp hardcodes it)

# transformers' MiMoV2FlashConfig defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "vocab_size": 152576,
    "hidden_size": 4096,
    "intermediate_size": 16384,
    "num_hidden_layers": 48,
    "num_attention_heads": 64,
    "num_key_value_heads": 4,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "moe_intermediate_size": 2048,
    "num_experts_per_tok": 8,
    "n_routed_experts": 256,
    "routed_scaling_factor": 1.0,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "head_dim": 192,
    "v_head_dim": 128,
    "sliding_window": 129,
    "attention_value_scale": 0.707,
}
# what the class sets when rope_parameters is absent (per layer type)
ROPE_FULL, ROPE_SWA, PARTIAL_ROTARY = 5_000_000.0, 10_000.0, 0.334


def n_nextn(c: Config) -> int:
    return c.int("num_nextn_predict_layers", default=N_MTP)


def swa_pattern(c: Config) -> list[bool]:
    """Per layer: sliding (True) or full attention: layer_types, else the release hybrid_layer_pattern (1 = SWA),
    else the class's default (full on layer 0 and every 6th)."""
    flags = sliding_layers(c)
    hybrid = c.get("hybrid_layer_pattern", default=None)
    if hybrid is not None:
        if not isinstance(hybrid, list) or len(hybrid) != c.n_layer or not set(hybrid) <= {0, 1}:
            raise ConversionError(f"{c.src}: key hybrid_layer_pattern must list {c.n_layer} entries of 0 / 1")
        if flags is not None and flags != [h == 1 for h in hybrid]:
            raise ConversionError(f"{c.src}: keys layer_types and hybrid_layer_pattern disagree")
        flags = [h == 1 for h in hybrid]
    return flags if flags is not None else [not (i == 0 or (i + 1) % 6 == 0) for i in range(c.n_layer)]


def dense_lead(c: Config) -> int:
    freq = c.get("moe_layer_freq", default=None)
    if c.get("mlp_layer_types", default=None) is None and isinstance(freq, list):
        return leading_dense_layers(c, ["sparse" if f else "dense" for f in freq])
    return leading_dense_layers(c, default=1)


def rope(c: Config) -> tuple[float, float, float]:
    """(full theta, SWA theta, partial rotary factor): rope_parameters per layer type (transformers) or the release
    keys rope_theta / swa_rope_theta / partial_rotary_factor, else the class's defaults."""
    rp = c.d.get("rope_parameters")
    if isinstance(rp, dict) and "full_attention" in rp:
        full, swa = rp["full_attention"], rp.get("sliding_attention", rp["full_attention"])
        for kind in (full, swa):
            if kind.get("rope_type", "default") != "default":
                raise ConversionError(
                    f"{c.src}: rope_parameters rope_type {str(kind.get('rope_type'))[:20]} is not "
                    f"supported (mimo2: plain RoPE)"
                )
        return (
            float(full.get("rope_theta", ROPE_FULL)),
            float(swa.get("rope_theta", ROPE_SWA)),
            float(full.get("partial_rotary_factor", PARTIAL_ROTARY)),
        )
    return (
        c.float("rope_theta", default=ROPE_FULL),
        c.float("swa_rope_theta", default=ROPE_SWA),
        c.float("partial_rotary_factor", default=PARTIAL_ROTARY),
    )


def hparams(c: Config) -> dict[str, Any]:
    hd, vhd, n_head, n_kv = c.head_dim, c.int("v_head_dim"), c.int("num_attention_heads"), c.int("num_key_value_heads")
    for key, want in (("swa_head_dim", hd), ("swa_v_head_dim", vhd), ("swa_num_attention_heads", n_head)):
        if c.get(key, default=want) != want:
            raise ConversionError(
                f"{c.src}: key {key} = {str(c.get(key))[:20]}: expected {want} (the full-attention "
                f"layers' value; the mimo2 GGUF has one per model)"
            )
    if (
        c.get("topk_method", default="noaux_tc") != "noaux_tc"
        or not c.bool("norm_topk_prob")
        or c.get("scoring_func", default="sigmoid") != "sigmoid"
    ):
        raise ConversionError(
            f"{c.src}: keys topk_method / norm_topk_prob / scoring_func: expected noaux_tc, true, "
            f"sigmoid (llama.cpp's mimo2 graph hardcodes renormalised sigmoid routing)"
        )
    window = c.get("sliding_window_size", default=None)
    window = c.int("sliding_window_size") + 1 if window is not None else c.int("sliding_window")
    full_theta, swa_theta, partial = rope(c)
    nextn = n_nextn(c)
    swa = swa_pattern(c) + [True] * nextn  # MTP blocks: SWA attention (llama.cpp's converter: the same)
    n_kv_swa = c.int("swa_num_key_value_heads", default=2 * n_kv)
    kv = {
        **common_hparams(c),
        "block_count": c.n_layer + nextn,
        "vocab_size": c.int("vocab_size"),
        "attention.head_count_kv": [n_kv_swa if s else n_kv for s in swa],
        "attention.key_length": hd,
        "attention.value_length": vhd,
        "attention.sliding_window": window,
        "attention.sliding_window_pattern": swa,
        "attention.layer_norm_rms_epsilon": c.float("rms_norm_eps", "layernorm_epsilon"),
        "rope.dimension_count": int(hd * partial),
        "rope.freq_base": full_theta,
        "rope.freq_base_swa": swa_theta,
        "rope.scaling.type": "none",
        "expert_feed_forward_length": c.int("moe_intermediate_size"),
        "expert_weights_scale": c.float("routed_scaling_factor", default=1.0),
        "expert_weights_norm": True,
        "expert_gating_func": SIGMOID,
        "expert_group_count": c.int("n_group"),
        "expert_group_used_count": c.int("topk_group"),
        "leading_dense_block_count": dense_lead(c),
        "nextn_predict_layers": nextn,
    }
    scale = c.get("attention_value_scale", default=None)
    if scale is not None:
        kv["attention.value_scale"] = c.float("attention_value_scale")
    return kv


TENSORS = {
    **LLAMA_NAMES,
    **DEEPSEEK_MOE_NAMES,
    ATTN + ".attention_sink_bias": "blk.{bid}.attn_sinks.weight",  # [n_head], SWA layers only
    ATTN + ".sinks": "blk.{bid}.attn_sinks.weight",  # transformers' in-memory name
    ATTN + ".qkv_proj.weight": "blk.{bid}.attn_qkv.weight",  # MTP blocks (llama.cpp's MTP graph)
    "model.layers.{bid}.eh_proj.weight": "blk.{bid}.nextn.eh_proj.weight",  # [H, 2H]
    "model.layers.{bid}.enorm.weight": "blk.{bid}.nextn.enorm.weight",
    "model.layers.{bid}.hnorm.weight": "blk.{bid}.nextn.hnorm.weight",
    "model.layers.{bid}.final_layernorm.weight": "blk.{bid}.layer_output_norm.weight",  # MTP head norm
}


def sanitize(w, c: Config) -> None:
    n_layer, nextn = c.n_layer, n_nextn(c)
    for name in [n for n in w if n.startswith("model.mtp.")]:
        t = w.pop(name)
        m = re.match(r"model\.mtp\.layers\.(\d+)\.(.+)\Z", name)
        if not m or int(m.group(1)) >= nextn:
            raise ConversionError(
                f"{t.src}: tensor {name}: expected model.mtp.layers.{{0..{nextn - 1}}}.* ({nextn} MTP blocks)"
            )
        w[f"model.layers.{n_layer + int(m.group(1))}.{m.group(2)}"] = t
    # a fused qkv_proj in the trunk (MiMo-V2.5's layout, unsharded): rows [Q | K | V] split for the attention mixer
    swa = swa_pattern(c)
    hd, vhd, n_head = c.head_dim, c.int("v_head_dim"), c.int("num_attention_heads")
    for bid in range(n_layer):
        a = ATTN.format(bid=bid)
        if a + ".qkv_proj.weight" in w:
            n_kv = (
                c.int("swa_num_key_value_heads", default=2 * c.int("num_key_value_heads"))
                if swa[bid]
                else c.int("num_key_value_heads")
            )
            t, q, k = w.pop(a + ".qkv_proj.weight"), n_head * hd, n_kv * hd
            if t.shape[0] != q + k + n_kv * vhd:
                raise ConversionError(
                    f"{t.src}: tensor {a}.qkv_proj.weight has {t.shape[0]} rows, config.json "
                    f"implies {q + k + n_kv * vhd}"
                )
            w[a + ".q_proj.weight"], w[a + ".k_proj.weight"] = rows(t, slice(0, q), 0), rows(t, slice(q, q + k), 0)
            w[a + ".v_proj.weight"] = rows(t, slice(q + k, None), 0)
    c_all = Config({**c.d, "num_hidden_layers": n_layer + nextn}, c.src, c.defaults)
    stack_experts(w, c_all, MLP + ".experts.{e}.{proj}.weight", MLP + ".experts.{proj}.weight")


FAMILY = Family(
    ("mimo_v2_flash", "mimo_v2"),
    "mimo2",
    hparams,
    TENSORS,
    sanitize,
    tokenizer_pre="qwen2",
    defaults=DEFAULTS,
    keep_mtp=True,
    n_mtp=N_MTP,
)
