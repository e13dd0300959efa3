"""Repacked weights on the CPU (issue 21): ggml's CPU_REPACK buffer type holds the dense mul_mat weights and the
expert arenas in interleaved-row layouts (llama.cpp's default, --no-repack to turn it off).

The model is a small Qwen3-MoE whose shapes the repack takes (rows multiples of 256 for the K-quants, row counts
multiples of 8), converted to Q4_K_M (Q4_K repacked; the Q6_K tensors of its mix are not, on x86) and to Q4_0
(every matrix repacked). Repacking changes the kernels, not the math: the same greedy tokens and logits within
float rounding of the plain layout; and one layout in every mode, so experts read from disk into a tiny cache
(synchronously or by I/O threads, or through a RAM tier) give the resident run's logits bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixture_models import fixture_gguf

import moelite
from moelite.apps.cli import main

# hidden and expert FFN 256 (K-quant rows), q 256 / kv 128 rows, 16 experts (not the 8-expert branch of the
# q4_k_m mix), 2 layers: layer 0's ffn_down is Q4_K (repacked), layer 1's Q6_K (plain on x86)
SHAPES = dict(
    hidden_size=256,
    intermediate_size=256,
    moe_intermediate_size=256,
    head_dim=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=16,
    num_experts_per_tok=2,
)
TYPES = ("q4_k_m", "q4_0")
IDS = list(range(5, 69))
OPTS = dict(kv_type="f32", n_threads=2, n_ubatch=64)  # one ubatch size for every run: the same dense GEMM rows
# Repack on vs off: the kernels sum in another order (1e-7 on one matmul), and where that moves an activation
# across a Q8_K/Q8_0 rounding step of the next layer's input the step shows: the largest |logit difference| seen
# here is 1.6e-2 (q4_k_m) and 1.8e-7 (q4_0), against 0.38 / 0.50 between the quantized and the f32 model. The
# bound: a tenth of what quantizing itself changes.
NOISE_SHARE = 0.1


def _path(type: str) -> str:
    return str(fixture_gguf("qwen3_moe", type=type, **SHAPES)[1])


def _run(path: str, **opts):
    with moelite.load(path, **OPTS, **opts) as m:
        return m.logits(IDS), m.generate(IDS[:4], max_tokens=24, stop_ids=[]), m.stats(), m.info()


@pytest.fixture(scope="module")
def runs():
    out = {(t, rp): _run(_path(t), repack=rp) for t in TYPES for rp in (True, False)}
    out[("f32", False)] = _run(_path("f32"), repack=False)
    return out


@pytest.fixture(scope="module", autouse=True)
def _repack_here(runs):
    if not runs[("q4_0", True)][3]["repack"]["available"]:
        pytest.skip("this ggml CPU backend has no CPU_REPACK buffer type")
    if runs[("q4_0", True)][3]["repack"]["dense_tensors"] == 0:
        pytest.skip("this CPU has no repacked Q4_0 kernels (needs AVX2, NEON dotprod/i8mm, SVE or RVV)")


def _minimum(path: str) -> int:
    with moelite.load(path, **OPTS) as m:
        return m.plan.minimum_budget


@pytest.mark.parametrize("type", TYPES)
def test_repacked_matches_the_plain_layout(runs, type):
    lo_rp, greedy_rp, _, info_rp = runs[(type, True)]
    lo, greedy, _, info = runs[(type, False)]
    assert greedy_rp == greedy
    diff = float(np.abs(lo_rp - lo).max())
    quantization = float(np.abs(lo - runs[("f32", False)][0]).max())
    assert diff < NOISE_SHARE * quantization, (diff, quantization)
    assert not np.array_equal(lo_rp, lo) or info_rp["repack"]["dense_tensors"] == 0  # other kernels really ran
    assert info["repack"] == {
        "available": False,
        "dense_tensors": 0,
        "dense_bytes": 0,
        "arena_bytes": 0,
        "tiled_prompts": False,
        "q4_K_packer": False,
    }


@pytest.mark.parametrize("type", TYPES)
def test_info_says_what_was_repacked(runs, type):
    rp, plain = runs[(type, True)][3], runs[(type, False)][3]
    r = rp["repack"]
    # attention q/k/v/o, and output.weight when it is Q4_0 (Q4_K_M makes it Q6_K; the 16-expert mix keeps
    # attn_v Q4_K on layer 0 and Q6_K on layer 1)
    assert r["available"] and r["dense_tensors"] >= 7 and 0 < r["dense_bytes"] < rp["dense_bytes"]
    # no doubled weights: repacked bytes are as many as the file's (dense: up to one alignment per tensor apart)
    assert rp["arena_bytes"] == plain["arena_bytes"]
    assert abs(rp["dense_bytes"] - plain["dense_bytes"]) <= 64 * (r["dense_tensors"] + 1)
    if type == "q4_0":
        assert r["arena_bytes"] == rp["arena_bytes"]  # every expert matrix
    else:
        assert 0 < r["arena_bytes"] < rp["arena_bytes"]  # gate/up and layer 0's down; layer 1's Q6_K down not


@pytest.mark.parametrize("type", TYPES)
@pytest.mark.parametrize("n_io_threads", [0, 2])
def test_tiny_cache_is_bit_exact(runs, type, n_io_threads):
    path = _path(type)
    lo, greedy, _, _ = runs[(type, True)]
    lo_off, greedy_off, st, info = _run(path, repack=True, memory_budget=_minimum(path), n_io_threads=n_io_threads)
    assert info["offloaded"] and info["repack"]["arena_bytes"] > 0
    assert st["total"]["misses"] > 0 and st["total"]["bytes_read"] > 0  # experts really came from disk
    assert np.array_equal(lo_off, lo)
    assert greedy_off == greedy


def test_q4_K_packer_writes_ggml_s_layout(runs, monkeypatch):
    """Q4_K experts read into repacked slots are packed by moelite (csrc/unrepack.cpp), not by ggml's conversion
    (~2.5x slower per matrix, on the I/O threads the compute threads share the cores with). Every expert of the
    resident model passes through it at load, and the offloaded one's again on every miss: the logits equal those
    of ggml's own conversion (MOELITE_GGML_REPACK=1) bit for bit, resident and at the smallest budget."""
    path = _path("q4_k_m")
    lo, greedy, _, info = runs[("q4_k_m", True)]
    if not info["repack"]["q4_K_packer"]:
        pytest.skip("ggml's repacked Q4_K layout in this CPU backend is not the one unrepack.cpp packs")
    monkeypatch.setenv("MOELITE_GGML_REPACK", "1")
    for budget in (None, _minimum(path)):
        lo_g, greedy_g, st, info_g = _run(path, repack=True, memory_budget=budget)
        assert not info_g["repack"]["q4_K_packer"] and info_g["repack"]["arena_bytes"] > 0
        assert budget is None or st["total"]["misses"] > 0
        assert np.array_equal(lo_g, lo)
        assert greedy_g == greedy


@pytest.mark.parametrize("mode", ["never", "always"])
def test_ram_tier_is_bit_exact(runs, mode):
    # the GPU tiering code on host memory: arena and RAM tier both repacked, copies between them stay memcpys,
    # and the CPU's share runs from the RAM tier's repacked slots
    path = _path("q4_0")
    lo, greedy, _, _ = runs[("q4_0", True)]
    lo_t, greedy_t, st, info = _run(path, repack=True, memory_budget=_minimum(path), host_slots=3, cpu_compute=mode)
    assert info["ram_tier_slots"] and st["ram_tier"]["misses"] > 0
    assert (st["ram_tier"]["cpu_experts"] > 0) == (mode == "always")
    assert np.array_equal(lo_t, lo)
    assert greedy_t == greedy


def test_no_repack_from_the_cli(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    out = {}
    for flags in ((), ("--no-repack",)):
        rc = main(
            [
                "run",
                _path("q4_k_m"),
                "-p",
                "It is a truth universally",
                "-n",
                "12",
                "--temp",
                "0",
                "--threads",
                "1",
                "--ignore-eos",
                "--json",
                *flags,
            ]
        )
        o, err = capsys.readouterr()
        assert rc == 0, err
        out[flags] = json.loads(o)
    on, off = out[()], out[("--no-repack",)]
    assert on["token_ids"] == off["token_ids"]
    assert on["stats"]["memory"]["repacked_tensors"] > 0 and on["stats"]["memory"]["repacked_arena_bytes"] > 0
    assert off["stats"]["memory"]["repacked_tensors"] == 0 and not off["stats"]["memory"]["repack_available"]


def test_prompts_unpack_q4_K_for_the_tiled_gemm():
    """x86 (AVX2): a prompt's matmuls over >= 32 tokens unpack repacked Q4_K weights (dense ones and expert slots)
    into plain rows for ggml's tiled GEMM, the kernel the plain layout runs there (csrc/unrepack.cpp). With 4 experts
    and 200 tokens every matmul of the prompt is over >= 32 tokens, so the repacked and the plain model agree bit for
    bit: the unpacking is exact. Decode steps and small windows keep the repacked GEMV / GEMM."""
    path = str(fixture_gguf("qwen3_moe", type="q4_k_m", **dict(SHAPES, num_experts=4))[1])
    ids = [(13 * i + 5) % 250 + 3 for i in range(200)]
    opts = dict(kv_type="f32", n_threads=2, n_ubatch=256)
    with moelite.load(path, **opts) as m:
        if not m.info()["repack"]["tiled_prompts"]:
            pytest.skip("no tiled K-quant GEMM in this ggml CPU backend (x86 with AVX2 only)")
        assert m.info()["repack"]["arena_bytes"] > 0
        packed = m.logits(ids)
    with moelite.load(path, repack=False, **opts) as m:
        plain = m.logits(ids)
    assert np.array_equal(packed, plain)
