"""The memory planner (runtime/planner.py) counts every family's per-layer shapes as the C++ core allocates them:
per-layer head counts and head sizes (KV cache), 2-matrix expert slots (Nemotron's ReLU² experts), latent and MLA
projections (dense weights), recurrent state; so at the smallest budget the model's own memory stays within it
(+ 10 %, the bound the README promises). Planning from config.json alone (converters/shapes.py, `moelite plan
--config`) gives the table the converted checkpoint has, and plans the release configs of tests/data/release_configs
(their parameter counts the published ones)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixture_models import RUNTIME_FAMILIES, fixture_gguf

import moelite
from moelite.converters.convert import describe
from moelite.converters.shapes import CONFIG_FAMILIES, count_params, describe_config

ALIGN_SLACK = 64 * 16  # ggml pads each dense tensor to its buffer alignment: a few tensors' worth of bytes


@pytest.mark.parametrize("family", RUNTIME_FAMILIES)
def test_plan_equals_the_core_at_the_minimum_budget(family):
    _, path = fixture_gguf(family)
    opts = dict(n_threads=1, n_ubatch=64, kv_type="f32")
    with moelite.load(str(path), **opts) as m:
        minimum = m.plan.minimum_budget
    with moelite.load(str(path), memory_budget=minimum, **opts) as m:
        info, plan = m.info(), m.plan
        assert info["offloaded"]
        assert plan.kv_bytes == info["kv_bytes"]
        assert sum(s * b for s, b in zip(plan.slots, plan.expert_slot_bytes)) == info["arena_bytes"]
        assert abs(plan.dense_bytes - info["dense_bytes"]) <= ALIGN_SLACK
        held = info["dense_bytes"] + info["kv_bytes"] + info["state_bytes"] + info["arena_bytes"] + plan.scratch_bytes
        assert held <= 1.10 * minimum, f"{family}: {held} bytes held for a budget of {minimum}"


# --- planning from config.json alone (converters/shapes.py, `moelite plan --config`) ---------------------------
RELEASES = Path(__file__).resolve().parent / "data" / "release_configs"
# published total parameters of each release (billions; the releases' model cards): the table from its
# config.json must count them within 3 % (trunk without MTP blocks)
PUBLISHED_TOTAL = {
    "hy3-preview": 295,
    "k-exaone-236b-a23b": 236,
    "laguna-xs.2": 33.2,
    "mimo-v2-flash": 309,
    "mistral-small-4": 119,
    "nemotron-3-nano-30b-a3b": 31.6,
    "north-mini-code-1.0": 30.5,
    "step-3.5-flash": 196,
    "trinity-mini": 26,
}


@pytest.mark.parametrize("model_type", CONFIG_FAMILIES)
def test_config_table_is_the_converted_table(model_type, tmp_path):
    """The tensor table planned from config.json alone is the one describe() reads off the checkpoint's weights
    (names, ggml types at Q4_K_M, shapes, bytes), and the keys are the same. A tiny checkpoint that lacks the MTP
    blocks its config promises (MiMo-V2's three, which config.json does not count; DeepSeek-V3's class default of
    one, which save_pretrained does not write) converts without them: planned from its config with none."""
    hf, _ = fixture_gguf(model_type)
    kv_w, weights = describe(str(hf), "q4_k_m")
    kv_c, config = describe_config(hf, "q4_k_m")
    arch = kv_c["general.architecture"]
    if kv_c.get(f"{arch}.nextn_predict_layers") and not kv_w.get(f"{arch}.nextn_predict_layers"):
        cfg = json.loads((hf / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 0}))
        kv_c, config = describe_config(tmp_path / "config.json", "q4_k_m")
    n_layer = int(kv_c[f"{arch}.block_count"]) - int(kv_c.get(f"{arch}.nextn_predict_layers", 0))
    held = {int(n.split(".")[1]) for n in weights if n.startswith("blk.")}
    config = {n: t for n, t in config.items() if not n.startswith("blk.") or int(n.split(".")[1]) in held}
    assert {n: (t[0], list(t[1]), t[3]) for n, t in config.items()} == {
        n: (t[0], list(t[1]), t[3]) for n, t in weights.items()
    }
    same = [k for k in kv_w if not k.startswith(("tokenizer.", "general.")) and k in kv_c]
    assert {k: kv_c[k] for k in same} == {k: kv_w[k] for k in same} and max(held) >= n_layer - 1


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTAL))
def test_release_config_counts_and_plans(name):
    """A release config.json (tests/data/release_configs) plans without weights: its parameter count is the
    published one, and at 16 GiB the memory plan fits the budget with the dense part resident."""
    from moelite.runtime.planner import plan_memory
    from moelite.runtime.validate import load_hparams

    kv, table = describe_config(RELEASES / f"{name}.json", "q4_k_m")
    n = count_params(kv, table)
    assert abs(n["total"] / 1e9 - PUBLISHED_TOTAL[name]) <= 0.03 * PUBLISHED_TOTAL[name], n
    assert 0 < n["active"] < n["total"]
    hp = load_hparams(name, kv, table, file_size=sum(t[3] for t in table.values()))
    plan = plan_memory(hp, table, budget=16 << 30, n_ctx=4096, n_ubatch=None, kv_elsize=2)
    assert plan.resident_bytes <= 16 << 30 and plan.dense_bytes > 0


def test_plan_cli_from_a_config(capsys, tmp_path, monkeypatch):
    """`moelite plan --config config.json --quant Q4_K_M --memory 16GiB`: the plan of the model it describes; a
    family whose table is not known from its config alone, or MODEL and --config both, are refused by name."""
    import json

    from moelite.apps.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "cache" / "moelite").mkdir(parents=True)
    machine = {"mem_bw": 10e9, "disk_bw": 1e9, "disk_method": "test"}
    (tmp_path / "cache" / "moelite" / "machine.json").write_text(json.dumps(machine))
    cfg = str(RELEASES / "laguna-xs.2.json")
    assert main(["plan", "--config", cfg, "--quant", "Q4_K_M", "--memory", "16GiB"]) == 0
    out = capsys.readouterr().out
    assert "laguna, 40 layers, 256 experts" in out and "offloaded" in out and "predicted" in out
    assert main(["plan", "--config", cfg, "--quant", "Q4_K_M", "--memory", "32GiB"]) == 0
    assert "everything resident" in capsys.readouterr().out
    hf, _ = fixture_gguf("phimoe")  # its table (LayerNorm and attention biases) is not known from config.json
    assert main(["plan", "--config", str(hf), "--memory", "1GiB"]) != 0
    assert "model_type 'phimoe'" in capsys.readouterr().err
    assert main(["plan", str(hf), "--config", cfg, "--memory", "1GiB"]) != 0
    assert "either MODEL" in capsys.readouterr().err
    for bad, key in (({"hidden_size": "big"}, "hidden_size"), ({"hidden_size": -5}, "embedding_length")):
        (tmp_path / "bad.json").write_text(json.dumps({**json.loads(Path(cfg).read_text()), **bad}))
        assert main(["plan", "--config", str(tmp_path / "bad.json"), "--memory", "1GiB"]) != 0
        assert key in capsys.readouterr().err
