"""Bad inputs and failed writes: each raises ConversionError naming the file / tensor / key and what was
expected, and leaves no output file (and no temp file) behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hf_fixtures import make_hf_model

from moelite.converters import convert
from moelite.errors import ConversionError


def copy_fixture(tmp_path: Path, family: str = "qwen3_moe") -> Path:
    d = tmp_path / "src"
    shutil.copytree(make_hf_model(family), d)
    return d


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    if out.parent.is_dir():
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temp file left"


def edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
    (d / "config.json").write_text(json.dumps(cfg))


def test_missing_shard(tmp_path):
    d = copy_fixture(tmp_path)
    (d / "model-00002-of-00003.safetensors").unlink()
    out = tmp_path / "o.gguf"
    with pytest.raises(ConversionError, match=r"model-00002-of-00003\.safetensors: missing shard"):
        convert(d, out, progress=False)
    assert_nothing_written(out)


def test_truncated_safetensors(tmp_path):
    d = copy_fixture(tmp_path)
    shard = d / "model-00001-of-00003.safetensors"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 1000)
    out = tmp_path / "o.gguf"
    with pytest.raises(
        ConversionError, match=r"model-00001-of-00003\.safetensors: truncated safetensors file: tensor \S+ ends at byte"
    ):
        convert(d, out, progress=False)
    assert_nothing_written(out)
    with open(shard, "r+b") as f:  # header itself cut
        f.truncate(20)
    with pytest.raises(ConversionError, match="truncated or corrupt"):
        convert(d, out, progress=False)
    assert_nothing_written(out)


def test_unknown_model_type(tmp_path):
    d = copy_fixture(tmp_path)
    edit_config(d, model_type="frobnicator_moe")
    out = tmp_path / "o.gguf"
    with pytest.raises(
        ConversionError, match=r"config\.json: unknown model_type 'frobnicator_moe'; expected one of .*qwen3_moe"
    ):
        convert(d, out, progress=False)
    assert_nothing_written(out)


def test_dense_model(tmp_path):
    d = copy_fixture(tmp_path)
    edit_config(d, model_type="qwen3", num_local_experts=None, num_experts_per_tok=None)
    out = tmp_path / "o.gguf"
    with pytest.raises(ConversionError, match=r"model_type 'qwen3' is a dense \(non-MoE\) model"):
        convert(d, out, progress=False)
    d2 = copy_fixture(tmp_path / "b")
    edit_config(d2, num_local_experts=1)
    with pytest.raises(ConversionError, match="dense"):
        convert(d2, out, progress=False)
    assert_nothing_written(out)


def test_tensor_shape_contradicts_config(tmp_path):
    d = copy_fixture(tmp_path)
    edit_config(d, moe_intermediate_size=48)  # experts on disk are [E, 32, H]
    out = tmp_path / "o.gguf"
    with pytest.raises(
        ConversionError,
        match=r"tensor blk\.0\.ffn_gate_exps\.weight has shape \[8, 32, 64\] but "
        r"config\.json .* implies \[8, 48, 64\]",
    ):
        convert(d, out, progress=False)
    assert_nothing_written(out)
    d2 = copy_fixture(tmp_path / "b")
    edit_config(d2, vocab_size=400)
    with pytest.raises(ConversionError, match=r"token_embd\.weight has shape \[320, 64\]"):
        convert(d2, out, progress=False)


def test_missing_expert_tensor(tmp_path):
    d = copy_fixture(tmp_path)
    edit_config(d, num_local_experts=9)
    with pytest.raises(
        ConversionError,
        match=r"model\.layers\.0\.mlp\.experts\.8\.gate_proj\.weight is missing: "
        r"config\.json says 9 experts",
    ):
        convert(d, tmp_path / "o.gguf", progress=False)


def test_unwritable_output_path(tmp_path):
    src = make_hf_model("qwen3_moe")
    with pytest.raises(ConversionError, match=r"no_such_dir/o\.gguf: cannot write the output file"):
        convert(src, tmp_path / "no_such_dir" / "o.gguf", progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConversionError, match="cannot write the output file"):
        convert(src, blocker / "o.gguf", progress=False)
    with pytest.raises(ConversionError, match="is a directory"):
        convert(src, tmp_path, progress=False)


def test_disk_full_leaves_nothing(tmp_path):
    """RLIMIT_FSIZE in a child process: writes past the limit fail with EFBIG, as on a full disk."""
    src = make_hf_model("qwen3_moe")
    out = tmp_path / "full.gguf"
    code = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        from moelite.converters import convert
        from moelite.errors import ConversionError
        try:
            convert({str(src)!r}, {str(out)!r}, "f32", progress=False)
        except ConversionError as e:
            print("ConversionError:", e)
            sys.exit(3)
        sys.exit(0)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=os.environ)
    assert p.returncode == 3, p.stdout + p.stderr
    assert "full.gguf: disk full (or file size limit reached) while writing the output file" in p.stdout
    assert_nothing_written(out)


def test_interrupt_and_existing_output(tmp_path, monkeypatch):
    """Ctrl-C in the middle removes the temp file and leaves an existing OUT untouched."""
    from moelite.converters import quant

    src = make_hf_model("qwen3_moe")
    out = tmp_path / "o.gguf"
    out.write_bytes(b"previous")
    real, calls = quant.encode, []

    def boom(p, n):
        calls.append(p.name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(p, n)

    monkeypatch.setattr(quant, "encode", boom)
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, progress=False)
    assert out.read_bytes() == b"previous"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.gguf.")]


def test_missing_input_and_not_a_model(tmp_path):
    with pytest.raises(ConversionError, match="no such file or directory"):
        convert(tmp_path / "nope", tmp_path / "o.gguf", progress=False)
    (tmp_path / "junk.bin").write_bytes(b"hello world")
    with pytest.raises(ConversionError, match="not a Hugging Face model directory and not a GGUF file"):
        convert(tmp_path / "junk.bin", tmp_path / "o.gguf", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="no config.json"):
        convert(tmp_path / "empty", tmp_path / "o.gguf", progress=False)
    with pytest.raises(ConversionError, match="unknown output type 'q3_x'"):
        convert(make_hf_model("qwen3_moe"), tmp_path / "o.gguf", "q3_x", progress=False)
    assert_nothing_written(tmp_path / "o.gguf")


@pytest.mark.parametrize(
    "key,value", [("num_experts_per_tok", [2, 2]), ("moe_intermediate_size", "32"), ("rms_norm_eps", [1e-6])]
)
def test_config_values_of_the_wrong_type_name_the_key(tmp_path, key, value):
    """A config.json value of the wrong JSON type is a ConversionError naming the key (not a TypeError)."""
    import json

    from hf_fixtures import edited_copy, make_hf_model

    from moelite.converters import convert
    from moelite.errors import ConversionError

    src = edited_copy(make_hf_model("qwen3_moe"), tmp_path / "hf", lambda ts: ts)
    cfg = json.loads((src / "config.json").read_text())
    cfg[key] = value
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=key):
        convert(src, tmp_path / "out.gguf", "f32", progress=False)
    assert not (tmp_path / "out.gguf").exists()
