"""Cache simulator against a literal reference (every victim = min over unpinned entries of the policy's key
with explicit timestamps, Belady by scanning the future), plus registry, capacities and hand examples."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_routing_metrics import traces

from moelite.cache_policies.registry import POLICY_IDS, layer_capacities, make_policy, policy_id, policy_name
from moelite.cache_policies.simulator import SIM_POLICIES, simulate
from moelite.cache_policies.trace import Trace
from moelite.errors import UsageError

SETTINGS = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


# reference simulator: the module docstring of simulator.py, statement by statement -----------------------
def reference(trace: Trace, policy: str, caps: list[int], pooled: bool, m: int, pred=None):
    n_layers = trace.n_layers
    out = {name: np.zeros(n_layers, np.int64) for name in ("hits", "misses", "loads", "useful", "wasted")}
    for s in range(trace.n_sequences):
        rows = trace.ids[trace.seq_slice(s)].tolist()  # rows[t][l] = ids
        start = int(trace.offsets[s])
        steps = [(t, l) for t in range(len(rows)) for l in range(n_layers)]
        pools = [dict() for _ in caps]  # (layer, expert) -> {"last", "count", "K", "pf"}
        age = [0] * len(caps)
        clock = 0

        def pool_of(key):
            return 0 if pooled else key[0]

        def uses(key, lo, hi):  # steps i in (lo, hi) whose row uses key
            return [
                i
                for i in range(lo + 1, min(hi, len(steps)))
                if key[1] in rows[steps[i][0]][key[0]] and steps[i][1] == key[0]
            ]

        def recent_uses(key, g):  # how many of the last m tokens that completed the key's layer used it
            t, l = steps[g]
            newest = t if key[0] < l else t - 1
            return sum(key[1] in rows[u][key[0]] for u in range(max(0, newest - m + 1), newest + 1))

        def victim(p, pinned, g):
            cands = [y for y in pools[p] if y not in pinned]
            if not cands:
                return None
            e = pools[p]
            key = {
                "lru": lambda y: (0, e[y]["last"]),
                "lfu": lambda y: (e[y]["count"], e[y]["last"]),
                "lfuda": lambda y: (e[y]["K"], e[y]["last"]),
                "consistency": lambda y: (recent_uses(y, g), e[y]["last"]),
                "window_lfu": lambda y: (recent_uses(y, g), e[y]["last"]),
                "belady": lambda y: (-(uses(y, g, len(steps)) or [len(steps)])[0], e[y]["last"]),
                "sch": lambda y: (len(uses(y, g, g + m * n_layers)), e[y]["last"]),
            }[policy]
            return min(cands, key=key)

        def evict(p, y):
            entry = pools[p].pop(y)
            age[p] = entry["K"]
            if entry["pf"]:
                out["wasted"][y[0]] += 1

        for g, (t, l) in enumerate(steps):
            row = [(l, e) for e in rows[t][l]]
            for x in row:
                p = pool_of(x)
                clock += 1
                if x in pools[p]:
                    out["hits"][l] += 1
                    entry = pools[p][x]
                    if entry["pf"]:
                        out["useful"][l] += 1
                        entry["pf"] = False
                    entry["count"] += 1
                else:
                    out["misses"][l] += 1
                    if len(pools[p]) >= caps[p]:
                        evict(p, victim(p, set(row), g))
                    pools[p][x] = entry = {"count": 1, "pf": False}
                entry["last"] = clock
                entry["K"] = entry["count"] + age[p]
            if pred is not None and l + 1 < n_layers:
                want = [(l + 1, e) for e in pred[start + t][l] if e >= 0]
                for x in want:
                    p = pool_of(x)
                    if x in pools[p]:
                        continue
                    if len(pools[p]) >= caps[p]:
                        y = victim(p, set(row) | set(want), g)
                        if y is None:
                            continue
                        evict(p, y)
                    clock += 1
                    pools[p][x] = {"count": 0, "pf": True, "last": clock, "K": age[p]}
                    out["loads"][l + 1] += 1
        for p in pools:
            for y, entry in p.items():
                out["wasted"][y[0]] += entry["pf"]
    return out


def check_against_reference(trace, policy, total, pooled, m, prefetch=False, precision=None):
    got = simulate(trace, policy, total, m=m, pooled=pooled, prefetch=prefetch, precision=precision)
    pred = None
    if prefetch:
        from moelite.cache_policies.simulator import _predictions

        pred = _predictions(trace, precision, 0).tolist()  # [N][L][k]
    want = reference(trace, policy, got.caps, pooled, m, pred)
    np.testing.assert_array_equal(got.hits, want["hits"])
    np.testing.assert_array_equal(got.misses, want["misses"])
    np.testing.assert_array_equal(got.prefetch_loads, want["loads"])
    np.testing.assert_array_equal(got.prefetch_useful, want["useful"])
    np.testing.assert_array_equal(got.prefetch_wasted, want["wasted"])
    return got


@SETTINGS
@given(
    trace=traces(max_tokens=10),
    policy=st.sampled_from(SIM_POLICIES),
    extra=st.integers(0, 6),
    pooled=st.booleans(),
    m=st.integers(1, 4),
)
def test_policies_match_reference(trace, policy, extra, pooled, m):
    total = trace.n_layers * trace.k + extra
    check_against_reference(trace, policy, total, pooled, m)


@SETTINGS
@given(
    trace=traces(max_tokens=10),
    policy=st.sampled_from(SIM_POLICIES),
    extra=st.integers(0, 6),
    pooled=st.booleans(),
    m=st.integers(1, 4),
    precision=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_prefetch_matches_reference(trace, policy, extra, pooled, m, precision):
    total = trace.n_layers * trace.k + extra
    got = check_against_reference(trace, policy, total, pooled, m, prefetch=True, precision=precision)
    assert (got.prefetch_loads == got.prefetch_useful + got.prefetch_wasted).all()


@SETTINGS
@given(trace=traces(max_tokens=10), extra=st.integers(0, 6), pooled=st.booleans(), m=st.integers(1, 4))
def test_belady_is_the_ceiling(trace, extra, pooled, m):
    total = trace.n_layers * trace.k + extra
    best = simulate(trace, "belady", total, pooled=pooled).hits.sum()
    for policy in SIM_POLICIES:
        assert simulate(trace, policy, total, m=m, pooled=pooled).hits.sum() <= best


@SETTINGS
@given(trace=traces(max_tokens=10), extra=st.integers(0, 6), m=st.integers(1, 6))
def test_consistency_is_the_window_frequency_rule(trace, extra, m):
    # consistency evicts the entry fewest of the last m tokens used (ties LRU), the rule named window_lfu
    total = trace.n_layers * trace.k + extra
    a = simulate(trace, "consistency", total, m=m)
    b = simulate(trace, "window_lfu", total, m=m)
    np.testing.assert_array_equal(a.hits, b.hits)


# hand examples -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", SIM_POLICIES)
@pytest.mark.parametrize("prefetch", [False, True])
def test_constant_trace_only_cold_misses(policy, prefetch):
    # each layer always uses the same k experts: after the first token (k cold misses per layer, or
    # k prefetched loads for layers >= 1), every lookup hits
    n_tok, n_layers, n_expert, k = 12, 3, 8, 2
    row = np.array([[(2 * l + j) % n_expert for j in range(k)] for l in range(n_layers)])
    trace = Trace(ids=np.tile(row, (n_tok, 1, 1)), n_expert=n_expert)
    r = simulate(trace, policy, n_layers * k, prefetch=prefetch, precision=1.0)
    cold = [k] + [0 if prefetch else k] * (n_layers - 1)
    assert r.misses.tolist() == cold
    assert r.hits.sum() == n_tok * n_layers * k - sum(cold)
    assert r.prefetch_useful.sum() == (k * (n_layers - 1) if prefetch else 0)


def test_alternating_trace():
    # one layer, E = 4, k = 2, rows alternate [0, 1], [2, 3]
    trace = Trace(ids=np.array([[[0, 1]], [[2, 3]]] * 5), n_expert=4)
    # 2 slots: every token replaces the whole cache -> 0 hits for every policy (the row is pinned)
    for policy in SIM_POLICIES:
        assert simulate(trace, policy, 2).hits.sum() == 0
    # 4 slots: 4 cold misses (tokens 0 and 1), then all 16 lookups hit
    for policy in SIM_POLICIES:
        r = simulate(trace, policy, 4)
        assert (r.hits.sum(), r.misses.sum()) == (16, 4)
    # 3 slots: during token t its pair fills 2 slots, so at most one of the next pair survives: at most
    # 1 hit per token from t = 2 on -> 8 hits is the ceiling, and Belady reaches it. LRU reaches it too
    # because the running row is pinned: t2 [0, 1] finds {1, 2, 3}; 0 misses and may not evict 1
    # (pinned), so it evicts 2 (LRU of 2, 3); 1 hits. t3 [2, 3] finds {3, 0, 1}: 2 evicts 0, 3 hits...
    assert simulate(trace, "belady", 3).hits.sum() == 8
    assert simulate(trace, "lru", 3).hits.sum() == 8


def test_lfuda_ages_out_an_old_favourite():
    # one layer, k = 1, 2 slots, experts a=0 b=1 c=2, accesses a a a b c b c b
    # LFU: a keeps count 3 forever; b and c evict each other -> hits: the two repeats of a only.
    # LFUDA: a K=3. b K=1. c evicts b (age 1), K=2. b evicts c (age 2), K=3. c: a and b tie at K=3,
    # LRU -> a goes (age 3), c K=4. The last b hits -> 3 hits.
    trace = Trace(ids=np.array([0, 0, 0, 1, 2, 1, 2, 1]).reshape(8, 1, 1), n_expert=3)
    assert simulate(trace, "lfu", 2).hits.sum() == 2
    assert simulate(trace, "lfuda", 2).hits.sum() == 3


def test_lookahead_ids_equal_to_truth_is_precision_one():
    rng = np.random.default_rng(1)
    ids = np.argsort(rng.random((30, 3, 6)), axis=-1)[..., :2]
    look = np.concatenate([ids[:, 1:], np.full((30, 1, 2), -1, np.int32)], axis=1)
    with_look = Trace(ids=ids, n_expert=6, lookahead_ids=look)
    a = simulate(with_look, "lru", 9, prefetch=True)
    b = simulate(with_look, "lru", 9, prefetch=True, precision=1.0)
    assert a.to_dict() == b.to_dict()
    assert a.misses[1:].sum() == 0  # layers 1, 2 always prefetched correctly
    with pytest.raises(UsageError, match="lookahead_ids"):
        simulate(Trace(ids=ids, n_expert=6), "lru", 9, prefetch=True)


def test_bad_simulation_arguments():
    trace = Trace(ids=np.zeros((4, 2, 1), np.int32), n_expert=3)
    with pytest.raises(UsageError, match="belady"):
        simulate(trace, "fifo", 4)
    with pytest.raises(UsageError, match="at least 1"):
        simulate(trace, "lru", 1)  # 2 layers need 1 slot each
    with pytest.raises(UsageError):
        simulate(trace, "lru", 4, shares=[1.0])
    with pytest.raises(UsageError):
        simulate(trace, "lru", 4, prefetch=True, precision=1.5)


# registry ----------------------------------------------------------------------------------------------
def test_registry_ids():
    assert POLICY_IDS == {"lru": 0, "lfu": 1, "lfuda": 2, "consistency": 3}
    for name, pid in POLICY_IDS.items():
        assert policy_id(name) == pid and policy_name(pid) == name
    with pytest.raises(UsageError, match="lru, lfu, lfuda, consistency"):
        policy_id("fifo")


def test_registry_knobs():
    assert make_policy("consistency").m == 16
    cfg = make_policy("consistency", m=4, shares=[0.25, 0.75], n_layers=2)
    assert (cfg.id, cfg.m, cfg.shares) == (3, 4, (0.25, 0.75))
    assert make_policy("lru").knobs() == {"shares": None}
    for bad in (
        {"m": 0},
        {"m": 2.0},
        {"m": True},
        {"shares": [0.5, 0.6]},
        {"shares": [-0.5, 1.5]},
        {"shares": []},
        {"shares": "ab"},
        {"window": 3},
    ):
        with pytest.raises(UsageError):
            make_policy("consistency", **bad)
    with pytest.raises(UsageError, match="no knob 'm'"):
        make_policy("lru", m=4)
    with pytest.raises(UsageError, match="3 routed layers"):
        make_policy("lfu", shares=[0.5, 0.5], n_layers=3)


def test_layer_capacities():
    assert layer_capacities(10, 3) == [4, 3, 3]
    assert layer_capacities(10, 2, [0.25, 0.75]) == [3, 7]  # 2.5 / 7.5: tie goes to the lower layer
    caps = [8, 13, 21, 6]
    assert layer_capacities(48, 4, [c / 48 for c in caps]) == caps  # shares from slot counts round-trip
    with pytest.raises(UsageError, match="layer 0"):
        layer_capacities(10, 2, [0.05, 0.95], min_per_layer=2)


# calibration and report --------------------------------------------------------------------------------
def two_speed_trace(n_tok=120, seed=0):
    """Layer 0 always uses experts [0, 1]; layer 1 draws 2 of 8 at random every token."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n_tok, 2, 2), np.int32)
    ids[:, 0] = [0, 1]
    ids[:, 1] = np.argsort(rng.random((n_tok, 8)), axis=-1)[:, :2]
    return Trace(ids=ids, n_expert=8, model="two-speed")


def test_calibration_keys_are_gguf_storable():
    from moelite.cache_policies.calibration import calibrate

    trace = two_speed_trace()
    cal = calibrate(trace, 8, ms=(4, 16))
    assert all(key.startswith("moelite.calibration.") for key in cal)
    for key, value in cal.items():
        items = value if isinstance(value, list) else [value]
        assert all(type(v) in (str, int, float, bool) for v in items), key
    p = "moelite.calibration."
    assert cal[p + "policy"] in POLICY_IDS and cal[p + "policy_id"] == POLICY_IDS[cal[p + "policy"]]
    assert sum(cal[p + "layer_slots"]) == 8 and min(cal[p + "layer_slots"]) >= trace.k
    assert sum(cal[p + "layer_shares"]) == pytest.approx(1.0)
    # the constant layer needs only its k = 2 slots: the random layer should get the other 6
    assert cal[p + "layer_slots"] == [2, 6]
    assert cal[p + "hit_rate"] >= cal[p + "hit_rate_lru_uniform"]
    assert cal[p + "hit_rate_belady"] >= cal[p + "hit_rate"]
    assert len(cal[p + "expert_freq"]) == 2 * 8
    with pytest.raises(UsageError, match=r"budget=3: expected an integer in \[4, 16\]"):
        calibrate(trace, 3)
    with pytest.raises(UsageError, match="budget=17"):  # more slots than experts: the share spread looped on
        calibrate(trace, 17)


def test_report_files(tmp_path):
    import io
    import json

    from rich.console import Console

    from moelite.cache_policies.report import build_report, print_summary, write_report

    rep = build_report(two_speed_trace(), ms=(4, 16), rhos=(1, 2), policies=("lru", "belady"), precision=0.5)
    assert {(r["policy"], r["prefetch"]) for r in rep["hit_rate"]} == {
        ("lru", False),
        ("belady", False),
        ("lru", True),
        ("belady", True),
    }
    paths = write_report(rep, tmp_path / "out")
    assert json.loads(open(paths[0]).read())["model"] == "two-speed"
    for png in paths[1:]:
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    buf = io.StringIO()
    print_summary(rep, Console(file=buf, width=120))
    out = buf.getvalue()
    assert "belady (oracle)" in out and "SRP" in out and "a ceiling" in out  # oracles marked
    assert "SRP(m):" in out and "SCH(m, rho):" in out  # a line each


def test_identical_curves_are_merged_not_repeated():
    """consistency without prefetch is LRU exactly (the simulator's property test): one row, both names."""
    from moelite.cache_policies.report import _by_curve

    rows = [
        dict(policy=p, prefetch=False, total_slots=n, hit_rate=h)
        for p in ("lru", "consistency")
        for n, h in ((4, 0.5), (8, 0.7))
    ] + [dict(policy="lfu", prefetch=False, total_slots=4, hit_rate=0.4)]
    curves = _by_curve({"hit_rate": rows})
    assert list(curves) == ["lru = consistency", "lfu"]
