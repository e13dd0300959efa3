"""Mistral Small 4 (text model_type `mistral4`, shipped as `Mistral3ForConditionalGeneration` with a Pixtral vision
tower and the text model under `text_config`) -> GGUF arch `mistral4` (llama.cpp: the deepseek2 model).

Per layer: RMSNorm -> DeepSeek MLA (q_lora, kv_lora, interleaved RoPE on the rope dims; see deepseek_v2.py for the
tensor layout) -> RMSNorm -> the first `first_k_dense_replace` layers dense SwiGLU, the rest MoE: softmax scores,
group-limited top-k (groups ranked by the sum of their top-2 scores), renormalised (+1e-20) x
`routed_scaling_factor`, plus `n_shared_experts` shared experts of width moe_intermediate_size x count.
YaRN with mscale (`rope.scaling.yarn_log_multiplier` = 0.1 x mscale_all_dim, as llama.cpp's deepseek2 converter).
Llama-4 attention temperature: q x (1 + beta log(1 + floor(pos / original_max_position_embeddings))), beta =
rope_parameters.llama_4_scaling_beta; written as `attention.temperature_scale` / `attention.temperature_length`,
the keys llama.cpp's deepseek2 loader reads (its HF converter drops them: its GGUF diverges from transformers from
position 8192 on; its --mistral-format path writes them).

Tensors: the wrapper's prefixes (`language_model.model.`, `language_model.lm_head.` as transformers saves it;
`model.language_model.`) are stripped, the vision tower and projector dropped. Experts: transformers' stacked
`experts.gate_up_proj` [E, 2I, H] (gate rows first) / `experts.down_proj` [E, H, I] (no `.weight` suffix), or per
expert `experts.{e}.{gate,up,down}_proj.weight`.
"""

from __future__ import annotations

from typing import Any

from moelite.errors import ConversionError

from . import SOFTMAX, Config, Family, split_halves, strip_prefix
from .deepseek_v2 import MLP, TENSORS
from .deepseek_v2 import hparams as deepseek2_hparams
from .deepseek_v2 import sanitize as deepseek2_sanitize

# transformers' Mistral4Config defaults: the value of a key read here that config.json omits
DEFAULTS = {
    "vocab_size": 131072,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "n_shared_experts": 1,
    "n_routed_experts": 128,
    "routed_scaling_factor": 1.0,
    "kv_lora_rank": 256,
    "q_lora_rank": 1024,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 64,
    "n_group": 1,
    "topk_group": 1,
    "num_experts_per_tok": 4,
    "first_k_dense_replace": 0,
    "norm_topk_prob": True,
    "max_position_embeddings": 1048576,
    "rms_norm_eps": 1e-06,
    "rope_interleave": True,
}
# what Mistral4Config sets when rope_parameters is absent (partial_rotary_factor, derived, is not read here)
ROPE_DEFAULT = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 128.0,
    "original_max_position_embeddings": 8192,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale_all_dim": 1.0,
    "mscale": 1.0,
    "llama_4_scaling_beta": 0.1,
}


def hparams(c: Config) -> dict[str, Any]:
    if not c.bool("rope_interleave"):
        raise ConversionError(
            f"{c.src}: rope_interleave = false (rotate-half RoPE on the MLA rope dims) is not "
            f"supported: llama.cpp's mistral4 graph rotates interleaved pairs"
        )
    if c.d.get("rope_parameters") is None and c.d.get("rope_scaling") is None:
        c = Config({**c.d, "rope_parameters": ROPE_DEFAULT}, c.src, c.defaults)
    kv = deepseek2_hparams(c, default_gating=SOFTMAX)
    kv["expert_gating_func"] = SOFTMAX  # Mistral4TopkRouter: softmax whatever a scoring key says
    rp = c.rope()
    beta = rp.get("llama_4_scaling_beta")
    if beta:
        if not isinstance(beta, (int, float)) or isinstance(beta, bool):
            raise ConversionError(
                f"{c.src}: key rope_parameters.llama_4_scaling_beta = {str(beta)[:40]}: expected a number"
            )
        length = rp.get("original_max_position_embeddings")
        if not isinstance(length, int) or isinstance(length, bool) or length < 1:
            raise ConversionError(
                f"{c.src}: key rope_parameters.original_max_position_embeddings = "
                f"{str(length)[:40]}: expected a positive integer (the attention temperature's "
                f"period)"
            )
        kv["attention.temperature_scale"] = float(beta)
        kv["attention.temperature_length"] = length
    return kv


def sanitize(w, c: Config) -> None:
    strip_prefix(
        w,
        (
            ("language_model.model.", "model."),
            ("language_model.lm_head.", "lm_head."),
            ("model.language_model.", "model."),
        ),
        drop=("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."),
    )
    for bid in range(c.n_layer):
        e = MLP.format(bid=bid) + ".experts."
        if e + "gate_up_proj" in w:  # [E, 2I, H]: gate rows then up rows of each expert
            split_halves(w, e + "gate_up_proj", e + "gate_proj.weight", e + "up_proj.weight", axis=-2)
        if e + "down_proj" in w:
            w[e + "down_proj.weight"] = w.pop(e + "down_proj")
    deepseek2_sanitize(w, c)  # kv_b -> k_b / v_b, per-expert tensors stacked


FAMILY = Family(("mistral4",), "mistral4", hparams, TENSORS, sanitize, tokenizer_pre="tekken", defaults=DEFAULTS)
