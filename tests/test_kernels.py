"""ggml_mul_mat_id over the expert slot arena equals a numpy float reference (NMSE <= 5e-4) for every
expert weight type, with slot ids permuted and slots padded to 4096 bytes."""

from __future__ import annotations

import numpy as np
import pytest

from moelite import _core

TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14, "MXFP4": 39}
PAGE = 4096


def quantize_experts(w: np.ndarray, type_id: int) -> tuple[np.ndarray, np.ndarray]:
    """w: [n_expert, ne1, ne0] f32 -> (arena uint8 [n_expert, slot_bytes], dequantized w)."""
    n_expert, ne1, ne0 = w.shape
    rows = _core.quantize(w.reshape(-1, ne0), type_id, 2)  # [n_expert * ne1, row_size]
    expert_bytes = rows.shape[1] * ne1
    slot_bytes = (expert_bytes + PAGE - 1) // PAGE * PAGE
    arena = np.zeros((n_expert, slot_bytes), dtype=np.uint8)
    arena[:, :expert_bytes] = rows.reshape(n_expert, expert_bytes)
    deq = _core.dequantize(rows.reshape(-1), type_id, w.size).reshape(w.shape)
    return arena, deq


@pytest.mark.parametrize("name", list(TYPES))
def test_mul_mat_id_over_arena_matches_numpy(name):
    t = TYPES[name]
    rng = np.random.default_rng(t)
    n_expert, ne0, ne1, T, K = 6, 256, 96, 7, 3
    w = rng.standard_normal((n_expert, ne1, ne0)).astype(np.float32)
    arena, deq = quantize_experts(w, t)
    assert arena.shape[1] % PAGE == 0
    # slot s holds expert perm[s]: the kernel must follow slot ids, not expert ids
    perm = rng.permutation(n_expert)
    arena = arena[perm].copy()
    x = rng.standard_normal((T, ne0)).astype(np.float32)
    experts = np.stack([rng.choice(n_expert, K, replace=False) for _ in range(T)])  # [T, K]
    inv = np.argsort(perm)  # expert -> slot
    slots = inv[experts].astype(np.int32)
    y = _core.arena_mul_mat_id(arena, t, ne0, ne1, x, slots, 2)  # [T, K, ne1]
    # numpy float reference on the weights as stored (dequantized): what is left is the kernel's own
    # rounding (activations quantized to Q8 for the quantized types)
    ref = np.einsum("tkij,tj->tki", deq[experts].astype(np.float64), x.astype(np.float64))
    nmse = float(((y - ref) ** 2).sum() / (ref**2).sum())
    assert nmse <= 5e-4, f"{name}: NMSE {nmse}"
    # and the type itself keeps the product close to the unquantized one (4-bit types lose most)
    ref_f = np.einsum("tkij,tj->tki", w[experts].astype(np.float64), x.astype(np.float64))
    assert float(((y - ref_f) ** 2).sum() / (ref_f**2).sum()) <= 2e-2
