"""Granite MoE (model_types `granitemoe`, `granitemoeshared`) -> GGUF arch `granitemoe`.

Experts are fused on disk: input_linear [E, 2I, H] (first half gate, second half up), output_linear
[E, H, I]. granitemoeshared adds a dense shared MLP (shared_mlp.input_linear [2S, H], output_linear [H, S]).
Scalars: embeddings * embedding_multiplier, attention scale = attention_multiplier (not 1/sqrt(d)),
residual branches * residual_multiplier, logits / logits_scaling. NORM rope, so q/k are permuted as for
`llama`.
"""

from __future__ import annotations

from typing import Any

from . import LLAMA_NAMES, SOFTMAX, Config, Family, common_hparams, split_halves
from .mixtral import permute_attention

# transformers' GraniteMoeConfig defaults: the value of a key read here that config.json omits
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
    "rope_theta": 10000.0,
}
# transformers' GraniteMoeSharedConfig defaults: GraniteMoeConfig's plus the shared expert's width
SHARED_DEFAULTS = {**DEFAULTS, "shared_intermediate_size": 0}


def hparams(c: Config) -> dict[str, Any]:
    kv = {
        **common_hparams(c),
        "vocab_size": c.int("vocab_size"),
        "rope.dimension_count": c.int("hidden_size") // c.int("num_attention_heads"),
        "attention.scale": c.float("attention_multiplier", default=None),
        "embedding_scale": c.float("embedding_multiplier", default=None),
        "residual_scale": c.float("residual_multiplier", default=None),
        "logit_scale": c.float("logits_scaling", default=None),
        "expert_weights_norm": True,  # moelite extra: top-k softmax weights sum to 1
        "expert_gating_func": SOFTMAX,  # moelite extra
    }
    kv.pop("attention.key_length", None)  # Granite ignores head_dim (llama.cpp's converter drops it)
    kv.pop("attention.value_length", None)
    if c.int("shared_intermediate_size", default=0):
        kv["expert_shared_feed_forward_length"] = c.int("shared_intermediate_size")  # S
    return kv


MOE = "model.layers.{bid}.block_sparse_moe"
TENSORS = {
    **LLAMA_NAMES,
    MOE + ".router.layer.weight": "blk.{bid}.ffn_gate_inp.weight",  # [E, H]
    MOE + ".gate_proj": "blk.{bid}.ffn_gate_exps.weight",  # [E, I, H]
    MOE + ".up_proj": "blk.{bid}.ffn_up_exps.weight",  # [E, I, H]
    MOE + ".output_linear.weight": "blk.{bid}.ffn_down_exps.weight",  # [E, H, I]
    "model.layers.{bid}.shared_mlp.gate_proj": "blk.{bid}.ffn_gate_shexp.weight",  # [S, H]
    "model.layers.{bid}.shared_mlp.up_proj": "blk.{bid}.ffn_up_shexp.weight",  # [S, H]
    "model.layers.{bid}.shared_mlp.output_linear.weight": "blk.{bid}.ffn_down_shexp.weight",  # [H, S]
}


def sanitize(w, c: Config) -> None:
    permute_attention(w, c)
    for bid in range(c.n_layer):
        for pre in (MOE.format(bid=bid), f"model.layers.{bid}.shared_mlp"):
            if f"{pre}.input_linear.weight" in w:  # [.., 2I, H] -> gate [.., I, H], up [.., I, H]
                split_halves(w, f"{pre}.input_linear.weight", f"{pre}.gate_proj", f"{pre}.up_proj")


FAMILY = Family(("granitemoe",), "granitemoe", hparams, TENSORS, sanitize, tokenizer_pre="refact", defaults=DEFAULTS)
SHARED = Family(
    ("granitemoeshared",), "granitemoe", hparams, TENSORS, sanitize, tokenizer_pre="refact", defaults=SHARED_DEFAULTS
)
FAMILIES = (FAMILY, SHARED)
