"""Output types: which ggml type each tensor gets, and encoding a Lazy tensor into those bytes.

Rules (llama.cpp's, re-stated):
- Never quantized, always F32: tensors with fewer than 2 non-trivial dims (norms, biases, sinks,
  exp_probs_b), routers (`ffn_gate_inp.weight`), hyper-connection mixes (`*hc_*_fn.weight`), anything not ending
  in "weight".
- Plain types (f16, bf16, q8_0, q4_0, q4_k, q5_k, q6_k) apply to every other tensor ("pure").
- The mixes follow llama.cpp's (src/llama-quant.cpp); output.weight is Q6_K in all of them; for 8-expert
  models attn_v / attn_kv_b is Q8_0, attn_k Q8_0 and attn_output Q5_K.
  q5_k_m / q4_k_m: base Q5_K / Q4_K; attn_v / attn_kv_b and every ffn_down* (experts, shared, dense) Q6_K
  on "more bits" layers (first 1/8, last 1/8, every third between).
  q3_k_m: base Q3_K; attn_v Q5_K for the first two, then Q4_K; ffn_down Q5_K in the first 1/16 of the
  layers, then Q4_K; attn_output Q4_K.
  q2_k: base Q2_K; attn_v Q4_K (llama.cpp's choice for n_gqa >= 4), ffn_down Q3_K, attn_output Q3_K.
- Type names are case-insensitive (Q4_K_M = q4_k_m).
- Fallback when a row (ne[0]) is not a multiple of the block size: q4_k -> q5_0, q5_k -> q5_1,
  q6_k -> q8_0 (llama.cpp's table), then any 32-block type -> f16 (and f16 always fits). Each fallback
  is reported.
- Packed input: GPT-OSS MXFP4 experts are always copied as MXFP4 (lossless, whatever --type); a GGUF
  input tensor is copied when the planned type is its own type, else dequantized and re-quantized;
  with type "keep" (GGUF input only) every tensor keeps its type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as FT

from moelite.errors import ConversionError

from .lazy import OPAQUE, Lazy

TYPES = {
    "f32": T.F32,
    "f16": T.F16,
    "bf16": T.BF16,
    "q8_0": T.Q8_0,
    "q4_0": T.Q4_0,
    "q4_k": T.Q4_K,
    "q5_k": T.Q5_K,
    "q6_k": T.Q6_K,
    "q5_k_m": T.Q5_K,
    "q4_k_m": T.Q4_K,
    "q3_k_m": T.Q3_K,
    "q2_k": T.Q2_K,
    "keep": None,
}
FILE_TYPES = {
    "f32": FT.ALL_F32,
    "f16": FT.MOSTLY_F16,
    "bf16": FT.MOSTLY_BF16,
    "q8_0": FT.MOSTLY_Q8_0,
    "q4_0": FT.MOSTLY_Q4_0,
    "q4_k": FT.MOSTLY_Q4_K_S,
    "q5_k": FT.MOSTLY_Q5_K_S,
    "q6_k": FT.MOSTLY_Q6_K,
    "q5_k_m": FT.MOSTLY_Q5_K_M,
    "q4_k_m": FT.MOSTLY_Q4_K_M,
    "q3_k_m": FT.MOSTLY_Q3_K_M,
    "q2_k": FT.MOSTLY_Q2_K,
}
MIXES = ("q5_k_m", "q4_k_m", "q3_k_m", "q2_k")
FALLBACK = {
    T.Q2_K: T.Q4_0,
    T.Q3_K: T.Q4_0,
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
    T.Q8_0: T.F16,
    T.Q4_0: T.F16,
    T.Q5_0: T.F16,
    T.Q5_1: T.F16,
    T.Q4_1: T.F16,
    T.MXFP4: T.Q8_0,
}


def canonical_type(name: str) -> str:
    """A user's output type name -> its key in TYPES (case-insensitive); ConversionError listing them if unknown."""
    key = str(name).strip().lower()
    if key not in TYPES:
        raise ConversionError(f"unknown output type {name!r}; expected one of {', '.join(TYPES)} (any case)")
    return key


def _core():
    from moelite import _core

    return _core


def row_size(ggml_type: int, n_per_row: int) -> int:
    block, size = GGML_QUANT_SIZES[T(ggml_type)]
    return n_per_row // block * size


def fits(ggml_type: int, n_per_row: int) -> bool:
    return n_per_row % GGML_QUANT_SIZES[T(ggml_type)][0] == 0


def keeps_f32(name: str, shape: tuple[int, ...]) -> bool:
    return (
        sum(d > 1 for d in shape) < 2
        or not name.endswith("weight")
        or "ffn_gate_inp" in name
        or "_norm" in name
        or name.endswith("exp_probs_b.weight")
        or "ssm_conv1d" in name
        or "shortconv.conv" in name  # ggml_ssm_conv takes F32 kernels
        or "ple_conv1d" in name  # PLE's dilated conv kernel, F32 as the other convs
        or re.search(r"hc_(attn|ffn)_fn\.|output_hc_fn\.", name) is not None  # hyper-connection mixes: F32 in the
        # reference and in llama.cpp's converter (Hy4)
        or "indexer_compressor_" in name  # KPool's pooling gate and slot biases: F32 as llama.cpp keeps them
    )


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass
class Planned:
    name: str
    lazy: Lazy
    type: int  # ggml type id written
    wanted: int  # type the plan asked for before fallback
    n_per_row: int  # ne[0]

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return (*self.lazy.shape[:-1], row_size(self.type, self.n_per_row))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.byte_shape))


def plan(tensors: list[tuple[str, Lazy]], type_name: str, n_layer: int, n_expert: int) -> list[Planned]:
    type_name = canonical_type(type_name)
    base = TYPES[type_name]
    n_attn_v = sum(1 for n, _ in tensors if re.search(r"attn_(v|kv_b|qkv)\.weight$", n))
    i_attn_v = 0
    out = []
    for name, t in tensors:
        n_per_row = t.shape[-1]
        raw = _raw_type(t)
        if base is None:  # keep
            want = raw if raw is not None else T.F32
        elif keeps_f32(name, t.shape):
            want = T.F32
        elif raw is not None and raw == int(T.MXFP4):
            want = T.MXFP4  # GPT-OSS MXFP4 experts are copied losslessly whatever the output type
        else:
            want = base
            if type_name in MIXES:
                want = _mix(type_name, name, n_layer, n_expert, i_attn_v, n_attn_v)
        if re.search(r"attn_(v|kv_b|qkv)\.weight$", name):
            i_attn_v += 1
        got = want
        while not fits(int(got), n_per_row):
            got = FALLBACK.get(T(got), T.F16)
        out.append(Planned(name, t, int(got), int(want), n_per_row))
    return out


def _is_expert(name: str) -> bool:
    return "_exps." in name


def _raw_type(t: Lazy) -> int | None:
    if t.raw_type == OPAQUE:
        raise ConversionError(f"{t.src}: packed uint8 tensor that no family rule turns into a ggml type")
    return t.raw_type


def _mix(mix: str, name: str, n_layer: int, n_expert: int, i_attn_v: int, n_attn_v: int) -> int:
    """The type of one tensor in llama.cpp's mix `mix` (see the module docstring)."""
    m = re.match(r"blk\.(\d+)\.", name)
    bid = int(m.group(1)) if m else 0
    base = TYPES[mix]
    if name == "output.weight":
        return T.Q6_K
    if re.search(r"attn_(v|kv_b|qkv)\.weight$", name):
        if n_expert == 8:
            return T.Q8_0
        if mix == "q3_k_m":
            return T.Q5_K if i_attn_v < 2 else T.Q4_K
        if mix == "q2_k":
            return T.Q4_K
        return T.Q6_K if _more_bits(i_attn_v, n_attn_v) else base
    if name.endswith("attn_k.weight") and n_expert == 8:
        return T.Q8_0
    if name.endswith("attn_output.weight"):
        if n_expert == 8:
            return T.Q5_K
        return {"q3_k_m": T.Q4_K, "q2_k": T.Q3_K}.get(mix, base)
    if "ffn_down" in name:
        if mix == "q3_k_m":
            return T.Q5_K if bid < n_layer // 16 else T.Q4_K
        if mix == "q2_k":
            return T.Q3_K
        return T.Q6_K if _more_bits(bid, n_layer) else base
    return base


def encode(p: Planned, n_threads: int) -> np.ndarray | RowBlocks:
    """Materialise one planned tensor as uint8 [*lead, row_size] in its ggml type. 3-D tensors with a
    per-expert view are converted expert by expert (peak = this output + one expert in float32); a 2-D tensor of row
    blocks (Lazy.row_parts) comes back as RowBlocks, encoded block by block as it is written (peak = one block)."""
    t = p.lazy
    if t.raw_type == p.type:  # already packed in the planned type: copy
        return np.ascontiguousarray(t.load()).view(np.uint8).reshape(p.byte_shape)
    if t.row_parts is not None and t.raw_type is None:  # a table from its shards: encoded as it is written
        return RowBlocks(p, n_threads)
    out = np.empty(p.byte_shape, dtype=np.uint8)
    if t.ndim >= 3 and t.parter is not None:
        for e in range(t.shape[0]):
            out[e] = _encode_rows(_as_f32(t.part(e)), p.type, p.n_per_row, n_threads).reshape(out.shape[1:])
    else:
        out[...] = _encode_rows(_as_f32(t), p.type, p.n_per_row, n_threads).reshape(out.shape)
    return out


class RowBlocks:
    """A planned tensor of row blocks (Lazy.row_parts), e.g. Qwen4-Exp's n-gram table from its shards: what
    GGUFWriter.write_tensor_data takes of an ndarray (nbytes, tofile), each block encoded when its turn to be written
    comes, so that neither the table nor its encoding is ever in memory whole."""

    def __init__(self, p: Planned, n_threads: int) -> None:
        self.p, self.n_threads, self.nbytes = p, n_threads, p.nbytes

    def tofile(self, fp) -> None:
        for part in self.p.lazy.row_parts:
            _encode_rows(_as_f32(part), self.p.type, self.p.n_per_row, self.n_threads).tofile(fp)


def _as_f32(t: Lazy) -> np.ndarray:
    a = t.load()
    if t.raw_type is None:
        return a
    n = int(np.prod(t.shape))
    try:
        f = _core().dequantize(np.ascontiguousarray(a).view(np.uint8).reshape(-1), int(t.raw_type), n)
    except Exception as e:  # noqa: BLE001 - the binding raises its own error types
        raise ConversionError(f"{t.src}: cannot dequantize ggml type {t.raw_type}: {e}") from e
    return np.asarray(f, dtype=np.float32).reshape(t.shape)


def _encode_rows(a: np.ndarray, ggml_type: int, n_per_row: int, n_threads: int) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float32).reshape(-1, n_per_row)
    if ggml_type == T.F32:
        return a.view(np.uint8)
    if ggml_type == T.F16:
        return a.astype(np.float16).view(np.uint8)
    if ggml_type == T.BF16:  # round to nearest even, as ggml_fp32_to_bf16 (NaN kept quiet)
        u = a.view(np.uint32).astype(np.uint64)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        r[np.isnan(a)] = ((u[np.isnan(a)] >> 16) | 64).astype(np.uint16)
        return r.view(np.uint8)
    return np.asarray(_core().quantize(a, int(ggml_type), n_threads))
