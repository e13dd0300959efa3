"""Low-bit stand-ins (issue 17, lossy, off by default): `moelite convert MODEL.gguf --standins q2_k` writes
MODEL.gguf.standins.gguf (every routed expert re-quantized, the model file untouched); `standins=True` gives the
side file's experts part of the expert budget, and in a one-token step a missing expert the router weighs at most
standin_threshold x the token's top weight runs as its stand-in instead of being read in full."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
from fixture_models import fixture_gguf

import moelite
from moelite import _core
from moelite.apps.cli import main as cli
from moelite.converters.standins import write_standins
from moelite.errors import ConversionError, ModelFormatError, UsageError

# K-quant rows (multiples of 256), 16 experts top-2, 2 layers: the stand-ins are real Q2_K / Q3_K blocks
SHAPES = dict(
    hidden_size=256,
    intermediate_size=256,
    moe_intermediate_size=256,
    head_dim=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=16,
    num_experts_per_tok=2,
)
IDS = list(range(5, 45))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("standins")
    path = d / "m.gguf"
    shutil.copy(fixture_gguf("qwen3_moe", type="q8_0", **SHAPES)[1], path)
    digest = hashlib.sha1(path.read_bytes()).hexdigest()
    rep = write_standins(path, "q2_k", progress=False)
    assert hashlib.sha1(path.read_bytes()).hexdigest() == digest  # the model file is not touched
    return path, rep


def _budget(path) -> int:
    """A budget that offloads: the minimum plus room for a few slots per layer."""
    with moelite.load(path, n_ubatch=64, kv_type="f32") as m:  # as _teacher opens it
        return m.plan.minimum_budget + 6 * 2 * max(m.plan.expert_slot_bytes)


def _teacher(path, **opts):
    """Logits of every forced token, decoded one token per step after a 4-token prompt."""
    with moelite.load(path, n_ubatch=64, n_threads=2, kv_type="f32", **opts) as m:
        rows = [m.eval(IDS[:4])] + [m.eval([t]) for t in IDS[4:-1]]
        return np.stack(rows), m.stats(), m.info()


def test_side_file_holds_every_expert_at_low_bits(model):
    path, rep = model
    side = _core.read_gguf(str(path) + ".standins.gguf")
    main = {n: (t, s) for n, t, s, _, _ in _core.read_gguf(str(path))["tensors"]}
    got = {n: (t, s) for n, t, s, _, _ in side["tensors"]}
    experts = {n for n in main if n.endswith("_exps.weight")}
    assert set(got) == experts
    for n in experts:
        assert list(got[n][1]) == list(main[n][1])
        assert got[n][0] in (10, 11)  # Q2_K, Q3_K (down, the q2_k mix)
    assert side["kv"]["moelite.standins.source_size"] == path.stat().st_size
    assert rep.file_size < 0.5 * sum(nb for n, _, _, _, nb in _core.read_gguf(str(path))["tensors"] if n in experts)


def test_standins_run_missing_experts_and_stay_close(model):
    path, _ = model
    budget = _budget(path)
    exact, st_exact, info_exact = _teacher(path, memory_budget=budget)
    approx, st, info = _teacher(path, memory_budget=budget, standins=True, standin_threshold=1.0)
    assert info_exact["offloaded"] and info["offloaded"]
    assert st_exact["total"]["standin_uses"] == 0 and st_exact["standins"] is None
    assert st["total"]["standin_uses"] > 0  # misses ran as stand-ins
    assert st["standins"]["misses"] > 0 and st["standins"]["bytes_read"] > 0  # read from the side file
    assert st["total"]["bytes_read"] < st_exact["total"]["bytes_read"]  # fewer full experts read
    assert sum(info["expert_slots"]) < sum(info_exact["expert_slots"])  # the stand-ins took part of the budget
    assert [s for s in info["standins"]["slots"] if s] == [2, 2] and info_exact["standins"] is None  # read on a miss
    assert st["memory"]["standin_arena_bytes"] > 0 and st_exact["memory"]["standin_arena_bytes"] == 0
    assert np.isfinite(approx).all()
    # a Q2_K copy of some experts moves the logits by a fraction of their spread, not more
    spread = exact.std(axis=1, keepdims=True)
    assert np.abs(approx - exact).max() > 0
    assert float(np.median(np.abs(approx - exact) / spread)) < 0.5


def test_standins_change_nothing_where_no_expert_is_missing(model):
    path, _ = model
    exact, _, _ = _teacher(path)  # resident: stand-ins never needed
    same, st, info = _teacher(path, standins=True)
    assert not info["offloaded"] and st["total"]["standin_uses"] == 0
    np.testing.assert_array_equal(same, exact)


def test_standins_all_in_memory_when_cheap_and_full_experts_read_for_later(tmp_path):
    """An F32 model: its Q2_K stand-ins cost under a quarter of the expert budget, so every stand-in stays in memory
    and a step that uses one also reads (prefetches) the full expert for the tokens after it."""
    path = tmp_path / "f.gguf"
    shutil.copy(fixture_gguf("qwen3_moe", type="f32", **SHAPES)[1], path)
    write_standins(path, "q2_k", progress=False)
    with moelite.load(path, n_ubatch=64, kv_type="f32") as m:  # as _teacher opens it
        budget = m.plan.minimum_budget + 10 * max(m.plan.expert_slot_bytes)
    _, st, info = _teacher(path, memory_budget=budget, standins=True, standin_threshold=1.0)
    assert info["offloaded"] and st["total"]["standin_uses"] > 0
    assert [s for s in info["standins"]["slots"] if s] == [16, 16]  # every stand-in fits
    assert st["standins"]["evictions"] == 0 and st["standins"]["hits"] > 0
    assert st["total"]["prefetch_issued"] > 0


def test_standin_errors_name_the_file(model, tmp_path):
    path, _ = model
    other = tmp_path / "o.gguf"
    shutil.copy(path, other)
    with pytest.raises(UsageError, match=r"o\.gguf\.standins\.gguf: no stand-in file.*--standins q2_k"):
        moelite.load(other, standins=True)
    with open(other, "ab") as f:  # the model changed since
        f.write(b"\0" * 4096)
    shutil.copy(str(path) + ".standins.gguf", str(other) + ".standins.gguf")
    with pytest.raises(ModelFormatError, match=r"standins\.gguf: made for a file of \d+ bytes"):
        moelite.load(other, standins=True)
    f16 = tmp_path / "h.gguf"  # stand-ins no smaller than the model
    shutil.copy(path, f16)
    write_standins(f16, "f16", progress=False)
    with pytest.raises(
        ModelFormatError, match=r"h\.gguf\.standins\.gguf: tensor 'blk\.0\.ffn_\w+_exps\.weight' has ggml type 1"
    ):
        moelite.load(f16, standins=True)
    with pytest.raises(UsageError, match="standin_threshold"):
        moelite.load(path, standins=True, standin_threshold=0.0)
    with pytest.raises(ConversionError, match="not 'keep'"):
        write_standins(path, "keep", tmp_path / "x.gguf", progress=False)
    assert not (tmp_path / "x.gguf").exists()


def test_convert_cli_writes_only_the_side_file_for_a_gguf(model, tmp_path, capsys):
    path, _ = model
    src = tmp_path / "c.gguf"
    shutil.copy(path, src)
    assert cli(["convert", str(src), "--standins", "q2_k", "--no-progress"]) == 0
    assert (tmp_path / "c.gguf.standins.gguf").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.gguf", "c.gguf.standins.gguf"]
