"""Kimi-Linear (model_type `kimi_linear`, Kimi-Linear-48B-A3B) -> GGUF arch `kimi-linear`.

Layers are KDA (Kimi Delta Attention, mixer_recurrent.cpp) or NoPE MLA (DeepSeek's MLA whose rope dims are never
rotated: k_rot stays in kv_a_proj_with_mqa and the cache, as llama.cpp keeps it), 3 : 1; FFNs DeepSeek-V3's (the
first `first_k_dense_replace` layers dense, then sigmoid + correction-bias routing, renormalised, x
routed_scaling_factor, one shared expert). Written the way llama.cpp's converter writes it:
  KDA  q/k/v_proj -> attn_q/k/v; q/k/v_conv1d [C, 1, K] -> ssm_conv1d_{q,k,v} (ggml ne {K, 1, C}); f_a/f_b_proj (the
       decay's low-rank pair) -> ssm_f_a / ssm_f_b; g_a/g_b_proj (the output gate's) -> ssm_g_a / ssm_g_b;
       b_proj -> ssm_beta; A_log [1, 1, H, 1] -> ssm_a [H, 1] = -exp(A_log); dt_bias [C] -> ssm_dt.bias;
       o_norm -> ssm_norm [S]; o_proj -> attn_output
  MLA  as deepseek_v2.py (kv_b split into attn_k_b / attn_v_b), head_count_kv 1 on MLA layers, 0 on KDA layers
       (llama.cpp tells the layer kinds apart by it)
Both config layouts are read: the release's (`linear_attn_config` {full_attn_layers (1-based), head_dim, num_heads,
short_conv_kernel_size}, first_k_dense_replace, num_experts / num_experts_per_token) and the one transformers 5.25
saves (`layer_types`, `linear_head_dim`, `linear_num_heads`, `linear_conv_kernel_dim`, `mlp_layer_types`,
`model_max_length`). transformers saves the dense layers' MLP under `block_sparse_moe.` (its reverse rename of
`block_sparse_moe.` -> `mlp.` hits them too); both prefixes are read.
"""

from __future__ import annotations

import math
from typing import Any

from moelite.errors import ConversionError

from ..lazy import Lazy
from . import SIGMOID, Config, Family, leading_dense_layers, neg_exp, stack_experts
from .deepseek_v2 import ATTN
from .deepseek_v2 import TENSORS as DEEPSEEK_TENSORS
from .deepseek_v2 import sanitize as deepseek_sanitize

# transformers' KimiLinearConfig defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "num_hidden_layers": 27,
    "vocab_size": 163840,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "moe_intermediate_size": 1024,
    "max_position_embeddings": 1048576,
    "num_attention_heads": 32,
    "rms_norm_eps": 1e-05,
    "num_local_experts": 256,
    "num_experts_per_tok": 8,
    "n_shared_experts": 1,
    "routed_scaling_factor": 2.446,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "linear_head_dim": 128,
    "linear_num_heads": 32,
    "linear_conv_kernel_dim": 4,
}


def _linear(c: Config, release: str, saved: str) -> Any:
    """A KDA size: the release's `linear_attn_config[release]`, else transformers' `saved` key (or its default)."""
    la = c.get("linear_attn_config", default=None) or {}
    return la[release] if la.get(release) is not None else c.int(saved)


def mla_layers(c: Config) -> list[bool]:
    """Per layer: MLA (True) or KDA, from transformers' `layer_types` or the release's 1-based
    `linear_attn_config.full_attn_layers`, else KimiLinearConfig's default (MLA at il % 4 == 0, il > 0)."""
    types = c.get("layer_types", default=None)
    full = (c.get("linear_attn_config", default=None) or {}).get("full_attn_layers")
    if types is not None:
        if (
            not isinstance(types, list)
            or len(types) != c.n_layer
            or set(types) - {"full_attention", "linear_attention"}
        ):
            raise ConversionError(
                f"{c.src}: key layer_types must list {c.n_layer} entries of 'full_attention' / 'linear_attention'"
            )
        return [t == "full_attention" for t in types]
    if full is not None:
        if not isinstance(full, list) or any(not isinstance(i, int) or not 1 <= i <= c.n_layer for i in full):
            raise ConversionError(
                f"{c.src}: key linear_attn_config.full_attn_layers must list 1-based layer numbers 1..{c.n_layer}"
            )
        return [il + 1 in full for il in range(c.n_layer)]
    return [il > 0 and il % 4 == 0 for il in range(c.n_layer)]


def mla_hparams(c: Config) -> dict[str, Any]:
    """The MLA layers' keys, as llama.cpp writes them for MLA as MQA (deepseek_v2.py): K = [kv_lora + rope] per
    token, V = the latent; the decompressed heads' sizes in key_length_mla / value_length_mla."""
    kv_lora, rope, nope = c.int("kv_lora_rank"), c.int("qk_rope_head_dim"), c.int("qk_nope_head_dim")
    return {
        "attention.q_lora_rank": c.int("q_lora_rank", default=None),
        "attention.kv_lora_rank": kv_lora,
        "rope.dimension_count": rope,
        "attention.key_length": kv_lora + rope,
        "attention.value_length": kv_lora,
        "attention.key_length_mla": nope + rope,
        "attention.value_length_mla": c.int("v_head_dim"),
    }


def check_kda_heads(c: Config, arch: str) -> int:
    """The KDA head count, which llama.cpp's layouts (kimi-linear, glm5-next) share with the attention's."""
    n_head = c.int("num_attention_heads")
    kda_heads = int(_linear(c, "num_heads", "linear_num_heads"))
    if kda_heads != n_head:
        raise ConversionError(
            f"{c.src}: KDA heads (linear_num_heads / linear_attn_config.num_heads) = {kda_heads} differ from "
            f"num_attention_heads = {n_head}: llama.cpp's {arch} layout has one head count for both"
        )
    return n_head


def hparams(c: Config) -> dict[str, Any]:
    n_head = check_kda_heads(c, "kimi-linear")
    if c.get("moe_router_activation_func", default="sigmoid") != "sigmoid":  # transformers' router: sigmoid only
        raise ConversionError(
            f"{c.src}: moe_router_activation_func = {c.get('moe_router_activation_func')!r}: expected 'sigmoid'"
        )
    if not c.bool("moe_renormalize", "norm_topk_prob"):
        raise ConversionError(
            f"{c.src}: moe_renormalize = false is not supported (llama.cpp's kimi-linear graph always renormalises)"
        )
    kv: dict[str, Any] = {
        "block_count": c.n_layer,
        "context_length": c.int("model_max_length", "max_position_embeddings"),
        "embedding_length": c.int("hidden_size"),
        "feed_forward_length": c.int("intermediate_size"),
        "attention.head_count": n_head,
        "attention.head_count_kv": [1 if m else 0 for m in mla_layers(c)],
        "attention.layer_norm_rms_epsilon": c.float("rms_norm_eps"),
        "expert_count": c.n_expert,
        "expert_used_count": c.int("num_experts_per_token", "num_experts_per_tok"),
        "vocab_size": c.int("vocab_size"),
        "ssm.conv_kernel": int(_linear(c, "short_conv_kernel_size", "linear_conv_kernel_dim")),
        "kda.head_dim": int(_linear(c, "head_dim", "linear_head_dim")),
        **mla_hparams(c),
        "expert_feed_forward_length": c.int("moe_intermediate_size"),
        "expert_shared_count": c.int("num_shared_experts", "n_shared_experts"),
        "leading_dense_block_count": leading_dense_layers(c, default=1),
        "expert_weights_scale": c.float("routed_scaling_factor"),
        "expert_gating_func": SIGMOID,
    }
    if c.int("num_expert_group", "n_group") > 1:  # llama.cpp's kimi-linear graph reads no groups: moelite's does
        kv["expert_group_count"] = c.int("num_expert_group", "n_group")
        kv["expert_group_used_count"] = c.int("topk_group")
    return kv


def kda_tensor_names(att: str) -> dict[str, str]:
    """The HF -> GGUF names a KDA mixer at prefix `att` shares between Kimi-Linear and Ling-3.0."""
    return {
        **{f"{att}.{x}_proj.weight": f"blk.{{bid}}.attn_{x}.weight" for x in "qkv"},
        **{f"{att}.{x}_conv1d.weight": f"blk.{{bid}}.ssm_conv1d_{x}.weight" for x in "qkv"},  # [C, 1, K]
        att + ".b_proj.weight": "blk.{bid}.ssm_beta.weight",  # [n_head, H]
        att + ".A_log": "blk.{bid}.ssm_a",  # [n_head, 1]: -exp(A_log) (Kimi), exp(A_log) (Ling)
        att + ".dt_bias": "blk.{bid}.ssm_dt.bias",  # [C]
        att + ".o_norm.weight": "blk.{bid}.ssm_norm.weight",  # [S]
    }


def conv_to_3d(w: dict[str, Lazy], att: str) -> None:
    """q/k/v conv kernels [C, 1, K] = ggml ne {K, 1, C}, one of llama.cpp's two shapes; a 2-D [C, K] gets its 1."""
    for x in "qkv":
        name = f"{att}.{x}_conv1d.weight"
        t = w[name]
        if t.ndim == 2:
            w[name] = t.map(lambda v: v.reshape(v.shape[0], 1, v.shape[1]), (t.shape[0], 1, t.shape[1]), "")


L = "model.layers.{bid}"
MOE = L + ".block_sparse_moe"
TENSORS = {
    **{k: v for k, v in DEEPSEEK_TENSORS.items() if ".mlp." not in k},
    **kda_tensor_names(ATTN),
    ATTN + ".f_a_proj.weight": "blk.{bid}.ssm_f_a.weight",  # [S, H]
    ATTN + ".f_b_proj.weight": "blk.{bid}.ssm_f_b.weight",  # [C, S]
    ATTN + ".g_a_proj.weight": "blk.{bid}.ssm_g_a.weight",
    ATTN + ".g_b_proj.weight": "blk.{bid}.ssm_g_b.weight",
    # FFN: dense layers (the release's mlp., transformers' block_sparse_moe.), MoE layers
    **{
        f"{p}.{x}_proj.weight": f"blk.{{bid}}.ffn_{x}.weight" for p in (L + ".mlp", MOE) for x in ("gate", "up", "down")
    },
    MOE + ".gate.weight": "blk.{bid}.ffn_gate_inp.weight",  # [E, H]
    MOE + ".gate.e_score_correction_bias": "blk.{bid}.exp_probs_b.bias",  # [E]
    MOE + ".experts.w1.weight": "blk.{bid}.ffn_gate_exps.weight",  # [E, I, H]
    MOE + ".experts.w3.weight": "blk.{bid}.ffn_up_exps.weight",
    MOE + ".experts.w2.weight": "blk.{bid}.ffn_down_exps.weight",  # [E, H, I]
    **{f"{MOE}.shared_experts.{x}_proj.weight": f"blk.{{bid}}.ffn_{x}_shexp.weight" for x in ("gate", "up", "down")},
}


def sanitize(w, c: Config) -> None:
    deepseek_sanitize(w, c)  # kv_b -> k_b / v_b on the MLA layers
    for bid in range(c.n_layer):
        a = ATTN.format(bid=bid)
        if f"{a}.A_log" in w:
            neg_exp(w, f"{a}.A_log", (math.prod(w[f"{a}.A_log"].shape), 1))  # ggml ne {1, H}: llama.cpp takes it
            conv_to_3d(w, a)
    stack_experts(w, c, MOE + ".experts.{e}.{proj}.weight", MOE + ".experts.{proj}.weight", ("w1", "w2", "w3"))


FAMILY = Family(("kimi_linear",), "kimi-linear", hparams, TENSORS, sanitize, tokenizer_pre="kimi-k2", defaults=DEFAULTS)
