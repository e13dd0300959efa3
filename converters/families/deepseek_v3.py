"""DeepSeek-V3 / R1 (model_type `deepseek_v3`) and GLM-4.7-Flash (`glm4_moe_lite`) -> GGUF arch `deepseek2`
(same layout as V2).

Differences from V2 (see deepseek_v2.py for MLA): sigmoid router scores, a per-expert selection bias
`e_score_correction_bias` -> `exp_probs_b.bias`, grouped top-k (n_group / topk_group), renormalized
top-k weights scaled by routed_scaling_factor (2.5). Real checkpoints are FP8 (e4m3, 128x128 blocks with
`weight_scale_inv`): the source reader dequantizes them. The extra MTP layer (model.layers.{n_layer}) is
dropped as llama.cpp's converter does.
"""
from __future__ import annotations

from typing import Any

from moelite.errors import ConversionError

from . import SIGMOID, Config, Family, drop_layers_beyond
from .deepseek_v2 import TENSORS, hparams, sanitize


def v3_hparams(c: Config) -> dict[str, Any]:
    if not c.bool("rope_interleave", default=True):
        raise ConversionError(f"{c.src}: rope_interleave = false (rotate-half RoPE on the MLA rope dims) is not "
                              f"supported: llama.cpp's deepseek2 graph rotates interleaved pairs")
    return hparams(c, default_gating=SIGMOID)


def v3_sanitize(w, c: Config) -> None:
    drop_layers_beyond(w, c)                      # the MTP layer model.layers.{n_layer}
    sanitize(w, c)


FAMILY = Family(("deepseek_v3",), "deepseek2", v3_hparams, TENSORS, v3_sanitize, tokenizer_pre="deepseek-v3")
# GLM-4.7-Flash: DeepSeek-V3's architecture (MLA, sigmoid + bias routing) with GLM's tokenizer
GLM4_MOE_LITE = Family(("glm4_moe_lite",), "deepseek2", v3_hparams, TENSORS, v3_sanitize, tokenizer_pre="glm4")
FAMILIES = (FAMILY, GLM4_MOE_LITE)
