"""DeepSeek-V3 / R1 (model_type `deepseek_v3`) and GLM-4.7-Flash (`glm4_moe_lite`) -> GGUF arch `deepseek2`
(same layout as V2).

Differences from V2 (see deepseek_v2.py for MLA): sigmoid router scores, a per-expert selection bias
`e_score_correction_bias` -> `exp_probs_b.bias`, grouped top-k (n_group / topk_group), renormalized
top-k weights scaled by routed_scaling_factor (2.5). Real checkpoints are FP8 (e4m3, 128x128 blocks with
`weight_scale_inv`): the source reader dequantizes them. The MTP layer (model.layers.{n_layer}: an MLA decoder
layer plus eh_proj / enorm / hnorm / shared_head / embed_tokens) is kept as llama.cpp's converter keeps it
(blk.{n_layer}.nextn.*, `nextn_predict_layers`); speculative="mtp" runs it (csrc/mtp.cpp).
"""

from __future__ import annotations

from typing import Any

from moelite.errors import ConversionError

from . import MTP_NAMES, SIGMOID, Config, Family, leading_dense_layers, mtp_hparams, with_mtp_layers
from .deepseek_v2 import TENSORS as V2_TENSORS
from .deepseek_v2 import hparams, sanitize

TENSORS = {**V2_TENSORS, **MTP_NAMES}

# transformers' DeepseekV3Config defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "num_hidden_layers": 61,
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "max_position_embeddings": 4096,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "rms_norm_eps": 1e-06,
    "n_routed_experts": 256,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "moe_intermediate_size": 2048,
    "n_shared_experts": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "n_group": 8,
    "topk_group": 4,
    "rope_interleave": True,
    "rope_theta": 10000.0,
}
# transformers' Glm4MoeLiteConfig defaults: the value of a key read here that config.json omits
GLM4_MOE_LITE_DEFAULTS = {
    "num_hidden_layers": 47,
    "vocab_size": 154880,
    "hidden_size": 2048,
    "intermediate_size": 10240,
    "max_position_embeddings": 202752,
    "num_attention_heads": 20,
    "num_key_value_heads": 20,
    "rms_norm_eps": 1e-05,
    "n_routed_experts": 64,
    "num_experts_per_tok": 4,
    "q_lora_rank": 768,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 192,
    "v_head_dim": 256,
    "moe_intermediate_size": 1536,
    "n_shared_experts": 1,
    "routed_scaling_factor": 1.8,
    "norm_topk_prob": True,
    "n_group": 1,
    "topk_group": 1,
    "rope_interleave": True,
    "rope_theta": 10000.0,
}


def v3_hparams(c: Config) -> dict[str, Any]:
    if not c.bool("rope_interleave", default=True):
        raise ConversionError(
            f"{c.src}: rope_interleave = false (rotate-half RoPE on the MLA rope dims) is not "
            f"supported: llama.cpp's deepseek2 graph rotates interleaved pairs"
        )
    return {**hparams(c, default_gating=SIGMOID), **mtp_hparams(c)}


def lite_hparams(c: Config) -> dict[str, Any]:
    """GLM-4.7-Flash: the release config says `first_k_dense_replace`; transformers' Glm4MoeLiteConfig has
    `mlp_layer_types` instead (default: the first layer dense, the rest sparse)."""
    kv = v3_hparams(c)
    if not c.has("first_k_dense_replace"):
        types = c.get("mlp_layer_types", default=None) or ["dense"] + ["sparse"] * (c.n_layer - 1)
        kv["leading_dense_block_count"] = leading_dense_layers(c, types)
    return kv


def v3_sanitize(w, c: Config) -> None:
    sanitize(w, with_mtp_layers(c))  # the MTP layer model.layers.{n_layer} too


FAMILY = Family(
    ("deepseek_v3",),
    "deepseek2",
    v3_hparams,
    TENSORS,
    v3_sanitize,
    tokenizer_pre="deepseek-v3",
    defaults=DEFAULTS,
    keep_mtp=True,
)
# GLM-4.7-Flash: DeepSeek-V3's architecture (MLA, sigmoid + bias routing) with GLM's tokenizer
GLM4_MOE_LITE = Family(
    ("glm4_moe_lite",),
    "deepseek2",
    lite_hparams,
    TENSORS,
    v3_sanitize,
    tokenizer_pre="glm4",
    defaults=GLM4_MOE_LITE_DEFAULTS,
    keep_mtp=True,
)
FAMILIES = (FAMILY, GLM4_MOE_LITE)
