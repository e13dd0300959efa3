"""The CPU attention ops (csrc/attn_cpu.cpp) on given arrays through _core.attn_check, against a float64 softmax
reference: decode steps whose KV range is split into parts (attn_decode + attn_combine) and not, the AVX2 kernel's
head groups (1 to 8 heads per KV head: scored eight heads at a time or eight positions at a time; more than 8 run
as several groups; several KV heads per work item) and the portable loops (head sizes that are not multiples of
8), F32 / F16 / Q8_0 caches, masks, sinks, and the ubatch sizes of attn_prompt. ggml's flash attention and plain path
run the same inputs for scale. The output of a decode does not depend on the number of threads."""

from __future__ import annotations

import numpy as np
import pytest

from moelite import _core


def reference(q, k, v, mask, scale, sinks=None):
    T, n_head, _ = q.shape
    rk = n_head // k.shape[1]
    out = np.zeros((T, n_head, v.shape[2]))
    for t in range(T):
        for h in range(n_head):
            s = k[:, h // rk].astype(np.float64) @ q[t, h].astype(np.float64) * scale + mask[t]
            m = max(s.max(), sinks[h]) if sinks is not None else s.max()
            p = np.exp(s - m)
            total = p.sum() + (np.exp(sinks[h] - m) if sinks is not None else 0.0)
            out[t, h] = p @ v[:, h // rk].astype(np.float64) / total
    return out


def inputs(T, n_head, h_kv, dk, dv, n_kv, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((T, n_head, dk), dtype=np.float32)
    k = rng.standard_normal((n_kv, h_kv, dk), dtype=np.float32)
    v = rng.standard_normal((n_kv, h_kv, dv), dtype=np.float32)
    # causal for the T new tokens after n_kv - T cached ones, and a window of 300 positions on the first token
    mask = np.zeros((T, n_kv), np.float32)
    for t in range(T):
        mask[t, n_kv - T + t + 1 :] = -np.inf
    mask[0, : max(0, n_kv - T - 300)] = -np.inf
    return q, k, v, mask


# error bounds per KV type: the cache's own rounding (the reference sees the F32 values)
TOL = {"f32": 1e-5, "f16": 2e-3, "q8_0": 2e-2}


@pytest.mark.parametrize("kv_type", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize(
    "T,n_head,h_kv,dk,dv,n_kv",
    [
        (1, 32, 4, 128, 128, 100),  # Qwen3-30B-A3B's heads, one part
        (1, 32, 4, 128, 128, 4100),  # split into parts, the last one short
        (1, 16, 4, 64, 64, 2000),  # 4 heads per KV head: scored by position, split
        (1, 16, 16, 64, 64, 400),  # multi-head attention: one head per KV head, 16 KV heads per item
        (1, 24, 2, 64, 64, 900),  # 12 heads per KV head: two groups of a KV head in one item
        (1, 16, 1, 96, 64, 1500),  # one KV head (MLA-like): head chunks and parts
        (3, 16, 2, 64, 64, 1100),  # a small ubatch
        (70, 8, 2, 32, 32, 300),  # attn_prompt
    ],
)
def test_cpu_attention_matches_the_reference(kv_type, T, n_head, h_kv, dk, dv, n_kv):
    check_against_reference(kv_type, T, n_head, h_kv, dk, dv, n_kv)


@pytest.mark.parametrize("kv_type", ["f32", "f16"])  # (a Q8_0 cache holds whole blocks of 32 values per head)
@pytest.mark.parametrize("T,n_kv", [(1, 1300), (3, 700)])
def test_head_sizes_not_a_multiple_of_8_run_the_portable_loops(kv_type, T, n_kv):
    check_against_reference(kv_type, T, 12, 3, 36, 36, n_kv)


def check_against_reference(kv_type, T, n_head, h_kv, dk, dv, n_kv):
    q, k, v, mask = inputs(T, n_head, h_kv, dk, dv, n_kv)
    sinks = np.linspace(-1, 2, n_head).astype(np.float32)
    scale = dk**-0.5
    ref = reference(q, k, v, mask, scale, sinks)
    # (a Q8_0 cache with T > 1 runs ggml's flash attention: see attn_cpu_supports)
    out, seconds = _core.attn_check(q, k, v, mask, sinks, scale, kv_type=kv_type, path="cpu", n_threads=2)
    assert out.shape == ref.shape and len(seconds) == 1
    assert np.abs(out - ref).max() < TOL[kv_type]
    flash, _ = _core.attn_check(q, k, v, mask, sinks, scale, kv_type=kv_type, path="flash", n_threads=2)
    assert np.abs(flash - ref).max() < TOL[kv_type]  # the same inputs reach ggml's op


@pytest.mark.parametrize("n_kv", [600, 5000])
@pytest.mark.parametrize("n_head,h_kv,d", [(32, 4, 128), (16, 16, 64), (24, 2, 64), (4, 2, 64), (5, 1, 64)])
def test_split_decode_gives_the_same_bits_on_any_thread_count(n_kv, n_head, h_kv, d):
    # the work items (KV heads per item, query-head chunks) depend on the threads; a head's bits must not. 5 heads on
    # one KV head at 4 threads: chunks of 2 heads, the fourth past the last head (an item with nothing to do)
    q, k, v, mask = inputs(1, n_head, h_kv, d, d, n_kv, seed=1)
    outs = [
        _core.attn_check(q, k, v, mask, None, 0.09, kv_type="f16", path="cpu", n_threads=n)[0] for n in (1, 2, 3, 4, 5)
    ]
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


def test_nan_score_poisons_only_its_heads_and_masked_rows_are_zero():
    q, k, v, mask = inputs(1, 32, 4, 128, 128, 3000, seed=2)
    q[0, 9, 5] = np.nan  # head 9 (KV head 1): its scores are NaN
    mask[0, :] = 0.0
    out, _ = _core.attn_check(q, k, v, mask, None, 0.09, kv_type="f16", path="cpu", n_threads=2)
    assert np.isnan(out[0, 9]).all()
    assert not np.isnan(np.delete(out[0], 9, axis=0)).any()
    mask[0, :] = -np.inf  # every position masked, no sink: 0, as ggml's op gives
    out, _ = _core.attn_check(q, k, v, mask, None, 0.09, kv_type="f16", path="cpu", n_threads=2)
    assert np.array_equal(np.nan_to_num(out[0], nan=1.0)[np.arange(32) != 9], np.zeros((31, 128), np.float32))


def test_plain_path_and_bad_arguments():
    q, k, v, mask = inputs(1, 8, 2, 64, 64, 200)
    ref = reference(q, k, v, mask, 0.125)
    plain, _ = _core.attn_check(q, k, v, mask, None, 0.125, kv_type="f32", path="plain", n_threads=2)
    assert np.abs(plain - ref).max() < 1e-5
    with pytest.raises(ValueError, match="kv_type"):
        _core.attn_check(q, k, v, mask, None, 0.125, kv_type="bf16")
    with pytest.raises(ValueError, match="q8_0"):
        _core.attn_check(q, k, v, mask, None, 0.125, kv_type="q8_0", path="plain")
    with pytest.raises(ValueError, match="n_head % h_kv"):
        _core.attn_check(q[:, :7], k, v, mask)
