"""Hunyuan-A13B (model_type `hunyuan_v1_moe`) -> GGUF arch `hunyuan-moe`.

Per layer: RMSNorm -> GQA attention, NeoX RoPE, then per-head q/k RMSNorm **after** RoPE (`query_layernorm`,
`key_layernorm`) -> RMSNorm -> a shared MLP (width `intermediate_size`) plus softmax top-k routed experts,
renormalised. Real configs hold `moe_topk`, `moe_intermediate_size`, `num_shared_expert` as per-layer lists
(uniform); transformers' config takes ints: both are accepted. RoPE "dynamic" with NTK alpha is written as the
scaled base theta * alpha^(d / (d - 2)), as llama.cpp's converter does.
"""

from __future__ import annotations

from typing import Any

from moelite.errors import ConversionError

from . import LLAMA_NAMES, MOE_NAMES, SOFTMAX, Config, Family, common_hparams, stack_experts

ATTN = "model.layers.{bid}.self_attn"
MLP = "model.layers.{bid}.mlp"


# transformers' HunYuanMoEV1Config defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "num_hidden_layers": 32,
    "vocab_size": 290943,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "max_position_embeddings": 2048,
    "num_attention_heads": 32,
    "rms_norm_eps": 1e-05,
    "num_experts": 1,
    "moe_topk": 1,
    "rope_theta": 10000.0,
}


def uniform(c: Config, key: str, default: Any = None) -> Any:
    """A config value that real checkpoints store per layer: one value, or a list of equal values."""
    v = c.get(key, default=default)
    if isinstance(v, list):
        if not v or any(x != v[0] for x in v):
            raise ConversionError(f"{c.src}: key {key} = {v} varies per layer; expected one value")
        return v[0]
    return v


def hparams(c: Config) -> dict[str, Any]:
    hd = c.head_dim
    kv = {
        **common_hparams(c),
        "expert_used_count": int(uniform(c, "moe_topk")),
        "attention.key_length": hd,
        "attention.value_length": hd,
        "expert_feed_forward_length": int(uniform(c, "moe_intermediate_size", c.int("intermediate_size"))),
        "expert_shared_feed_forward_length": c.int("intermediate_size"),
        "expert_shared_count": int(uniform(c, "num_shared_expert", 1)),
        "expert_gating_func": SOFTMAX,  # moelite extra
        "expert_weights_norm": True,  # moelite extra (llama.cpp: always)
    }
    rp = c.rope()
    if rp.get("rope_type") == "dynamic" and rp.get("alpha"):
        alpha, base = float(rp["alpha"]), float(rp.get("rope_theta", 10000.0))
        kv["rope.freq_base"] = base * alpha ** (hd / (hd - 2))
        kv.pop("rope.scaling.type", None)
    return kv


TENSORS = {
    **LLAMA_NAMES,
    **MOE_NAMES,
    MLP + ".gate.wg.weight": "blk.{bid}.ffn_gate_inp.weight",  # [E, H]
    MLP + ".shared_mlp.gate_proj.weight": "blk.{bid}.ffn_gate_shexp.weight",  # [I, H]
    MLP + ".shared_mlp.up_proj.weight": "blk.{bid}.ffn_up_shexp.weight",
    MLP + ".shared_mlp.down_proj.weight": "blk.{bid}.ffn_down_shexp.weight",
    ATTN + ".query_layernorm.weight": "blk.{bid}.attn_q_norm.weight",  # [head_dim]
    ATTN + ".key_layernorm.weight": "blk.{bid}.attn_k_norm.weight",
}


def sanitize(w, c: Config) -> None:
    stack_experts(w, c, MLP + ".experts.{e}.{proj}.weight", MLP + ".experts.{proj}.weight")


FAMILY = Family(
    ("hunyuan_v1_moe",), "hunyuan-moe", hparams, TENSORS, sanitize, tokenizer_pre="hunyuan", defaults=DEFAULTS
)
