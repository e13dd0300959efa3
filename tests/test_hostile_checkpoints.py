"""Hostile Hugging Face checkpoints (issue 15): a ConversionError naming the file and the key, before anything
is written or allocated; never a silently shifted tensor, a raw Python exception or a hang."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hf_fixtures import edited_copy, make_hf_model

import moelite
from moelite.converters import convert
from moelite.errors import ConversionError


@pytest.fixture()
def hf(tmp_path) -> Path:
    return edited_copy(make_hf_model("qwen3_moe"), tmp_path / "hf", lambda ts: ts)


def expect_refused(src: Path, out: Path, *needles: str) -> str:
    with pytest.raises(ConversionError) as e:
        convert(src, out, "f32", progress=False)
    assert not out.exists()
    msg = str(e.value)
    for n in needles:
        assert n in msg, msg
    return msg


def rewrite_header(st: Path, edit, length_delta: int = 0, pad: int = 8) -> None:
    """Re-write a safetensors file's JSON header through edit(header) (data kept), padded with `pad` spaces,
    with the stated header length off by length_delta."""
    raw = st.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    blob = json.dumps(edit(header)).encode() + b" " * pad
    st.write_bytes(struct.pack("<Q", len(blob) + length_delta) + blob + data)


def test_header_length_one_byte_short(hf, tmp_path):
    rewrite_header(hf / "model.safetensors", lambda h: h, length_delta=-1)
    expect_refused(hf, tmp_path / "o.gguf", "model.safetensors", "corrupt safetensors")


def _first(h: dict) -> str:
    return next(k for k in h if k != "__metadata__")


def _shift(h: dict, by: int) -> dict:
    name = _first(h)
    h[name]["data_offsets"] = [h[name]["data_offsets"][0] + by, h[name]["data_offsets"][1] + by]
    return h


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda h: _shift(h, 4), "gap"),  # leaves a gap
        (lambda h: {**h, "dup": dict(h[_first(h)])}, "overlaps"),  # two tensors, one range
        (lambda h: {**h, _first(h): [1, 2]}, "expected an object"),
        (lambda h: {**h, _first(h): {**h[_first(h)], "shape": "abc"}}, "shape"),
        (lambda h: {**h, _first(h): {**h[_first(h)], "shape": [2**70]}}, "shape"),
        (lambda h: {**h, _first(h): {**h[_first(h)], "data_offsets": [5]}}, "data_offsets"),
        (lambda h: {**h, _first(h): {**h[_first(h)], "dtype": ["F32"]}}, "dtype"),
        (lambda h: [1, 2], "expected an object"),
    ],
)
def test_bad_header(hf, tmp_path, edit, needle):
    rewrite_header(hf / "model.safetensors", edit)
    expect_refused(hf, tmp_path / "o.gguf", "model.safetensors", needle)


def test_trailing_bytes(hf, tmp_path):
    st = hf / "model.safetensors"
    st.write_bytes(st.read_bytes() + b"\0" * 16)
    expect_refused(hf, tmp_path / "o.gguf", "data section")


def test_deeply_nested_header(hf, tmp_path):
    st = hf / "model.safetensors"
    blob = b"[" * 200000 + b"]" * 200000
    st.write_bytes(struct.pack("<Q", len(blob)) + blob)
    expect_refused(hf, tmp_path / "o.gguf", "model.safetensors")


@pytest.mark.parametrize(
    "key,value",
    [
        ("num_hidden_layers", 2**31),
        ("num_hidden_layers", 3),
        ("num_experts", 2**63),
        ("vocab_size", 1e30),
        ("num_attention_heads", 2**31),
        ("num_attention_heads", "4"),
        ("hidden_size", [64]),
        ("rms_norm_eps", -0.5),
        ("num_experts_per_tok", True),
        ("model_type", ["qwen3_moe"]),  # fuzz: once reached a dict lookup unchecked (TypeError)
    ],
)
def test_bad_config_value(hf, tmp_path, key, value):
    cfg = json.loads((hf / "config.json").read_text())
    cfg[key] = value
    (hf / "config.json").write_text(json.dumps(cfg))
    expect_refused(hf, tmp_path / "o.gguf", "config.json", key)


@pytest.mark.parametrize("text", ["[1, 2]", "[" * 100000 + "]" * 100000, '{"a": "\udcff"}'])
def test_bad_config_json(hf, tmp_path, text):
    (hf / "config.json").write_text(text, errors="surrogateescape")
    expect_refused(hf, tmp_path / "o.gguf", "config.json")


@pytest.mark.parametrize(
    "index",
    [
        {"weight_map": [1, 2]},
        {"weight_map": {"a": 5}},
        [1],
        {"weight_map": {"model.embed_tokens.weight": "../../etc/passwd"}},
    ],
)
def test_bad_index(hf, tmp_path, index):
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_refused(hf, tmp_path / "o.gguf", "model.safetensors.index.json")


def test_valid_checkpoint_converts(hf, tmp_path):
    out = tmp_path / "o.gguf"
    convert(hf, out, "f32", progress=False)
    with moelite.load(out, n_ctx=32) as m:
        assert np.isfinite(m.logits([1, 2, 3])).all()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 3e38])
def test_corrupt_weight_values(tmp_path, value):
    """A NaN, inf or absurd weight (flipped exponent bits) would convert into a model with non-finite logits."""

    def edit(ts):
        name = next(n for n in ts if n.endswith("q_proj.weight"))
        ts[name] = ts[name].copy()
        ts[name].flat[5] = value
        return ts

    src = edited_copy(make_hf_model("qwen3_moe"), tmp_path / "hf", edit)
    expect_refused(src, tmp_path / "o.gguf", "q_proj.weight", "corrupt checkpoint")


def test_tokenizer_files(hf, tmp_path):
    cfg = json.loads((hf / "tokenizer_config.json").read_text())
    (hf / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": [1, 2]}))
    expect_refused(hf, tmp_path / "o.gguf", "tokenizer_config.json", "chat_template")
    (hf / "tokenizer_config.json").write_text(json.dumps(cfg))
    tj = json.loads((hf / "tokenizer.json").read_text())
    tj["model"]["merges"] = [[1, 2, 3]]
    (hf / "tokenizer.json").write_text(json.dumps(tj))
    expect_refused(hf, tmp_path / "o.gguf", "tokenizer.json")


@pytest.mark.parametrize("key,value", [("moe_intermediate_size", [32, 32]), ("num_experts_per_tok", "2")])
def test_config_value_of_wrong_type_for_the_family(hf, tmp_path, key, value):
    cfg = json.loads((hf / "config.json").read_text())
    cfg[key] = value
    (hf / "config.json").write_text(json.dumps(cfg))
    expect_refused(hf, tmp_path / "o.gguf", "config.json")


def test_long_shard_name_in_index(hf, tmp_path):
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "a" * 5000}}))
    expect_refused(hf, tmp_path / "o.gguf", "model.safetensors.index.json")


@pytest.mark.parametrize("value", [None, 49])
def test_mla_rank_contradicting_the_tensors(tmp_path, value):
    """deepseek_v3 with q_lora_rank dropped or off by one: the converter once wrote a file moelite refused."""
    src = edited_copy(make_hf_model("deepseek_v3"), tmp_path / "hf", lambda ts: ts)
    cfg = json.loads((src / "config.json").read_text())
    cfg["q_lora_rank"] = value
    (src / "config.json").write_text(json.dumps(cfg))
    expect_refused(src, tmp_path / "o.gguf", "attn_q", "would not load")


def test_rope_scaling_without_its_keys(tmp_path):
    src = edited_copy(make_hf_model("gpt_oss"), tmp_path / "hf", lambda ts: ts)
    cfg = json.loads((src / "config.json").read_text())
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    scaling.pop("original_max_position_embeddings")
    (src / "config.json").write_text(json.dumps(cfg))
    expect_refused(src, tmp_path / "o.gguf", "config.json", "original_max_position_embeddings")
