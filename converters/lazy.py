"""Lazy tensors: a shape, a loader and an optional per-expert view, so that the converter plans the whole
output (names, shapes, types, offsets) before it reads a byte, and then materialises one tensor at a time.

`part(e)` gives the e-th slice along axis 0 without loading the others; the writer uses it to quantize a
3-D expert tensor expert by expert (peak memory = one output tensor + one expert). Every op below keeps
`part` working when it acts on trailing axes only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from moelite.errors import ConversionError

OPAQUE = -1  # raw_type of packed uint8 source data that a family must turn into a ggml type


@dataclass
class Lazy:
    shape: tuple[int, ...]  # numpy / torch order (outermost first)
    loader: Callable[[], np.ndarray]  # -> float32 array (or uint8 for raw blocks) of `shape`
    src: str  # where it comes from, for error messages
    parter: Callable[[int], Lazy] | None = field(default=None, repr=False)
    raw_type: int | None = None  # ggml type id when the data is already packed (MXFP4, GGUF
    # input): loader gives uint8 [*shape[:-1], row_size]
    f32_exact: bool = True  # False when the source was lower precision than f32
    # a 2-D tensor made of these row blocks, in order (Qwen4-Exp's n-gram table from its shards): encoded block by
    # block, so that neither the source nor the output is held whole (quant.encode)
    row_parts: tuple[Lazy, ...] | None = field(default=None, repr=False)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def load(self) -> np.ndarray:
        a = self.loader()
        if self.raw_type is None and tuple(a.shape) != tuple(self.shape):
            raise ConversionError(
                f"{self.src}: loaded shape {list(a.shape)}, expected {list(self.shape)} (a tensor "
                "of the checkpoint does not have the shape its config implies)"
            )
        return a

    def part(self, e: int) -> Lazy:
        if self.parter is not None:
            return self.parter(e)
        return Lazy(self.shape[1:], lambda: self.load()[e], f"{self.src}[{e}]", raw_type=self.raw_type)

    def map(self, fn: Callable[[np.ndarray], np.ndarray], shape: Sequence[int], what: str = "") -> Lazy:
        """fn acts on the trailing len(shape)-1... axes only, so parts map independently."""
        shape = tuple(shape)
        lead = self.ndim == len(shape) and self.ndim >= 3 and self.shape[0] == shape[0]
        parter = (lambda e: self.part(e).map(fn, shape[1:], what)) if lead else None
        return Lazy(
            shape,
            lambda: np.ascontiguousarray(fn(self.load())),
            f"{self.src}{what}",
            parter,
            self.raw_type,
            self.f32_exact,
        )


def stack(ts: Sequence[Lazy], src: str) -> Lazy:
    """[n, *shape] from n lazy tensors of equal shape (the per-expert -> ffn_*_exps stacking)."""
    ts = list(ts)
    shape0 = ts[0].shape
    for t in ts:
        if t.shape != shape0:
            raise ConversionError(
                f"{t.src}: shape {list(t.shape)} differs from {ts[0].src} {list(shape0)}; cannot stack into {src}"
            )

    def load() -> np.ndarray:
        out = np.empty((len(ts), *shape0), dtype=np.float32)
        for i, t in enumerate(ts):
            out[i] = t.load()
        return out

    return Lazy((len(ts), *shape0), load, src, parter=lambda e: ts[e], f32_exact=all(t.f32_exact for t in ts))


def rows(t: Lazy, sl: slice, axis: int = -2) -> Lazy:
    """A slice along one axis (gate/up halves, interleaved gate=[::2]/up=[1::2])."""
    axis = axis % t.ndim
    n = len(range(*sl.indices(t.shape[axis])))
    shape = t.shape[:axis] + (n,) + t.shape[axis + 1 :]
    idx = (slice(None),) * axis + (sl,)
    if axis == 0:
        return Lazy(
            shape,
            lambda: np.ascontiguousarray(t.load()[idx]),
            f"{t.src}[{sl.start}:{sl.stop}:{sl.step}]",
            None,
            t.raw_type,
            t.f32_exact,
        )
    return t.map(
        lambda a: a[(slice(None),) * (a.ndim - t.ndim + axis) + (sl,)], shape, f"[..{sl.start}:{sl.stop}:{sl.step}]"
    )


def row_blocks(parts: Sequence[Lazy], src: str) -> Lazy:
    """[sum of rows, width] from 2-D blocks of one width, concatenated by rows (shards of one table)."""
    parts = tuple(parts)
    if not parts or any(p.ndim != 2 or p.shape[1] != parts[0].shape[1] for p in parts):
        raise ConversionError(f"{src}: expected 2-D blocks of one row width, got {[list(p.shape) for p in parts]}")
    return Lazy(
        (sum(p.shape[0] for p in parts), parts[0].shape[1]),
        lambda: np.concatenate([p.load() for p in parts], axis=0),
        src,
        f32_exact=all(p.f32_exact for p in parts),
        row_parts=parts,
    )


def concat_rows(a: Lazy, b: Lazy, src: str) -> Lazy:
    """[.., n_a + n_b, in] from [.., n_a, in] and [.., n_b, in]: llama.cpp's fused ffn_gate_up_exps (gate rows of
    each expert first). Packed rows (raw_type) concatenate the same way."""
    shape = a.shape[:-2] + (a.shape[-2] + b.shape[-2], a.shape[-1])
    parter = (lambda e: concat_rows(a.part(e), b.part(e), f"{src}[{e}]")) if a.ndim >= 3 else None
    return Lazy(
        shape,
        lambda: np.concatenate([a.load(), b.load()], axis=-2),
        src,
        parter,
        a.raw_type,
        a.f32_exact and b.f32_exact,
    )


def transpose_last(t: Lazy) -> Lazy:
    """Swap the two innermost axes ([E, in, out] -> [E, out, in])."""
    shape = t.shape[:-2] + (t.shape[-1], t.shape[-2])
    return t.map(lambda a: np.swapaxes(a, -1, -2), shape, ".T")


def permute_qk(t: Lazy, n_head: int) -> Lazy:
    """llama.cpp's Q/K row permutation for the `llama` arch: per head, interleaved rotary pairs
    (HF "rotate_half" order) -> GGUF order. Rows: [n_head * head_dim, ...]."""
    n_rows = t.shape[0]

    def fn(a: np.ndarray) -> np.ndarray:
        return a.reshape(n_head, 2, n_rows // n_head // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

    return Lazy(
        t.shape, lambda: np.ascontiguousarray(fn(t.load())), f"{t.src}.permute_qk", None, t.raw_type, t.f32_exact
    )


def const(a: np.ndarray, src: str) -> Lazy:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return Lazy(tuple(a.shape), lambda: a, src)


MXFP4 = 39  # ggml type id (gguf.GGMLQuantizationType.MXFP4)


def mxfp4_from_hf(blocks: Lazy, scales: Lazy) -> Lazy:
    """HF MXFP4 -> ggml block_mxfp4 bytes, lossless. Shape in elements: [E, out, in].

    HF: blocks uint8 [E, out, in/32, 16], byte j of a 32-group holds element 2j (low nibble) and 2j+1
        (high nibble); scales uint8 [E, out, in/32], E8M0 exponent (value = code * 2^(s-127)).
    ggml: per group 17 bytes {e, qs[16]}, qs[j] = element j (low nibble) | element j+16 (high nibble);
        value = kvalues_mxfp4[code] * 2^(e-127) / 2 with kvalues = 2 x the FP4 E2M1 values, so the 4-bit
        codes and the exponent byte carry over unchanged."""
    E, out, n_groups, _ = blocks.shape

    def repack(b: np.ndarray, s: np.ndarray) -> np.ndarray:  # b [..., G, 16], s [..., G]
        lo, hi = b & 0x0F, b >> 4
        codes = np.stack((lo, hi), axis=-1).reshape(*b.shape[:-1], 32)  # element order
        qs = codes[..., :16] | (codes[..., 16:] << 4)
        return np.concatenate((s[..., None], qs), axis=-1).reshape(*b.shape[:-2], n_groups * 17)

    def load() -> np.ndarray:
        return repack(blocks.load(), scales.load())

    def parter(e: int) -> Lazy:
        be, se = blocks.part(e), scales.part(e)
        return Lazy(
            (out, n_groups * 32),
            lambda: repack(be.load(), se.load()),
            f"{blocks.src}[{e}](mxfp4)",
            raw_type=MXFP4,
            f32_exact=False,
        )

    return Lazy((E, out, n_groups * 32), load, f"{blocks.src}(mxfp4)", parter, raw_type=MXFP4, f32_exact=False)
