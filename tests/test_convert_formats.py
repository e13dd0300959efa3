"""Output types (f16 ... q4_k_m), block-size fallbacks, GGUF input (keep / re-quantize), DeepSeek FP8 and
GPT-OSS MXFP4 inputs. Quantized outputs are checked by dequantizing with the vendored ggml."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hf_fixtures import edited_copy, make_hf_model

gguf = pytest.importorskip("gguf")
_core = pytest.importorskip("moelite._core")
from moelite.converters import convert  # noqa: E402

T = gguf.GGMLQuantizationType
# relative RMS error bound of the dequantized weights per type (random normal weights)
REL_ERR = {
    T.F32: 0,
    T.F16: 1e-3,
    T.BF16: 5e-3,
    T.Q8_0: 1e-2,
    T.Q6_K: 3e-2,
    T.Q5_K: 6e-2,
    T.Q5_0: 8e-2,
    T.Q4_K: 0.12,
    T.Q4_0: 0.15,
    T.MXFP4: 0.3,
}
BIG = dict(hidden_size=256, moe_intermediate_size=256, intermediate_size=256, head_dim=64)  # rows fit K-quants


def dequant(t) -> np.ndarray:
    shape = [int(d) for d in reversed(t.shape.tolist())]
    if t.tensor_type == T.F32:
        return np.asarray(t.data, np.float32).reshape(shape)
    raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)
    return np.asarray(_core.dequantize(raw, int(t.tensor_type), int(np.prod(shape))), np.float32).reshape(shape)


@pytest.fixture(scope="module")
def big_f32(tmp_path_factory):
    src = make_hf_model("qwen3_moe", **BIG)
    out = tmp_path_factory.mktemp("big") / "f32.gguf"
    convert(src, out, "f32", progress=False)
    return src, out


@pytest.mark.parametrize("type_name", ["f16", "bf16", "q8_0", "q4_0", "q4_k", "q6_k", "q4_k_m"])
def test_quantized_outputs_dequantize_close_to_f32(type_name, big_f32, tmp_path):
    src, f32 = big_f32
    out = tmp_path / f"{type_name}.gguf"
    rep = convert(src, out, type_name, progress=False)
    assert not rep.fallbacks
    ref = {t.name: dequant(t) for t in gguf.GGUFReader(str(f32)).tensors}
    r = gguf.GGUFReader(str(out))
    seen = set()
    for t in r.tensors:
        assert t.data_offset % 4096 == 0
        got, want = dequant(t), ref[t.name]
        rel = np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(want**2))
        assert rel <= REL_ERR[T(t.tensor_type)], (t.name, T(t.tensor_type).name, rel)
        seen.add(T(t.tensor_type))
        if len(want.shape) == 1 or "ffn_gate_inp" in t.name:
            assert t.tensor_type == T.F32, t.name  # norms, biases and routers stay F32
    assert len(seen) >= 2


def test_q4_k_m_mix_follows_llama_cpp(big_f32, tmp_path):
    src, _ = big_f32
    rep = convert(src, tmp_path / "m.gguf", "q4_k_m", progress=False)
    tt = rep.tensor_types
    assert tt["output.weight"] == "q6_k"
    assert tt["token_embd.weight"] == "q4_k"
    # 8 experts: attn_v and attn_k Q8_0, attn_output Q5_K (llama.cpp's 8-expert rule)
    assert tt["blk.0.attn_v.weight"] == "q8_0" and tt["blk.0.attn_k.weight"] == "q8_0"
    assert tt["blk.0.attn_output.weight"] == "q5_k"
    # ffn_down gets Q6_K on the "more bits" layers: with 2 layers that is layer 1 (the last 1/8)
    assert tt["blk.0.ffn_down_exps.weight"] == "q4_k" and tt["blk.1.ffn_down_exps.weight"] == "q6_k"
    assert tt["blk.0.ffn_gate_exps.weight"] == "q4_k" and tt["blk.0.ffn_up_exps.weight"] == "q4_k"
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert r.get_field("general.file_type").contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)


def test_q4_k_m_attn_v_uses_more_bits_without_8_experts(tmp_path):
    src = make_hf_model("qwen3_moe", num_experts=4, **BIG)
    rep = convert(src, tmp_path / "m4.gguf", "q4_k_m", progress=False)
    # n_attn_v = 2: layer 0 -> not more bits (Q4_K), layer 1 -> more bits (Q6_K); attn_k stays Q4_K
    assert rep.tensor_types["blk.0.attn_v.weight"] == "q4_k"
    assert rep.tensor_types["blk.1.attn_v.weight"] == "q6_k"
    assert rep.tensor_types["blk.0.attn_k.weight"] == "q4_k"


def test_k_quant_falls_back_when_rows_do_not_fit(tmp_path):
    src = make_hf_model("qwen3_moe")  # hidden 64: K-quants (256 per block) cannot hold a row
    rep = convert(src, tmp_path / "fb.gguf", "q4_k", progress=False)
    assert rep.fallbacks["blk.0.ffn_gate_exps.weight"] == ("q4_k", "q5_0")
    assert rep.tensor_types["blk.0.ffn_gate_exps.weight"] == "q5_0"
    assert "fell back" in rep.summary()
    rep = convert(src, tmp_path / "fb6.gguf", "q6_k", progress=False)
    assert rep.tensor_types["blk.0.ffn_down_exps.weight"] == "q8_0"  # rows of 32 -> q6_k -> q8_0
    src = make_hf_model("qwen3_moe", moe_intermediate_size=24)  # down rows of 24: not even a 32-block
    rep = convert(src, tmp_path / "fb16.gguf", "q8_0", progress=False)
    assert rep.tensor_types["blk.0.ffn_down_exps.weight"] == "f16"
    assert rep.tensor_types["blk.0.ffn_gate_exps.weight"] == "q8_0"


def test_gguf_input_keep_is_bit_identical_and_requantize_matches_hf_path(big_f32, tmp_path):
    src, f32 = big_f32
    qkm = tmp_path / "qkm.gguf"
    convert(src, qkm, "q4_k_m", progress=False)
    keep = tmp_path / "keep.gguf"
    convert(qkm, keep, "keep", progress=False)
    r0, r1 = gguf.GGUFReader(str(qkm)), gguf.GGUFReader(str(keep))
    for a, b in zip(r0.tensors, r1.tensors):
        assert a.name == b.name and a.tensor_type == b.tensor_type
        assert np.array_equal(np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8)), a.name
    kv0 = {f.name: f.contents() for f in r0.fields.values() if not f.name.startswith("GGUF.")}
    kv1 = {f.name: f.contents() for f in r1.fields.values() if not f.name.startswith("GGUF.")}
    assert kv0 == kv1
    # f32 GGUF -> q4_k_m gives the same bytes as HF -> q4_k_m
    req = tmp_path / "req.gguf"
    convert(f32, req, "q4_k_m", progress=False)
    for a, b in zip(r0.tensors, gguf.GGUFReader(str(req)).tensors):
        assert np.array_equal(np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8)), a.name
    # quantized GGUF -> q8_0 dequantizes close to the quantized input
    q8 = tmp_path / "q8.gguf"
    convert(qkm, q8, "q8_0", progress=False)
    for a, b in zip(r0.tensors, gguf.GGUFReader(str(q8)).tensors):
        x, y = dequant(a), dequant(b)
        assert np.sqrt(np.mean((x - y) ** 2)) <= 1e-2 * np.sqrt(np.mean(x**2)) + 1e-12, a.name


def test_keep_rejected_for_hf_input(tmp_path):
    from moelite.errors import ConversionError

    with pytest.raises(ConversionError, match="keep"):
        convert(make_hf_model("qwen3_moe"), tmp_path / "k.gguf", "keep", progress=False)
    assert not (tmp_path / "k.gguf").exists()


# ---- DeepSeek-V3 FP8 (e4m3, 128x128 blocks, weight_scale_inv) ----


def _e4m3_table() -> np.ndarray:
    c = np.arange(256)
    sign = np.where(c & 0x80, -1.0, 1.0)
    e, m = (c >> 3) & 0xF, c & 7
    v = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * 2.0 ** (e - 7.0))
    v[(e == 15) & (m == 7)] = np.nan
    return sign * v


def _to_fp8_blocks(w: np.ndarray, block: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (codes uint8 [r, c], scale_inv f32 [ceil(r/b), ceil(c/b)], dequantized reference)."""
    table = _e4m3_table()
    finite = np.where(np.isnan(table), np.inf, table)
    nb = (-(-w.shape[0] // block), -(-w.shape[1] // block))
    scale = np.zeros(nb, np.float32)
    codes = np.zeros(w.shape, np.uint8)
    for i in range(nb[0]):
        for j in range(nb[1]):
            blk = w[i * block : (i + 1) * block, j * block : (j + 1) * block]
            s = np.float32(np.abs(blk).max() / 448.0)
            scale[i, j] = s
            codes[i * block : (i + 1) * block, j * block : (j + 1) * block] = np.abs(
                finite[None, None, :] - (blk / s)[..., None]
            ).argmin(-1)
    ref = table[codes].astype(np.float32) * np.repeat(np.repeat(scale, block, 0), block, 1)[: w.shape[0], : w.shape[1]]
    return codes, scale, ref.astype(np.float32)


def test_deepseek_v3_fp8_weights_are_dequantized(tmp_path):
    src = make_hf_model("deepseek_v3")
    refs = {}

    def edit(ts):
        for name in [
            n for n in ts if n.endswith(("experts.3.up_proj.weight", "self_attn.q_b_proj.weight")) and ".layers.1." in n
        ]:
            codes, scale, refs[name] = _to_fp8_blocks(ts[name], block=16)  # small blocks: several per tensor
            ts[name] = ("F8_E4M3", list(codes.shape), codes.tobytes())
            ts[name + "_scale_inv"] = scale
        return ts

    d = edited_copy(src, tmp_path / "fp8", edit)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16]}
    (d / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "fp8.gguf"
    convert(d, out, "f32", progress=False)
    ts = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    assert len(refs) == 2
    up = dequant(ts["blk.1.ffn_up_exps.weight"])[3]
    np.testing.assert_array_equal(up, refs["model.layers.1.mlp.experts.3.up_proj.weight"])
    np.testing.assert_array_equal(
        dequant(ts["blk.1.attn_q_b.weight"]), refs["model.layers.1.self_attn.q_b_proj.weight"]
    )
    assert not any("scale_inv" in n for n in ts)


# ---- GPT-OSS MXFP4 experts ----

FP4 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def _hf_mxfp4_dequant(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """transformers' reading of HF MXFP4: [E, out, G, 16] + [E, out, G] -> [E, out, G*32]."""
    v = np.empty((*blocks.shape[:-1], 32), np.float32)
    v[..., 0::2], v[..., 1::2] = FP4[blocks & 0x0F], FP4[blocks >> 4]
    v *= np.exp2(scales.astype(np.float32) - 127)[..., None]
    return v.reshape(*blocks.shape[:-2], -1)


def test_gpt_oss_mxfp4_experts_stay_mxfp4_and_match(tmp_path):
    src = make_hf_model("gpt_oss", hidden_size=64, intermediate_size=64)
    rng = np.random.default_rng(0)
    refs = {}

    def edit(ts):
        for bid in range(2):
            x = f"model.layers.{bid}.mlp.experts"
            for proj, (rows, cols) in (("gate_up_proj", (128, 64)), ("down_proj", (64, 64))):
                del ts[f"{x}.{proj}"]
                blocks = rng.integers(0, 256, (4, rows, cols // 32, 16), dtype=np.uint8)
                scales = rng.integers(118, 130, (4, rows, cols // 32), dtype=np.uint8)
                refs[(bid, proj)] = _hf_mxfp4_dequant(blocks, scales)  # [E, out, in]
                ts[f"{x}.{proj}_blocks"] = ("U8", list(blocks.shape), blocks.tobytes())
                ts[f"{x}.{proj}_scales"] = ("U8", list(scales.shape), scales.tobytes())
        return ts

    d = edited_copy(src, tmp_path / "mx", edit)
    for type_name in ("f32", "q8_0"):
        out = tmp_path / f"mx_{type_name}.gguf"
        rep = convert(d, out, type_name, progress=False)
        assert rep.tensor_types["blk.0.ffn_gate_exps.weight"] == "mxfp4"
        ts = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
        for bid in range(2):
            gu = refs[(bid, "gate_up_proj")]
            np.testing.assert_array_equal(dequant(ts[f"blk.{bid}.ffn_gate_exps.weight"]), gu[:, 0::2])
            np.testing.assert_array_equal(dequant(ts[f"blk.{bid}.ffn_up_exps.weight"]), gu[:, 1::2])
            np.testing.assert_array_equal(dequant(ts[f"blk.{bid}.ffn_down_exps.weight"]), refs[(bid, "down_proj")])


def test_bf16_source_is_read_exactly(tmp_path):
    src = make_hf_model("olmoe")
    kept = {}

    def edit(ts):
        for name, a in list(ts.items()):
            if a.ndim >= 2:
                u = (a.view(np.uint32) >> 16).astype(np.uint16)  # truncate to bf16
                kept[name] = (u.astype(np.uint32) << 16).view(np.float32)
                ts[name] = ("BF16", list(a.shape), u.tobytes())
        return ts

    d = edited_copy(src, tmp_path / "bf", edit)
    out = tmp_path / "bf.gguf"
    convert(d, out, "bf16", progress=False)
    ts = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    assert ts["token_embd.weight"].tensor_type == T.BF16
    np.testing.assert_array_equal(dequant(ts["token_embd.weight"]), kept["model.embed_tokens.weight"])
    gate = np.stack([kept[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"] for e in range(8)])
    np.testing.assert_array_equal(dequant(ts["blk.1.ffn_gate_exps.weight"]), gate)
