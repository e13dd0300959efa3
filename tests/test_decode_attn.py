"""Decode-step attention on the CPU (issue 21, csrc/attn_cpu.cpp, decode_attn): one pass over the KV cache per KV
head for all the query heads that share it, in F32, instead of ggml's flash attention (one query head at a time,
F16 sums). With an F32 KV cache both compute the same sums in another order (float rounding apart); with the
default F16 cache the new op is closer to the F32-cache result than ggml's, whose V sums round to F16. Families:
grouped-query attention, sinks + sliding windows (gpt-oss), MLA with one latent KV head (deepseek2)."""

from __future__ import annotations

import numpy as np
import pytest
from fixture_models import fixture_gguf

import moelite

PROMPT = list(range(3, 150))
STEPS = list(range(30, 42))


def _decode(path, **opts):
    with moelite.load(str(path), n_threads=2, **opts) as m:
        m.eval(PROMPT)
        return np.stack([m.eval([t]) for t in STEPS])


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v2", "mixtral"])
def test_same_sums_as_ggml_with_an_f32_cache(family):
    _, path = fixture_gguf(family)
    ours = _decode(path, kv_type="f32")
    ggml = _decode(path, kv_type="f32", decode_attn=False)
    assert float(np.abs(ours - ggml).max()) < 1e-5


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_closer_to_f32_than_ggml_with_an_f16_cache(family):
    _, path = fixture_gguf(family)
    ref = _decode(path, kv_type="f32", decode_attn=False)
    ours = _decode(path, kv_type="f16")
    ggml = _decode(path, kv_type="f16", decode_attn=False)
    err_ours, err_ggml = float(np.abs(ours - ref).max()), float(np.abs(ggml - ref).max())
    assert not np.array_equal(ours, ggml)  # the op really ran
    assert err_ours < err_ggml and err_ours < 1e-3, (err_ours, err_ggml)


def test_offloaded_decode_keeps_its_bits():
    _, path = fixture_gguf("qwen3_moe", type="q8_0")
    full = _decode(path, n_ubatch=64)  # one ubatch size for both: the same prompt GEMMs
    with moelite.load(str(path), n_threads=2, n_ubatch=64) as m:
        minimum = m.plan.minimum_budget
    assert np.array_equal(_decode(path, n_ubatch=64, memory_budget=minimum), full)
