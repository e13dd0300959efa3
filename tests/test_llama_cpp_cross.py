"""Cross-engine checks against the pinned llama.cpp (llama-cpp-python 0.3.36, F32 KV cache), both ways:

- llama.cpp loads every GGUF moelite converts, and its logits agree with moelite's within 1e-3;
- moelite loads the GGUFs llama.cpp's own converter writes for the wave-2 families (and with
  `--fuse-gate-up-exps`: fused `ffn_gate_up_exps` for any family), and agrees with transformers within 1e-3.

Runs in CI (.ci/run installs llama-cpp-python and sets MOELITE_REQUIRE_LLAMA_CPP=1: never skipped there).
"""

from __future__ import annotations

import numpy as np
import pytest
from fixture_models import RUNTIME_FAMILIES, fixture_gguf
from hf_fixtures import HYBRID_FAMILIES, WAVE2_FAMILIES, WAVE3_FAMILIES, hf_logits
from llama_cpp_ref import llama_cpp_logits, pinned_convert

import moelite
from moelite import _core

PROMPT = [(7 * i + 3) % 320 for i in range(12)]
# phimoe: llama.cpp's sparsemixer routing differs from transformers' (README.md, families table)
LLAMA_CPP_FAMILIES = [f for f in RUNTIME_FAMILIES if f != "phimoe"]


def moelite_logits(path, ids=PROMPT) -> np.ndarray:
    with moelite.load(path, kv_type="f32", n_threads=1) as m:
        return m.logits(ids)


@pytest.mark.slow
@pytest.mark.parametrize("family", LLAMA_CPP_FAMILIES)
def test_llama_cpp_runs_moelite_gguf(family):
    # Gemma-4: ggml-cpu's GELU reads an fp16 table (moelite computes it in f32): ~5e-4 on this fixture
    _, path = fixture_gguf(family)
    err = float(np.abs(llama_cpp_logits(path, PROMPT) - moelite_logits(path)).max())
    assert err <= 1e-3, f"{family}: llama.cpp vs moelite max |logit diff| = {err}"


def mimo_release_style(hf, out):
    """MiMo-V2-Flash as its release config.json states it: rope_theta / swa_rope_theta / partial_rotary_factor and no
    rope_parameters (transformers regenerates the same class defaults). llama.cpp's converter reads that only from
    config.json itself (`--raw-config`): through transformers 5.25's AutoConfig it fails (KeyError
    'partial_rotary_factor')."""
    import json

    from hf_fixtures import edited_copy

    d = edited_copy(hf, out, lambda ts: ts)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters")
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def step35_release_style(hf, out):
    """Step-3.5-Flash's text config as its release config.json states it (attention_other_setting, moe_layers_enum,
    rope_theta per layer + partial_rotary_factors, num_attention_groups, moe_num_experts / moe_top_k) without
    transformers' derived keys. llama.cpp's converter reads these only from config.json itself (`--raw-config`):
    transformers 5.25's AutoConfig consumes them (KeyError 'num_attention_groups')."""
    import json

    from hf_fixtures import edited_copy

    d = edited_copy(hf, out, lambda ts: ts)
    cfg = json.loads((d / "config.json").read_text())
    t = cfg["text_config"]
    for k in ("mlp_layer_types", "rope_parameters", "num_sliding_attention_heads", "per_layer_config"):
        t.pop(k)
    for new, old in (
        ("num_attention_groups", "num_key_value_heads"),
        ("moe_num_experts", "n_routed_experts"),
        ("moe_top_k", "num_experts_per_tok"),
    ):
        t[new] = t.pop(old)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.slow
@pytest.mark.parametrize("family", WAVE2_FAMILIES + HYBRID_FAMILIES + WAVE3_FAMILIES + ("qwen3_moe",))
def test_moelite_runs_llama_cpp_converted_gguf(family, tmp_path):
    hf, _ = fixture_gguf(family)
    if family == "granitemoehybrid":
        # llama.cpp's converter knows only the real checkpoints' layer_types vocabulary (mamba / attention); on
        # transformers 5's re-saved one (linear_attention / full_attention) it writes a broken file
        import json

        from hf_fixtures import edited_copy

        hf = edited_copy(hf, tmp_path / "hf", lambda ts: ts)
        cfg = json.loads((hf / "config.json").read_text())
        cfg["layer_types"] = ["mamba" if t == "linear_attention" else "attention" for t in cfg["layer_types"]]
        (hf / "config.json").write_text(json.dumps(cfg))
    extra = ()
    if family == "mimo_v2_flash":
        hf, extra = mimo_release_style(hf, tmp_path / "hf"), ("--raw-config",)
    if family == "step3p5":
        hf, extra = step35_release_style(hf, tmp_path / "hf"), ("--raw-config",)
    path = pinned_convert(hf, tmp_path / f"{family}.gguf", *extra)
    err = float(np.abs(moelite_logits(path) - hf_logits(hf, PROMPT)).max())
    assert err <= 1e-3, f"{family}: moelite on llama.cpp's GGUF vs transformers max |logit diff| = {err}"


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss", "llama4_text"])
def test_fused_gate_up_experts_exact(family, tmp_path):
    """Fused `ffn_gate_up_exps` (llama.cpp's --fuse-gate-up-exps layout; written here by moelite's converter with
    the same option, for any family): the expert slots hold its two halves, so logits equal those of the
    unfused file bit for bit, resident and at the smallest budget."""
    from moelite.converters import convert

    hf, ours = fixture_gguf(family)
    fused = tmp_path / f"{family}-fused.gguf"
    convert(hf, fused, "f32", progress=False, fuse_gate_up=True)
    names = {t[0] for t in _core.read_gguf(str(fused))["tensors"]}
    assert any(n.endswith("ffn_gate_up_exps.weight") for n in names)
    assert not any(n.endswith(("ffn_gate_exps.weight", "ffn_up_exps.weight")) for n in names)
    want = moelite_logits(ours)
    with moelite.load(fused, kv_type="f32", n_threads=1, n_ubatch=64) as m:
        assert np.array_equal(m.logits(PROMPT), want)
        minimum = m.plan.minimum_budget
    with moelite.load(fused, kv_type="f32", n_threads=1, n_ubatch=64, memory_budget=minimum) as m:
        assert m.info()["offloaded"]
        assert np.array_equal(m.logits(PROMPT), want)
        assert m.stats()["total"]["misses"] > 0


@pytest.mark.slow
def test_stock_fused_gemma4_gguf_offloads_exactly(tmp_path):
    """llama.cpp's converter writes Gemma-4's experts fused; moelite runs that file offloaded bit for bit."""
    hf, _ = fixture_gguf("gemma4_text")
    path = pinned_convert(hf, tmp_path / "gemma4.gguf")
    assert "blk.0.ffn_gate_up_exps.weight" in {t[0] for t in _core.read_gguf(str(path))["tensors"]}
    with moelite.load(path, kv_type="f32", n_threads=1, n_ubatch=64) as m:
        want = m.logits(PROMPT)
        minimum = m.plan.minimum_budget
    with moelite.load(path, kv_type="f32", n_threads=1, n_ubatch=64, memory_budget=minimum) as m:
        assert m.info()["offloaded"] and np.array_equal(m.logits(PROMPT), want)
