"""DeepSeek-V3 / R1 (model_type `deepseek_v3`) -> GGUF arch `deepseek2` (same layout as V2).

Differences from V2 (see deepseek_v2.py for MLA): sigmoid router scores, a per-expert selection bias
`e_score_correction_bias` -> `exp_probs_b.bias`, grouped top-k (n_group / topk_group), renormalized
top-k weights scaled by routed_scaling_factor (2.5). Real checkpoints are FP8 (e4m3, 128x128 blocks with
`weight_scale_inv`): the source reader dequantizes them. The extra MTP layer (model.layers.{n_layer}) is
dropped as llama.cpp's converter does.
"""
from __future__ import annotations

from functools import partial

from . import SIGMOID, Family
from .deepseek_v2 import TENSORS, hparams, sanitize

FAMILY = Family(("deepseek_v3",), "deepseek2", partial(hparams, default_gating=SIGMOID), TENSORS, sanitize,
                tokenizer_pre="deepseek-v3")
