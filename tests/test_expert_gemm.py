"""Per-expert GEMMs for prompt ubatches (issue 21, csrc/ffn_moe.cpp expert_gemm): on the CPU, a ubatch that gives
its experts >= 4 tokens each on average runs every expert's tokens as one 2-D matmul per matrix (ggml's repacked
GEMM on repacked arenas, 4 tokens per pass over the weights; tinyBLAS on plain Q8_0/F16/F32 ones) instead of
mul_mat_id's GEMV per token. Which way runs depends on the ubatch size and the pool's layout only, never on the
cache: offloading changes no bit. Against mul_mat_id it changes only the kernels' summation order: the same greedy
tokens, logits within the noise test_repack.py allows between two kernels."""

from __future__ import annotations

import numpy as np
import pytest
from fixture_models import fixture_gguf

import moelite

# K-quant rows (256), 160 experts top-8: a 128-token ubatch gives them 6.4 tokens each, and more distinct experts
# than one graph takes (kMaxNodes / kGemmExpertNodes = 126), so a layer's GEMMs are split over graphs
SHAPES = dict(
    hidden_size=256,
    intermediate_size=256,
    moe_intermediate_size=256,
    head_dim=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=160,
    num_experts_per_tok=8,
    num_hidden_layers=2,
)
IDS = [(37 * i + 11) % 250 + 3 for i in range(200)]
OPTS = dict(kv_type="f32", n_threads=2, n_ubatch=128)
NOISE_SHARE = 0.1  # as tests/test_repack.py: a tenth of what quantizing changes


def _path(type: str) -> str:
    return str(fixture_gguf("qwen3_moe", type=type, **SHAPES)[1])


def _run(path: str, **opts):
    with moelite.load(path, **OPTS, **opts) as m:
        lo = m.logits(IDS)
        st = m.stats()
        return lo, m.generate(IDS[:60], max_tokens=8, stop_ids=[]), st, m.info()


@pytest.fixture(scope="module")
def runs():
    out = {gemm: _run(_path("q4_k_m"), expert_gemm=gemm) for gemm in (True, False)}
    out["f32"] = _run(_path("f32"))
    return out


@pytest.fixture(scope="module", autouse=True)
def _repacked_here(runs):
    if not runs[True][3]["repack"]["arena_bytes"]:
        pytest.skip("this CPU has no repacked Q4_K kernels (needs AVX2 or NEON)")


def test_gemm_runs_on_prompts_only_and_matches_mul_mat_id(runs):
    lo, greedy, st, _ = runs[True]
    lo_id, greedy_id, st_id, _ = runs[False]
    # 2 layers x ubatches of 128 and 72 tokens: the first gives its experts 6.4 tokens each (GEMMs), the second 3.6
    # (mul_mat_id, as do the one-token decode steps)
    assert st["total"]["gemm_experts"] > 0 and st_id["total"]["gemm_experts"] == 0
    assert all(s["gemm_experts"] <= 160 for s in st["per_layer"] if s)  # one ubatch ran them, once per expert
    assert greedy == greedy_id
    diff = float(np.abs(lo - lo_id).max())
    quantization = float(np.abs(lo_id - runs["f32"][0]).max())
    assert 0 < diff < NOISE_SHARE * quantization, (diff, quantization)  # 0: the other kernel did not run


def test_plain_arenas_run_gemms_too(runs):
    """F32 arenas are not repacked: their GEMMs are ggml's 2-D mul_mat (tinyBLAS), F32 sums in another order."""
    lo, greedy, st, _ = runs["f32"]
    lo_id, greedy_id, st_id, _ = _run(_path("f32"), expert_gemm=False)
    assert st["total"]["gemm_experts"] > 0 and st_id["total"]["gemm_experts"] == 0
    assert greedy == greedy_id
    assert 0 < float(np.abs(lo - lo_id).max()) < 1e-4


@pytest.mark.parametrize("n_io_threads", [0, 2])
def test_offloaded_gemm_is_bit_exact(runs, n_io_threads):
    """A tiny cache: each layer's experts in groups of a few slots, every group through its own GEMMs."""
    path = _path("q4_k_m")
    lo, greedy, st, _ = runs[True]
    with moelite.load(path, **OPTS) as m:
        minimum = m.plan.minimum_budget
    lo_off, greedy_off, st_off, info = _run(path, memory_budget=minimum, n_io_threads=n_io_threads)
    assert info["offloaded"] and st_off["total"]["misses"] > 0
    assert st_off["total"]["gemm_experts"] == st["total"]["gemm_experts"]
    assert np.array_equal(lo_off, lo)
    assert greedy_off == greedy


def test_fused_step_keeps_its_bits(runs):
    """The one-graph step runs the ubatches that use no GEMM; with it off, every ubatch runs per layer."""
    lo, greedy, st, _ = runs[True]
    lo_l, greedy_l, st_l, _ = _run(_path("q4_k_m"), fused_graph=False)
    assert np.array_equal(lo_l, lo) and greedy_l == greedy
    assert st_l["total"]["gemm_experts"] == st["total"]["gemm_experts"]
