"""Bad model files give a moelite.errors.ModelFormatError naming the file and the tensor or key, never a crash:
not a GGUF, truncated, unknown architecture, not a MoE model, a missing tensor, a wrong shape."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from fixture_models import fixture_gguf

import moelite

ModelFormatError = moelite.errors.ModelFormatError


def rewrite(
    src: Path, dst: Path, *, kv: dict | None = None, drop: tuple[str, ...] = (), reshape: dict[str, int] | None = None
) -> Path:
    """Copy a GGUF with keys changed, tensors dropped, or a tensor's last dimension cut to n rows."""
    r = gguf.GGUFReader(src)
    arch = str(r.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(dst, arch if not kv or "general.architecture" not in kv else kv["general.architecture"])
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.alignment"):
            continue
        if kv and name in kv:
            continue
        sub = f.types[1] if len(f.types) > 1 else None
        w.add_key_value(name, f.contents(), f.types[0], sub)
    for name, value in (kv or {}).items():
        if name != "general.architecture":
            w.add_key_value(
                name, value, gguf.GGUFValueType.STRING if isinstance(value, str) else gguf.GGUFValueType.UINT32
            )
    for t in r.tensors:
        if t.name in drop:
            continue
        data = np.array(t.data)
        if reshape and t.name in reshape:
            data = data[: reshape[t.name]]
        w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture(scope="module")
def good():
    return fixture_gguf("qwen3_moe")[1]


def expect_error(path: Path, *needles: str):
    with pytest.raises(ModelFormatError) as e:
        moelite.load(path)
    msg = str(e.value)
    assert str(path) in msg
    for n in needles:
        assert n in msg, msg


def test_not_a_gguf(tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"this is not a gguf file at all" * 10)
    expect_error(p, "not a valid GGUF")


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.gguf", "no such")


@pytest.mark.parametrize("frac", [0.3, 0.9, 0.97])
def test_truncated(good, tmp_path, frac):
    p = tmp_path / "trunc.gguf"
    data = good.read_bytes()
    p.write_bytes(data[: int(len(data) * frac)])
    with pytest.raises(ModelFormatError) as e:
        moelite.load(p)
    assert str(p) in str(e.value) and ("truncated" in str(e.value) or "not a valid GGUF" in str(e.value))


def test_unknown_architecture(good, tmp_path):
    p = rewrite(good, tmp_path / "arch.gguf", kv={"general.architecture": "mamba"})
    expect_error(p, "unknown architecture 'mamba'", "general.architecture")


def test_not_moe(good, tmp_path):
    drop = tuple(t.name for t in gguf.GGUFReader(good).tensors if "_exps" in t.name or "gate_inp" in t.name)
    p = rewrite(good, tmp_path / "dense.gguf", kv={"qwen3moe.expert_count": 0}, drop=drop)
    expect_error(p, "not a Mixture-of-Experts model")


def test_missing_tensor(good, tmp_path):
    p = rewrite(good, tmp_path / "missing.gguf", drop=("blk.1.attn_k.weight",))
    expect_error(p, "blk.1.attn_k.weight")


def test_missing_expert_tensor(good, tmp_path):
    p = rewrite(good, tmp_path / "missing_exps.gguf", drop=("blk.0.ffn_down_exps.weight",))
    expect_error(p, "blk.0.ffn_down_exps.weight")


def test_wrong_shape(good, tmp_path):
    p = rewrite(good, tmp_path / "shape.gguf", reshape={"blk.0.attn_q.weight": 8})
    expect_error(p, "blk.0.attn_q.weight", "expected")


def test_wrong_expert_shape(good, tmp_path):
    p = rewrite(good, tmp_path / "shape_exps.gguf", reshape={"blk.1.ffn_up_exps.weight": 3})
    expect_error(p, "blk.1.ffn_up_exps.weight", "expected")


def test_errors_do_not_crash_the_interpreter(good, tmp_path):
    """Run a bad load in a child process: it must end with a Python exception, not a signal."""
    p = tmp_path / "trunc.gguf"
    p.write_bytes(good.read_bytes()[:5000])
    code = f"import moelite\ntry:\n    moelite.load({str(p)!r})\nexcept moelite.errors.ModelFormatError:\n    print('ok')\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda d: b"XXXX" + d[4:], "invalid magic"),
        (lambda d: d[:4] + (99).to_bytes(4, "little") + d[8:], "version 99"),
        (lambda d: d[:200], "failed to read"),
    ],
)
def test_bad_gguf_header_says_why(tmp_path, mutate, needle):
    """The header's problem as ggml states it, in the ModelFormatError (not only on stderr above it)."""
    import moelite
    from moelite.errors import ModelFormatError
    from moelite.runtime.model import default_model_path

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(mutate(open(default_model_path(), "rb").read()))
    with pytest.raises(ModelFormatError, match=needle):
        moelite.load(bad)
