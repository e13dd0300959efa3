"""DeepSeek-V3.2 (model_type `deepseek_v32`) -> GGUF arch `deepseek32`, and GLM-5 (`glm_moe_dsa`) -> `glm-dsa`.

DeepSeek-V3's block (MLA, see deepseek_v2.py; sigmoid + bias routing, see deepseek_v3.py) with DeepSeek Sparse
Attention (DSA): per layer a lightning indexer picks the `index_topk` past positions each token attends to, the
rest of the MLA attention is masked. The indexer (`self_attn.indexer.*`, llama.cpp's `blk.N.indexer.*`):
  q = wq_b(q_resid) [index_n_heads * index_head_dim]  (q_resid: the MLA's q_a_layernorm(q_a_proj x))
  k = LayerNorm(wk x) [index_head_dim]                (k_norm: weight and bias, eps 1e-6; one head)
  RoPE on the first qk_rope_head_dim dims of q and k: half-split (NEOX) for DeepSeek, interleaved pairs for GLM
  score(t, j) = sum_h w_h relu(q_h . k_j) / sqrt(index_head_dim), w = weights_proj(x) / sqrt(index_n_heads)
GLM-5.2's IndexShare: `indexer_types` per layer, "full" (own indexer) or "shared" (the previous full layer's
selection, no indexer tensors), written as llama.cpp's bool array `attention.indexer.types` (true = full).
Experts as transformers 5.25 saves them (stacked gate_up_proj / down_proj) or per expert; the MTP layer
(model.layers.{n_layer}) is dropped, as for DeepSeek-V3.
"""

from __future__ import annotations

from typing import Any

from moelite.errors import ConversionError

from . import Config, Family, leading_dense_layers, unfuse_experts
from .deepseek_v2 import ATTN, MLP
from .deepseek_v2 import TENSORS as DEEPSEEK2_TENSORS
from .deepseek_v3 import DEFAULTS as V3_DEFAULTS
from .deepseek_v3 import v3_hparams, v3_sanitize

# transformers' DeepseekV32Config / GlmMoeDsaConfig defaults: the value of a key read here that config.json omits
# (DeepSeek-V3's, less rope_interleave and rope_theta: keys these classes do not define)
DEFAULTS = {k: v for k, v in V3_DEFAULTS.items() if k not in ("rope_interleave", "rope_theta")}
DEFAULTS.update(max_position_embeddings=163840, index_topk=2048, index_head_dim=128, index_n_heads=64)
GLM_DEFAULTS = {
    **DEFAULTS,
    "vocab_size": 154880,
    "hidden_size": 6144,
    "intermediate_size": 12288,
    "num_hidden_layers": 78,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "q_lora_rank": 2048,
    "qk_nope_head_dim": 192,
    "v_head_dim": 256,
    "n_group": 1,
    "topk_group": 1,
    "max_position_embeddings": 202752,
    "rms_norm_eps": 1e-05,
    "index_n_heads": 32,
}

TENSORS = {
    **DEEPSEEK2_TENSORS,
    ATTN + ".indexer.wq_b.weight": "blk.{bid}.indexer.attn_q_b.weight",  # [n_idx * d_idx, q_lora]
    ATTN + ".indexer.wk.weight": "blk.{bid}.indexer.attn_k.weight",  # [d_idx, H]
    ATTN + ".indexer.k_norm.weight": "blk.{bid}.indexer.k_norm.weight",  # [d_idx] LayerNorm
    ATTN + ".indexer.k_norm.bias": "blk.{bid}.indexer.k_norm.bias",
    ATTN + ".indexer.weights_proj.weight": "blk.{bid}.indexer.proj.weight",  # [n_idx, H]
}


def indexer_hparams(c: Config, nope_too: bool = False) -> dict[str, Any]:
    """The lightning indexer's keys; nope_too: its heads must hold more than the rotated dims (Hy4's RoPE on their
    tail; llama.cpp refuses a head of only rotated dims there)."""
    n_idx, d_idx, top_k = c.int("index_n_heads"), c.int("index_head_dim"), c.int("index_topk")
    rope = c.int("qk_rope_head_dim")
    if n_idx < 1 or top_k < 1 or d_idx < rope + nope_too:
        raise ConversionError(
            f"{c.src}: keys index_n_heads = {n_idx}, index_head_dim = {d_idx}, index_topk = {top_k}: expected "
            f">= 1 heads, >= 1 selected positions and a head of {'more than' if nope_too else '>='} "
            f"qk_rope_head_dim = {rope} dims"
        )
    return {
        "attention.indexer.head_count": n_idx,
        "attention.indexer.key_length": d_idx,
        "attention.indexer.top_k": top_k,
    }


def hparams(c: Config) -> dict[str, Any]:
    kv = v3_hparams(c)  # sigmoid gating unless scoring_func says otherwise; llama.cpp requires the key
    kv["leading_dense_block_count"] = leading_dense_layers(c)
    return {**kv, **indexer_hparams(c)}


def indexer_types(c: Config) -> list[bool] | None:
    """GLM-5.2's per-layer IndexShare pattern as llama.cpp's bools (True = the layer runs its own indexer)."""
    types = c.get("indexer_types", default=None)
    if types is None:
        return None
    if not isinstance(types, list) or len(types) != c.n_layer or not set(types) <= {"full", "shared"}:
        raise ConversionError(f"{c.src}: key indexer_types must list {c.n_layer} entries of 'full' / 'shared'")
    if types[0] != "full":
        raise ConversionError(f"{c.src}: key indexer_types: layer 0 is 'shared', no earlier layer to share with")
    return [t == "full" for t in types]


def check_full_rope(c: Config) -> None:
    """RoPE on all qk_rope_head_dim dims (partial_rotary_factor 1): what llama.cpp's MLA graphs rotate."""
    partial = c.rope().get("partial_rotary_factor", 1.0)
    if partial not in (None, 1, 1.0):
        raise ConversionError(
            f"{c.src}: key rope_parameters.partial_rotary_factor = {partial}: only 1.0 (RoPE on all "
            f"qk_rope_head_dim dims) is supported"
        )


def glm_hparams(c: Config) -> dict[str, Any]:
    kv = hparams(c)
    check_full_rope(c)
    types = indexer_types(c)
    if types is not None:
        kv["attention.indexer.types"] = types
    return kv


def sanitize(w, c: Config) -> None:
    unfuse_experts(w, c, MLP + ".experts")
    v3_sanitize(w, c)  # MTP layer dropped, kv_b split, per-expert tensors stacked


def glm_sanitize(w, c: Config) -> None:
    types = indexer_types(c)
    for il, full in enumerate(types or []):
        if not full and any(n.startswith(ATTN.format(bid=il) + ".indexer.") for n in w):
            raise ConversionError(
                f"{c.src}: layer {il} is 'shared' in indexer_types but its checkpoint holds indexer tensors"
            )
    sanitize(w, c)


DEEPSEEK32 = Family(
    ("deepseek_v32",), "deepseek32", hparams, TENSORS, sanitize, tokenizer_pre="deepseek-v3", defaults=DEFAULTS
)
GLM_DSA = Family(
    ("glm_moe_dsa",), "glm-dsa", glm_hparams, TENSORS, glm_sanitize, tokenizer_pre="glm4", defaults=GLM_DEFAULTS
)
FAMILY = DEEPSEEK32
FAMILIES = (DEEPSEEK32, GLM_DSA)
