"""Local routing consistency: SRP and SCH, defined here (the project's reference definition).

Notation: a trace has sequences of T tokens, L routed layers, k ids per row, E experts per layer. A window
is m consecutive tokens fully inside one sequence (starts p = 0..T-m, stride 1); windows never cross a
sequence boundary. f(window, expert) = number of tokens of the window whose top-k holds the expert.

- `srp(trace, m, level)`: pools all (window, expert) pairs of a group (one layer, or all layers for
  "model"), finds the best shared threshold alpha in 0..m (ties: the smallest alpha, compared exactly
  in integers), returns SRP, alpha and rho_hat = pairs selected / (k * windows * layers of the group).
  A group without any window (all sequences shorter than m) gives nan. `srp_many(trace, ms, level)`
  does several m in one pass. Both rest on `f_histograms` (the histogram of f per layer), computed by
  a sparse event sweep in O(N*L*k) per m, independent of E and m.
- `sch(trace, m, rho, level)`: the segment-cache oracle simulated token by token per sequence (rules 1-5
  in sch_hits' docstring), capacity C = round(rho * k) per layer or round(rho * L * k) for the model
  level; per-sequence hit rates averaged over sequences. Sequential: pure Python with a lazy heap,
  about 3 us per id.
- `static_sch(trace, m, rho, level)`: the paper's first ("legacy") SCH: for every window, cache the C
  experts with the highest f in that window; hit rate = sum over windows of those f / (windows * m * k *
  layers of the group), pooled over all windows of all sequences.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from moelite.errors import UsageError

from ..runtime.args import finite_float, int_in, ints_in
from .trace import Trace, as_trace

_BLOCK_CELLS = 1 << 22  # window counts are built in blocks of about this many int32 cells (16 MiB)
_PAIR_BINS = 1 << 22  # _sweep's (f, length) histogram up to this many int64 bins (32 MiB, m <= 2047), then weights


class SRPResult(NamedTuple):
    """SRP of one group (floats) or of every layer (arrays [L])."""

    value: float | np.ndarray
    alpha: int | np.ndarray
    rho_hat: float | np.ndarray


# windows -----------------------------------------------------------------------------------------------
def _check_m(trace: Trace, m: int, name: str = "m") -> int:
    """A segment length: an int in [1, n_tokens]. A window longer than the whole trace holds nothing; the bound comes
    before any array of m + 1 bins is made (a window longer than every sequence but not than the trace gives nan)."""
    return int_in(
        name, m, 1, trace.n_tokens, why=f"a segment length no longer than the trace's {trace.n_tokens} tokens"
    )


def _check_ms(trace: Trace, ms: Sequence[int]) -> list[int]:
    why = f"segment lengths no longer than the trace's {trace.n_tokens} tokens"
    return ints_in("ms", ms, 1, trace.n_tokens, why=why)


def _valid_starts(trace: Trace, m: int) -> np.ndarray:
    """bool [N]: True where a window of m tokens starting at this token stays inside its sequence."""
    lengths = np.diff(trace.offsets)
    seq_end = np.repeat(trace.offsets[1:], lengths)  # [N] end (exclusive) of each token's sequence
    return np.arange(trace.n_tokens) + m <= seq_end


def window_counts(trace: Trace, m: int) -> Iterator[np.ndarray]:
    """Yield f for every valid window, in blocks of window starts: int32 [n_windows_in_block, L, E].

    One-hot rows -> cumulative sum over tokens -> f = c[p + m] - c[p]; all windows of all sequences
    come out exactly once, in token order.
    """
    trace = as_trace(trace)
    m = _check_m(trace, m)
    n, n_layers, k = trace.ids.shape
    n_expert = trace.n_expert
    valid = _valid_starts(trace, m)
    block = max(1, _BLOCK_CELLS // (n_layers * n_expert))  # cells per block: about (block + m) * L * E
    for s in range(0, n - m + 1, block):
        rows = min(n, s + block + m - 1) - s  # tokens needed by the window starts s .. s+block-1
        n_win = rows - m + 1
        onehot = np.zeros((rows, n_layers * n_expert), dtype=np.uint8)  # [rows, L*E]
        col = trace.ids[s : s + rows] + (np.arange(n_layers, dtype=np.int32) * n_expert)[None, :, None]
        np.put_along_axis(onehot, col.reshape(rows, n_layers * k), 1, axis=1)
        csum = np.zeros((rows + 1, n_layers * n_expert), dtype=np.int32)
        np.cumsum(onehot, axis=0, dtype=np.int32, out=csum[1:])
        f = csum[m : m + n_win] - csum[:n_win]  # [n_win, L*E]
        ok = valid[s : s + n_win]
        if not ok.all():
            f = f[ok]
        if len(f):
            yield f.reshape(-1, n_layers, n_expert)


# SRP ---------------------------------------------------------------------------------------------------
def f_histogram(trace: Trace, m: int) -> np.ndarray:
    """int64 [L, m+1]: hist[l, f] = number of (window, expert) pairs of layer l with f uses."""
    return f_histograms(trace, [m])[0]


def f_histograms(trace: Trace, ms: Sequence[int]) -> list[np.ndarray]:
    """`f_histogram` for several m, sharing the per-layer sort of occurrences by expert.

    Sparse sweep, cost O(N*L*k) whatever m and E: an occurrence of expert e at token o adds 1 to f of the
    window starts [o-m+1, o] (clipped to its sequence's valid starts). Per layer, the +1/-1 events of all
    experts are sorted by (expert, position); between consecutive events f is constant, so hist[f] +=
    segment length. Pairs with f = 0 are the rest (their bin collects junk across expert boundaries).
    """
    trace = as_trace(trace)
    ms = _check_ms(trace, ms)
    n, n_layers, _ = trace.ids.shape
    lengths = np.diff(trace.offsets)
    hists = [np.zeros((n_layers, m + 1), dtype=np.int64) for m in ms]
    dtype = np.int32 if 2 * (trace.n_expert + 1) * (n + 1) < 2**31 else np.int64
    seq_start = np.repeat(trace.offsets[:-1], lengths).astype(dtype)  # [N] of each token's sequence
    seq_end = np.repeat(trace.offsets[1:], lengths).astype(dtype)
    for l in range(n_layers):
        occ, lo, end = _occurrence_keys(trace.ids[:, l], trace.n_expert, seq_start, seq_end)
        for m, hist in zip(ms, hists):
            o, a, e = occ, lo, end
            if (lengths < m).any():  # occurrences in sequences shorter than m touch no window
                fits = e - a >= m
                o, a, e = o[fits], a[fits], e[fits]
            hist[l] = _sweep(o, a, e, m)
            hist[l, 0] = int(np.maximum(lengths - (m - 1), 0).sum()) * trace.n_expert - hist[l, 1:].sum()
    return hists


def _occurrence_keys(ids_l: np.ndarray, n_expert: int, seq_start: np.ndarray, seq_end: np.ndarray):
    """ids_l [N, k] -> keys e*(N+1) + token of every occurrence, sorted, and the keys of its sequence's
    start and end (3 arrays [N*k] of seq_start's dtype)."""
    n, k = ids_l.shape
    dtype = seq_start.dtype.type
    flat = ids_l.ravel().astype(np.uint16 if n_expert <= 1 << 16 else np.int64)
    order = np.argsort(flat, kind="stable").astype(dtype)  # 16-bit keys: radix sort
    tok = order // dtype(k)
    base = np.repeat(
        (np.arange(n_expert) * (n + 1)).astype(dtype), np.bincount(flat, minlength=n_expert)
    )  # keeps experts apart and in order
    return base + tok, base + seq_start[tok], base + seq_end[tok]


def _sweep(occ: np.ndarray, lo: np.ndarray, end: np.ndarray, m: int) -> np.ndarray:
    """int64 [m+1]: number of window starts per f (bin 0 is junk), from sorted occurrence keys."""
    n = len(occ)
    keys = np.empty(2 * n, dtype=occ.dtype)
    np.maximum(occ - (m - 1), lo, out=keys[:n])  # +1 at the first window start holding the occurrence
    np.minimum(occ + 1, end - (m - 1), out=keys[n:])  # -1 past the last one
    keys <<= 1
    keys[:n] |= 1  # low bit: 1 = +1, 0 = -1
    keys.sort(kind="stable")  # two sorted runs: a linear merge; on a tie -1 first, so 0 <= f <= m
    f = keys & 1
    np.cumsum(f, out=f)  # +1 events so far; f = (+1 events) - (-1 events) = 2 * (+1 events) - events
    f <<= 1
    f -= np.arange(1, 2 * n + 1, dtype=f.dtype)
    keys >>= 1
    length = np.subtract(keys[1:], keys[:-1])  # a segment with f >= 1 lies in one occurrence's span,
    np.clip(length, 0, m, out=length)  # so length <= m: only junk f = 0 segments get clipped
    if (m + 1) ** 2 > _PAIR_BINS:  # a long window: (f, length) pairs would need (m + 1)^2 bins
        return np.bincount(f[:-1], weights=length, minlength=m + 1).astype(np.int64)  # exact below 2^53
    pair = f[:-1]
    pair *= m + 1
    pair += length  # an unweighted bincount of (f, length): several times faster than weights=
    counts = np.bincount(pair, minlength=(m + 1) ** 2).reshape(m + 1, m + 1)
    return counts @ np.arange(m + 1)


def best_threshold(hist: np.ndarray, m: int, k: int, n_expert: int) -> tuple[float, int, float]:
    """(SRP, alpha, rho_hat) from a pooled histogram hist[f], f = 0..m (see module docstring).

    F1(alpha) = 2 TP / (m * SEL + A), TP = sum_{f>=alpha} f h[f], SEL = sum_{f>=alpha} h[f], A = sum f h[f].
    """
    h = [int(x) for x in hist]
    pairs = sum(h)
    if pairs == 0:
        return float("nan"), -1, float("nan")
    actual = sum(f * c for f, c in enumerate(h))
    tp = sel = 0
    best = (0, 1, m + 1, 0)  # (numerator, denominator, alpha, selected); exact comparisons
    for alpha in range(m, -1, -1):
        tp += alpha * h[alpha]
        sel += h[alpha]
        num, den = 2 * tp, m * sel + actual
        if num * best[1] >= best[0] * den:  # >= : on a tie the smaller alpha wins
            best = (num, den, alpha, sel)
    num, den, alpha, sel = best
    return num / den, alpha, sel * n_expert / (k * pairs)


def srp(trace: Trace, m: int, level: str = "model") -> SRPResult:
    """SRP(m) with its best threshold alpha and rho_hat; floats for level="model", arrays [L] for "layer".
    m: 1 <= m <= trace.n_tokens (UsageError otherwise)."""
    trace = as_trace(trace)
    m = _check_m(trace, m)
    return srp_many(trace, [m], level)[m]


def srp_many(trace: Trace, ms: Sequence[int], level: str = "model") -> dict[int, SRPResult]:
    """`srp` for several segment lengths in one pass over the trace: {m: SRPResult}."""
    trace = as_trace(trace)
    ms = _check_ms(trace, ms)
    _check_level(level)
    out = {}
    for m, hist in zip(ms, f_histograms(trace, ms)):
        if level == "model":
            out[m] = SRPResult(*best_threshold(hist.sum(axis=0), m, trace.k, trace.n_expert))
        else:
            per_layer = [best_threshold(h, m, trace.k, trace.n_expert) for h in hist]
            out[m] = SRPResult(*(np.array(col) for col in zip(*per_layer)))
    return out


def _check_level(level: str) -> None:
    if not isinstance(level, str) or level not in ("model", "layer"):
        raise UsageError(f"level must be 'model' or 'layer', got {level!r}")


# SCH ---------------------------------------------------------------------------------------------------
def sch_hits(rows: np.ndarray, m: int, capacity: int) -> int:
    """Hits of the segment-cache oracle over one sequence: rows int [T, w] of distinct ids in score order.

    The rules (numbered as the tests cite them):
    1. start: F[y] = uses of y in the first min(m, T) tokens; the cache empty; clock 0;
    2. token t's lookups see the cache as it was before token t: an id already seen in this sequence hits iff it
       is cached; a first-seen id hits iff fewer than `capacity` distinct ids were seen before it (ids of the row
       counted in order): filling a cold cache costs nothing;
    3. then its updates, ids in row order: an uncached x evicts, when the cache is full, the cached y with the
       least (F[y], last[y]) (fewest uses ahead in the window, then least recent) and is inserted; after each id
       clock += 1, F[x] -= 1, last[x] = clock; no id is protected, not even one of the current row;
    4. the window slides: when t + m < T, F[y] += 1 for each y of row t + m;
    5. hit rate = hits / (T * k).
    The eviction order min (F[y], last[y]) is kept in a lazy heap: every change of a cached id's key pushes a
    fresh entry; stale entries are skipped when popped.
    """
    seq = rows.tolist()
    n_tok = len(seq)
    fut: dict[int, int] = {}  # F[y]: uses in the look-ahead window
    for row in seq[: min(m, n_tok)]:
        for y in row:
            fut[y] = fut.get(y, 0) + 1
    last: dict[int, int] = {}  # last[y]; an id is "seen" iff it is in last or in seen_row
    cached: set[int] = set()
    heap: list[tuple[int, int, int]] = []  # (F, last, y)
    hits = clock = 0
    for t, row in enumerate(seq):
        n_seen = len(last)
        for x in row:  # lookups, against the cache before token t
            if x in last:
                hits += x in cached
            else:
                hits += n_seen < capacity
                n_seen += 1
        for x in row:  # updates, in row order
            if x not in cached:
                if len(cached) >= capacity:
                    while True:
                        f, lt, y = heapq.heappop(heap)
                        if y in cached and last[y] == lt and fut[y] == f:
                            break
                    cached.discard(y)
                cached.add(x)
            clock += 1
            fut[x] -= 1
            last[x] = clock
            heapq.heappush(heap, (fut[x], clock, x))
        if t + m < n_tok:  # slide the look-ahead window
            for y in seq[t + m]:
                fut[y] = fut.get(y, 0) + 1
                if y in cached:
                    heapq.heappush(heap, (fut[y], last[y], y))
    return hits


def _capacity(rho: float, width: int, keys: int) -> int:
    """C = round(rho * width) slots for rows of `width` ids, at most `keys` (the distinct ids there are: more slots
    hold nothing more, and rho = 1e308 would overflow); rho a finite number > 0 giving at least one slot."""
    rho = finite_float("rho", rho, 0.0, lo_open=True, why="the cache size in units of ids per row")
    cap = round(min(rho * width, float(keys)))
    if cap < 1:
        raise UsageError(
            f"rho={rho!r} gives a capacity of {cap} slots for {width} ids per row: expected rho >= {0.5 / width:g}"
        )
    return cap


def model_rows(ids: np.ndarray, n_expert: int) -> np.ndarray:
    """[T, L, k] -> [T, L*k]: ids of all layers per token, layer l's ids shifted by l*E, in layer order."""
    n_tok, n_layers, k = ids.shape
    return (ids + (np.arange(n_layers, dtype=np.int32) * n_expert)[None, :, None]).reshape(n_tok, n_layers * k)


def sch(trace: Trace, m: int, rho: float = 2.0, level: str = "model") -> float | np.ndarray:
    """SCH(m, rho): mean over sequences of the oracle's hit rate; a float for "model", [L] for "layer".
    m: 1 <= m <= trace.n_tokens; rho: finite, > 0, round(rho * ids per row) >= 1 (UsageError otherwise)."""
    trace = as_trace(trace)
    m = _check_m(trace, m)
    _check_level(level)
    if level == "model":
        cap = _capacity(rho, trace.n_layers * trace.k, trace.n_layers * trace.n_expert)
        rates = [sch_hits(model_rows(s, trace.n_expert), m, cap) / s.size for s in trace.sequences()]
        return float(np.mean(rates))
    cap = _capacity(rho, trace.k, trace.n_expert)
    rates = [[sch_hits(s[:, l], m, cap) / s[:, l].size for l in range(trace.n_layers)] for s in trace.sequences()]
    return np.mean(np.array(rates), axis=0)


def static_sch(trace: Trace, m: int, rho: float = 2.0, level: str = "model") -> float | np.ndarray:
    """Legacy static SCH: per window, cache the top-C experts by f (C = round(rho*k) per layer, or
    round(rho*L*k) over the pooled L*E experts); hit rate pooled over all windows of all sequences."""
    trace = as_trace(trace)
    m = _check_m(trace, m)
    _check_level(level)
    n_layers, k, n_expert = trace.n_layers, trace.k, trace.n_expert
    pooled = level == "model"
    width = n_layers * k if pooled else k
    cap = _capacity(rho, width, n_layers * n_expert if pooled else n_expert)
    kept = np.zeros(1 if pooled else n_layers, dtype=np.int64)
    n_win = 0
    for f in window_counts(trace, m):  # [n, L, E]
        g = f.reshape(len(f), 1, -1) if pooled else f
        top = np.partition(g, g.shape[-1] - cap, axis=-1)[..., g.shape[-1] - cap :]
        kept += top.sum(axis=(0, 2))
        n_win += len(f)
    if n_win == 0:
        return float("nan") if pooled else np.full(n_layers, np.nan)
    rate = kept / (n_win * m * width)
    return float(rate[0]) if pooled else rate


# gate lookahead ----------------------------------------------------------------------------------------
def lookahead_precision(trace: Trace) -> np.ndarray:
    """float [D, L]: [d - 1, l] = the share of layer l + d's top-k that the prediction made at layer l names
    (|predicted & actual| / k over the trace's tokens), d = 1 .. trace.lookahead_depth; nan where l + d is past
    the last layer. It is the precision of a prefetch d layers ahead that reads all k predicted experts."""
    trace = as_trace(trace)
    depth, n_layers = trace.lookahead_depth, trace.n_layers
    if depth == 0:
        raise UsageError("the trace holds no lookahead predictions (record it with moelite analyze or record_trace)")
    out = np.full((depth, n_layers), np.nan)
    for d in range(1, depth + 1):
        pred = trace.lookahead(d)
        for layer in range(n_layers - d):
            named = (pred[:, layer, :, None] == trace.ids[:, layer + d, None, :]).any(axis=-1)  # [N, k]
            out[d - 1, layer] = named.mean()
    return out
