"""Hostile GGUF files (issue 15): each crash class the fuzzer found is a minimal file here that must give a
ModelFormatError naming the file and the key or tensor (runtime/validate.py), never a signal, a hang, a huge
allocation or a raw Python exception. Built from a converted fixture by rewriting keys and tensors."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from fixture_models import fixture_gguf

import moelite

ModelFormatError = moelite.errors.ModelFormatError
T = gguf.GGMLQuantizationType
V = gguf.GGUFValueType


def rewrite(
    src: Path,
    dst: Path,
    *,
    kv: dict | None = None,
    retype: dict | None = None,
    add: dict | None = None,
    drop: tuple[str, ...] = (),
) -> Path:
    """Copy a GGUF with keys set (name -> (value, GGUFValueType[, sub type])), tensors stored under another
    ggml type (name -> GGMLQuantizationType, zero data of the same logical shape), tensors added (name ->
    (numpy array, type)) or dropped."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, str(r.fields["general.architecture"].contents()))
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.alignment") or name in (kv or {}):
            continue
        w.add_key_value(name, f.contents(), f.types[0], f.types[1] if len(f.types) > 1 else None)
    for name, (value, *types) in (kv or {}).items():
        w.add_key_value(name, value, *types)
    for t in r.tensors:
        if t.name in drop:
            continue
        if retype and t.name in retype:
            w.add_tensor(
                t.name, zeros_of(retype[t.name], [int(d) for d in reversed(t.shape)]), raw_dtype=retype[t.name]
            )
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    for name, (data, typ) in (add or {}).items():
        w.add_tensor(name, data, raw_dtype=typ)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def zeros_of(typ: T, shape: list[int]) -> np.ndarray:
    """Zero data of ggml type typ for a tensor of numpy shape `shape` (rows last)."""
    plain = {
        T.F32: np.float32,
        T.F16: np.float16,
        T.I8: np.int8,
        T.I16: np.int16,
        T.I32: np.int32,
        T.I64: np.int64,
        T.F64: np.float64,
    }
    if typ in plain:
        return np.zeros(shape, dtype=plain[typ])
    block, size = gguf.GGML_QUANT_SIZES[typ]
    return np.zeros([*shape[:-1], shape[-1] // block * size], dtype=np.uint8)


def expect_error(path: Path, *needles: str) -> str:
    with pytest.raises(ModelFormatError) as e:
        moelite.load(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


@pytest.fixture(scope="module")
def qwen():
    return fixture_gguf("qwen3_moe")[1]


@pytest.fixture(scope="module")
def dsv3():
    return fixture_gguf("deepseek_v3")[1]


# ---- tensor types: a weight of a type without a CPU dot kernel segfaulted, a non-F32 norm aborted -------------
@pytest.mark.parametrize("typ", [T.I8, T.I16, T.I32, T.I64, T.F64])
@pytest.mark.parametrize("tensor", ["blk.0.attn_q.weight", "blk.1.ffn_gate_exps.weight"])
def test_matmul_weight_of_integer_type(qwen, tmp_path, tensor, typ):
    bad = rewrite(qwen, tmp_path / "bad.gguf", retype={tensor: typ})
    expect_error(bad, tensor, typ.name, "matrix multiply")


@pytest.mark.parametrize("tensor", ["token_embd.weight", "blk.0.ffn_down_exps.weight"])
def test_q8_k_weight(tmp_path, tensor):
    # Q8_K blocks hold 256 values: the demo's rows are multiples of 256
    demo = Path(moelite.__file__).parent / "data" / "demo.gguf"
    bad = rewrite(demo, tmp_path / "bad.gguf", retype={tensor: T.Q8_K})
    expect_error(bad, tensor, "Q8_K")


@pytest.mark.parametrize("tensor", ["blk.0.attn_norm.weight", "output_norm.weight", "blk.1.attn_k_norm.weight"])
def test_norm_weight_not_f32(qwen, tmp_path, tensor):
    bad = rewrite(qwen, tmp_path / "bad.gguf", retype={tensor: T.F16})
    expect_error(bad, tensor, "expected F32")


def test_output_bias_f16(qwen, tmp_path):
    bad = rewrite(qwen, tmp_path / "bad.gguf", add={"output.bias": (np.zeros(_n_vocab(qwen), np.float16), T.F16)})
    expect_error(bad, "output.bias", "expected F32")


def test_expert_bias_f16(tmp_path):
    src = fixture_gguf("gpt_oss")[1]
    bad = rewrite(src, tmp_path / "bad.gguf", retype={"blk.0.ffn_up_exps.bias": T.F16})
    expect_error(bad, "blk.0.ffn_up_exps.bias", "expected F32")


def _n_vocab(path: Path) -> int:
    return next(int(t.shape[1]) for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")


# ---- keys: counts, eps, rope dims, groups -----------------------------------------------------------------
@pytest.mark.parametrize(
    "key,value,vtype,needle",
    [
        ("attention.head_count_kv", 0, V.UINT32, "head_count_kv"),
        ("attention.head_count_kv", 3, V.UINT32, "divisor of n_head"),
        ("attention.head_count", 0, V.UINT32, "head_count"),
        ("attention.key_length", 0, V.UINT32, "key_length"),
        ("attention.layer_norm_rms_epsilon", -0.5, V.FLOAT32, "layer_norm_rms_epsilon"),
        ("attention.layer_norm_rms_epsilon", float("nan"), V.FLOAT32, "layer_norm_rms_epsilon"),
        ("rope.dimension_count", 0, V.UINT32, "rope.dimension_count"),
        ("rope.dimension_count", 7, V.UINT32, "even"),
        ("rope.dimension_count", 65536, V.UINT32, "rope.dimension_count"),
        ("rope.dimension_count", -2, V.INT32, "rope.dimension_count"),
        ("rope.freq_base", 0.0, V.FLOAT32, "rope.freq_base"),
        ("rope.freq_base", float("inf"), V.FLOAT32, "rope.freq_base"),
        ("block_count", 6 * 10**18, V.UINT64, "block_count"),
        ("block_count", 2**31, V.UINT64, "block_count"),
        ("context_length", 2**40, V.UINT64, "context_length"),
        ("embedding_length", float("nan"), V.FLOAT32, "embedding_length"),
        ("expert_used_count", 9, V.UINT32, "expert_used_count"),
        ("expert_group_count", 32, V.UINT32, "expert_group_count"),
        ("expert_group_count", 3, V.UINT32, "divisor of n_expert"),
        ("rope.scaling.factor", -4.0, V.FLOAT32, "rope.scaling.factor"),
    ],
)
def test_bad_key(qwen, tmp_path, key, value, vtype, needle):
    bad = rewrite(qwen, tmp_path / "bad.gguf", kv={f"qwen3moe.{key}": (value, vtype)})
    expect_error(bad, needle)


def test_array_where_a_count_belongs(qwen, tmp_path):
    bad = rewrite(qwen, tmp_path / "bad.gguf", kv={"qwen3moe.attention.head_count": (["a", "b"], V.ARRAY, V.STRING)})
    expect_error(bad, "head_count")


def test_topk_group_above_groups(dsv3, tmp_path):
    bad = rewrite(dsv3, tmp_path / "bad.gguf", kv={"deepseek2.expert_group_used_count": (8, V.UINT32)})
    expect_error(bad, "expert_group_used_count")


# ---- shapes -------------------------------------------------------------------------------------------------
def test_token_embd_1d(qwen, tmp_path):
    n = _n_vocab(qwen)
    bad = rewrite(
        qwen,
        tmp_path / "bad.gguf",
        drop=("token_embd.weight",),
        add={"token_embd.weight": (np.zeros(64 * n, np.float32), T.F32)},
    )
    expect_error(bad, "token_embd.weight")


@pytest.mark.parametrize("length,typ", [(3, T.F32), (None, T.F16)])
def test_rope_factors(qwen, tmp_path, length, typ):
    n_rot = int(gguf.GGUFReader(qwen).fields["qwen3moe.attention.key_length"].contents())  # no rope key: head size
    data = np.ones(length or n_rot // 2, np.float16 if typ == T.F16 else np.float32)
    bad = rewrite(qwen, tmp_path / "bad.gguf", add={"rope_freqs.weight": (data, typ)})
    expect_error(bad, "rope_freqs.weight")


def test_dense_ffn_shape(dsv3, tmp_path):
    r = gguf.GGUFReader(dsv3)
    down = next(t for t in r.tensors if t.name == "blk.0.ffn_down.weight")
    rows, cols = int(down.shape[1]), int(down.shape[0])  # numpy [n_embd, n_ff]
    bad = rewrite(
        dsv3,
        tmp_path / "bad.gguf",
        drop=("blk.0.ffn_down.weight",),
        add={"blk.0.ffn_down.weight": (np.zeros((rows, cols - 4), np.float32), T.F32)},
    )
    expect_error(bad, "blk.0.ffn_down.weight")


def test_exp_probs_b_shape(dsv3, tmp_path):
    bad = rewrite(
        dsv3,
        tmp_path / "bad.gguf",
        drop=("blk.1.exp_probs_b.bias",),
        add={"blk.1.exp_probs_b.bias": (np.zeros((2, 8), np.float32), T.F32)},
    )
    expect_error(bad, "blk.1.exp_probs_b.bias")


# ---- strings: invalid UTF-8 names the key, not UnicodeDecodeError -------------------------------------------
def _patch(path: Path, old: bytes, new: bytes) -> Path:
    data = path.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    path.write_bytes(data.replace(old, new))
    return path


def test_invalid_utf8_value(qwen, tmp_path):
    bad = rewrite(qwen, tmp_path / "bad.gguf", kv={"general.name": ("QQQQQQQQ", V.STRING)})
    expect_error(_patch(bad, b"QQQQQQQQ", b"QQ\xff\xfeQQQQ"), "general.name", "UTF-8")


def test_invalid_utf8_key(qwen, tmp_path):
    bad = rewrite(qwen, tmp_path / "bad.gguf", kv={"general.zzzzzzzz": ("x", V.STRING)})
    expect_error(_patch(bad, b"zzzzzzzz", b"zz\xc3\x28zzzz"), "metadata key", "UTF-8")


def test_invalid_utf8_tensor_name(qwen, tmp_path):
    bad = rewrite(qwen, tmp_path / "bad.gguf", add={"zzzzzzzz": (np.zeros(4, np.float32), T.F32)})
    expect_error(_patch(bad, b"zzzzzzzz", b"zz\xe2\x82zzzz"), "tensor name", "UTF-8")


# ---- no false rejections ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss", "phimoe"])
def test_valid_files_pass(family):
    with moelite.load(fixture_gguf(family, "q8_0")[1], n_ctx=32) as m:
        assert np.isfinite(m.logits([1, 2, 3])).all()


# ---- tokenizer keys: the types the tokenizer and chat template read ------------------------------------------
@pytest.mark.parametrize(
    "key,value,types",
    [
        ("tokenizer.ggml.bos_token_id", float("nan"), (V.FLOAT32,)),
        ("tokenizer.ggml.eos_token_id", 2**40, (V.UINT64,)),
        ("tokenizer.ggml.bos_token_id", [1, 2], (V.ARRAY, V.UINT32)),
        ("tokenizer.ggml.tokens", 7, (V.UINT32,)),
        ("tokenizer.ggml.model", 3, (V.UINT32,)),
        ("tokenizer.chat_template", ["a", "b"], (V.ARRAY, V.STRING)),
    ],
)
def test_tokenizer_key_of_wrong_type(qwen, tmp_path, key, value, types):
    bad = rewrite(qwen, tmp_path / "bad.gguf", kv={key: (value, *types)})
    expect_error(bad, key, "expected")


def test_token_scores_of_another_length(qwen, tmp_path):
    n = len(gguf.GGUFReader(qwen).fields["tokenizer.ggml.tokens"].data)
    bad = rewrite(qwen, tmp_path / "bad.gguf", kv={"tokenizer.ggml.scores": ([0.0] * (n + 3), V.ARRAY, V.FLOAT32)})
    expect_error(bad, "tokenizer.ggml.scores", "entries")


def test_invalid_utf8_in_a_name_the_error_quotes(qwen, tmp_path):
    """ggml refuses the file (truncated data) before moelite checks the names: its message quotes the raw tensor
    name, which must come back escaped inside the ModelFormatError, not as a UnicodeDecodeError (fuzz seed 3002)."""
    name = struct.pack("<Q", 13) + b"output.weight"  # its tensor info; its data is the last
    bad = _patch(rewrite(qwen, tmp_path / "bad.gguf"), name, name.replace(b"output.", b"outpu\xff."))
    bad.write_bytes(bad.read_bytes()[:-4096])
    expect_error(bad, "truncated", "outpu\\xff.weight")
