"""Flash attention (ggml_flash_attn_ext, the default) against the plain softmax(QK)V path, for every family: the
same logits within float rounding with an F32 KV cache (sinks, MLA, sliding windows, chunked and NoPE layers,
per-layer head sizes included), and within the F16 cache's rounding with the default cache."""
from __future__ import annotations

import numpy as np
import pytest

import moelite
from fixture_models import RUNTIME_FAMILIES, fixture_gguf

PROMPT = [(5 * i + 11) % 320 for i in range(20)]


@pytest.mark.parametrize("family", RUNTIME_FAMILIES)
def test_flash_and_plain_attention_agree(family):
    _, path = fixture_gguf(family)
    out = {}
    for kv_type in ("f32", "f16"):
        for flash in (True, False):
            with moelite.load(path, kv_type=kv_type, n_threads=1, n_ubatch=7, flash_attn=flash) as m:
                assert m.info()["flash_attn"] is flash
                out[kv_type, flash] = m.logits(PROMPT)
    assert float(np.abs(out["f32", True] - out["f32", False]).max()) <= 1e-4
    assert float(np.abs(out["f16", True] - out["f16", False]).max()) <= 2e-2
