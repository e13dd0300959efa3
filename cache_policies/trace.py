"""Routing traces: which experts every token used at every routed MoE layer.

File format (.npz written by `save_trace`, read by `load_trace`; no pickles). Sequences are concatenated
along the token axis and cut by `offsets`:

    ids            int32   [n_tokens_total, n_layers, k]  top-k expert ids, descending router score
    scores         float32 [n_tokens_total, n_layers, k]  router scores of those ids (optional)
    lookahead_ids  int32   [n_tokens_total, n_layers, k]  optional: row [t, l] = top-k of router l+1
                           applied to the hidden state leaving layer l (a prediction of ids[t, l+1]);
                           the last layer's row predicts nothing and is ignored (write -1 there)
    lookahead_far  int32   [n_tokens_total, n_layers, D, k]  optional: the same from further ahead: row
                           [t, l, j] = top-k of router l+2+j applied to the hidden state leaving layer l
                           (a prediction of ids[t, l+2+j]); -1 where l+2+j is past the last layer
    offsets        int64   [n_sequences + 1]  sequence s = tokens offsets[s] .. offsets[s+1]-1
    layers         int32   [n_layers]  block index of each routed layer (dense layers are absent)
    n_expert       int64   scalar      routed experts per layer
    model          str     scalar      model name (free text, e.g. general.name of the GGUF)
    format_version int64   scalar      1

`load_trace` also accepts the per-sequence layout `ids_0, scores_0, lookahead_ids_0, ids_1, ...`
(plus `layers`, `n_expert`, `model`), for traces produced outside moelite. A trace without `offsets`
and without `ids_0` but with a 3-D `ids` is one sequence.

Validation (`Trace.__post_init__`, so every construction path) raises moelite.errors.TraceError for:
integer ids of a non-integer dtype, ids outside [0, n_expert), a repeated id within one row, ragged or
non-3-D rows, an empty trace (no sequence, a sequence of 0 tokens, 0 layers or k = 0), k > n_expert,
scores or lookahead_ids whose shape differs from ids, non-float scores, scores not descending along k,
bad offsets or layers, a repeated id in a lookahead row (rows that predict past the last layer excepted), a
lookahead_far that is not [N, L, D, k] or that comes without lookahead_ids.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.lib.format as npy_format

from moelite.errors import TraceError, UsageError
from moelite.fileio import atomic_open

FORMAT_VERSION = 1
# bounds that keep every analysis's memory proportional to the trace: the simulator and the window counts
# hold per-(layer, expert) state, so a file may not name more experts than any MoE has (the C++ core and
# the 16-bit sort in metrics.py assume <= 65536 per layer) nor more (layer, expert) pairs than MAX_KEYS
MAX_EXPERT = 1 << 16
MAX_KEYS = 1 << 20


@dataclass(eq=False)  # arrays: compare fields explicitly
class Trace:
    """A routing trace of one or more sequences, concatenated along the token axis.

    ids: int32 [N, L, k]; scores: float32 [N, L, k] or None; lookahead_ids: int32 [N, L, k] or None;
    lookahead_far: int32 [N, L, D, k] or None (distances 2 .. D + 1; `lookahead(d)` gives any distance);
    offsets: int64 [S + 1] with offsets[0] = 0, offsets[-1] = N, strictly increasing;
    layers: int32 [L] block indices; n_expert: E; model: name.
    """

    ids: np.ndarray
    n_expert: int
    offsets: np.ndarray | None = None
    scores: np.ndarray | None = None
    lookahead_ids: np.ndarray | None = None
    lookahead_far: np.ndarray | None = None
    layers: np.ndarray | None = None
    model: str = ""
    source: str = field(default="<memory>", compare=False)

    def __post_init__(self) -> None:
        self.ids = _as_ids(self.ids, "ids", self.source)
        n, n_layers, k = self.ids.shape
        self.n_expert = _as_n_expert(self.n_expert, n_layers, k, self.source)
        _check_range(self.ids, self.n_expert, "ids", self.source)
        _check_distinct(self.ids, "ids", self.source)
        self.offsets = _as_offsets(self.offsets, n, self.source)
        self.scores = _as_scores(self.scores, self.ids.shape, self.source)
        if self.lookahead_ids is not None:
            self.lookahead_ids = _as_ids(self.lookahead_ids, "lookahead_ids", self.source)
            _same_shape(self.lookahead_ids, self.ids.shape, "lookahead_ids", self.source)
            if n_layers > 1:  # the last layer's row is ignored
                _check_range(self.lookahead_ids[:, :-1], self.n_expert, "lookahead_ids", self.source)
                _check_distinct(self.lookahead_ids[:, :-1], "lookahead_ids", self.source)
        if self.lookahead_far is not None:
            self.lookahead_far = _as_lookahead_far(self.lookahead_far, self.ids.shape, self.source)
            if self.lookahead_ids is None:
                raise TraceError(f"{self.source}: lookahead_far without lookahead_ids")
            for j in range(self.lookahead_far.shape[2]):
                rows = self.lookahead_far[:, : max(n_layers - 2 - j, 0), j]  # rows whose target layer exists
                if rows.size:
                    _check_range(rows, self.n_expert, f"lookahead_far[:, :, {j}]", self.source)
                    _check_distinct(rows, f"lookahead_far[:, :, {j}]", self.source)
        self.layers = _as_layers(self.layers, n_layers, self.source)
        self.model = _as_model(self.model, self.source)

    # shapes -----------------------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.ids.shape[1])

    @property
    def k(self) -> int:
        return int(self.ids.shape[2])

    @property
    def lookahead_depth(self) -> int:
        """The furthest lookahead distance recorded (0: none)."""
        if self.lookahead_ids is None:
            return 0
        return 1 + (0 if self.lookahead_far is None else int(self.lookahead_far.shape[2]))

    def lookahead(self, d: int) -> np.ndarray:
        """int32 [N, L, k]: row [t, l] = the prediction of ids[t, l + d] made at layer l (d in 1..lookahead_depth;
        rows with l + d past the last layer are meaningless)."""
        if not 1 <= d <= self.lookahead_depth:
            raise UsageError(f"lookahead distance {d} not recorded (the trace has 1..{self.lookahead_depth})")
        return self.lookahead_ids if d == 1 else self.lookahead_far[:, :, d - 2]

    @property
    def n_sequences(self) -> int:
        return len(self.offsets) - 1

    def seq_slice(self, s: int) -> slice:
        """Token range of sequence s."""
        return slice(int(self.offsets[s]), int(self.offsets[s + 1]))

    def sequences(self) -> list[np.ndarray]:
        """Per-sequence views of ids, each [T_s, L, k]."""
        return [self.ids[self.seq_slice(s)] for s in range(self.n_sequences)]

    @classmethod
    def from_sequences(
        cls,
        ids: Sequence,
        n_expert: int,
        *,
        scores: Sequence | None = None,
        lookahead_ids: Sequence | None = None,
        lookahead_far: Sequence | None = None,
        layers=None,
        model: str = "",
        source: str = "<memory>",
    ) -> Trace:
        """Build a trace from per-sequence arrays (or nested lists), each [T_s, L, k]."""
        if len(ids) == 0:
            raise TraceError(f"{source}: empty trace (no sequence)")
        seqs = [_as_ids(a, f"ids[{s}]", source) for s, a in enumerate(ids)]
        for s, a in enumerate(seqs[1:], 1):
            if a.shape[1:] != seqs[0].shape[1:]:
                raise TraceError(
                    f"{source}: ids[{s}] has [n_layers, k] = {list(a.shape[1:])}, "
                    f"ids[0] has {list(seqs[0].shape[1:])} (ragged rows)"
                )
        offsets = np.concatenate([[0], np.cumsum([a.shape[0] for a in seqs])])
        return cls(
            ids=np.concatenate(seqs),
            n_expert=n_expert,
            offsets=offsets,
            scores=_concat_optional(scores, "scores", len(seqs), source),
            lookahead_ids=_concat_optional(lookahead_ids, "lookahead_ids", len(seqs), source),
            lookahead_far=_concat_optional(lookahead_far, "lookahead_far", len(seqs), source, ndim=4),
            layers=layers,
            model=model,
            source=source,
        )


# validation helpers (each raises TraceError naming the source and the array) ----------------------------
def _as_array(a, name: str, source: str) -> np.ndarray:
    try:
        return np.asarray(a)
    except ValueError as exc:  # numpy refuses inhomogeneous nested lists
        raise TraceError(f"{source}: {name} has ragged rows ({exc})") from None


def _as_ids(a, name: str, source: str) -> np.ndarray:
    arr = _as_array(a, name, source)
    if arr.dtype == object:
        raise TraceError(f"{source}: {name} has ragged rows (object array)")
    if arr.size == 0:
        raise TraceError(f"{source}: empty {name} (shape {list(arr.shape)})")
    if arr.ndim != 3:
        raise TraceError(f"{source}: {name} must be 3-D [n_tokens, n_layers, k], got shape {list(arr.shape)}")
    return _as_int32(arr, name, source)


def _as_int32(arr: np.ndarray, name: str, source: str) -> np.ndarray:
    """An integer array as int32, refusing values the cast would wrap (2**32 + 3 must not read as 3): the range is
    checked in the array's own dtype (min / max of int64 or uint64 are exact) before any cast."""
    if arr.dtype.kind not in "iu":
        raise TraceError(f"{source}: {name} must have an integer dtype, got {arr.dtype}")
    if arr.dtype == np.int32:
        return arr
    if arr.size and (int(arr.min()) < -(2**31) or int(arr.max()) >= 2**31):
        bad = int(arr.max()) if int(arr.max()) >= 2**31 else int(arr.min())
        raise TraceError(f"{source}: {name} holds {bad}, outside the int32 range [-2^31, 2^31)")
    return arr.astype(np.int32)


def _as_lookahead_far(a, shape: tuple, source: str) -> np.ndarray:
    """lookahead_far: an integer [N, L, D, k] array (D >= 1) matching ids' [N, L, k], as int32."""
    arr = _as_array(a, "lookahead_far", source)
    if arr.dtype == object or arr.ndim != 4 or arr.shape[2] < 1 or (arr.shape[:2] + arr.shape[3:]) != shape:
        raise TraceError(
            f"{source}: lookahead_far must be [n_tokens, n_layers, D >= 1, k] = "
            f"[{shape[0]}, {shape[1]}, D, {shape[2]}], got shape {list(arr.shape)}"
        )
    return _as_int32(arr, "lookahead_far", source)


def as_trace(trace: object, name: str = "trace") -> Trace:
    """The analyses' first argument: a Trace (UsageError naming what was passed instead)."""
    if not isinstance(trace, Trace):
        raise UsageError(
            f"{name} must be a moelite.cache_policies.Trace (load_trace / Trace(...)), got {type(trace).__name__}"
        )
    return trace


def _as_n_expert(n_expert, n_layers: int, k: int, source: str) -> int:
    if isinstance(n_expert, np.ndarray):
        n_expert = n_expert.item() if n_expert.size == 1 else n_expert
    if isinstance(n_expert, (bool, np.bool_)) or not isinstance(n_expert, (int, np.integer)) or n_expert < 1:
        raise TraceError(f"{source}: n_expert must be a positive integer, got {_brief(n_expert)}")
    if n_expert > MAX_EXPERT or n_expert * n_layers > MAX_KEYS:
        raise TraceError(
            f"{source}: n_expert = {n_expert} with {n_layers} layers: expected at most {MAX_EXPERT} "
            f"experts per layer and {MAX_KEYS} (layer, expert) pairs in all"
        )
    if k > n_expert:
        raise TraceError(f"{source}: k = {k} ids per row but only n_expert = {n_expert}")
    return int(n_expert)


def _check_range(ids: np.ndarray, n_expert: int, name: str, source: str) -> None:
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= n_expert:
        bad = np.argwhere((ids < 0) | (ids >= n_expert))[0].tolist()
        raise TraceError(f"{source}: {name}{bad} = {int(ids[tuple(bad)])} outside [0, n_expert = {n_expert})")


def _check_distinct(ids: np.ndarray, name: str, source: str) -> None:
    srt = np.sort(ids, axis=-1)
    dup = (srt[..., 1:] == srt[..., :-1]).any(axis=-1)  # [N, L]
    if dup.any():
        t, l = np.argwhere(dup)[0].tolist()
        raise TraceError(f"{source}: {name}[{t}, {l}] = {ids[t, l].tolist()} repeats an expert id")


def _as_offsets(offsets, n: int, source: str) -> np.ndarray:
    if offsets is None:
        return np.array([0, n], dtype=np.int64)
    off = _as_array(offsets, "offsets", source)
    if off.ndim != 1 or off.dtype.kind not in "iu" or len(off) < 2:
        raise TraceError(
            f"{source}: offsets must be a 1-D integer array [n_sequences + 1], got {off.dtype} {list(off.shape)}"
        )
    if off.dtype == np.uint64 and off.size and int(off.max()) > n:
        raise TraceError(f"{source}: offsets must rise strictly from 0 to n_tokens = {n}, got {int(off.max())}")
    off = off.astype(np.int64)
    if off[0] != 0 or off[-1] != n or (np.diff(off) <= 0).any():
        raise TraceError(
            f"{source}: offsets must rise strictly from 0 to n_tokens = {n} "
            f"(no empty sequence), got {off.tolist()[:8]}..."
        )
    return off


def _same_shape(arr: np.ndarray, shape: tuple, name: str, source: str) -> None:
    if arr.shape != shape:
        raise TraceError(f"{source}: {name} has shape {list(arr.shape)}, ids has {list(shape)}")


def _as_scores(scores, shape: tuple, source: str) -> np.ndarray | None:
    if scores is None:
        return None
    arr = _as_array(scores, "scores", source)
    if arr.dtype.kind != "f":
        raise TraceError(f"{source}: scores must have a float dtype, got {arr.dtype}")
    _same_shape(arr, shape, "scores", source)
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        t, l, j = np.argwhere(~np.isfinite(arr))[0].tolist()
        raise TraceError(f"{source}: scores[{t}, {l}, {j}] = {arr[t, l, j]}: expected a finite float32")
    rising = arr[..., 1:] > arr[..., :-1]  # [N, L, k-1]
    if rising.any():
        t, l, j = np.argwhere(rising)[0].tolist()
        raise TraceError(
            f"{source}: scores[{t}, {l}] = {arr[t, l].tolist()} is not in descending order "
            "(ids must be listed by descending router score)"
        )
    return arr


def _as_layers(layers, n_layers: int, source: str) -> np.ndarray:
    if layers is None:
        return np.arange(n_layers, dtype=np.int32)
    arr = _as_array(layers, "layers", source)
    if arr.ndim != 1 or arr.dtype.kind not in "iu" or len(arr) != n_layers:
        raise TraceError(
            f"{source}: layers must be {n_layers} integer block indices, got {arr.dtype} {list(arr.shape)}"
        )
    arr = _as_int32(arr, "layers", source)
    if (arr < 0).any() or (np.diff(arr) <= 0).any():
        raise TraceError(f"{source}: layers must be non-negative and increasing, got {_brief(arr)}")
    return arr


def _as_model(model, source: str) -> str:
    if isinstance(model, np.ndarray):
        if model.ndim != 0 or model.dtype.kind not in "U":
            raise TraceError(f"{source}: model must be a string, got {model.dtype} {list(model.shape)}")
        model = model.item()
    if not isinstance(model, str):
        raise TraceError(f"{source}: model must be a string, got {type(model).__name__}")
    return model


def _brief(v) -> str:
    s = repr(v.tolist() if isinstance(v, np.ndarray) else v)
    return s if len(s) <= 80 else s[:77] + "..."


def _concat_optional(parts, name: str, n_seq: int, source: str, ndim: int = 3) -> np.ndarray | None:
    if parts is None:
        return None
    if len(parts) != n_seq:
        raise TraceError(f"{source}: {len(parts)} {name} arrays for {n_seq} sequences")
    arrs = [_as_array(a, f"{name}[{s}]", source) for s, a in enumerate(parts)]
    if any(a.dtype == object or a.ndim != ndim for a in arrs) or len({a.shape[1:] for a in arrs}) != 1:
        raise TraceError(f"{source}: {name} has ragged rows")
    return np.concatenate(arrs)


# files ----------------------------------------------------------------------------------------------------
def save_trace(trace: Trace, path: str | os.PathLike) -> None:
    """Write `trace` to `path` (.npz, layout in the module docstring) atomically: temp file, fsync, rename."""
    arrays = {
        "ids": trace.ids,
        "offsets": trace.offsets,
        "layers": trace.layers,
        "n_expert": np.int64(trace.n_expert),
        "model": np.str_(trace.model),
        "format_version": np.int64(FORMAT_VERSION),
    }
    if trace.scores is not None:
        arrays["scores"] = trace.scores
    if trace.lookahead_ids is not None:
        arrays["lookahead_ids"] = trace.lookahead_ids
    if trace.lookahead_far is not None:
        arrays["lookahead_far"] = trace.lookahead_far
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def load_trace(path: str | os.PathLike) -> Trace:
    """Read a trace written by `save_trace` or in the per-sequence layout `ids_0, scores_0, ...`."""
    source = os.fspath(path)
    data = read_npz(source)
    if "n_expert" not in data:
        raise TraceError(f"{source}: missing key 'n_expert'")
    common = {
        "n_expert": data["n_expert"],
        "layers": data.get("layers"),
        "model": data.get("model", ""),
        "source": source,
    }
    if "ids_0" in data:
        return _load_per_sequence(data, common)
    if "ids" not in data:
        raise TraceError(f"{source}: missing key 'ids' (or 'ids_0', 'ids_1', ...)")
    return Trace(
        ids=data["ids"],
        offsets=data.get("offsets"),
        scores=data.get("scores"),
        lookahead_ids=data.get("lookahead_ids"),
        lookahead_far=data.get("lookahead_far"),
        **common,
    )


def read_npz(source: str) -> dict[str, np.ndarray]:
    """The arrays of a .npz file, each read only after its header's shape is checked against the bytes the
    archive stores for it (a header may not claim more data than there is). TraceError for anything else
    than a zip of plain .npy arrays (a bare .npy, a damaged archive, pickled objects)."""
    try:
        with zipfile.ZipFile(source) as zf:
            return {
                info.filename[:-4]: _read_member(zf, info, source)
                for info in zf.infolist()
                if info.filename.endswith(".npy")
            }
    except TraceError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError) as e:
        raise TraceError(f"{source}: not a readable .npz trace ({type(e).__name__}: {e})") from None


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, source: str) -> np.ndarray:
    name = info.filename[:-4]
    with zf.open(info) as f:
        version = npy_format.read_magic(f)
        header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, fortran, dtype = header(f)
        if dtype.hasobject:
            raise TraceError(f"{source}: array '{name}' holds Python objects ({dtype}); expected numbers")
        count = math.prod(shape)
        if count * dtype.itemsize > info.file_size:
            raise TraceError(
                f"{source}: array '{name}' claims shape {list(shape)} of {dtype} but the archive "
                f"stores {info.file_size} bytes for it"
            )
        data = bytearray(count * dtype.itemsize)
        got = f.readinto(data)
    if got != len(data):
        raise TraceError(f"{source}: array '{name}' is truncated ({got} of {len(data)} bytes)")
    return np.frombuffer(data, dtype=dtype, count=count).reshape(shape, order="F" if fortran else "C")


def _load_per_sequence(data: dict, common: dict) -> Trace:
    n_seq = 0
    while f"ids_{n_seq}" in data:
        n_seq += 1

    def part(name: str):
        """The arrays name_0 .. name_{n_seq-1}; integer ones each checked against int32 under its own key (an int64
        id shifted by k * 2^32 must not wrap, nor reach np.concatenate's type promotion with another part)."""
        if f"{name}_0" not in data:
            return None
        missing = [s for s in range(n_seq) if f"{name}_{s}" not in data]
        if missing:
            raise TraceError(f"{common['source']}: {name}_{missing[0]} missing ({n_seq} sequences)")
        if name == "scores":
            return [data[f"{name}_{s}"] for s in range(n_seq)]
        return [_as_int32(np.asarray(data[f"{name}_{s}"]), f"{name}_{s}", common["source"]) for s in range(n_seq)]

    return Trace.from_sequences(
        part("ids"),
        scores=part("scores"),
        lookahead_ids=part("lookahead_ids"),
        lookahead_far=part("lookahead_far"),
        **common,
    )
