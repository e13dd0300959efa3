"""moelite analyze: records a real routing trace, writes the report (JSON + PNGs) and a calibration side
file that moelite.load then uses by default."""

from __future__ import annotations

import json
import shutil

from fixture_models import fixture_gguf

import moelite
from moelite.apps.cli import main as cli
from moelite.cache_policies.trace import load_trace

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    'want of a wife. def cache(x): return x + 1  # a comment\nfunc main() { fmt.Println("hi") }\n'
) * 20


def test_analyze_writes_report_and_calibration(tmp_path, capsys):
    _, src = fixture_gguf("qwen3_moe")
    model = tmp_path / "m.gguf"
    shutil.copy(src, model)
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    rc = cli(
        [
            "analyze",
            str(model),
            "--text",
            str(text),
            "--tokens",
            "300",
            "--seq-len",
            "100",
            "--threads",
            "1",
            "--out",
            str(tmp_path / "rep"),
            "--trace",
            str(tmp_path / "trace.npz"),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "recommended for" in out
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [r["m"] for r in rep["srp"]][:2] == [4, 16]
    for png in ("srp.png", "sch.png", "hit_rate.png", "layers.png", "experts.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 1000
    tr = load_trace(tmp_path / "trace.npz")
    assert tr.n_sequences == 3 and tr.ids.shape[1:] == (2, 2)
    side = json.loads((tmp_path / "m.gguf.calibration.json").read_text())
    policy = side["moelite.calibration.policy"]
    assert policy in ("lru", "lfu", "lfuda", "consistency")
    with moelite.load(model, memory_budget=None) as m:  # default: the calibrated policy
        assert m.policy.name == policy
    with moelite.load(model, policy="lru") as m:  # an explicit choice wins
        assert m.policy.name == "lru"
    with moelite.load(model, use_calibration=False) as m:  # no calibration: LFUDA (cache_policies/registry.py)
        assert m.policy.name == "lfuda"


def test_trace_matches_logits_routing():
    """The recorded ids are the experts the forward pass used: one sequence per fresh context, k ids per
    (token, layer), distinct, in range."""
    _, path = fixture_gguf("deepseek_v3")
    with moelite.load(path, record_trace=True, n_threads=1) as m:
        m.logits(list(range(3, 23)))
        m.logits(list(range(40, 50)))
        tr = m.trace()
    assert tr.n_sequences == 2 and tr.n_tokens == 30
    assert list(tr.layers) == [1, 2]  # deepseek's first layer is dense
    assert tr.ids.shape == (30, 2, 2)
    assert tr.lookahead_ids is not None and (tr.lookahead_ids[:, -1] == -1).all()
    assert ((tr.lookahead_ids[:, 0] >= 0) & (tr.lookahead_ids[:, 0] < tr.n_expert)).all()
