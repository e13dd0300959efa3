"""DeepSeek-V2 / V2-Lite (model_type `deepseek_v2`) -> GGUF arch `deepseek2`.

MLA attention, written the way llama.cpp 0.3.36 loads it ("MLA" mode, key_length_mla present):
  q:  q_a_proj [q_lora, H] -> q_a_layernorm -> q_b_proj [n_head * (nope + rope), q_lora]
      (V2-Lite without q_lora: q_proj [n_head * (nope + rope), H] -> attn_q)
  kv: kv_a_proj_with_mqa [kv_lora + rope, H] -> attn_kv_a_mqa, kv_a_layernorm [kv_lora] -> attn_kv_a_norm
      kv_b_proj [n_head * (nope + v), kv_lora] is split per head into
        attn_k_b [n_head, kv_lora, nope]  (k part, transposed for the absorbed q·k product)
        attn_v_b [n_head, v, kv_lora]
      `attn_kv_b` is NOT written: llama.cpp rejects files with tensors it does not load ("wrong number of
      tensors"), and kv_b is exactly concat(k_b^T, v_b) per head, so a runtime can rebuild it.
  head_count_kv = 1, key_length = kv_lora + rope, value_length = kv_lora (MLA as MQA), key_length_mla =
  nope + rope, value_length_mla = v, rope.dimension_count = rope (qk_rope_head_dim).
FFN: the first `first_k_dense_replace` layers are dense (ffn_gate/up/down); the rest are MoE with
n_shared_experts shared experts fused into one ffn_*_shexp of width n_shared * moe_intermediate_size.
Rope: HF deepseek applies rope to interleaved pairs, which is ggml's NORM rope: no Q/K permutation.
YaRN: `rope.scaling.yarn_log_multiplier` = 0.1 * mscale_all_dim (llama.cpp divides by 0.1 on load).
Note: llama.cpp decides "lite" (no q_lora) from the layer count (26/27), so a q_lora-less checkpoint
with another depth will not load there; moelite's runtime reads `attention.q_lora_rank` presence.
"""

from __future__ import annotations

from typing import Any

from ..lazy import Lazy
from . import LLAMA_NAMES, MOE_NAMES, SIGMOID, SOFTMAX, Config, Family, common_hparams, stack_experts

# transformers' DeepseekV2Config defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "num_hidden_layers": 32,
    "vocab_size": 102400,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "max_position_embeddings": 2048,
    "num_attention_heads": 32,
    "rms_norm_eps": 1e-06,
    "n_routed_experts": 64,
    "first_k_dense_replace": 0,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "moe_intermediate_size": 1407,
    "n_shared_experts": 2,
    "routed_scaling_factor": 1.0,
    "norm_topk_prob": False,
    "rope_theta": 10000.0,
}


def hparams(c: Config, default_gating: int = SOFTMAX) -> dict[str, Any]:
    rp = c.rope()
    kv_lora, rope, nope = c.int("kv_lora_rank"), c.int("qk_rope_head_dim"), c.int("qk_nope_head_dim")
    gating = {"softmax": SOFTMAX, "sigmoid": SIGMOID}.get(c.get("scoring_func", default=""), default_gating)
    kv = {
        **common_hparams(c),
        "attention.head_count_kv": 1,
        "vocab_size": c.int("vocab_size"),
        "leading_dense_block_count": c.int("first_k_dense_replace", default=0),
        "attention.q_lora_rank": c.int("q_lora_rank", default=None),
        "attention.kv_lora_rank": kv_lora,
        "attention.key_length": kv_lora + rope,
        "attention.value_length": kv_lora,
        "attention.key_length_mla": nope + rope,
        "attention.value_length_mla": c.int("v_head_dim"),
        "expert_feed_forward_length": c.int("moe_intermediate_size"),
        "expert_shared_count": c.int("n_shared_experts", default=0),
        "expert_weights_scale": c.float("routed_scaling_factor", default=1.0),
        "expert_weights_norm": c.bool("norm_topk_prob", default=False),  # llama.cpp writes it only when True
        "expert_gating_func": gating,
        "rope.dimension_count": rope,
    }
    if c.get("n_group", default=None) is not None:
        kv["expert_group_count"] = c.int("n_group")
        kv["expert_group_used_count"] = c.int("topk_group")
    if rp.get("mscale_all_dim") is not None:
        kv["rope.scaling.yarn_log_multiplier"] = 0.1 * float(rp["mscale_all_dim"])
    return kv


ATTN = "model.layers.{bid}.self_attn"
MLP = "model.layers.{bid}.mlp"
TENSORS = {
    **{k: v for k, v in LLAMA_NAMES.items() if ".k_proj." not in k and ".v_proj." not in k},
    **MOE_NAMES,
    ATTN + ".q_proj.weight": "blk.{bid}.attn_q.weight",  # V2-Lite (no q_lora)
    ATTN + ".q_a_proj.weight": "blk.{bid}.attn_q_a.weight",  # [q_lora, H]
    ATTN + ".q_a_layernorm.weight": "blk.{bid}.attn_q_a_norm.weight",  # [q_lora]
    ATTN + ".q_b_proj.weight": "blk.{bid}.attn_q_b.weight",  # [n_head*(nope+rope), q_lora]
    ATTN + ".kv_a_proj_with_mqa.weight": "blk.{bid}.attn_kv_a_mqa.weight",  # [kv_lora+rope, H]
    ATTN + ".kv_a_layernorm.weight": "blk.{bid}.attn_kv_a_norm.weight",  # [kv_lora]
    ATTN + ".k_b_proj.weight": "blk.{bid}.attn_k_b.weight",  # [n_head, kv_lora, nope]
    ATTN + ".v_b_proj.weight": "blk.{bid}.attn_v_b.weight",  # [n_head, v, kv_lora]
    MLP + ".gate_proj.weight": "blk.{bid}.ffn_gate.weight",  # dense layers [I_dense, H]
    MLP + ".up_proj.weight": "blk.{bid}.ffn_up.weight",
    MLP + ".down_proj.weight": "blk.{bid}.ffn_down.weight",
    MLP + ".shared_experts.gate_proj.weight": "blk.{bid}.ffn_gate_shexp.weight",  # [n_shared*I, H]
    MLP + ".shared_experts.up_proj.weight": "blk.{bid}.ffn_up_shexp.weight",
    MLP + ".shared_experts.down_proj.weight": "blk.{bid}.ffn_down_shexp.weight",  # [H, n_shared*I]
    MLP + ".gate.e_score_correction_bias": "blk.{bid}.exp_probs_b.bias",  # [E] (V3)
}


def split_kv_b(kv_b: Lazy, n_head: int, nope: int, v: int) -> tuple[Lazy, Lazy]:
    """kv_b [n_head*(nope+v), kv_lora] -> k_b [n_head, kv_lora, nope], v_b [n_head, v, kv_lora]."""
    kv_lora = kv_b.shape[1]

    def heads(a):  # [n_head, nope+v, kv_lora]
        return a.reshape(n_head, nope + v, kv_lora)

    k_b = kv_b.map(lambda a: heads(a)[:, :nope, :].transpose(0, 2, 1), (n_head, kv_lora, nope), ".k_b")
    v_b = kv_b.map(lambda a: heads(a)[:, nope:, :], (n_head, v, kv_lora), ".v_b")
    return k_b, v_b


def sanitize(w, c: Config) -> None:
    n_head, nope, v = c.int("num_attention_heads"), c.int("qk_nope_head_dim"), c.int("v_head_dim")
    for bid in range(c.n_layer):
        a = ATTN.format(bid=bid)
        if f"{a}.kv_b_proj.weight" in w:
            w[f"{a}.k_b_proj.weight"], w[f"{a}.v_b_proj.weight"] = split_kv_b(
                w.pop(f"{a}.kv_b_proj.weight"), n_head, nope, v
            )
    stack_experts(w, c, MLP + ".experts.{e}.{proj}.weight", MLP + ".experts.{proj}.weight")


FAMILY = Family(
    ("deepseek_v2",), "deepseek2", hparams, TENSORS, sanitize, tokenizer_pre="deepseek-llm", defaults=DEFAULTS
)
