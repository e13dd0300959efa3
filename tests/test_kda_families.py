"""KDA (Kimi Delta Attention) families (issue 30): Kimi-Linear (KDA layers 3 : 1 with NoPE MLA, DeepSeek-V3 routing)
and Ling-3.0 (`bailingmoe3`: KDA with the bounded decay and full-rank gates, MLA with RoPE and a per-head gate,
grouped routing, SwiGLU clamps).

transformers 5.25 ships KimiLinearForCausalLM and BailingHybridForCausalLM: they are the reference (F32, eager). On a
tiny random instance of each:
- f32 logits within 1e-3 of transformers for a prompt, a prompt + decode steps, and 32 greedy tokens equal;
- prompts in chunks (ubatches of 3 and 7 tokens: the conv and delta states carried across) and prompt reuse through
  state snapshots give a fresh recomputation's logits / tokens;
- offloading at the smallest budget is bit-identical to resident; the state is counted in the budget;
- llama.cpp both ways: it runs moelite's GGUF, and moelite runs the GGUF llama.cpp's converter writes;
- the converter reads the release config layout (linear_attn_config, first_k_dense_replace) and the one
  transformers saves (layer_types, linear_*, mlp_layer_types) into the same file, and refuses what the GGUF cannot
  express.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from fixture_models import fixture_gguf
from hf_fixtures import KDA_FAMILIES, edited_copy, hf_greedy, hf_logits
from test_recurrent import test_generate_calls_sharing_a_prefix_equal_fresh_runs as check_prompt_reuse
from test_recurrent import test_state_is_counted_in_the_budget as check_state_budget
from test_release_configs import test_fixture_config_is_what_save_pretrained_writes as check_fixture_config
from test_release_configs import test_minimal_config_converts_to_the_same_gguf as check_minimal_config

import moelite
from moelite import _core
from moelite.converters import convert
from moelite.errors import ConversionError, ModelFormatError
from moelite.runtime.hparams import MIXER_KDA

PROMPT = [(7 * i + 3) % 320 for i in range(16)]


def logits(path, ids=PROMPT, **kw) -> np.ndarray:
    with moelite.load(path, kv_type="f32", n_threads=1, **kw) as m:
        return m.logits(ids)


@pytest.mark.parametrize("family", KDA_FAMILIES)
def test_logits_and_greedy_match_transformers(family):
    hf, path = fixture_gguf(family)
    assert float(np.abs(logits(path) - hf_logits(hf, PROMPT)).max()) <= 1e-3
    with moelite.load(path, kv_type="f32", n_threads=1) as m:
        greedy = m.generate(PROMPT[:5], max_tokens=32, stop_ids=[])
    assert greedy == hf_greedy(hf, PROMPT[:5], 32)


@pytest.mark.parametrize("family", KDA_FAMILIES)
def test_prompt_then_decode_steps_match_transformers(family):
    """The prompt in one ubatch, then three single-token steps through the recurrent state and the MLA cache."""
    hf, path = fixture_gguf(family)
    steps = [123, 45, 6]
    with moelite.load(path, kv_type="f32", n_threads=1) as m:
        out = [m.eval(PROMPT)] + [m.eval([t]) for t in steps]
    ref = hf_logits(hf, PROMPT + steps)
    for i, row in enumerate(out):
        assert float(np.abs(row - ref[len(PROMPT) - 1 + i]).max()) <= 1e-3


@pytest.mark.parametrize("family", KDA_FAMILIES)
def test_prompt_in_chunks_equals_one_batch(family):
    hf, path = fixture_gguf(family)
    whole = logits(path)
    assert float(np.abs(whole - hf_logits(hf, PROMPT)).max()) <= 1e-3
    for n_ubatch in (3, 7):
        chunked = logits(path, n_ubatch=n_ubatch)
        assert float(np.abs(chunked - whole).max()) <= 1e-5
        assert np.array_equal(chunked.argmax(-1), whole.argmax(-1))


@pytest.mark.parametrize("family", KDA_FAMILIES)
def test_prompt_reuse_equals_fresh_runs(family):
    """test_recurrent's check on the KDA families: an extension of the cached context, a divergence from the
    generated tokens and one inside the prompt (state snapshots restored) each give a fresh model's tokens."""
    check_prompt_reuse(family)


@pytest.mark.parametrize("family", KDA_FAMILIES)
def test_smallest_budget_is_bit_exact(family):
    _, path = fixture_gguf(family)
    ids = list(range(5, 37))

    def run(**kw):
        with moelite.load(path, kv_type="f32", n_threads=1, n_ubatch=64, **kw) as m:
            return m.logits(ids), m.generate(ids[:4], max_tokens=32, stop_ids=[]), m.stats(), m.info()

    lo, gr, _, _ = run()
    with moelite.load(path, kv_type="f32", n_threads=1, n_ubatch=64) as m:
        minimum = m.plan.minimum_budget
    lo_s, gr_s, stats, info = run(memory_budget=minimum)
    assert info["offloaded"] and all(q in (0, info["n_expert_used"]) for q in info["expert_slots"])
    assert np.array_equal(lo_s, lo) and gr_s == gr
    assert stats["total"]["misses"] > 0 and stats["total"]["bytes_read"] > 0


@pytest.mark.parametrize("family", KDA_FAMILIES)
def test_state_is_counted_in_the_budget(family):
    """Per KDA layer: the q / k / v conv inputs [K - 1, 3 H S] and the delta state [S, S, H], f32; then
    test_recurrent's check (the planner counts the live state and its snapshots; a budget short of it is refused)."""
    _, path = fixture_gguf(family)
    with moelite.load(path, kv_type="f32", n_threads=1) as m:
        hp, state = m.hparams, m.info()["state_bytes"]
    S, H, K = hp["ssm_d_state"], hp["ssm_dt_rank"], hp["ssm_conv_kernel"]
    assert hp["layer_mixer"].count(MIXER_KDA) == 3
    assert state == 3 * 4 * ((K - 1) * 3 * H * S + S * S * H)
    check_state_budget(family)


@pytest.mark.parametrize(
    "family,key,value",
    [
        ("kimi_linear", "kimi-linear.kda.head_dim", 0),
        ("kimi_linear", "kimi-linear.ssm.conv_kernel", 1),
        ("kimi_linear", "kimi-linear.kda.head_dim", 1 << 30),
        ("bailing_hybrid", "bailingmoe3.kda.gate_lower_bound", 1.0),
    ],
)
def test_bad_state_sizes_are_format_errors(family, key, value):
    from moelite.runtime.validate import load_hparams

    _, path = fixture_gguf(family)
    meta = _core.read_gguf(str(path))
    tensors = {n: (t, s, o, b) for n, t, s, o, b in meta["tensors"]}
    with pytest.raises(ModelFormatError, match=key.split(".", 1)[1]):
        load_hparams(str(path), {**meta["kv"], key: value}, tensors)


def kimi_release_layout(hf, out):
    """The fixture as Kimi-Linear's release config.json states it: linear_attn_config and first_k_dense_replace
    only (no layer_types, linear_* or mlp_layer_types), the release's key names, and the dense layer's MLP under
    `mlp.` (transformers saves it under `block_sparse_moe.`, which llama.cpp's converter cannot map)."""
    d = edited_copy(
        hf, out, lambda ts: {k.replace("layers.0.block_sparse_moe.", "layers.0.mlp."): v for k, v in ts.items()}
    )
    cfg = json.loads((d / "config.json").read_text())
    for k in ("layer_types", "mlp_layer_types", "linear_head_dim", "linear_num_heads", "linear_conv_kernel_dim"):
        cfg.pop(k)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize(
    "family,override,key",
    [
        ("kimi_linear", {"linear_attn_config": {"num_heads": 2}, "linear_num_heads": 2}, "linear_num_heads"),
        ("kimi_linear", {"moe_renormalize": False}, "moe_renormalize"),
        ("kimi_linear", {"moe_router_activation_func": "softmax"}, "moe_router_activation_func"),
        ("kimi_linear", {"layer_types": ["linear_attention"] * 3}, "layer_types"),
        ("bailing_hybrid", {"kda_safe_gate": False}, "kda_safe_gate"),
        ("bailing_hybrid", {"kda_lower_bound": 0.5}, "kda_lower_bound"),
        ("bailing_hybrid", {"expert_swiglu_limit_list": [0.0, 1.0]}, "expert_swiglu_limit_list"),
    ],
)
def test_converter_refuses_what_the_gguf_cannot_express(tmp_path, family, override, key):
    hf, _ = fixture_gguf(family)
    d = edited_copy(hf, tmp_path / "hf", lambda ts: ts)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **override}))
    with pytest.raises(ConversionError, match=key):
        convert(d, tmp_path / "bad.gguf", "f32", progress=False)
    assert not (tmp_path / "bad.gguf").exists()


def hf_logits_l2_eps(hf, ids, eps: float) -> np.ndarray:
    """transformers' logits with KDA's q / k L2 norm taking `eps` instead of FLA's 1e-6: llama.cpp's kimi-linear
    graph normalises with the model's rms_norm_eps (build_gdn_l2_norm). On this fixture, whose q / k are small
    (|q|^2 ~ 1e-3), that alone moves llama.cpp's logits by ~1.5e-2 from transformers'; with it they agree to 1e-6."""
    import torch
    from hf_fixtures import _load

    def l2norm(x, dim=-1, eps_unused=1e-6, **_):
        return x / torch.sqrt((x * x).sum(dim=dim, keepdim=True) + eps)

    model = _load(hf)
    kda_module = sys.modules[type(model).__module__]  # the family's modeling file: its own copy of l2norm
    saved = kda_module.l2norm
    kda_module.l2norm = l2norm
    try:
        with torch.no_grad():
            return model(torch.tensor([list(ids)])).logits[0].float().numpy()
    finally:
        kda_module.l2norm = saved


@pytest.mark.slow
@pytest.mark.parametrize("family", KDA_FAMILIES)
def test_llama_cpp_runs_moelite_gguf(family):
    """llama.cpp runs moelite's file as transformers computes with llama.cpp's L2-norm eps (moelite keeps FLA's
    1e-6, so the two runtimes differ by that choice alone on these fixtures)."""
    from llama_cpp_ref import llama_cpp_logits

    hf, path = fixture_gguf(family)
    eps = json.loads((hf / "config.json").read_text())["rms_norm_eps"]
    ours = llama_cpp_logits(path, PROMPT)
    assert float(np.abs(ours - hf_logits_l2_eps(hf, PROMPT, eps)).max()) <= 1e-3
    assert float(np.abs(logits(path) - hf_logits(hf, PROMPT)).max()) <= 1e-3


def ling_release_layout(hf, out):
    """The Ling-3.0 fixture as its release config.json states it, which llama.cpp's converter reads (only verbatim:
    through AutoConfig its converter fails): the release class name, head_dim = the KDA head size
    (transformers rewrites it to qk_rope_head_dim and keeps the KDA size as linear_head_dim), n_group, the router's
    score_function, and the switches llama.cpp's converter insists on."""
    d = edited_copy(hf, out, lambda ts: ts)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["BailingMoeV3ForCausalLM"]
    cfg["head_dim"] = cfg.pop("linear_head_dim")
    cfg["n_group"] = cfg.pop("num_expert_group")
    for k in ("linear_num_heads", "linear_conv_kernel_dim", "layer_types", "mlp_layer_types"):
        cfg.pop(k)
    cfg.update(
        score_function="sigmoid",
        norm_topk_prob=cfg["moe_renormalize"],
        moe_shared_expert_intermediate_size=cfg["moe_intermediate_size"] * cfg["num_shared_experts"],
        no_kda_lora=True,
        gated_attention_proj_granularity_type="head_wise",
    )
    (d / "config.json").write_text(json.dumps(cfg))
    return d


RELEASE_LAYOUTS = {"kimi_linear": (kimi_release_layout, ()), "bailing_hybrid": (ling_release_layout, ("--raw-config",))}


@pytest.mark.parametrize("family", KDA_FAMILIES)
def test_release_layout_converts_to_the_same_file(family, tmp_path):
    hf, path = fixture_gguf(family)
    rel = RELEASE_LAYOUTS[family][0](hf, tmp_path / "hf")
    convert(rel, tmp_path / "rel.gguf", "f32", progress=False)
    a, b = _core.read_gguf(str(path)), _core.read_gguf(str(tmp_path / "rel.gguf"))
    arch = a["kv"]["general.architecture"] + "."
    arch_kv = lambda r: {k: np.asarray(v).tolist() for k, v in r["kv"].items() if k.startswith(arch)}  # noqa: E731
    assert arch_kv(a) == arch_kv(b)
    assert sorted((t[0], list(t[2])) for t in a["tensors"]) == sorted((t[0], list(t[2])) for t in b["tensors"])
    assert np.array_equal(logits(tmp_path / "rel.gguf"), logits(path))
    assert float(np.abs(logits(path) - hf_logits(rel, PROMPT)).max()) <= 1e-3  # transformers reads it the same


@pytest.mark.parametrize("family", KDA_FAMILIES)
def test_config_defaults(family, tmp_path):
    """test_release_configs' checks: the fixture's config.json is what save_pretrained writes (plus the release keys),
    and without the keys at their class defaults it converts to the same GGUF (the family's DEFAULTS are right)."""
    check_fixture_config(family)
    check_minimal_config(family, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", KDA_FAMILIES)
def test_moelite_runs_llama_cpp_gguf(family, tmp_path):
    """llama.cpp's converter on the release layout (Kimi-Linear: linear_attn_config, first_k_dense_replace,
    moe_router_activation_func, the dense MLP under `mlp.`; Ling-3.0: ling_release_layout): moelite agrees with
    transformers."""
    from llama_cpp_ref import pinned_convert

    hf, _ = fixture_gguf(family)
    layout, extra = RELEASE_LAYOUTS[family]
    theirs = pinned_convert(layout(hf, tmp_path / "hf"), tmp_path / "theirs.gguf", *extra)
    assert float(np.abs(logits(theirs) - hf_logits(hf, PROMPT)).max()) <= 1e-3
