"""Flash attention (ggml_flash_attn_ext, the default) against the plain softmax(QK)V path, for every family: the
same logits within float rounding with an F32 KV cache (sinks, MLA, sliding windows, chunked and NoPE layers,
per-layer head sizes included), and within the F16 cache's rounding with the default cache."""

from __future__ import annotations

import numpy as np
import pytest
from fixture_models import RUNTIME_FAMILIES, fixture_gguf

import moelite

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


@pytest.mark.parametrize(
    "family,overrides", [("qwen3_moe", {"head_dim": 32}), ("gpt_oss", {"head_dim": 32}), ("qwen3_5_moe_text", {})]
)
def test_q8_0_kv_cache_is_close_and_offloads_exactly(family, overrides):
    """A q8_0 KV cache (flash attention only; head sizes in whole blocks of 32) stays near the f32 one, and
    offloading keeps it bit-exact."""
    _, path = fixture_gguf(family, **overrides)
    with moelite.load(path, kv_type="f32", n_threads=1, n_ubatch=7) as m:
        ref = m.logits(PROMPT)
    with moelite.load(path, kv_type="q8_0", n_threads=1, n_ubatch=7) as m:
        q8 = m.logits(PROMPT)
        minimum = m.plan.minimum_budget
    assert float(np.abs(q8 - ref).max()) <= 0.05
    with moelite.load(path, kv_type="q8_0", n_threads=1, n_ubatch=7, memory_budget=minimum) as m:
        assert m.info()["offloaded"] and np.array_equal(m.logits(PROMPT), q8)


def test_q8_0_kv_cache_needs_flash_attention_and_whole_blocks():
    _, path = fixture_gguf("qwen3_moe")  # head_dim 16
    with pytest.raises(moelite.errors.UsageError, match="flash"):
        moelite.load(path, kv_type="q8_0", flash_attn=False)
    with pytest.raises(moelite.errors.UsageError, match="multiples of 32"):
        moelite.load(path, kv_type="q8_0")


def test_long_prompt_scratch_stays_within_the_plan():
    """With flash attention the attention scores are never materialized: a 3000-token prompt in a 4096 context
    keeps its graph scratch (logits of every position included, produced a block of rows at a time) within the
    planner's bound; the graph's part of it no longer grows with n_ctx, only the host's attention masks of a ubatch
    ([n_ctx, n_ubatch] in F16) do."""
    ids = [(7 * i + 3) % 8000 + 10 for i in range(3000)]
    with moelite.load(None, n_threads=2, n_ctx=4096) as m:
        out = m.logits(ids)
        assert out.shape == (3000, m.n_vocab) and np.isfinite(out).all()
        assert m.info()["scratch_bytes_in_use"] <= m.plan.scratch_bytes
        short = m.plan.scratch_bytes
    with moelite.load(None, n_threads=2, n_ctx=32768) as m:
        masks = (32768 - 4096) * m.plan.n_ubatch * 2  # one mask kind (causal), F16
        assert m.plan.scratch_bytes == short + masks
