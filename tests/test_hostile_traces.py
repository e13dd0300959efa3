"""Hostile routing traces and calibration side files (issue 15): a TraceError / ModelFormatError naming the file
and the field, never a raw zipfile/zlib/numpy exception, an int64 id wrapped to int32, or memory set by a number
in the file rather than by the trace's size."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
from fixture_models import fixture_gguf

import moelite
from moelite.cache_policies import Trace, load_trace, save_trace
from moelite.errors import ModelFormatError, TraceError


def good_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(3)]) for _ in range(20)]).astype(np.int32)
    return {
        "ids": ids,
        "offsets": np.array([0, 12, 20], np.int64),
        "layers": np.array([0, 1, 2], np.int32),
        "n_expert": np.int64(8),
        "model": np.str_("t"),
        "format_version": np.int64(1),
    }


def write(path, **arrays):
    np.savez(path, **arrays)
    return path


def expect_trace_error(path, *needles):
    with pytest.raises(TraceError) as e:
        load_trace(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for n in needles:
        assert n in msg, msg


def test_good_trace_round_trips(tmp_path):
    t = load_trace(write(tmp_path / "t.npz", **good_arrays()))
    save_trace(t, tmp_path / "u.npz")
    assert (load_trace(tmp_path / "u.npz").ids == t.ids).all()


@pytest.mark.parametrize(
    "field,value",
    [
        ("ids", lambda a: a["ids"].astype(np.int64) + np.int64(2**32)),  # 2**32 + 3 must not load as 3
        ("layers", lambda a: np.array([0, 1, 2**32], np.int64)),
        ("layers", lambda a: np.array([0, 1, 2**63 + 5], np.uint64)),
        ("offsets", lambda a: np.array([0, 2**64 - 1, 20], np.uint64)),
        ("n_expert", lambda a: np.int64(10**9)),
        ("n_expert", lambda a: np.float64(8.0)),
        ("scores", lambda a: np.full(a["ids"].shape, np.nan, np.float32)),
        ("model", lambda a: np.arange(3)),
    ],
)
def test_bad_field(tmp_path, field, value):
    arrays = good_arrays()
    arrays[field] = value(arrays)
    expect_trace_error(write(tmp_path / "t.npz", **arrays), field)


def per_sequence(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """good_arrays() in the per-sequence layout: ids_0, ids_1 (and lookahead_ids_0, ...) without offsets."""
    out = {k: v for k, v in arrays.items() if k not in ("ids", "offsets", "lookahead_ids", "lookahead_far")}
    off = arrays["offsets"]
    for name in ("ids", "lookahead_ids", "lookahead_far"):
        if name in arrays:
            for s in range(len(off) - 1):
                out[f"{name}_{s}"] = arrays[name][off[s] : off[s + 1]]
    return out


def lookahead(ids: np.ndarray) -> np.ndarray:
    return np.concatenate([ids[:, 1:], np.full((len(ids), 1, ids.shape[2]), -1, ids.dtype)], axis=1)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["savez", "savez_compressed"])
@pytest.mark.parametrize("key", ["ids_1", "ids_0", "lookahead_ids_1"])
@pytest.mark.parametrize(
    "shift",
    [
        lambda a: a.astype(np.int64) + np.int64(2**32),
        lambda a: a.astype(np.int64) - np.int64(3 * 2**32),  # negative ids that wrap to valid ones
        lambda a: a.astype(np.int64) + np.int64(2**62),
        lambda a: a.astype(np.uint64) + np.uint64(2**32),
        lambda a: np.where(np.arange(a.size).reshape(a.shape) == 5, a.astype(np.int64) + 2**33, a),  # one id
    ],
    ids=["+2^32", "-3*2^32", "+2^62", "uint64+2^32", "one id +2^33"],
)
def test_per_sequence_ids_shifted_by_k_2_32(tmp_path, save, key, shift):
    """Issue 33: a per-sequence trace whose int64 ids were shifted by k * 2^32 (savez_compressed) loaded and was
    simulated with other ids (the int32 cast wrapped them back into range). Refused in every layout, naming the
    file and the key, before any cast."""
    arrays = good_arrays()
    arrays["lookahead_ids"] = lookahead(arrays["ids"])
    seq = per_sequence(arrays)
    assert (load_trace(write(tmp_path / "ok.npz", **seq)).ids == arrays["ids"]).all()  # the layout itself loads
    seq[key] = shift(seq[key])
    assert (seq[key].astype(np.int64) != seq[key].astype(np.int32)).any()  # a cast would change it
    assert (seq[key].astype(np.int32) == per_sequence(arrays)[key]).all()  # ... back to the valid ids
    p = tmp_path / "t.npz"
    save(p, **seq)
    expect_trace_error(p, f"{key} holds", "outside the int32 range")


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["savez", "savez_compressed"])
@pytest.mark.parametrize("key", ["ids", "lookahead_ids"])
def test_flat_ids_shifted_by_k_2_32(tmp_path, save, key):
    arrays = good_arrays()
    arrays["lookahead_ids"] = lookahead(arrays["ids"])
    arrays[key] = arrays[key].astype(np.int64) + np.int64(5 * 2**32)
    p = tmp_path / "t.npz"
    save(p, **arrays)
    expect_trace_error(p, f"{key} holds", "outside the int32 range")


def test_not_a_zip(tmp_path):
    p = tmp_path / "t.npz"
    p.write_bytes(b"PK\x03\x04" + bytes(range(200)))
    expect_trace_error(p, "not a readable .npz")


def test_npy_given_as_npz(tmp_path):
    p = tmp_path / "t.npz"
    with open(p, "wb") as f:
        np.save(f, good_arrays()["ids"])
    expect_trace_error(p, "not a readable .npz")


def test_truncated(tmp_path):
    p = write(tmp_path / "t.npz", **good_arrays())
    p.write_bytes(p.read_bytes()[:-300])
    expect_trace_error(p)


def test_corrupt_deflate(tmp_path):
    p = tmp_path / "t.npz"
    np.savez_compressed(p, **good_arrays())
    data = bytearray(p.read_bytes())
    start = data.index(b"ids.npy") + 40  # inside the deflated member
    data[start : start + 30] = bytes(30)
    p.write_bytes(bytes(data))
    expect_trace_error(p)


def test_pickled_objects(tmp_path):
    arrays = good_arrays()
    arrays["model"] = np.array([{"a": 1}], dtype=object)
    p = tmp_path / "t.npz"
    np.savez(p, **arrays)
    expect_trace_error(p, "model")


def test_header_claims_more_than_stored(tmp_path):
    """An .npy header of shape [10**12, 3, 2] with 480 bytes behind it: refused before any allocation."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<i4", "fortran_order": False, "shape": (10**12, 3, 2)})
    p = tmp_path / "t.npz"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("ids.npy", buf.getvalue() + good_arrays()["ids"].tobytes())
        for k, v in good_arrays().items():
            if k != "ids":
                b = io.BytesIO()
                np.save(b, v)
                zf.writestr(k + ".npy", b.getvalue())
    expect_trace_error(p, "ids", "claims shape")


def test_memory_follows_the_trace_not_n_expert(tmp_path):
    """A 3-token trace naming the most experts allowed: srp, sch and simulate (with degraded predictions)
    run inside a 2 GiB address space."""
    ids = np.array([[[0, 1]] * 16, [[2, 3]] * 16, [[1, 0]] * 16], np.int32)
    save_trace(Trace(ids=ids, n_expert=1 << 16), tmp_path / "t.npz")
    code = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from moelite.cache_policies import load_trace, srp, sch, simulate
        t = load_trace({str(tmp_path / "t.npz")!r})
        srp(t, 2); sch(t, 2)
        for p in ("lru", "lfu", "lfuda", "belady", "consistency"):
            simulate(t, p, 64, prefetch=True, precision=0.5)
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


# ---- calibration side files ---------------------------------------------------------------------------------
@pytest.fixture()
def model_copy(tmp_path):
    dst = tmp_path / "m.gguf"
    shutil.copy(fixture_gguf("qwen3_moe")[1], dst)
    return dst


@pytest.mark.parametrize(
    "text,needles",
    [
        ("{not json", ["unreadable"]),
        ("[" * 100000 + "]" * 100000, ["unreadable"]),
        ("[1, 2]", ["expected a JSON object"]),
        ('{"moelite.calibration.policy": 5}', ["moelite.calibration.policy", "a string"]),
        ('{"moelite.calibration.policy": "fifo"}', ["moelite.calibration.policy", "lru"]),
        ('{"moelite.calibration.m": 1e400}', ["moelite.calibration.m"]),
        ('{"moelite.calibration.m": [3]}', ["moelite.calibration.m"]),
        ('{"moelite.calibration.m": 2147483648}', ["moelite.calibration.m=2147483648", "[1, 2^31 - 1]"]),
        ('{"moelite.calibration.hit_rate": 1' + "0" * 400 + "}", ["moelite.calibration.hit_rate"]),
        ('{"moelite.calibration.layer_shares": "ab"}', ["moelite.calibration.layer_shares"]),
        ('{"moelite.calibration.layer_shares": [0.5, {"a": [[[]]]}]}', ["moelite.calibration.layer_shares"]),
        ('{"moelite.calibration.layer_shares": [0.9, 0.9]}', ["sum to 1"]),
        (
            '{"moelite.calibration.layer_shares": [0.2, 0.3, 0.5], "moelite.calibration.layers": [0, 1]}',
            ["different numbers of layers"],
        ),
        ('{"moelite.calibration.m": -4, "moelite.calibration.policy": "consistency"}', ["moelite.calibration.m=-4"]),
    ],
)
def test_bad_calibration_side_file(model_copy, text, needles):
    side = model_copy.with_name(model_copy.name + ".calibration.json")
    side.write_text(text)
    with pytest.raises(ModelFormatError) as e:
        moelite.load(model_copy)
    msg = str(e.value)
    assert str(side) in msg, msg
    for n in needles:
        assert n in msg, msg


def test_good_calibration_side_file(model_copy):
    side = model_copy.with_name(model_copy.name + ".calibration.json")
    side.write_text(
        json.dumps(
            {
                "moelite.calibration.policy": "consistency",
                "moelite.calibration.m": 4,
                "moelite.calibration.layer_shares": [0.5, 0.5],
            }
        )
    )
    with moelite.load(model_copy) as m:
        assert m.policy.name == "consistency" and m.policy.m == 4


def test_calibration_shares_for_another_model_name_the_side_file(model_copy):
    """layer_shares with the wrong number of MoE layers (a side file of another model): refused naming the side
    file, with or without a budget (it was a planner BudgetError without the file, or ignored)."""
    side = model_copy.with_name(model_copy.name + ".calibration.json")
    side.write_text(json.dumps({"moelite.calibration.policy": "lru", "moelite.calibration.layer_shares": [0.2] * 5}))
    for budget in (None, "1GiB"):
        with pytest.raises(ModelFormatError, match="layer_shares has 5 entries") as e:
            moelite.load(model_copy, memory_budget=budget)
        assert str(side) in str(e.value)


def lookahead_far(ids: np.ndarray, depth: int = 2) -> np.ndarray:
    """[N, L, depth, k]: [t, l, j] = ids[t, l + 2 + j] (a perfect prediction), -1 past the last layer."""
    n, n_layers, k = ids.shape
    out = np.full((n, n_layers, depth, k), -1, ids.dtype)
    for j in range(depth):
        out[:, : max(n_layers - 2 - j, 0), j] = ids[:, 2 + j :]
    return out


@pytest.mark.parametrize("layout", ["flat", "per-sequence"])
def test_lookahead_far_round_trip(tmp_path, layout):
    """Predictions from further ahead (lookahead_far [N, L, D, k]) load in both layouts; `lookahead(d)` gives each
    distance and a perfect prediction has precision 1."""
    from moelite.cache_policies.metrics import lookahead_precision

    arrays = good_arrays()
    arrays["lookahead_ids"] = lookahead(arrays["ids"])
    arrays["lookahead_far"] = lookahead_far(arrays["ids"], depth=2)
    tr = load_trace(write(tmp_path / "t.npz", **(per_sequence(arrays) if layout == "per-sequence" else arrays)))
    assert tr.lookahead_depth == 3 and (tr.lookahead(2)[:, 0] == arrays["ids"][:, 2]).all()
    p = lookahead_precision(tr)  # 3 layers: distance 2 predicts layer 2 from layer 0 only, distance 3 nothing
    assert p[0, :2].tolist() == [1.0, 1.0] and p[1, 0] == 1.0 and np.isnan(p[1, 1:]).all() and np.isnan(p[2]).all()
    save_trace(tr, tmp_path / "again.npz")
    assert (load_trace(tmp_path / "again.npz").lookahead_far == tr.lookahead_far).all()
    with pytest.raises(moelite.errors.UsageError, match="distance 4 not recorded"):
        tr.lookahead(4)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda a: a["lookahead_far"][:, :, 0], "lookahead_far must be"),  # 3-D
        (lambda a: a["lookahead_far"][:, :2], "lookahead_far must be"),  # too few layers
        (lambda a: a["lookahead_far"].astype(np.float32), "integer dtype"),
        (lambda a: np.where(a["lookahead_far"] >= 0, a["lookahead_far"] + 8, -1), "outside"),
        (lambda a: np.where(a["lookahead_far"] >= 0, 3, -1), "repeats an expert id"),
    ],
    ids=["3-D", "layers", "float", "range", "repeat"],
)
def test_bad_lookahead_far(tmp_path, edit, match):
    arrays = good_arrays()
    arrays["lookahead_ids"] = lookahead(arrays["ids"])
    arrays["lookahead_far"] = edit({"lookahead_far": lookahead_far(arrays["ids"])})
    expect_trace_error(write(tmp_path / "t.npz", **arrays), match)


def test_lookahead_far_needs_lookahead_ids(tmp_path):
    arrays = good_arrays()
    arrays["lookahead_far"] = lookahead_far(arrays["ids"])
    expect_trace_error(write(tmp_path / "t.npz", **arrays), "lookahead_far without lookahead_ids")
