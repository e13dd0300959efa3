"""Batch invariance: the logits of one token sequence at different n_ubatch (docs/ARCHITECTURE.md, "Batch
invariance"). Which kernel runs depends on a ubatch's row count (one-row GEMV vs tinyBLAS / repacked GEMM / tiled
flash attention), and those kernels sum in different orders. At F32 weights and an F32 KV cache that leaves
float rounding only; at quantized weights or an F16 cache, an activation that lands on a rounding boundary of
the Q8 / F16 conversion flips one quantization step, and that step (not a bug) is what reaches the logits.
These tests pin the invariants that do hold; a wrong row, position, mask or stale buffer breaks the F32 one."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from fixture_models import fixture_gguf

import moelite

SHAPES = dict(
    hidden_size=256,  # K-quant rows (256)
    intermediate_size=256,
    moe_intermediate_size=256,
    head_dim=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=16,
    num_experts_per_tok=4,
    num_hidden_layers=2,
)
IDS = [(37 * i + 11) % 250 + 3 for i in range(80)]  # 80 tokens: 80 ubatches of 1, 5 of 16, one of 512 (>= 64 rows)
UBATCHES = (1, 16, 512)
# F32 weights + F32 KV: every difference is a summation reordering, |error| <~ n_terms * eps * |terms| with
# dot products of <= 256 terms (eps 6e-8) per layer; measured 6e-7 here and 6e-6 on the demo model dequantized to
# F32 (logits up to ~9). 1e-4 is a margin over both that a real bug (a wrong row or mask: O(1)) cannot hide in.
F32_BOUND = 1e-4


def _path(type: str) -> str | None:
    """The fixture at weight type `type`; "demo" -> None, the embedded demo model (Q8_0)."""
    return None if type == "demo" else str(fixture_gguf("qwen3_moe", type=type, **SHAPES)[1])


def _logits(type: str, n_ubatch: int, **opts) -> np.ndarray:
    path = _path(type)
    with moelite.load(path, n_ubatch=n_ubatch, n_threads=2, **opts) as m:
        return m.logits(IDS)


@pytest.mark.parametrize("flash_attn", [True, False], ids=["fa", "no_fa"])
def test_f32_weights_f32_kv_agree_across_ubatch_sizes(flash_attn):
    runs = {ub: _logits("f32", ub, kv_type="f32", flash_attn=flash_attn) for ub in UBATCHES}
    for ub in UBATCHES[1:]:
        diff = float(np.abs(runs[ub] - runs[1]).max())
        assert diff <= F32_BOUND, f"n_ubatch={ub} vs 1: max |logit difference| {diff:.3g} > {F32_BOUND}"
    assert not np.array_equal(runs[1][0], runs[1][1])  # the rows are distinct distributions, not one broadcast row


@pytest.mark.parametrize("type", ["q8_0", "demo"])
@pytest.mark.parametrize("kv_type", ["f32", "f16"])
def test_q8_0_multi_row_ubatches_bit_identical(kv_type, type):
    """Q8_0 weights, plain attention: every ubatch of >= 2 rows runs the same kernels (Q8_0 GEMM and
    expert GEMM sum each (row, weight row) pair in one order; the F32/F16 attention matmuls go through tinyBLAS
    alike), so 16 and 512 give the same bits. Against n_ubatch=1 (GEMV attention) this does not hold in general:
    a rounding-order difference can flip one Q8 step (docs/ARCHITECTURE.md, "Batch invariance")."""
    a = _logits(type, 16, kv_type=kv_type, flash_attn=False)
    b = _logits(type, 512, kv_type=kv_type, flash_attn=False)
    np.testing.assert_array_equal(a, b)


# one process per run: ggml reads GGML_CPU_TILED_MM once per process
_CHILD = """
import sys, numpy as np, moelite
path, n_ubatch, out, tiled = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
opts = dict(kv_type="f32", flash_attn=False, n_threads=2, n_ubatch=n_ubatch)
if not tiled:
    opts.update(repack=False, expert_gemm=False)
with moelite.load(path, **opts) as m:
    np.save(out, m.logits([int(t) for t in sys.argv[5].split(",")]))
"""


def _kquant_logits(tmp_path, n_ubatch: int, tiled: bool) -> np.ndarray:
    out = tmp_path / f"{n_ubatch}-{int(tiled)}.npy"
    env = dict(os.environ, GGML_CPU_TILED_MM="1" if tiled else "0")
    args = [_path("q4_k_m"), str(n_ubatch), str(out), str(int(tiled)), ",".join(map(str, IDS))]
    subprocess.run([sys.executable, "-c", _CHILD, *args], env=env, check=True, timeout=300)
    return np.load(out)


def test_q4_k_m_multi_row_kernels_are_the_difference(tmp_path):
    """Cause 3 of the write-up: K-quant weights differ between ubatches of 16 and 512 rows because ggml's tiled
    K-quant GEMM (from 8 rows) and the repacked / expert GEMMs sum differently from the one-row vec_dot. With
    the three off, every K-quant matmul is vec_dot whatever the row count: 16 and 512 give the same bits."""
    default = [_kquant_logits(tmp_path, ub, tiled=True) for ub in (16, 512)]
    vec_dot = [_kquant_logits(tmp_path, ub, tiled=False) for ub in (16, 512)]
    np.testing.assert_array_equal(vec_dot[0], vec_dot[1])
    assert np.abs(default[0] - default[1]).max() > 0  # the kernels do differ on this fixture (0.012 measured)
