"""SRP / SCH / static SCH against brute-force implementations written as literally as cache_policies/metrics.py
defines them, hand-checkable traces, and trace validation / file round trips."""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moelite.cache_policies.metrics import sch, srp, static_sch
from moelite.cache_policies.trace import Trace, load_trace, save_trace
from moelite.errors import TraceError, UsageError

SETTINGS = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


# random small traces -----------------------------------------------------------------------------------
@st.composite
def traces(draw, max_tokens: int = 12):
    """Small traces with some locality: each row keeps the previous row's ids with probability `stick`."""
    n_expert = draw(st.integers(2, 6))
    k = draw(st.integers(1, min(3, n_expert)))
    n_layers = draw(st.integers(1, 3))
    lengths = draw(st.lists(st.integers(1, max_tokens), min_size=1, max_size=3))
    stick = draw(st.sampled_from([0.0, 0.5, 0.9]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    seqs = []
    for n_tok in lengths:
        ids = np.argsort(rng.random((n_tok, n_layers, n_expert)), axis=-1)[..., :k]
        for t in range(1, n_tok):
            keep = rng.random(n_layers) < stick
            ids[t, keep] = ids[t - 1, keep]
        seqs.append(ids)
    return Trace.from_sequences(seqs, n_expert=n_expert)


# brute force, as literally as the text -------------------------------------------------------------------
def brute_srp(trace: Trace, m: int, layers: list[int]):
    """Loop over windows, experts and alpha; F1 = 2TP / (2TP + FP + FN); ties keep the smaller alpha."""
    f_values, n_windows = [], 0
    for seq in trace.sequences():
        rows = seq.tolist()
        for l in layers:
            for p in range(len(rows) - m + 1):
                n_windows += 1
                for e in range(trace.n_expert):
                    f_values.append(sum(e in rows[t][l] for t in range(p, p + m)))
    if not f_values:
        return None
    best = None
    for alpha in range(m + 1):
        tp = sum(f for f in f_values if f >= alpha)
        fp = sum(m - f for f in f_values if f >= alpha)
        fn = sum(f for f in f_values if f < alpha)
        f1 = Fraction(2 * tp, 2 * tp + fp + fn)
        if best is None or f1 > best[0]:
            best = (f1, alpha, sum(f >= alpha for f in f_values))
    f1, alpha, selected = best
    return f1, alpha, Fraction(selected, trace.k * n_windows)  # n_windows already counts layers


def brute_sch_hits(rows: list[list[int]], m: int, cap: int) -> int:
    """Rules 1-5 of metrics.sch_hits, one statement per rule."""
    n_tok = len(rows)
    fut = Counter(y for t in range(min(m, n_tok)) for y in rows[t])  # 1
    cache, last, seen, clock, hits = [], {}, set(), 0, 0
    for t in range(n_tok):
        for x in rows[t]:  # 2: lookups against the cache before token t
            if x in seen:
                hits += x in cache
            else:
                hits += len(seen) < cap
                seen.add(x)
        for x in rows[t]:  # 3: updates in row order
            if x not in cache:
                if len(cache) == cap:
                    cache.remove(min(cache, key=lambda y: (fut[y], last[y])))
                cache.append(x)
            clock += 1
            fut[x] -= 1
            last[x] = clock
        if t + m < n_tok:  # 4
            for y in rows[t + m]:
                fut[y] += 1
    return hits


def brute_sch(trace: Trace, m: int, rho: float, level: str):
    rates = []
    for seq in trace.sequences():
        if level == "model":
            rows = [[e + l * trace.n_expert for l in range(trace.n_layers) for e in tok[l]] for tok in seq.tolist()]
            cap = round(rho * trace.n_layers * trace.k)
            rates.append([Fraction(brute_sch_hits(rows, m, cap), len(rows) * trace.n_layers * trace.k)])
        else:
            cap = round(rho * trace.k)
            rates.append(
                [
                    Fraction(brute_sch_hits([tok[l] for tok in seq.tolist()], m, cap), len(seq) * trace.k)
                    for l in range(trace.n_layers)
                ]
            )
    return [sum(col) / len(col) for col in zip(*rates)]  # 5: averaged over sequences


def brute_static_sch(trace: Trace, m: int, rho: float, layers: list[int]):
    width = len(layers) * trace.k
    cap = round(rho * width)
    kept = n_windows = 0
    for seq in trace.sequences():
        rows = seq.tolist()
        for p in range(len(rows) - m + 1):
            n_windows += 1
            counts = [sum(e in rows[t][l] for t in range(p, p + m)) for l in layers for e in range(trace.n_expert)]
            kept += sum(sorted(counts, reverse=True)[:cap])
    return None if n_windows == 0 else Fraction(kept, n_windows * m * width)


# properties --------------------------------------------------------------------------------------------
def beyond_trace(trace: Trace, m: int, call) -> bool:
    """A window longer than the whole trace is refused before anything is computed (issue 33): True then."""
    if m <= trace.n_tokens:
        return False
    with pytest.raises(UsageError, match="no longer than the trace"):
        call()
    return True


@SETTINGS
@given(trace=traces(), m=st.integers(1, 6))
def test_srp_matches_brute_force(trace, m):
    if beyond_trace(trace, m, lambda: srp(trace, m)):
        return
    got = srp(trace, m, level="model")
    want = brute_srp(trace, m, list(range(trace.n_layers)))
    if want is None:
        assert np.isnan(got.value) and np.isnan(got.rho_hat)
        return
    assert got.value == pytest.approx(float(want[0]), abs=1e-12)
    assert got.alpha == want[1]
    assert got.rho_hat == pytest.approx(float(want[2]), abs=1e-12)
    layer = srp(trace, m, level="layer")
    for l in range(trace.n_layers):
        f1, alpha, rho_hat = brute_srp(trace, m, [l])
        assert layer.value[l] == pytest.approx(float(f1), abs=1e-12)
        assert layer.alpha[l] == alpha
        assert layer.rho_hat[l] == pytest.approx(float(rho_hat), abs=1e-12)


@SETTINGS
@given(trace=traces(), m=st.integers(1, 6), rho=st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0]))
def test_sch_matches_brute_force(trace, m, rho):
    if beyond_trace(trace, m, lambda: sch(trace, m, rho)):
        return
    for level in ("model", "layer"):
        if round(rho * trace.k * (trace.n_layers if level == "model" else 1)) < 1:
            with pytest.raises(UsageError):
                sch(trace, m, rho, level=level)
            continue
        got = np.atleast_1d(sch(trace, m, rho, level=level))
        want = brute_sch(trace, m, rho, level)
        np.testing.assert_allclose(got, [float(w) for w in want], atol=1e-12)


@SETTINGS
@given(trace=traces(), m=st.integers(1, 6), rho=st.sampled_from([1.0, 2.0, 3.0]))
def test_static_sch_matches_brute_force(trace, m, rho):
    if beyond_trace(trace, m, lambda: static_sch(trace, m, rho)):
        return
    got = static_sch(trace, m, rho, level="model")
    want = brute_static_sch(trace, m, rho, list(range(trace.n_layers)))
    if want is None:
        assert np.isnan(got)
    else:
        assert got == pytest.approx(float(want), abs=1e-12)
        layer = static_sch(trace, m, rho, level="layer")
        for l in range(trace.n_layers):
            assert layer[l] == pytest.approx(float(brute_static_sch(trace, m, rho, [l])), abs=1e-12)


@SETTINGS
@given(trace=traces(), m=st.integers(1, 6))
def test_srp_never_below_the_alpha_zero_floor(trace, m):
    if beyond_trace(trace, m, lambda: srp(trace, m)):
        return
    got = srp(trace, m)
    r = trace.k / trace.n_expert
    if not np.isnan(got.value):
        assert got.value >= 2 * r / (1 + r) - 1e-12


# hand-checkable traces ---------------------------------------------------------------------------------
def constant_trace(n_tok=20, n_layers=3, n_expert=8, k=2):
    row = np.array([[(2 * l + j) % n_expert for j in range(k)] for l in range(n_layers)])  # [L, k]
    return Trace(ids=np.tile(row, (n_tok, 1, 1)), n_expert=n_expert)


@pytest.mark.parametrize("m", [1, 4, 16])
def test_constant_trace_is_perfectly_consistent(m):
    # every window has f = m for the k used experts and 0 for the others: alpha = 1 selects exactly the
    # used ones (TP = all uses, FP = FN = 0) -> SRP = 1, and k experts per token -> rho_hat = 1.
    trace = constant_trace()
    assert tuple(srp(trace, m)) == (1.0, 1, 1.0)
    # SCH: the cold fill of the first token is free and nothing is ever evicted -> hit rate 1
    assert sch(trace, m, 1.0) == 1.0
    np.testing.assert_array_equal(sch(trace, m, 1.0, level="layer"), 1.0)
    assert static_sch(trace, m, 1.0) == 1.0


def alternating_trace(n_tok=10):
    # one layer, E = 4, k = 2: tokens alternate A = [0, 1], B = [2, 3]
    return Trace(ids=np.array([[[0, 1]], [[2, 3]]] * (n_tok // 2)), n_expert=4)


def test_alternating_trace_srp():
    # m = 2: every window holds one A and one B token, so each of the 4 experts has f = 1 = m/2 in every
    # window (W windows). alpha in {0, 1} selects all 4W pairs: TP = 4W, FP = 4W, FN = 0 -> F1 = 8W/16W...
    # by the formula 2*sum(f)/sum(m + f) = 2*4W / (2*4W + 4W) = 2/3; alpha = 2 selects nothing -> 0.
    # Ties go to the smaller alpha: alpha = 0, rho_hat = 4W / (k * W) = 2. (= the floor 2r/(1+r), r = 1/2)
    assert tuple(srp(alternating_trace(), 2)) == pytest.approx((2 / 3, 0, 2.0))
    # m = 3: a window is ABA or BAB: two experts with f = 2, two with f = 1, sum f = 6 per window.
    # alpha <= 1: 2*6 / (3*4 + 6) = 2/3;  alpha = 2: 2*4 / (3*2 + 6) = 2/3 (tie);  alpha = 3: 0.
    assert tuple(srp(alternating_trace(), 3)) == pytest.approx((2 / 3, 0, 2.0))


def test_alternating_trace_sch():
    # rho = 2 -> C = 4 = E: the 4 experts are the first 4 distinct ids, free cold fill, never evicted -> 1.
    assert sch(alternating_trace(), 2, 2.0) == 1.0
    # rho = 1 -> C = 2, m = 2. Hand simulation (F = look-ahead uses, (F, last) per cached id):
    #  t0 [0,1]: both unseen, <2 seen -> 2 hits; insert 0, 1; slide adds row 2 -> F0 = F1 = 1.
    #  t1 [2,3]: unseen, 2 ids already seen -> 2 misses. 2 evicts 0 (1,1) over 1 (1,2); then 3 evicts
    #     2 itself (F2 = 0 after its use) -> cache {1, 3}.
    #  t2 [0,1]: 0 misses, 1 hits. 0 evicts 1 (F 1, older) over 3; then 1 evicts 0 (F 0) -> {3, 1}.
    #  Every later token likewise: 1 hit of 2 (the same holds at the end, where the slide stops).
    #  Hits = 2 + 0 + (T - 2) = T of 2T lookups -> 1/2.
    assert sch(alternating_trace(10), 2, 1.0) == 0.5
    assert sch(alternating_trace(10), 2, 1.0, level="layer").tolist() == [0.5]
    # static SCH, m = 2, C = 2: every window has f = 1 for all 4 experts; top-2 keep 2 of m*k = 4 -> 1/2
    assert static_sch(alternating_trace(), 2, 1.0) == 0.5


def test_windows_do_not_cross_sequences():
    # two constant sequences using different experts: any window across the boundary would have f < m
    a = np.zeros((5, 1, 1), np.int32)
    trace = Trace.from_sequences([a, a + 1], n_expert=2)
    assert tuple(srp(trace, 5)) == (1.0, 1, 1.0)
    assert np.isnan(srp(trace, 6).value)  # no window of 6 tokens fits in a sequence


def test_bad_arguments():
    with pytest.raises(UsageError):
        srp(constant_trace(), 0)
    with pytest.raises(UsageError):
        srp(constant_trace(), 4, level="token")
    with pytest.raises(UsageError):
        sch(constant_trace(), 4, rho=0.1, level="layer")  # C = round(0.2) = 0


# validation and files --------------------------------------------------------------------------------
GOOD = np.array([[[0, 1], [2, 3]], [[1, 2], [3, 0]]], dtype=np.int32)  # [T=2, L=2, k=2]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ids": GOOD.astype(np.float32)}, "integer dtype"),
        ({"ids": GOOD + 3}, "outside"),
        ({"ids": GOOD - 1}, "outside"),
        ({"ids": GOOD[:, :, :1].repeat(2, axis=2)}, "repeats"),
        ({"ids": GOOD[0]}, "3-D"),
        ({"ids": np.zeros((0, 2, 2), np.int32)}, "empty"),
        ({"ids": [[[0, 1], [2, 3]], [[1, 2], [3]]]}, "ragged"),
        ({"ids": GOOD, "scores": np.zeros((2, 2, 3), np.float32)}, "scores has shape"),
        ({"ids": GOOD, "scores": np.zeros((2, 2, 2), np.int32)}, "float dtype"),
        ({"ids": GOOD, "scores": np.tile(np.float32([0.2, 0.7]), (2, 2, 1))}, "descending"),
        ({"ids": GOOD, "offsets": [0, 3]}, "offsets"),
        ({"ids": GOOD, "offsets": [0, 0, 2]}, "offsets"),
        ({"ids": GOOD, "n_expert": 1}, "k = 2"),
        ({"ids": GOOD, "n_expert": 0}, "positive"),
        ({"ids": GOOD, "layers": [3, 1]}, "increasing"),
        ({"ids": GOOD, "lookahead_ids": GOOD[:, :1]}, "lookahead_ids has shape"),
    ],
)
def test_bad_traces_raise(kwargs, match):
    kwargs = {"n_expert": 4, **kwargs}
    with pytest.raises(TraceError, match=match):
        Trace(**kwargs)


def test_bad_sequences_raise():
    with pytest.raises(TraceError, match="empty"):
        Trace.from_sequences([], n_expert=4)
    with pytest.raises(TraceError, match="ragged"):
        Trace.from_sequences([GOOD, GOOD[:, :1]], n_expert=4)


def test_lookahead_last_layer_is_ignored():
    look = np.concatenate([GOOD[:, 1:], np.full((2, 1, 2), -1, np.int32)], axis=1)
    assert Trace(ids=GOOD, n_expert=4, lookahead_ids=look).lookahead_ids.shape == GOOD.shape


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    seqs = [np.argsort(rng.random((n, 3, 8)), axis=-1)[..., :2] for n in (5, 1, 7)]
    scores = [-np.sort(-rng.random(s.shape).astype(np.float32), axis=-1) for s in seqs]  # descending
    trace = Trace.from_sequences(seqs, n_expert=8, scores=scores, layers=[1, 2, 5], model="toy")
    save_trace(trace, tmp_path / "t.npz")
    back = load_trace(tmp_path / "t.npz")
    np.testing.assert_array_equal(back.ids, trace.ids)
    np.testing.assert_array_equal(back.offsets, trace.offsets)
    np.testing.assert_array_equal(back.scores, trace.scores)
    assert (back.model, back.n_expert, back.layers.tolist()) == ("toy", 8, [1, 2, 5])
    assert [len(s) for s in back.sequences()] == [5, 1, 7]


def test_load_per_sequence_layout(tmp_path):
    ids0, ids1 = GOOD, GOOD[::-1]
    np.savez(tmp_path / "p.npz", ids_0=ids0, ids_1=ids1, n_expert=4, model="x")
    back = load_trace(tmp_path / "p.npz")
    assert back.n_sequences == 2 and np.array_equal(back.sequences()[1], ids1)
    np.savez(tmp_path / "q.npz", ids_0=ids0, ids_1=ids1, scores_0=np.zeros(ids0.shape), n_expert=4)
    with pytest.raises(TraceError, match="scores_1"):
        load_trace(tmp_path / "q.npz")


def test_load_bad_files(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(TraceError, match="junk.npz"):
        load_trace(tmp_path / "junk.npz")
    np.savez(tmp_path / "nokey.npz", ids=GOOD)
    with pytest.raises(TraceError, match="n_expert"):
        load_trace(tmp_path / "nokey.npz")
    np.savez(tmp_path / "bad.npz", ids=GOOD + 9, n_expert=4)
    with pytest.raises(TraceError, match="bad.npz"):
        load_trace(tmp_path / "bad.npz")
