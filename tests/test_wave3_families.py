"""Wave-3 families beyond parity (test_runtime_parity.py), offload exactness (test_offload.py) and
llama.cpp both ways (test_llama_cpp_cross.py):

- a prompt then one decode step through the KV cache equals transformers' logits of prompt + token;
- MTP blocks as the release checkpoints hold them (K-EXAONE: `mtp.*`; Hy3: `model.layers.{n_layer}` + eh_proj /
  enorm / hnorm / final_layernorm) are kept as llama.cpp keeps them (blk.{n_layer}.nextn.*, `nextn_predict_layers`
  in block_count): the trunk's logits are unchanged bit for bit, the planner does not count them as resident,
  llama.cpp loads the file, moelite loads llama.cpp's own conversion, and a wrong MTP shape is refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fixture_models import fixture_gguf
from hf_fixtures import WAVE3_FAMILIES, WRAPPED, edited_copy, hf_logits

import moelite
from moelite import _core
from moelite.converters import convert
from moelite.errors import ConversionError

PROMPT = [(7 * i + 3) % 320 for i in range(12)]


def assert_refused(tmp_path, family: str, override: dict, key: str, drop: tuple[str, ...] = (), **fixture) -> None:
    """The family's fixture with its config.json changed by override (and the keys in drop removed) is refused by
    the converter with an error naming key, and nothing is written."""
    hf, _ = fixture_gguf(family, **fixture)
    cfg = {k: v for k, v in json.loads((hf / "config.json").read_text()).items() if k not in drop}
    d = edited_copy(hf, tmp_path / "hf", lambda ts: ts)
    (d / "config.json").write_text(json.dumps({**cfg, **override}))
    with pytest.raises(ConversionError, match=key):
        convert(d, tmp_path / "bad.gguf", "f32", progress=False)
    assert not (tmp_path / "bad.gguf").exists()


def logits(path, ids=PROMPT) -> np.ndarray:
    with moelite.load(path, kv_type="f32", n_threads=1) as m:
        return m.logits(ids)


@pytest.mark.parametrize("family", WAVE3_FAMILIES)
def test_prompt_then_one_decode_step_match_transformers(family):
    hf, path = fixture_gguf(family)
    nxt = 123
    with moelite.load(path, kv_type="f32", n_threads=1) as m:
        prompt = m.eval(PROMPT)  # [n_vocab] of the last prompt token
        step = m.eval([nxt])  # one step through the F32 KV cache
    ref = hf_logits(hf, PROMPT + [nxt])
    assert float(np.abs(prompt - ref[-2]).max()) <= 1e-3
    assert float(np.abs(step - ref[-1]).max()) <= 1e-3


def exaone_mtp(ts: dict, n_layer: int) -> dict:
    """K-EXAONE's MTP as its checkpoint stores it: mtp.layers.0.* a decoder block with a dense MLP (what
    llama.cpp's exaone-moe loader expects), and the projections shared by the MTP blocks."""
    out = dict(ts)
    for k, v in ts.items():
        if k.startswith(f"model.layers.{n_layer - 1}.") and ".mlp." not in k:
            out[k.replace(f"model.layers.{n_layer - 1}.", "mtp.layers.0.", 1)] = v + 0.01
        if k.startswith("model.layers.0.mlp."):
            out[k.replace("model.layers.0.", "mtp.layers.0.", 1)] = v * 0.5
    H = ts["model.norm.weight"].shape[0]
    rng = np.random.default_rng(3)
    out["mtp.fc.weight"] = rng.standard_normal((H, 2 * H)).astype(np.float32) * 0.02
    for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        out[f"mtp.{n}.weight"] = (1.0 + 0.1 * rng.standard_normal(H)).astype(np.float32)
    return out


def hy_v3_mtp(ts: dict, n_layer: int, head_norm: str = "final_layernorm", seed: int = 4) -> dict:
    """Hy3's MTP as its checkpoint stores it: one more decoder block (MoE; the last layer's copy + 0.01) at
    model.layers.{n_layer}, plus eh_proj / enorm / hnorm / final_layernorm. GLM-4.x and DeepSeek-V3 store theirs
    the same way, the head norm as shared_head.norm."""
    out = dict(ts)
    for k, v in ts.items():
        if k.startswith(f"model.layers.{n_layer - 1}."):
            out[k.replace(f"model.layers.{n_layer - 1}.", f"model.layers.{n_layer}.", 1)] = v + 0.01
    H = ts["model.norm.weight"].shape[0]
    rng = np.random.default_rng(seed)
    out[f"model.layers.{n_layer}.eh_proj.weight"] = rng.standard_normal((H, 2 * H)).astype(np.float32) * 0.02
    for n in ("enorm", "hnorm", head_norm):
        out[f"model.layers.{n_layer}.{n}.weight"] = (1.0 + 0.1 * rng.standard_normal(H)).astype(np.float32)
    return out


def mimo_mtp(ts: dict, n_layer: int) -> dict:
    """MiMo-V2's MTP as its release stores it: model.mtp.layers.{0,1,2}, each a decoder block with SWA attention
    (twice the KV heads, sinks: layer 1's shapes) and a dense MLP, plus eh_proj / enorm / hnorm / final_layernorm;
    config.json does not give the count (3, as llama.cpp hardcodes)."""
    out = dict(ts)
    H = ts["model.norm.weight"].shape[0]
    rng = np.random.default_rng(5)
    for i in range(N_MTP["mimo_v2_flash"]):
        p = f"model.mtp.layers.{i}."
        for k, v in ts.items():
            if k.startswith("model.layers.1.") and ".mlp." not in k:
                out[k.replace("model.layers.1.", p, 1)] = v + 0.01 * (i + 1)
            if k.startswith("model.layers.0.mlp."):
                out[k.replace("model.layers.0.", p, 1)] = v * 0.5
        out[p + "eh_proj.weight"] = rng.standard_normal((H, 2 * H)).astype(np.float32) * 0.02
        for n in ("enorm", "hnorm", "final_layernorm"):
            out[p + f"{n}.weight"] = (1.0 + 0.1 * rng.standard_normal(H)).astype(np.float32)
    return out


def step35_mtp(ts: dict, n_layer: int) -> dict:
    """Step-3.5's MTP as its release stores it: a decoder block (full attention with its gate, MoE + shared expert)
    at model.layers.{n_layer}, plus eh_proj / enorm / hnorm and transformer.shared_head.norm (zero-centred norms)."""
    out = dict(ts)
    for k, v in ts.items():
        if k.startswith(f"model.layers.{n_layer - 1}."):
            out[k.replace(f"model.layers.{n_layer - 1}.", f"model.layers.{n_layer}.", 1)] = v + 0.01
    H = ts["model.norm.weight"].shape[0]
    rng = np.random.default_rng(6)
    p = f"model.layers.{n_layer}."
    out[p + "eh_proj.weight"] = rng.standard_normal((H, 2 * H)).astype(np.float32) * 0.02
    for n in ("enorm", "hnorm", "transformer.shared_head.norm"):
        out[p + f"{n}.weight"] = (0.1 * rng.standard_normal(H)).astype(np.float32)
    return out


def cohere_mtp(ts: dict, n_layer: int) -> dict:
    """North's MTP as its release stores it: a full-attention MoE decoder block at model.layers.{n_layer} (one norm,
    parallel residual), plus eh_proj / enorm / hnorm / shared_head.norm."""
    out = dict(ts)
    for k, v in ts.items():
        if k.startswith(f"model.layers.{n_layer - 1}."):
            out[k.replace(f"model.layers.{n_layer - 1}.", f"model.layers.{n_layer}.", 1)] = v + 0.01
    return {**out, **_nextn_projections(ts["model.norm.weight"].shape[0], f"model.layers.{n_layer}.", 7)}


def nemotron_mtp(ts: dict, n_layer: int) -> dict:
    """Nemotron 3 Super's MTP as its release stores it: mtp.layers.0 the NoPE attention sub-layer (its norm, the
    mixer's q/k/v/o: block 2's shapes) with eh_proj / enorm / hnorm, mtp.layers.1 the (latent) MoE sub-layer
    (its norm, the mixer: block 5's shapes) with final_layernorm."""
    out = dict(ts)
    for k, v in ts.items():
        for src, dst in (("backbone.layers.2.", "mtp.layers.0."), (f"backbone.layers.{n_layer - 1}.", "mtp.layers.1.")):
            if k.startswith(src):
                out[k.replace(src, dst, 1)] = v + 0.01
    H = ts["backbone.norm_f.weight"].shape[0]
    proj = _nextn_projections(H, "mtp.layers.0.", 8)
    out.update({k: v for k, v in proj.items() if "shared_head" not in k})
    out["mtp.layers.1.final_layernorm.weight"] = proj["mtp.layers.0.shared_head.norm.weight"]
    return out


def _nextn_projections(H: int, prefix: str, seed: int) -> dict:
    """eh_proj [H, 2H] and the enorm / hnorm / shared_head.norm weights [H] of one MTP block."""
    rng = np.random.default_rng(seed)
    out = {prefix + "eh_proj.weight": rng.standard_normal((H, 2 * H)).astype(np.float32) * 0.02}
    for n in ("enorm", "hnorm", "shared_head.norm"):
        out[prefix + f"{n}.weight"] = (1.0 + 0.1 * rng.standard_normal(H)).astype(np.float32)
    return out


# the families whose release checkpoints hold MTP blocks; N_MTP: those whose config.json does not say how many
MTP = {
    "exaone_moe": exaone_mtp,
    "hy_v3": hy_v3_mtp,
    "mimo_v2_flash": mimo_mtp,
    "step3p5": step35_mtp,
    "cohere2_moe": cohere_mtp,
    "nemotron_h": nemotron_mtp,
}
N_MTP = {"mimo_v2_flash": 3}
# the MTP head's norm: nextn.shared_head_norm, or (MiMo-V2: final_layernorm, as llama.cpp maps it) layer_output_norm
HEAD_NORM = {"mimo_v2_flash": "layer_output_norm"}
# the MTP block's norm before its FFN: ffn_norm; Cohere's parallel block has one norm, Nemotron's MTP block
# post_attention_norm (llama.cpp's names)
FFN_NORM = {"cohere2_moe": "attn_norm", "nemotron_h": "post_attention_norm"}


def trunk_layers(family: str, cfg: dict) -> int:
    """The trunk's layers: num_hidden_layers, or (Nemotron-H as transformers saves it) its block list's length."""
    text = cfg["text_config"] if family in WRAPPED else cfg
    return text.get("num_hidden_layers") or len(text["layers_block_type"])


def with_mtp(family: str, out: Path) -> Path:
    hf, _ = fixture_gguf(family)
    cfg = json.loads((hf / "config.json").read_text())
    text = cfg.get("text_config", cfg) if family in WRAPPED else cfg
    n_layer = trunk_layers(family, cfg)
    d = edited_copy(hf, out, lambda ts: MTP[family](ts, n_layer))
    if family not in N_MTP:
        text = {**text, "num_nextn_predict_layers": 1}
        cfg = {**cfg, "text_config": text} if family in WRAPPED else text
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return d


@pytest.mark.parametrize("family", tuple(MTP))
def test_mtp_blocks_are_kept_checked_and_not_run(family, tmp_path):
    _, plain = fixture_gguf(family)
    hf = with_mtp(family, tmp_path / "hf")
    path = tmp_path / "mtp.gguf"
    convert(hf, path, "f32", progress=False)
    r = _core.read_gguf(str(path))
    arch = r["kv"]["general.architecture"]
    n_layer = trunk_layers(family, json.loads((hf / "config.json").read_text()))
    n_mtp = N_MTP.get(family, 1)
    assert r["kv"][f"{arch}.block_count"] == n_layer + n_mtp and r["kv"][f"{arch}.nextn_predict_layers"] == n_mtp
    names = {t[0]: list(t[2]) for t in r["tensors"]}
    H = names["output_norm.weight"][0]
    for il in range(n_layer, n_layer + n_mtp):
        assert names[f"blk.{il}.nextn.eh_proj.weight"] == [2 * H, H]
        for n in ("nextn.enorm", "nextn.hnorm", HEAD_NORM.get(family, "nextn.shared_head_norm")):
            assert names[f"blk.{il}.{n}.weight"] == [H]
        assert f"blk.{il}.attn_q.weight" in names and f"blk.{il}.{FFN_NORM.get(family, 'ffn_norm')}.weight" in names
        assert f"blk.{il}.ffn_down_exps.weight" in names or family in ("exaone_moe", "mimo_v2_flash")
    assert not any(n.startswith(f"blk.{n_layer + n_mtp}.") for n in names)

    want = logits(plain)
    with moelite.load(path, kv_type="f32", n_threads=1) as m:
        assert np.array_equal(m.logits(PROMPT), want)  # the trunk is the same model, bit for bit
        assert m.info()["n_layer"] == n_layer and m.info()["n_layer_nextn"] == n_mtp
        dense_mtp = m.plan.dense_bytes
    with moelite.load(plain, kv_type="f32", n_threads=1) as m:
        assert m.plan.dense_bytes == dense_mtp  # MTP blocks are not loaded, so not planned


@pytest.mark.slow
@pytest.mark.parametrize("family", tuple(MTP))
def test_mtp_gguf_both_ways_with_llama_cpp(family, tmp_path):
    from llama_cpp_ref import llama_cpp_logits, pinned_convert

    hf = with_mtp(family, tmp_path / "hf")
    ours = tmp_path / "ours.gguf"
    convert(hf, ours, "f32", progress=False)
    assert float(np.abs(llama_cpp_logits(ours, PROMPT) - logits(ours)).max()) <= 1e-3
    extra = ()
    if family == "mimo_v2_flash":  # llama.cpp's converter reads MiMo-V2 only from config.json itself
        from test_llama_cpp_cross import mimo_release_style

        hf, extra = mimo_release_style(hf, tmp_path / "hf-release"), ("--raw-config",)
    if family == "step3p5":  # and Step-3.5 (AutoConfig consumes its release keys)
        from test_llama_cpp_cross import step35_release_style

        hf, extra = step35_release_style(hf, tmp_path / "hf-release"), ("--raw-config",)
    theirs = pinned_convert(hf, tmp_path / "theirs.gguf", "--keep-mtp", *extra)
    r = _core.read_gguf(str(theirs))
    assert r["kv"][f"{r['kv']['general.architecture']}.nextn_predict_layers"] == N_MTP.get(family, 1)
    assert float(np.abs(logits(theirs) - hf_logits(hf, PROMPT)).max()) <= 1e-3


@pytest.mark.parametrize("family", tuple(MTP))
def test_mtp_block_of_a_wrong_shape_is_refused_by_name(family, tmp_path):
    hf = with_mtp(family, tmp_path / "hf")
    key = "mtp.fc.weight" if family == "exaone_moe" else None

    def cut(ts):
        name = key or next(k for k in ts if k.endswith(".eh_proj.weight"))
        ts[name] = ts[name][:, :-8]
        return ts

    bad = edited_copy(hf, tmp_path / "bad", cut)
    path = tmp_path / "bad.gguf"
    with pytest.raises(ConversionError, match="nextn.eh_proj"):  # the loader's check, before writing
        convert(bad, path, "f32", progress=False)
    assert not path.exists()


def test_mistral4_attention_temperature_past_its_period():
    """Mistral Small 4's Llama-4 temperature, q x (1 + beta log(1 + floor(pos / L))), L =
    original_max_position_embeddings: moelite's GGUF keeps it (attention.temperature_scale / _length), so positions
    >= L match transformers; it changes the logits there (and only there)."""
    rope = dict(
        rope_type="yarn",
        rope_theta=1e4,
        factor=8.0,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=1.0,
        mscale_all_dim=1.0,
        original_max_position_embeddings=4,
    )
    hf, path = fixture_gguf(
        "mistral4", max_position_embeddings=32, rope_parameters={**rope, "llama_4_scaling_beta": 2.0}
    )
    kv = _core.read_gguf(str(path))["kv"]
    assert kv["mistral4.attention.temperature_scale"] == 2.0 and kv["mistral4.attention.temperature_length"] == 4
    ref = hf_logits(hf, PROMPT)
    assert float(np.abs(logits(path) - ref).max()) <= 1e-3
    hf0, _ = fixture_gguf("mistral4", max_position_embeddings=32, rope_parameters={**rope, "llama_4_scaling_beta": 0.0})
    ref0 = hf_logits(hf0, PROMPT)
    assert float(np.abs(ref0[:4] - ref[:4]).max()) <= 1e-6 < 1e-2 < float(np.abs(ref0[4:] - ref[4:]).max())


@pytest.mark.parametrize(
    "override, key",
    [
        ({"mup_enabled": False}, "mup_enabled"),
        ({"global_attn_every_n_layers": 2}, "NoPE"),
        ({"sliding_window": None}, "sliding_window"),
    ],
)
def test_afmoe_values_llama_cpp_hardcodes_are_required(override, key, tmp_path):
    """AFMoE: llama.cpp always scales embeddings by sqrt(H) and takes every 4th layer for NoPE (neither is in the
    GGUF): a checkpoint that differs is refused by name rather than written as a file llama.cpp runs otherwise."""
    assert_refused(tmp_path, "afmoe", override, key, drop=("layer_types",))


@pytest.mark.parametrize(
    "override",
    [
        {"expert_selection_fn": "softmax", "norm_topk_prob": True},  # the class default: softmax over the top-k
        {"rms_norm_eps": None},  # LayerNorm without bias
        {"num_shared_experts": 1},  # (routed + shared) / 2
        {"first_k_dense_replace": 2, "prefix_dense_sliding_window_pattern": 2},  # dense layers [S, F]: F is NoPE
    ],
)
def test_cohere2moe_variants_match_transformers(override):
    """Cohere2-MoE beyond North's config: what transformers' class allows and moelite's converter writes
    (softmax gating, LayerNorm when rms_norm_eps is null, the averaged shared expert, a NoPE dense layer)."""
    hf, path = fixture_gguf("cohere2_moe", **override)
    assert float(np.abs(logits(path) - hf_logits(hf, PROMPT)).max()) <= 1e-3


def test_cohere2moe_a_file_without_the_moelite_key_ropes_the_dense_lead_as_llama_cpp():
    """The leading dense layers: transformers ropes them only with prefix_dense_sliding_window_pattern 1 (moelite's
    converter writes `moelite.rope_dense_lead`); llama.cpp always (its files lack the key): both readings run."""
    from moelite.runtime.hparams import parse_hparams

    _, path = fixture_gguf("cohere2_moe", first_k_dense_replace=2, prefix_dense_sliding_window_pattern=2)
    r = _core.read_gguf(str(path))
    kv, tensors = dict(r["kv"]), {t[0]: (t[1], list(t[2])) for t in r["tensors"]}
    assert not kv["moelite.rope_dense_lead"]
    assert parse_hparams("f", kv, tensors)["layer_n_rot"] == [16, 0, 16, 16, 16]
    del kv["moelite.rope_dense_lead"]
    assert parse_hparams("f", kv, tensors)["layer_n_rot"] == [16, 16, 16, 16, 16]


@pytest.mark.parametrize(
    "override, key",
    [
        ({"shared_expert_combination_strategy": "sum"}, "shared_expert_combination_strategy"),
        ({"sliding_window": None}, "sliding_window"),
    ],
)
def test_cohere2moe_what_llama_cpp_cannot_run_is_refused(override, key, tmp_path):
    """llama.cpp's cohere2moe graph averages a shared expert and requires a sliding window: a checkpoint that sums
    them, or has no window, is refused by name rather than written as a file llama.cpp runs otherwise."""
    assert_refused(tmp_path, "cohere2_moe", override, key, num_shared_experts=1)


@pytest.mark.parametrize("value", [0.0, 0.5])
def test_cohere2moe_attention_biases_zero_dropped_else_refused(value, tmp_path):
    """A checkpoint holding q/k/v/o biases (`attention_bias`): all zero, they are dropped as llama.cpp's converter
    drops them (the same model); otherwise refused by name (neither GGUF graph has them), nothing written."""
    hf, path = fixture_gguf("cohere2_moe")
    H = 64

    def add(ts):
        for il in range(5):
            a = f"model.layers.{il}.self_attn."
            for p in "qkvo":
                rows = ts[a + f"{p}_proj.weight"].shape[0]
                ts[a + f"{p}_proj.bias"] = np.full(rows if p != "o" else H, value, np.float32)
        return ts

    d = edited_copy(hf, tmp_path / "hf", add)
    out = tmp_path / "bias.gguf"
    if value == 0.0:
        convert(d, out, "f32", progress=False)
        assert np.array_equal(logits(out), logits(path))
    else:
        with pytest.raises(ConversionError, match=r"self_attn\.[qkvo]_proj\.bias is not zero"):
            convert(d, out, "f32", progress=False)
        assert not out.exists()


# Nemotron 3: Nano (no latent MoE) beside the default fixture (Super's latent MoE)
NEMOTRON_NANO = {"moe_latent_size": None}


@pytest.mark.parametrize("override", [{}, NEMOTRON_NANO])
def test_nemotron_h_prompt_decode_and_offload(override):
    """Nemotron-H: single-purpose blocks (Mamba2 / NoPE attention / ReLU² MoE without gates), latent MoE or not:
    prompt and one decode step equal transformers; at the smallest budget (2-matrix expert slots, the latent
    projections resident) the logits are those of the resident run bit for bit."""
    hf, path = fixture_gguf("nemotron_h", **override)
    nxt = 123
    with moelite.load(path, kv_type="f32", n_threads=1, n_ubatch=64) as m:
        prompt = m.eval(PROMPT)
        step = m.eval([nxt])
        minimum = m.plan.minimum_budget
        want = m.logits(PROMPT)
        # the cache holds up and down only: the planner's slot bytes are the core's (gate absent)
        assert [b for b in m.plan.expert_slot_bytes if b] == [_core.expert_bytes(str(path), il) for il in (1, 3, 5)]
    ref = hf_logits(hf, PROMPT + [nxt])
    assert float(np.abs(prompt - ref[len(PROMPT) - 1]).max()) <= 1e-3
    assert float(np.abs(step - ref[-1]).max()) <= 1e-3
    with moelite.load(path, kv_type="f32", n_threads=1, n_ubatch=64, memory_budget=minimum) as m:
        assert m.info()["offloaded"]
        assert np.array_equal(m.logits(PROMPT), want)
        assert m.stats()["total"]["misses"] > 0


def test_nemotron_h_release_pattern_converts_identically(tmp_path):
    """The release config.json states the blocks as `hybrid_override_pattern` (M, *, E) and `num_hidden_layers`
    (transformers re-saves them as layers_block_type): the same GGUF."""
    hf, path = fixture_gguf("nemotron_h")
    cfg = json.loads((hf / "config.json").read_text())
    letters = {"linear_attention": "M", "full_attention": "*", "moe": "E"}
    pattern = "".join(letters[t] for t in cfg.pop("layers_block_type"))
    d = edited_copy(hf, tmp_path / "hf", lambda ts: ts)
    (d / "config.json").write_text(json.dumps({**cfg, "hybrid_override_pattern": pattern, "num_hidden_layers": 6}))
    convert(d, tmp_path / "release.gguf", "f32", progress=False)
    assert np.array_equal(logits(tmp_path / "release.gguf"), logits(path))


@pytest.mark.parametrize(
    "override, key",
    [
        ({"layers_block_type": ["linear_attention", "moe", "full_attention", "mlp", "linear_attention", "moe"]}, "mlp"),
        ({"mlp_hidden_act": "silu"}, "mlp_hidden_act"),
        ({"use_conv_bias": False}, "use_conv_bias"),
        ({"layers_block_type": ["linear_attention", "full_attention"] * 3}, "dense"),
        ({"num_nextn_predict_layers": 2}, "num_nextn_predict_layers"),  # llama.cpp folds one MTP head
    ],
)
def test_nemotron_h_what_llama_cpp_cannot_run_is_refused(override, key, tmp_path):
    """llama.cpp's nemotron_h_moe takes every FFN block for MoE, runs ReLU² and adds a conv bias always: a
    checkpoint that differs is refused by name rather than written as a file that runs otherwise."""
    assert_refused(tmp_path, "nemotron_h", override, key)


def test_mimo_release_config_converts_as_transformers_reads_it(tmp_path):
    """MiMo-V2-Flash's release config.json: hybrid_layer_pattern / moe_layer_freq / rope_theta, swa_rope_theta,
    partial_rotary_factor instead of transformers' layer_types / mlp_layer_types / rope_parameters, and
    sliding_window = sliding_window_size (128 both): transformers (as the SGLang reference) attends
    sliding_window_size previous tokens plus the query, so moelite writes sliding_window_size + 1 (llama.cpp's
    converter writes the raw sliding_window: one token fewer). The same model as the transformers-saved fixture
    (transformers itself ignores hybrid_layer_pattern and takes its default pattern, the release's for 48 layers)."""
    hf, path = fixture_gguf("mimo_v2_flash")
    cfg = json.loads((hf / "config.json").read_text())
    for k in ("layer_types", "mlp_layer_types", "rope_parameters"):
        cfg.pop(k)
    d = edited_copy(hf, tmp_path / "hf", lambda ts: ts)
    (d / "config.json").write_text(json.dumps({**cfg, "sliding_window": cfg["sliding_window_size"]}))
    convert(d, tmp_path / "release.gguf", "f32", progress=False)
    assert _core.read_gguf(str(tmp_path / "release.gguf"))["kv"]["mimo2.attention.sliding_window"] == 6
    assert np.array_equal(logits(tmp_path / "release.gguf"), logits(path))


@pytest.mark.parametrize(
    "override, key",
    [
        ({"swa_head_dim": 16}, "swa_head_dim"),
        ({"topk_method": "greedy"}, "topk_method"),
        ({"norm_topk_prob": False}, "norm_topk_prob"),
        ({"hybrid_layer_pattern": [0, 1, 1, 1]}, "hybrid_layer_pattern"),
    ],
)
def test_mimo_what_the_gguf_cannot_express_is_refused(override, key, tmp_path):
    """llama.cpp's mimo2 has one head size for all layers and hardcodes renormalised noaux_tc routing; two layer
    patterns that disagree have no one meaning: refused by name, nothing written."""
    assert_refused(tmp_path, "mimo_v2_flash", override, key)


def test_mimo_fused_qkv_proj_converts_identically(tmp_path):
    """MiMo-V2.5's layout: one qkv_proj per layer, rows [Q | K | V] (K and V with the layer's own KV heads): split
    back into q / k / v, the same GGUF tensors as the separate projections."""
    hf, path = fixture_gguf("mimo_v2_flash")

    def fuse(ts):
        for il in range(4):
            a = f"model.layers.{il}.self_attn."
            ts[a + "qkv_proj.weight"] = np.concatenate([ts.pop(a + f"{p}_proj.weight") for p in "qkv"], axis=0)
        return ts

    d = edited_copy(hf, tmp_path / "hf", fuse)
    convert(d, tmp_path / "fused.gguf", "f32", progress=False)
    assert np.array_equal(logits(tmp_path / "fused.gguf"), logits(path))


def test_mimo_fp8_release_weights_are_dequantized(tmp_path):
    """MiMo-V2-Flash ships block-scaled FP8 weights (e4m3 + `weight_scale_inv`, quantization_config fp8): the
    source reader dequantizes them, so the FP8 checkpoint converts to the model of its dequantized weights, bit for
    bit (an attention projection and the dense layer's MLP here)."""
    from test_convert_formats import _to_fp8_blocks

    hf, _ = fixture_gguf("mimo_v2_flash")
    refs: dict[str, np.ndarray] = {}

    def fp8(ts):
        for name in [
            n
            for n in ts
            if n.endswith(".weight")
            and ts[n].ndim == 2
            and (".layers.1.self_attn.q_proj" in n or ".layers.0.mlp." in n)
        ]:
            codes, scale, refs[name] = _to_fp8_blocks(ts[name], block=16)
            ts[name] = ("F8_E4M3", list(codes.shape), codes.tobytes())
            ts[name + "_scale_inv"] = scale
        return ts

    d = edited_copy(hf, tmp_path / "fp8", fp8)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16]}
    (d / "config.json").write_text(json.dumps(cfg))
    assert len(refs) >= 4
    plain = edited_copy(hf, tmp_path / "ref", lambda ts: {**ts, **refs})  # the dequantized weights in f32
    convert(d, tmp_path / "fp8.gguf", "f32", progress=False)
    convert(plain, tmp_path / "ref.gguf", "f32", progress=False)
    assert np.array_equal(logits(tmp_path / "fp8.gguf"), logits(tmp_path / "ref.gguf"))
    assert not any("scale_inv" in t[0] for t in _core.read_gguf(str(tmp_path / "fp8.gguf"))["tensors"])


FULL5 = ["full_attention"] * 5


@pytest.mark.parametrize(
    "override",
    [
        {"gating": "per-element"},  # Laguna M.1's gate
        {"layer_types": FULL5},  # no sliding layer: no window
        {"num_attention_heads_per_layer": None},
    ],
)  # one head count (M.1)
def test_laguna_variants_match_transformers(override):
    """Laguna's other shapes: the softplus gate per element (its width n_head * head_dim tells it apart, as in
    llama.cpp), all layers full attention (YaRN everywhere, no window written), a model-wide head count."""
    hf, path = fixture_gguf("laguna", **override)
    assert float(np.abs(logits(path) - hf_logits(hf, PROMPT)).max()) <= 1e-3


def test_laguna_layer_shapes_and_rope_per_type():
    """The layer plan counts each layer's query heads (attention and planner), and rotates the sliding layers with
    their own dims and theta, without YaRN (llama.cpp's laguna graph)."""
    from moelite.runtime.hparams import parse_hparams

    _, path = fixture_gguf("laguna")
    g = _core.read_gguf(str(path))
    hp = parse_hparams(str(path), g["kv"], {t[0]: (t[1], t[2], None, t[4]) for t in g["tensors"]})
    assert hp["layer_n_head"] == [4, 6, 6, 6, 4] and hp["n_head"] == 6
    assert hp["layer_mask"] == [0, 1, 1, 1, 0] and hp["layer_rope_scaling"] == [1, 0, 0, 0, 1]
    assert hp["layer_n_rot"] == [8, 16, 16, 16, 8] and hp["layer_freq_base"] == [5e5, 1e4, 1e4, 1e4, 5e5]


def test_laguna_router_softcap_is_refused(tmp_path):
    """llama.cpp's laguna graph has no router logit softcap: a checkpoint with one is refused by name."""
    assert_refused(tmp_path, "laguna", {"moe_router_logit_softcapping": 30.0}, "moe_router_logit_softcapping")


def step35_copy(tmp_path: Path, edit, name: str = "hf") -> Path:
    """A copy of the Step-3.5 fixture (Step3p7ForConditionalGeneration) whose text_config is edit(text_config)."""
    hf, _ = fixture_gguf("step3p5")
    cfg = json.loads((hf / "config.json").read_text())
    d = edited_copy(hf, tmp_path / name, lambda ts: ts)
    (d / "config.json").write_text(json.dumps({**cfg, "text_config": edit(dict(cfg["text_config"]))}))
    return d


def test_step35_swiglu_clamps_bite_and_match_transformers():
    """The per-layer SwiGLU limits (routed and shared / dense separately, after the SiLU) change this fixture's
    logits, and both with and without them moelite matches transformers."""
    hf, path = fixture_gguf("step3p5")
    hf0, path0 = fixture_gguf("step3p5", swiglu_limits=None, swiglu_limits_shared=None)
    clamped, free = logits(path), logits(path0)
    assert float(np.abs(clamped - free).max()) > 3e-3  # 6e-3 here: above the 1e-3 tolerance
    assert float(np.abs(free - hf_logits(hf0, PROMPT)).max()) <= 1e-3
    assert float(np.abs(clamped - hf_logits(hf, PROMPT)).max()) <= 1e-3


def test_step35_layer_plan():
    """Sliding layers: their own query heads, full RoPE on rope.freq_base_swa without rope factors; full layers
    rotate rope.dimension_count / 2 (llama.cpp hardcodes both); the clamps per layer; dense / MoE by tensors."""
    from moelite.runtime.hparams import parse_hparams

    _, path = fixture_gguf("step3p5")
    g = _core.read_gguf(str(path))
    assert g["kv"]["step35.rope.dimension_count"] == 16
    hp = parse_hparams(str(path), g["kv"], {t[0]: (t[1], t[2], None, t[4]) for t in g["tensors"]})
    assert hp["layer_n_head"] == [4, 6, 6, 4] and hp["n_head"] == 6 and hp["layer_mask"] == [0, 1, 1, 0]
    assert hp["layer_n_rot"] == [8, 16, 16, 8] and hp["layer_freq_base"] == [5e6, 1e4, 1e4, 5e6]
    assert hp["layer_rope_factors"] == [1, 0, 0, 1] and hp["layer_ffn"] == [0, 1, 1, 1]
    assert hp["layer_clamp_exp"] == [0, 0, 0.5, 0.5]
    assert np.allclose(hp["layer_clamp_shexp"], [0.4, 0, 0.4, 0.4])


def test_step35_release_config_converts_as_transformers_reads_it(tmp_path):
    """Step-3.5-Flash's config.json in its own keys only (attention_other_setting, moe_layers_enum, rope_theta per
    layer + partial_rotary_factors, num_attention_groups, moe_num_experts / moe_top_k, the lists padded with an MTP
    entry the checkpoint does not hold... is not allowed: num_nextn_predict_layers 0), none of transformers' derived
    keys: the same model, bit for bit."""
    _, path = fixture_gguf("step3p5")

    def release(t):
        for k in (
            "layer_types",
            "mlp_layer_types",
            "rope_parameters",
            "num_sliding_attention_heads",
            "per_layer_config",
            "query_pre_attn_scalar",
        ):
            t.pop(k)
        for new, old in (
            ("num_attention_groups", "num_key_value_heads"),
            ("moe_num_experts", "n_routed_experts"),
            ("moe_top_k", "num_experts_per_tok"),
        ):
            t[new] = t.pop(old)
        t["layer_types"] = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
        return t

    d = step35_copy(tmp_path, release)
    convert(d, tmp_path / "release.gguf", "f32", progress=False)
    assert np.array_equal(logits(tmp_path / "release.gguf"), logits(path))


@pytest.mark.parametrize(
    "edit, key",
    [
        (
            lambda t: {
                **t,
                "rope_parameters": {
                    **t["rope_parameters"],
                    "full_attention": {"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 1.0},
                },
            },
            "partial rotary",
        ),
        (lambda t: {**t, "query_pre_attn_scalar": 32}, "query_pre_attn_scalar"),
        (lambda t: {**t, "norm_expert_weight": False}, "norm_expert_weight"),
        (lambda t: {**t, "swiglu_limits": [0, 0, 0, -1]}, "swiglu_limits"),
    ],
)
def test_step35_what_the_gguf_cannot_express_is_refused(edit, key, tmp_path):
    """llama.cpp's step35 rotates half the head on full layers and all of it on sliding ones, scales by
    1/sqrt(head_dim); transformers always renormalises; a negative limit is no limit: refused by name."""
    d = step35_copy(tmp_path, edit)
    with pytest.raises(ConversionError, match=key):
        convert(d, tmp_path / "bad.gguf", "f32", progress=False)
    assert not (tmp_path / "bad.gguf").exists()
