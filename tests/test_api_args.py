"""The numbers a caller passes to the public API (issue 33): load options, generation options, the routing metrics,
simulator and calibration, and the command line's flags. Each bad value is a moelite.errors.UsageError (BudgetError
for a budget) naming the argument, the value and the accepted range, raised before anything is allocated; accepted
values give the same results as their plain Python equivalents. All on the real fixture model and a trace it
recorded."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from fixture_models import fixture_gguf

import moelite
from moelite.apps import cli
from moelite.cache_policies import Trace, calibrate, metrics, sch, simulate, srp, srp_many, static_sch
from moelite.errors import BudgetError, UsageError
from moelite.runtime.args import INT32_MAX, cli_float, cli_int, finite_float, int_in, ints_in
from moelite.runtime.sampling import Sampler, SamplerConfig

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def gguf():
    return str(fixture_gguf("qwen3_moe")[1])


@pytest.fixture(scope="module")
def model(gguf):
    with moelite.load(gguf, n_ctx=32, n_threads=1, prefetch=False) as m:
        yield m


@pytest.fixture(scope="module")
def trace(gguf):
    """The fixture model's routing over 3 sequences of 24 random tokens: [72, L, k]."""
    rng = np.random.default_rng(33)
    with moelite.load(gguf, n_ctx=32, n_threads=1, prefetch=False, record_trace=True) as m:
        for _ in range(3):
            m.logits(rng.integers(0, m.n_vocab, 24).tolist())
        return m.trace()


# ---- the checker itself ------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [True, np.bool_(False), 2.0, NAN, "3", None, [3], 2**31, -1, np.uint64(2**63)])
def test_int_in_refuses(value):
    with pytest.raises(UsageError) as e:
        int_in("n_things", value, 0, INT32_MAX)
    msg = str(e.value)
    assert msg.startswith("n_things=") and "expected an integer in [0, 2^31 - 1]" in msg, msg


@pytest.mark.parametrize("value", [NAN, INF, -INF, True, "0.5", None, 10**400, 1.5, 0.0, complex(0.5, 0)])
def test_finite_float_refuses(value):
    with pytest.raises(UsageError, match=r"^ratio=.*: expected a finite number in \(0, 1\]"):
        finite_float("ratio", value, 0.0, 1.0, lo_open=True)


def test_accepted_values_come_back_as_python_numbers():
    assert int_in("n", np.int64(7), 0, 10) == 7 and type(int_in("n", np.uint8(7), 0, 10)) is int
    assert finite_float("x", np.float32(0.5), 0.0, 1.0) == 0.5 and type(finite_float("x", 1, 0.0, 1.0)) is float
    assert int_in("n", None, 0, 10, optional=True) is None
    assert ints_in("ids", np.array([1, 2, 3]), 0, 3) == [1, 2, 3]
    with pytest.raises(UsageError, match=r"ids\[1\]=9: expected an integer in \[0, 3\]"):
        ints_in("ids", [1, 9], 0, 3)
    for bad in ("123", 5, np.zeros((2, 2), int), {"a": 1}):
        with pytest.raises(UsageError, match="expected a list of integers"):
            ints_in("ids", bad, 0, 3)


def test_cli_types_share_the_ranges():
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("--top-p", type=cli_float(0.0, 1.0, lo_open=True))
    p.add_argument("--threads", type=cli_int(1, 512))
    assert p.parse_args(["--top-p", "0.5", "--threads", "4"]).top_p == 0.5
    for argv, needle in [
        (["--top-p", "nan"], "'nan' is not a finite number in (0, 1]"),
        (["--top-p", "1e400"], "'1e400' is not a finite number"),
        (["--top-p", "0"], "'0' is not a finite number in (0, 1]"),
        (["--threads", "0"], "'0' is not an integer in [1, 512]"),
        (["--threads", "2.5"], "'2.5' is not an integer in [1, 512]"),
        (["--threads", "99999999999999999999"], "is not an integer in [1, 512]"),
    ]:
        with pytest.raises(argparse.ArgumentError, match=needle.replace("(", r"\(").replace("[", r"\[")):
            p.parse_args(argv)


# ---- the cases --------------------------------------------------------------------------------------
@pytest.mark.parametrize("rho", [NAN, INF, -INF, 0.0, -1.0, "2", None])
@pytest.mark.parametrize("fn", [sch, static_sch])
def test_sch_rho_not_a_finite_positive_number(trace, fn, rho):
    """sch(trace, m, nan) was a raw 'cannot convert float NaN to integer', inf an OverflowError (issue 33)."""
    for level in ("model", "layer"):
        with pytest.raises(UsageError, match=r"^rho=.*: expected a finite number > 0"):
            fn(trace, 4, rho, level=level)


def test_sch_rho_as_large_as_a_double_holds_every_key(trace):
    """rho = 1.8e308 made rho * width overflow to inf and int(round(inf)) raise (the api campaign's one finding):
    a capacity above the distinct ids is the same cache as one of exactly them."""
    for level in ("model", "layer"):
        for fn in (sch, static_sch):
            np.testing.assert_array_equal(
                fn(trace, 4, 1.7976931348623157e308, level=level), fn(trace, 4, 8.0, level=level)
            )


def test_sch_rho_too_small_for_one_slot_names_the_least(trace):
    with pytest.raises(UsageError, match=r"rho=0.1 gives a capacity of 0 slots .* expected rho >= 0.25"):
        sch(trace, 4, 0.1, level="layer")  # k = 2 ids per row


def test_srp_window_longer_than_the_trace_refused_before_any_allocation(trace, tmp_path):
    """srp(trace, 1_000_000_000) asked numpy for [L, m + 1] int64 (7.5-14.9 GiB); now a UsageError naming m and the
    trace length, inside a 256 MiB address space above the interpreter's (issue 33)."""
    from moelite.cache_policies import save_trace

    save_trace(trace, tmp_path / "t.npz")
    code = textwrap.dedent(f"""
        import resource
        import numpy as np
        from moelite.cache_policies import load_trace, srp, srp_many, sch, static_sch
        from moelite.errors import UsageError
        t = load_trace({str(tmp_path / "t.npz")!r})
        with open("/proc/self/status") as f:
            vm = next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20),) * 2)
        calls = [lambda: srp(t, 1_000_000_000), lambda: srp_many(t, [4, 10**9]), lambda: srp(t, np.int64(2**62)),
                 lambda: sch(t, 10**9), lambda: static_sch(t, 2**63)]
        for call in calls:
            try:
                call()
            except UsageError as e:
                print(e)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 5, r.stdout
    assert lines[0] == (
        f"m=1000000000: expected an integer in [1, {trace.n_tokens}] "
        f"(a segment length no longer than the trace's {trace.n_tokens} tokens)"
    )
    assert lines[1].startswith("ms[1]=1000000000: expected an integer in [1, 72]")


def test_srp_windows_up_to_the_trace_length(trace):
    """m = n_tokens is allowed (no window fits a sequence of 24: nan), m = 24 has windows, m = 73 is refused."""
    assert np.isnan(srp(trace, trace.n_tokens).value) and np.isnan(static_sch(trace, trace.n_tokens))
    assert 0 <= srp(trace, 24).value <= 1 and 0 <= sch(trace, trace.n_tokens) <= 1
    assert srp(trace, np.int64(8)) == srp(trace, 8)
    for bad in (trace.n_tokens + 1, 0, 8.0, True, NAN):
        with pytest.raises(UsageError, match="m="):
            srp(trace, bad)
    with pytest.raises(UsageError, match="ms=4: expected a list"):
        srp_many(trace, 4)


def test_long_windows_count_exactly_without_m_squared_bins(monkeypatch):
    """_sweep's histogram of (f, length) pairs needs (m + 1)^2 bins; past _PAIR_BINS it weighs a bincount instead:
    the same counts, memory proportional to the trace."""
    rng = np.random.default_rng(5)
    ids = np.argsort(rng.random((3000, 2, 8)), axis=-1)[..., :2]
    keep = rng.random((3000, 2)) < 0.8
    for t in range(1, 3000):
        ids[t, keep[t]] = ids[t - 1, keep[t]]
    trace = Trace.from_sequences([ids[:1800], ids[1800:]], n_expert=8)
    ms = [3, 40, 700]
    monkeypatch.setattr(metrics, "_PAIR_BINS", 1 << 40)
    pairs = metrics.f_histograms(trace, ms)
    monkeypatch.setattr(metrics, "_PAIR_BINS", 0)
    weighted = metrics.f_histograms(trace, ms)
    for a, b in zip(pairs, weighted):
        assert a.dtype == b.dtype == np.int64 and np.array_equal(a, b)


def test_simulate_and_calibrate_arguments(trace):
    L, k, E = trace.n_layers, trace.k, trace.n_expert
    for kw, needle in [
        ({"total_slots": NAN}, "total_slots=nan: expected an integer"),
        ({"total_slots": 2**63}, "total_slots=9223372036854775808: expected an integer in"),
        ({"total_slots": L * k - 1}, f"needs at least {k} slots"),
        ({"precision": NAN, "prefetch": True}, r"precision=nan: expected a finite number in \[0, 1\] or None"),
        ({"seed": -1, "prefetch": True, "precision": 0.5}, r"seed=-1: expected an integer in \[0, 2\^63 - 1\]"),
        ({"m": 2**31}, r"m=2147483648: expected an integer in \[1, 2\^31 - 1\]"),
        ({"shares": [NAN] * L}, r"shares\[0\]=nan: expected a finite number >= 0"),
        ({"shares": "0.5"}, "shares must be a list of numbers"),
    ]:
        args = {"total_slots": L * k * 2, **kw}
        with pytest.raises(UsageError, match=needle):
            simulate(trace, "lru", args.pop("total_slots"), **args)
    r = simulate(trace, "lru", np.int64(L * k * 2), precision=np.float32(0.5), prefetch=True, seed=np.uint8(3))
    assert r.to_dict() == simulate(trace, "lru", L * k * 2, precision=0.5, prefetch=True, seed=3).to_dict()
    t0 = time.monotonic()
    with pytest.raises(UsageError, match=rf"budget=1000000000: expected an integer in \[{L * k}, {L * E}\]"):
        calibrate(trace, 10**9)  # spread() gave the slots out one by one: it looped for ever
    assert time.monotonic() - t0 < 5
    with pytest.raises(UsageError, match=r"ms\[1\]=0"):
        calibrate(trace, L * k * 2, ms=(4, 0))  # m = 0 was silently simulated as 16
    with pytest.raises(UsageError, match="precision=inf"):
        calibrate(trace, L * k * 2, precision=INF, prefetch=True)
    with pytest.raises(UsageError, match="must be a moelite.cache_policies.Trace"):
        srp(None, 4)


# ---- load options ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"n_ctx": NAN}, r"n_ctx=nan: expected an integer in \[0, 2\^31 - 1\] or None"),
        ({"n_ctx": 2.0**40}, "n_ctx=1099511627776.0"),
        ({"n_threads": 2**40}, r"n_threads=1099511627776: expected an integer in \[0, 512\]"),
        ({"n_threads": True}, "n_threads=True"),
        ({"n_ubatch": 0}, r"n_ubatch=0: expected an integer in \[1, 65536\]"),
        ({"n_io_threads": 1e9}, r"n_io_threads=1000000000.0: expected an integer in \[0, 64\]"),
        ({"prefetch_depth": 0}, r"prefetch_depth=0: expected an integer in \[1, 3\]"),
        ({"prefetch_depth": 2.5}, r"prefetch_depth=2.5: expected an integer in \[1, 3\]"),
        ({"gpu": -1}, "gpu=-1"),
        ({"state_snapshots": -1}, r"state_snapshots=-1: expected an integer in \[0, 2\^31 - 1\]"),
        ({"swap_threshold": INF}, r"swap_threshold=inf: expected a finite number in \[0, 1\)"),
        ({"swap_threshold": 1.0}, "swap_threshold=1.0"),
        ({"standin_threshold": NAN}, r"standin_threshold=nan: expected a finite number in \(0, 1\]"),
        ({"policy": "consistency", "policy_window": 2**31}, r"policy_window=2147483648: expected an integer"),
        ({"policy_window": "16"}, "policy_window='16'"),
        ({"cache_shares": [NAN, 1.0]}, r"shares\[0\]=nan"),
        ({"host_slots": 2**31}, r"host_slots\[0\]=2147483648: expected an integer in \[0, 8\]"),
        ({"host_slots": [1.5, 2]}, r"host_slots\[0\]=1.5"),
        ({"kv_type": ["f16"]}, "kv_type"),
        ({"policy": 3}, "unknown cache policy 3"),
    ],
)
def test_bad_load_option_names_it_and_its_range(gguf, kw, needle):
    with pytest.raises(UsageError, match=needle):
        moelite.load(gguf, **kw)


@pytest.mark.parametrize("kw", [{"memory_budget": NAN}, {"memory_budget": -5}, {"vram_budget": INF}])
def test_bad_budget_on_every_device(gguf, kw):
    """vram_budget was never looked at on the CPU: a NaN passed silently."""
    with pytest.raises(BudgetError, match="budget"):
        moelite.load(gguf, **kw)


def test_numpy_load_options_load_as_python_ones(gguf, model):
    ref = model.generate([1, 2, 3], max_tokens=3, stop_ids=[])
    with moelite.load(
        gguf, n_ctx=np.int64(32), n_threads=np.int32(1), prefetch=False, swap_threshold=np.float32(0)
    ) as m:
        assert m.n_ctx == 32 and type(m.n_ctx) is int
        assert m.generate([1, 2, 3], max_tokens=np.int64(3), stop_ids=np.array([], np.int64)) == ref


def test_more_threads_than_cpus_run_as_many_as_cpus(gguf):
    cpus = len(os.sched_getaffinity(0))
    with pytest.warns(UserWarning, match=f"n_threads={cpus + 5} is more than the {cpus} CPUs"):
        m = moelite.load(gguf, n_ctx=16, n_threads=cpus + 5, prefetch=False)
    with m:
        assert m.info()["n_threads"] == cpus


# ---- generation options -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"temperature": NAN}, r"temperature=nan: expected a finite number >= 0"),
        ({"temperature": -INF}, "temperature=-inf"),
        ({"top_p": 0.0}, r"top_p=0.0: expected a finite number in \(0, 1\]"),
        ({"top_p": NAN}, "top_p=nan"),
        ({"top_k": True}, "top_k=True"),
        ({"top_k": 2**63}, r"top_k=9223372036854775808: expected an integer in \[0, 2\^63 - 1\]"),
        ({"min_p": INF}, r"min_p=inf: expected a finite number in \[0, 1\]"),
        ({"repetition_penalty": 0.0}, r"repetition_penalty=0.0: expected a finite number > 0"),
        ({"repeat_penalty": NAN}, "repetition_penalty=nan"),
        ({"seed": 2**63}, "seed=9223372036854775808"),
        ({"seed": 1.5}, "seed=1.5"),
        ({"max_tokens": 2**63}, r"max_tokens=9223372036854775808: expected an integer in \[0, 2\^63 - 1\]"),
        ({"max_tokens": INF}, "max_tokens=inf"),
        ({"stop_ids": [2**31]}, r"stop_ids\[0\]=2147483648: expected an integer in \[0, 2\^31 - 1\]"),
        ({"stop_ids": ["a"]}, r"stop_ids\[0\]='a'"),
    ],
)
def test_bad_generation_option_names_it_and_its_range(model, kw, needle):
    with pytest.raises(UsageError, match=needle):
        model.generate([1, 2, 3], max_tokens=kw.pop("max_tokens", 2), **kw)


@pytest.mark.parametrize("bad", [2**31, -1, 1.0, NAN, "5", None])
def test_bad_token_id(model, bad):
    with pytest.raises(UsageError, match=r"token_ids\[1\]=.*: expected an integer in \[0, 319\]"):
        model.generate([1, bad, 3], max_tokens=2)
    with pytest.raises(UsageError, match=r"token_ids\[1\]="):
        model.logits([1, bad])
    with pytest.raises(UsageError, match=r"first=.*: expected an integer in \[0, 2\]"):
        next(model.logits_blocks([1, 2, 3], bad))


def test_extreme_accepted_sampling_values_draw_no_nan():
    """A subnormal temperature divided logits into inf - inf = NaN (the draw then fell on either end of the
    candidates); a tiny repetition penalty pushed a seen positive logit past float64. Both now keep the favourite."""
    logits = np.array([1.0, 3.0, 2.0, -1.0], np.float32)
    cold = Sampler(SamplerConfig(temperature=5e-324, seed=1))
    assert {cold.sample(logits) for _ in range(50)} == {1}
    stuck = Sampler(SamplerConfig(temperature=1.0, repetition_penalty=1e-300, seed=2))
    assert {stuck.sample(logits, history=[2]) for _ in range(50)} == {2}  # 2.0 / 1e-300 overflowed to inf
    hot = Sampler(SamplerConfig(temperature=1e300, seed=3))
    assert {hot.sample(logits) for _ in range(400)} == {0, 1, 2, 3}


# ---- the command line -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv,needle",
    [
        (["run", "{gguf}", "-p", "x", "--repeat-penalty", "nan"], "--repeat-penalty: 'nan' is not a finite number > 0"),
        (["run", "{gguf}", "-p", "x", "--threads", "100000"], "--threads/-t: '100000' is not an integer in [1, 512]"),
        (["run", "{gguf}", "-p", "x", "--ctx-size", "4"], "--ctx-size/-c: '4' is not an integer in [8, 2^31 - 1]"),
        (["run", "{gguf}", "-p", "x", "--standin-threshold", "0"], "'0' is not a finite number in (0, 1]"),
        (["run", "{gguf}", "-p", "x", "--max-tokens", "1e3"], "'1e3' is not an integer in [0, 2^63 - 1]"),
        (["analyze", "{gguf}", "--text", "t.txt", "--budget-fraction", "nan"], "--budget-fraction: 'nan'"),
        (["analyze", "{gguf}", "--text", "t.txt", "--seq-len", "-5"], "--seq-len: '-5' is not an integer in [16,"),
        (["serve", "{gguf}", "--timeout", "inf"], "--timeout: 'inf' is not a finite number >= 0"),
    ],
)
def test_cli_flag_out_of_range_is_one_line(gguf, capsys, argv, needle):
    rc = cli.main([a.format(gguf=gguf) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("moelite: error: argument ") and err.count("\n") == 1, err
    assert needle in err and "Traceback" not in err
