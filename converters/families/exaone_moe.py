"""K-EXAONE (model_type `exaone_moe`) -> GGUF arch `exaone-moe`.

Per layer: RMSNorm -> GQA attention with per-head q/k RMSNorm; sliding-window layers (`layer_types`, else
`sliding_window_pattern`: an int period or an "LLLG" string) rotate q/k (NeoX RoPE), full-attention layers are
NoPE (transformers: "global NoPE for hybrid attention"; llama.cpp's graph ropes only its SWA layers) -> RMSNorm ->
the first `first_k_dense_replace` layers (or `mlp_layer_types`) dense SwiGLU, the rest DeepSeek-V3 routing:
sigmoid scores, selection on score + `e_score_correction_bias` with groups, renormalised x `routed_scaling_factor`,
plus `num_shared_experts` shared experts (width moe_intermediate_size x count).

MTP: the release checkpoint keeps `num_nextn_predict_layers` blocks under `mtp.*` (`mtp.layers.{i}.*` a decoder
block, `mtp.fc` / `mtp.pre_fc_norm_embedding` / `mtp.pre_fc_norm_hidden` / `mtp.norm` shared by them); they are
written as llama.cpp does, blocks `blk.{n_layer + i}` with `nextn.{eh_proj,enorm,hnorm,shared_head_norm}`, and
`nextn_predict_layers` counted in `block_count`. transformers' class has no MTP and ignores `mtp.*`.
"""

from __future__ import annotations

from typing import Any

from moelite.errors import ConversionError

from . import (
    LLAMA_NAMES,
    MTP_NAMES,
    SIGMOID,
    Config,
    Family,
    common_hparams,
    leading_dense_layers,
    n_nextn,
    release_mtp_layers,
    sliding_layers,
    stack_experts,
    with_mtp_layers,
)
from .glm4_moe import DEEPSEEK_MOE_NAMES, MLP

ATTN = "model.layers.{bid}.self_attn"

# transformers' ExaoneMoeConfig defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "num_hidden_layers": 32,
    "vocab_size": 102400,
    "hidden_size": 4096,
    "intermediate_size": 16384,
    "max_position_embeddings": 2048,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "rms_norm_eps": 1e-05,
    "sliding_window": 4096,
    "sliding_window_pattern": 4,
    "first_k_dense_replace": 1,
    "moe_intermediate_size": 1024,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "num_shared_experts": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "n_group": 1,
    "topk_group": 1,
}


def swa_pattern(c: Config) -> list[bool]:
    """Per layer: sliding (True) or full attention, as ExaoneMoeConfig derives `layer_types`."""
    n = c.n_layer
    flags = sliding_layers(c)
    if flags is not None:
        return flags
    p = c.get("sliding_window_pattern")
    if isinstance(p, str) and p and set(p) <= {"L", "G"}:
        return [p[i % len(p)] == "L" for i in range(n)]
    if isinstance(p, int) and not isinstance(p, bool) and p >= 1:
        return [(i + 1) % p != 0 for i in range(n)]
    raise ConversionError(
        f"{c.src}: key sliding_window_pattern = {str(p)[:40]}: expected a period >= 1 or a string of 'L' / 'G'"
    )


def hparams(c: Config) -> dict[str, Any]:
    if c.get("sliding_window", default=None) is None:
        # transformers then ropes every layer; llama.cpp's exaone-moe graph ropes sliding layers only
        raise ConversionError(
            f"{c.src}: sliding_window null (RoPE on every layer, no sliding window) is not "
            f"supported: the exaone-moe GGUF ropes only its sliding-window layers"
        )
    scoring = c.get("scoring_func", "score_function", default="sigmoid")
    if scoring != "sigmoid":  # transformers' router (DeepSeek-V3's) is sigmoid whatever the key says
        raise ConversionError(f"{c.src}: key scoring_func = {str(scoring)[:40]}: expected 'sigmoid'")
    nextn = n_nextn(c)
    n_ff_exp, n_shared = c.int("moe_intermediate_size"), c.int("num_shared_experts")
    kv = {
        **common_hparams(c),
        "block_count": c.n_layer + nextn,
        "vocab_size": c.int("vocab_size"),
        "attention.key_length": c.head_dim,
        "attention.value_length": c.head_dim,
        "attention.sliding_window": c.int("sliding_window"),
        "attention.sliding_window_pattern": swa_pattern(c),
        "expert_feed_forward_length": n_ff_exp,
        "expert_shared_count": n_shared,
        "expert_shared_feed_forward_length": n_ff_exp * n_shared,
        "expert_weights_scale": c.float("routed_scaling_factor"),
        "expert_weights_norm": c.bool("norm_topk_prob"),
        "expert_gating_func": SIGMOID,
        "expert_group_count": c.int("n_group"),
        "expert_group_used_count": c.int("topk_group"),
        "leading_dense_block_count": leading_dense_layers(c),
        "nextn_predict_layers": nextn,
        "rope.scaling.type": "none",
    }
    return kv


TENSORS = {
    **LLAMA_NAMES,
    **DEEPSEEK_MOE_NAMES,
    ATTN + ".q_norm.weight": "blk.{bid}.attn_q_norm.weight",  # [head_dim]
    ATTN + ".k_norm.weight": "blk.{bid}.attn_k_norm.weight",
    MLP + ".e_score_correction_bias": "blk.{bid}.exp_probs_b.bias",  # [E] (release layout)
    **MTP_NAMES,
}


def sanitize(w, c: Config) -> None:
    release_mtp_layers(w, c, "exaone-moe")  # mtp.* -> model.layers.{n_layer + i}.*
    c_all = with_mtp_layers(c)  # trunk + MTP blocks
    stack_experts(w, c_all, MLP + ".experts.{e}.{proj}.weight", MLP + ".experts.{proj}.weight")


FAMILY = Family(
    ("exaone_moe",),
    "exaone-moe",
    hparams,
    TENSORS,
    sanitize,
    tokenizer_pre="exaone-moe",
    defaults=DEFAULTS,
    keep_mtp=True,
)
