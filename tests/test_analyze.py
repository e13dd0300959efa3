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
    assert "recommended for" in out and "gate lookahead precision" in out
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    look = rep["lookahead_precision"]  # 2 MoE layers: only the next one can be predicted
    assert look["distance"] == [1, 2, 3] and 0 <= look["by_distance"][0] <= 1 and look["by_distance"][1:] == [None] * 2
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


def test_lookahead_at_every_distance_is_the_later_router_on_this_layers_input():
    """trace.lookahead(d)[t, l] is the top-k of routed layer l + d's router applied to layer l's FFN input (the
    residual stream after l's attention), for d = 1 .. 3: checked against transformers' Qwen3-MoE (F32, 5 MoE layers)
    by hooking each layer's post-attention norm; lookahead_precision is the share of layer l + d's experts it names."""
    import numpy as np
    import torch
    import transformers

    from moelite.cache_policies.metrics import lookahead_precision

    hf, path = fixture_gguf("qwen3_moe", num_hidden_layers=5)
    tokens = list(range(5, 45))
    with moelite.load(path, record_trace=True, n_threads=1) as m:
        m.logits(tokens)
        tr = m.trace()
    assert tr.lookahead_depth == 3 and tr.lookahead_far.shape == (40, 5, 2, 2)
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    layers = ref.model.layers
    h = {}
    hooks = [
        layer.post_attention_layernorm.register_forward_pre_hook(
            lambda mod, a, i=i: h.__setitem__(i, a[0].reshape(-1, a[0].shape[-1]))
        )
        for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        ref(torch.tensor([tokens]))
        for hook in hooks:  # before the norms are called again below
            hook.remove()
        k = ref.config.num_experts_per_tok
        for d in (1, 2, 3):
            got = tr.lookahead(d)
            for li in range(5 - d):
                target = layers[li + d]
                logits = target.mlp.gate.weight @ target.post_attention_layernorm(h[li]).T  # [E, T]
                want = torch.topk(logits.T, k).indices.numpy()
                assert (np.sort(got[:, li], axis=1) == np.sort(want, axis=1)).all(), (d, li)
            assert (got[:, 5 - d :] == -1).all()  # nothing that far past the last layer
    p = lookahead_precision(tr)
    assert p.shape == (3, 5) and np.isnan(p[2, 2:]).all() and np.isnan(p[0, 4])
    named = [(tr.lookahead(2)[:, 0, :, None] == tr.ids[:, 2, None, :]).any(-1).mean()]
    assert p[1, 0] == named[0]
