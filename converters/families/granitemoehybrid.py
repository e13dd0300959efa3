"""Granite-4.0-H (model_type `granitemoehybrid`, e.g. granite-4.0-h-tiny) -> GGUF arch `granitehybrid`.

Hybrid: `layer_types` "mamba" layers are Mamba2 (mixer_recurrent.cpp: in_proj -> z, xBC, dt; causal conv with bias;
selective scan with per-head A = -exp(A_log), D skip; grouped gated RMSNorm; out_proj), "attention" layers GQA;
`position_embedding_type` "nope" (the real models; absent, the class default null, is NoPE too: RoPE only for
"rope") is written as llama.cpp's switch `rope.scaling.finetuned` = false. transformers 5 re-saves `layer_types` as
linear_attention / full_attention: both vocabularies are accepted (llama.cpp's converter only knows the first and
writes a broken file on the second); absent, every layer is Mamba (the class default). Every layer: routed experts
(fused input_linear, split into gate/up) plus a shared MLP; Granite multipliers as granitemoe.py.
`attention.head_count_kv` is per layer, 0 on Mamba layers.
"""

from __future__ import annotations

from typing import Any

from moelite.errors import ConversionError

from . import Config, Family, mamba2_mixer, mamba2_names
from .granitemoe import TENSORS as GRANITE_TENSORS
from .granitemoe import hparams as granite_hparams
from .granitemoe import sanitize as granite_sanitize

M = "model.layers.{bid}.mamba"
ATTENTION, MAMBA = {"attention", "full_attention"}, {"mamba", "linear_attention"}


# transformers' GraniteMoeHybridConfig defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "num_hidden_layers": 32,
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "max_position_embeddings": 2048,
    "num_attention_heads": 32,
    "rms_norm_eps": 1e-06,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "attention_multiplier": 1.0,
    "embedding_multiplier": 1.0,
    "residual_multiplier": 1.0,
    "logits_scaling": 1.0,
    "shared_intermediate_size": 1024,
    "mamba_d_conv": 4,
    "mamba_d_state": 256,
    "mamba_n_groups": 1,
    "mamba_n_heads": 128,
    "mamba_expand": 2,
    "rope_theta": 10000.0,
}


def _mamba_layers(c: Config) -> list[bool]:
    # `layers_block_type`: transformers' alias; absent, the class makes every layer Mamba
    types = c.get("layer_types", "layers_block_type", default=None) or ["mamba"] * c.n_layer
    if not isinstance(types, list) or len(types) != c.n_layer or set(types) - ATTENTION - MAMBA:
        raise ConversionError(
            f"{c.src}: layer_types must list {c.n_layer} entries of mamba / attention "
            f"(or transformers' linear_attention / full_attention)"
        )
    return [t in MAMBA for t in types]


def _d_head(c: Config) -> int:
    """mamba_d_head; absent or "auto" (the class default): mamba_expand x hidden_size / mamba_n_heads."""
    if c.get("mamba_d_head", default="auto") == "auto":
        return c.int("mamba_expand") * c.int("hidden_size") // c.int("mamba_n_heads")
    return c.int("mamba_d_head")


def hparams(c: Config) -> dict[str, Any]:
    if c.int("mamba_expand") * c.int("hidden_size") != c.int("mamba_n_heads") * _d_head(c):
        raise ConversionError(f"{c.src}: mamba_n_heads x mamba_d_head must equal mamba_expand x hidden_size")
    mamba = _mamba_layers(c)
    kv = {**granite_hparams(c)}
    kv.pop("rope.dimension_count", None)
    # RoPE only for "rope": the class default (null) is NoPE, as the real models ("nope")
    nope = c.get("position_embedding_type", default=None) != "rope"
    kv.update(
        {
            "attention.head_count_kv": [0 if m else c.int("num_key_value_heads") for m in mamba],
            "ssm.conv_kernel": c.int("mamba_d_conv"),
            "ssm.state_size": c.int("mamba_d_state"),
            "ssm.group_count": c.int("mamba_n_groups"),
            "ssm.time_step_rank": c.int("mamba_n_heads"),
            "ssm.inner_size": c.int("mamba_n_heads") * _d_head(c),
            "rope.scaling.finetuned": not nope,
        }
    )
    if not nope:
        kv["rope.dimension_count"] = c.int("hidden_size") // c.int("num_attention_heads")
    return kv


TENSORS = {
    **GRANITE_TENSORS,
    **mamba2_names(M),
}


def sanitize(w, c: Config) -> None:
    granite_sanitize(w, c)
    ng = c.int("mamba_n_groups")
    for bid in range(c.n_layer):
        mamba2_mixer(w, M.format(bid=bid), ng)


FAMILY = Family(
    ("granitemoehybrid",), "granitehybrid", hparams, TENSORS, sanitize, tokenizer_pre="refact", defaults=DEFAULTS
)
