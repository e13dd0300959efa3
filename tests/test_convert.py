"""Converter acceptance: every family converts, gguf-py reads the file, tensors are page-aligned, names and
keys follow llama.cpp, expert tensors equal what transformers holds in memory, tokenizer keys are there."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_fixtures import FAMILIES, make_hf_model  # noqa: E402

gguf = pytest.importorskip("gguf")
from moelite.converters import convert  # noqa: E402

ARCH = {
    "mixtral": "llama",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "olmoe": "olmoe",
    "deepseek_v2": "deepseek2",
    "deepseek_v3": "deepseek2",
    "gpt_oss": "gpt-oss",
    "granitemoe": "granitemoe",
    "granitemoeshared": "granitemoe",
    "phimoe": "phimoe",
}


def kv(reader, key):
    f = reader.get_field(key)
    return None if f is None else f.contents()


def tensors(reader) -> dict:
    return {t.name: t for t in reader.tensors}


def as_f32(t) -> np.ndarray:
    """numpy-order float32 array of a GGUF F32 tensor."""
    assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
    return np.asarray(t.data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape.tolist())])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache: dict[str, tuple[Path, Path]] = {}

    def get(family: str):
        if family not in cache:
            src = make_hf_model(family)
            out = tmp_path_factory.mktemp(family) / f"{family}.gguf"
            convert(src, out, "f32", progress=False)
            cache[family] = (src, out)
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_family_converts_to_llama_cpp_layout(family, converted):
    src, out = converted(family)
    cfg = json.loads((src / "config.json").read_text())
    r = gguf.GGUFReader(str(out))
    arch = ARCH[family]
    assert kv(r, "general.architecture") == arch
    assert kv(r, "general.alignment") == 4096
    for t in r.tensors:  # absolute file offset of every tensor is on a page
        assert t.data_offset % 4096 == 0, t.name
    n_layer = cfg["num_hidden_layers"]
    assert kv(r, f"{arch}.block_count") == n_layer
    assert kv(r, f"{arch}.embedding_length") == cfg["hidden_size"]
    n_exp = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts")
    assert kv(r, f"{arch}.expert_count") == n_exp
    assert kv(r, f"{arch}.expert_used_count") == cfg["num_experts_per_tok"]
    assert kv(r, f"{arch}.expert_gating_func") in (1, 2, 3)
    assert isinstance(kv(r, f"{arch}.expert_weights_norm"), bool)
    # tokenizer: llama.cpp keys + the verbatim HF tokenizer + chat template
    assert kv(r, "tokenizer.ggml.model") == "gpt2"
    assert len(kv(r, "tokenizer.ggml.tokens")) == cfg["vocab_size"]
    assert len(kv(r, "tokenizer.ggml.merges")) > 0
    assert kv(r, "tokenizer.huggingface.json") == (src / "tokenizer.json").read_text(encoding="utf-8")
    assert "<|im_start|>" in kv(r, "tokenizer.chat_template")
    assert kv(r, "tokenizer.ggml.eos_token_id") == 2
    # names: every layer has a router and the three stacked expert tensors shaped [E, I, H] / [E, H, I]
    ts = tensors(r)
    first_moe = cfg.get("first_k_dense_replace", 0)
    for bid in range(first_moe, n_layer):
        gate = ts[f"blk.{bid}.ffn_gate_exps.weight"]
        down = ts[f"blk.{bid}.ffn_down_exps.weight"]
        assert gate.shape.tolist()[0] == cfg["hidden_size"] and gate.shape.tolist()[2] == n_exp
        assert down.shape.tolist()[1] == cfg["hidden_size"]
        assert f"blk.{bid}.ffn_up_exps.weight" in ts and f"blk.{bid}.ffn_gate_inp.weight" in ts
        assert ts[f"blk.{bid}.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert "token_embd.weight" in ts and "output_norm.weight" in ts and "output.weight" in ts


def _hf_state(src: Path) -> dict[str, np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    m = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    return sd


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_tensors_equal_transformers_in_memory(family, converted):
    """The converter reads the on-disk layout; transformers fuses it in memory. Both must agree."""
    src, out = converted(family)
    sd = _hf_state(src)
    ts = tensors(gguf.GGUFReader(str(out)))
    n_checked = 0
    for key, gu in sd.items():
        m = re.match(r"model\.layers\.(\d+)\..*experts\.gate_up_proj$", key)
        if not m:
            continue
        bid = int(m.group(1))
        down = sd[key.replace("gate_up_proj", "down_proj")]
        if family == "gpt_oss":  # [E, H, 2I] interleaved, down [E, I, H]
            gate, up, down = np.swapaxes(gu[..., ::2], 1, 2), np.swapaxes(gu[..., 1::2], 1, 2), np.swapaxes(down, 1, 2)
        else:  # [E, 2I, H] gate first, down [E, H, I]
            n = gu.shape[1] // 2
            gate, up = gu[:, :n], gu[:, n:]
        np.testing.assert_array_equal(as_f32(ts[f"blk.{bid}.ffn_gate_exps.weight"]), gate)
        np.testing.assert_array_equal(as_f32(ts[f"blk.{bid}.ffn_up_exps.weight"]), up)
        np.testing.assert_array_equal(as_f32(ts[f"blk.{bid}.ffn_down_exps.weight"]), down)
        n_checked += 1
    assert n_checked >= 1
    if family == "deepseek_v3":
        bias = next(v for k, v in sd.items() if k.endswith("e_score_correction_bias"))
        got = as_f32(ts["blk.1.exp_probs_b.bias"])
        np.testing.assert_array_equal(got, bias)
        assert np.abs(got).max() > 0


def test_deepseek_mla_split_rebuilds_kv_b(converted):
    src, out = converted("deepseek_v2")
    cfg = json.loads((src / "config.json").read_text())
    sd = _hf_state(src)
    ts = tensors(gguf.GGUFReader(str(out)))
    h, nope, v = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    k_b = as_f32(ts["blk.0.attn_k_b.weight"])  # [n_head, kv_lora, nope]
    v_b = as_f32(ts["blk.0.attn_v_b.weight"])  # [n_head, v, kv_lora]
    kv_b = np.concatenate([np.swapaxes(k_b, 1, 2), v_b], axis=1).reshape(h * (nope + v), -1)
    np.testing.assert_array_equal(kv_b, sd["model.layers.0.self_attn.kv_b_proj.weight"])
    assert "blk.0.attn_kv_b.weight" not in ts
    r = gguf.GGUFReader(str(out))
    assert kv(r, "deepseek2.attention.head_count_kv") == 1
    assert kv(r, "deepseek2.attention.key_length_mla") == nope + cfg["qk_rope_head_dim"]
    assert kv(r, "deepseek2.leading_dense_block_count") == 1
    assert kv(r, "deepseek2.rope.scaling.type") == "yarn"
    assert abs(kv(r, "deepseek2.rope.scaling.yarn_log_multiplier") - 0.0707) < 1e-6


def test_mixtral_qk_permuted_like_llama_cpp(converted):
    src, out = converted("mixtral")
    cfg = json.loads((src / "config.json").read_text())
    sd = _hf_state(src)
    ts = tensors(gguf.GGUFReader(str(out)))
    q = sd["model.layers.0.self_attn.q_proj.weight"]
    h = cfg["num_attention_heads"]
    want = q.reshape(h, 2, q.shape[0] // h // 2, -1).swapaxes(1, 2).reshape(q.shape)
    np.testing.assert_array_equal(as_f32(ts["blk.0.attn_q.weight"]), want)
    v = sd["model.layers.0.self_attn.v_proj.weight"]
    np.testing.assert_array_equal(as_f32(ts["blk.0.attn_v.weight"]), v)


def test_family_specific_keys(converted):
    r = gguf.GGUFReader(str(converted("gpt_oss")[1]))
    assert kv(r, "gpt-oss.attention.sliding_window_pattern") == [True, False]
    assert kv(r, "gpt-oss.attention.sliding_window") == 8
    assert kv(r, "gpt-oss.rope.scaling.type") == "yarn"
    assert kv(r, "gpt-oss.rope.scaling.factor") == 32.0
    assert kv(r, "gpt-oss.rope.scaling.original_context_length") == 128
    assert "blk.0.attn_sinks.weight" in tensors(r) and "blk.0.post_attention_norm.weight" in tensors(r)
    r = gguf.GGUFReader(str(converted("deepseek_v3")[1]))
    assert kv(r, "deepseek2.expert_gating_func") == 2
    assert kv(r, "deepseek2.expert_weights_scale") == 2.5
    assert kv(r, "deepseek2.expert_group_count") == 4 and kv(r, "deepseek2.expert_group_used_count") == 2
    r = gguf.GGUFReader(str(converted("qwen3_moe")[1]))
    assert kv(r, "qwen3moe.expert_weights_norm") is True
    r = gguf.GGUFReader(str(converted("qwen2_moe")[1]))
    assert kv(r, "qwen2moe.expert_weights_norm") is False
    assert kv(r, "qwen2moe.expert_shared_feed_forward_length") == 64
    r = gguf.GGUFReader(str(converted("granitemoeshared")[1]))
    assert abs(kv(r, "granitemoe.attention.scale") - 0.0078125) < 1e-9
    assert kv(r, "granitemoe.embedding_scale") == 12.0 and kv(r, "granitemoe.logit_scale") == 8.0
    assert "blk.0.ffn_gate_shexp.weight" in tensors(r)
    r = gguf.GGUFReader(str(converted("phimoe")[1]))
    assert {"output.bias", "output_norm.bias", "blk.0.attn_norm.bias"} <= set(tensors(r))


def test_cli_module(tmp_path):
    src = make_hf_model("qwen3_moe")
    out = tmp_path / "cli.gguf"
    p = subprocess.run(
        [sys.executable, "-m", "moelite.converters", str(src), "-o", str(out), "--type", "f16", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert "qwen3moe" in p.stdout and out.is_file()
    p = subprocess.run(
        [sys.executable, "-m", "moelite.converters", str(tmp_path / "nope"), "-o", str(tmp_path / "x.gguf")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 1 and "error:" in p.stderr and not (tmp_path / "x.gguf").exists()


def test_progress_bar_runs(tmp_path, capsys):
    convert(make_hf_model("olmoe"), tmp_path / "p.gguf", progress=True)
    assert "B" in capsys.readouterr().err
