"""Prompt attention on the CPU (issue 21, csrc/attn_cpu.cpp, prompt_attn): ubatches of 64 tokens and more in 64 x 64
tiles whose rows are (token, query head) pairs of one KV head's group, each K/V tile converted once for the group,
instead of ggml's tiled flash attention (a tile per query head). Both sum in F32: with an F32 KV cache they agree to
float rounding for every family (GQA, sinks + sliding windows, MLA, chunked and NoPE layers, per-layer head sizes);
a prompt evaluated in one ubatch (this op) or token by token (attn_decode) agrees too, and offloading keeps it
bit-exact."""

from __future__ import annotations

import numpy as np
import pytest
from fixture_models import RUNTIME_FAMILIES, fixture_gguf
from hf_fixtures import DSA_FAMILIES

import moelite

PROMPT = [(7 * i + 3) % 300 + 3 for i in range(150)]


def _logits(path, **opts):
    with moelite.load(str(path), n_threads=2, n_ubatch=128, **opts) as m:
        return m.logits(PROMPT)


@pytest.mark.parametrize("family", RUNTIME_FAMILIES)
def test_same_sums_as_ggml_tiles(family):
    _, path = fixture_gguf(family)
    ours = _logits(path, kv_type="f32")
    ggml = _logits(path, kv_type="f32", prompt_attn=False)
    assert not np.array_equal(ours, ggml)  # the op ran
    assert float(np.abs(ours - ggml).max()) < 1e-4
    # an F16 cache (the indexer's keys too, as llama.cpp keeps them) moves DSA's scores: past its budget of 16 a
    # near-tie may select another position (3 of 150 rows of glm_moe_dsa); under it the rows agree as for the rest
    rows = slice(0, 16) if family in DSA_FAMILIES else slice(None)
    ours16 = _logits(path, kv_type="f16")
    assert float(np.abs(ours16[rows] - ggml[rows]).max()) < 2e-2


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v2"])
def test_whole_prompt_agrees_with_token_by_token(family):
    _, path = fixture_gguf(family)
    whole = _logits(path, kv_type="f32")[-1]
    with moelite.load(str(path), n_threads=2, kv_type="f32") as m:
        for t in PROMPT:
            last = m.eval([t])
    assert float(np.abs(whole - last).max()) < 1e-4


def test_offloaded_prompt_keeps_its_bits():
    _, path = fixture_gguf("qwen3_moe", type="q8_0")
    full = _logits(path)
    with moelite.load(str(path), n_threads=2, n_ubatch=128) as m:
        minimum = m.plan.minimum_budget
    assert np.array_equal(_logits(path, memory_budget=minimum), full)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_q8_0_cache_in_prompts(family):  # head sizes in whole q8_0 blocks of 32
    """A Q8_0 KV cache in prompt ubatches: the op dequantizes each tile once for its rows (ggml's tiles otherwise).
    Both read the same int8 cache (ggml's op also rounds its queries to Q8_0): each stays as near the F32 cache's
    logits as test_flash_attn asks of a Q8_0 cache, and offloading keeps the op's bits."""
    _, path = fixture_gguf(family, head_dim=32)
    ref = _logits(path, kv_type="f32")
    ours = _logits(path, kv_type="q8_0")
    ggml = _logits(path, kv_type="q8_0", prompt_attn=False)
    assert not np.array_equal(ours, ggml)  # the op ran
    assert float(np.abs(ours - ref).max()) <= 0.05 and float(np.abs(ggml - ref).max()) <= 0.05
    with moelite.load(str(path), n_threads=2, n_ubatch=128, kv_type="q8_0") as m:
        minimum = m.plan.minimum_budget
    assert np.array_equal(_logits(path, kv_type="q8_0", memory_budget=minimum), ours)
