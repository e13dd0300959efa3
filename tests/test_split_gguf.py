"""Split GGUF sets (llama.cpp's gguf-split layout: NAME-00001-of-0000N.gguf ..., keys split.no / split.count /
split.tensors.count in every shard, the metadata in the first): read as one model from any shard, written by
`moelite convert --split-max-size / --split-max-tensors`, refused with a clear error when a set is broken.

Two writers make the sets: gguf-py's GGUFWriter(split_max_tensors=...) as llama.cpp's converter calls it (default
32-byte alignment, so expert reads are buffered), and moelite's converter (every shard 4096-aligned: O_DIRECT)."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from fixture_models import fixture_gguf

import moelite
from moelite import _core
from moelite.apps.cli import main
from moelite.converters import convert
from moelite.converters.gguf_out import rewrite_stock
from moelite.converters.standins import write_standins
from moelite.errors import ConversionError, ModelFormatError

IDS = list(range(5, 37))
FAMILIES = ("qwen3_moe", "qwen3_5_moe_text")  # routed experts + shared; a hybrid recurrent one (Gated DeltaNet)


def shard_names(out: Path) -> list[Path]:
    """The shards written for OUT = dir/NAME.gguf."""
    return sorted(out.parent.glob(f"{out.stem}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].gguf"))


def gguf_py_split(src: Path, out: Path, max_tensors: int) -> list[Path]:
    """src re-written by gguf-py's writer with split_max_tensors, the way llama.cpp's converter splits."""
    return rewrite_stock(src, out, split_max_tensors=max_tensors)


def write_shards(
    d: Path, name: str, src: Path, groups: list[list[str]], kv: list[dict] | None = None, count: int | None = None
) -> list[Path]:
    """A hand-made set from src's tensors: shard i holds groups[i] (names), with split keys (count: split.count,
    default len(groups)) plus kv[i] overrides (None deletes a key); shard 0 also holds src's metadata."""
    r = gguf.GGUFReader(str(src))
    arch = str(r.get_field("general.architecture").contents())
    tensors = {t.name: t for t in r.tensors}
    n = count or len(groups)
    paths = []
    for i, names in enumerate(groups):
        p = d / f"{name}-{i + 1:05d}-of-{n:05d}.gguf"
        w = gguf.GGUFWriter(p, arch)
        if i == 0:
            for f in r.fields.values():
                if not f.name.startswith("GGUF.") and f.name not in ("general.architecture", "general.alignment"):
                    w.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
        else:
            w.kv_data[0].clear()
        keys = {
            "split.no": (i, gguf.GGUFValueType.UINT16),
            "split.count": (n, gguf.GGUFValueType.UINT16),
            "split.tensors.count": (sum(map(len, groups)), gguf.GGUFValueType.INT32),
        }
        for k, v in ((kv or [{}] * len(groups))[i]).items():
            keys[k] = v
        for k, v in keys.items():
            if v is not None:
                w.add_key_value(k, v[0], v[1])
        for t in names:
            w.add_tensor(t, np.asarray(tensors[t].data), raw_dtype=tensors[t].tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        paths.append(p)
    return paths


def third(path: Path) -> int:
    """A split size that makes 3-4 shards of the file at path (bytes of tensor data)."""
    return sum(t[4] for t in _core.read_gguf(str(path))["tensors"]) // 3 + 1


def run(path, **opts) -> tuple[np.ndarray, list[int], dict]:
    with moelite.load(str(path), kv_type="f32", n_threads=1, n_ubatch=64, **opts) as m:
        return m.logits(IDS), m.generate(IDS[:4], max_tokens=24, stop_ids=[]), m.info()


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    _, path = fixture_gguf(request.param)
    logits, greedy, _ = run(path)
    with moelite.load(str(path), kv_type="f32", n_threads=1, n_ubatch=64) as m:
        minimum = m.plan.minimum_budget
    return path, logits, greedy, minimum


@pytest.mark.parametrize("writer", ["gguf-py", "moelite"])
def test_split_set_is_bit_identical(model, writer, tmp_path):
    path, logits, greedy, minimum = model
    n_tensors = len(_core.read_gguf(str(path))["tensors"])
    if writer == "gguf-py":
        shards = gguf_py_split(path, tmp_path / "m.gguf", max_tensors=n_tensors // 3 + 1)
    else:
        shards = convert(path, tmp_path / "m.gguf", "keep", progress=False, split_max_tensors=n_tensors // 3 + 1).files
    assert len(shards) == 3 and all(p.exists() for p in shards)
    assert not (tmp_path / "m.gguf").exists()
    for opened in (shards[0], shards[-1]):  # the first shard, or any later one
        lg, gr, info = run(opened)
        assert np.array_equal(lg, logits) and gr == greedy
        assert info["files"] == [str(p) for p in shards] and info["path"] == str(shards[0])
        assert info["file_size"] == sum(p.stat().st_size for p in shards) and not info["offloaded"]
        lg, gr, info = run(opened, memory_budget=minimum)  # every expert read from its shard on demand
        assert info["offloaded"] and np.array_equal(lg, logits) and gr == greedy


def test_moelite_shards_are_page_aligned(tmp_path):
    _, path = fixture_gguf("qwen3_moe")
    report = convert(path, tmp_path / "m.gguf", "keep", progress=False, split_max_size=third(path))
    assert len(report.files) >= 3 and report.out == report.files[0]
    for i, p in enumerate(report.files):
        r = gguf.GGUFReader(str(p))
        assert int(r.get_field("general.alignment").contents()) == 4096
        assert int(r.get_field("split.no").contents()) == i
        assert int(r.get_field("split.count").contents()) == len(report.files)
        assert (r.get_field("general.architecture") is not None) == (i == 0)  # metadata in the first only
        assert all(t.data_offset % 4096 == 0 for t in r.tensors)
    assert report.file_size == sum(p.stat().st_size for p in report.files)
    # the whole set, converted again: same tensors as the unsplit file
    again = convert(report.files[1], tmp_path / "one.gguf", "keep", progress=False)
    one = {t[0]: t[1:3] for t in _core.read_gguf(str(again.out))["tensors"]}
    assert one == {t[0]: t[1:3] for t in _core.read_gguf(str(report.out))["tensors"]}


def test_convert_split_is_atomic(tmp_path, monkeypatch):
    """A failure in the second shard leaves no shard (and no temp file) behind."""
    from moelite.converters import quant

    _, path = fixture_gguf("qwen3_moe")
    n_tensors = len(_core.read_gguf(str(path))["tensors"])
    real, calls = quant.encode, []

    def failing(p, n):
        calls.append(p.name)
        if len(calls) == n_tensors // 2:
            raise KeyboardInterrupt
        return real(p, n)

    monkeypatch.setattr(quant, "encode", failing)
    with pytest.raises(KeyboardInterrupt):
        convert(path, tmp_path / "m.gguf", "q8_0", progress=False, split_max_tensors=n_tensors // 4)
    assert len(calls) == n_tensors // 2 and list(tmp_path.iterdir()) == []


def test_cli_convert_plan_run_split(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _, path = fixture_gguf("qwen3_moe")
    out = tmp_path / "m.gguf"
    assert (
        main(
            [
                "convert",
                str(path),
                "-o",
                str(out),
                "--type",
                "keep",
                "--split-max-size",
                str(third(path)),
                "--no-progress",
            ]
        )
        == 0
    )
    said = capsys.readouterr().out
    shards = shard_names(out)
    assert len(shards) >= 3 and f"split set of {len(shards)} files" in said
    total = sum(p.stat().st_size for p in shards)
    assert main(["plan", str(shards[-1]), "--memory", "1GiB"]) == 0
    said = capsys.readouterr().out
    assert f"{shards[0]} (split set of {len(shards)} files, {total / 2**30:.2f} GiB)" in said
    assert main(["run", str(shards[1]), "-p", "Hello", "-n", "4", "--temp", "0", "--stats"]) == 0
    assert f"split set of {len(shards)} files" in capsys.readouterr().err
    # analyze's calibration side file hangs off the first shard, and a load from any shard uses it
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged that a single man in possession of a good fortune " * 20)
    assert (
        main(
            [
                "analyze",
                str(shards[-1]),
                "--text",
                str(text),
                "--tokens",
                "200",
                "--seq-len",
                "100",
                "--threads",
                "1",
                "-c",
                "64",
                "--out",
                str(tmp_path / "rep"),
            ]
        )
        == 0
    )
    side = Path(str(shards[0]) + ".calibration.json")
    assert side.is_file()
    with moelite.load(str(shards[2]), n_threads=1) as m:
        assert m.calibration_file == str(side)


def test_standins_of_a_split_set(tmp_path):
    _, path = fixture_gguf("qwen3_moe")
    shards = convert(path, tmp_path / "m.gguf", "q8_0", progress=False, split_max_tensors=20).files
    side = write_standins(shards[-1], "q4_0", progress=False)  # from any shard: named after the first
    assert side.out == Path(str(shards[0]) + ".standins.gguf")
    with moelite.load(str(shards[1]), kv_type="f32", n_threads=1, n_ubatch=64) as m:
        minimum = m.plan.minimum_budget
    with moelite.load(str(shards[1]), n_threads=1, n_ubatch=64, memory_budget=minimum, standins=True) as m:
        assert m.info()["standins"]["path"] == str(side.out)
        assert len(m.generate(IDS[:4], max_tokens=4, stop_ids=[])) > 0


# --- broken sets: a moelite.errors exception naming the file -------------------------------------------------


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    _, path = fixture_gguf("qwen3_moe")
    names = [t[0] for t in _core.read_gguf(str(path))["tensors"]]
    third = len(names) // 3
    return path, [names[:third], names[third : 2 * third], names[2 * third :]]


def expect_error(path: Path, *words: str) -> None:
    with pytest.raises(ModelFormatError) as e:
        moelite.load(str(path), n_threads=1)
    for w in words:
        assert w in str(e.value), str(e.value)
    with pytest.raises(ConversionError):  # the converter's GGUF input too
        convert(path, path.with_name("out.gguf"), "keep", progress=False)


def test_missing_shard(parts, tmp_path):
    shards = write_shards(tmp_path, "m", parts[0], parts[1])
    shards[1].unlink()
    expect_error(shards[0], str(shards[1]), "missing shard 2 of 3")
    expect_error(shards[2], str(shards[1]), "missing shard 2 of 3")


def test_shard_of_another_set(parts, tmp_path):
    path, groups = parts
    shards = write_shards(tmp_path, "m", path, groups)
    (tmp_path / "o").mkdir()
    other = write_shards(tmp_path / "o", "m", path, [groups[0], groups[1][:-1], groups[1][-1:] + groups[2]])
    shutil.copy(other[1], shards[1])  # same name, another split of the model
    expect_error(shards[0], "m-00002-of-00003.gguf")


def test_counts_disagree(parts, tmp_path):
    path, groups = parts
    shards = write_shards(tmp_path, "m", path, groups, kv=[{}, {"split.count": (4, gguf.GGUFValueType.UINT16)}, {}])
    expect_error(shards[0], str(shards[1]), "split.count", "4")
    shards = write_shards(tmp_path, "n", path, groups, kv=[{}, {}, {"split.no": (1, gguf.GGUFValueType.UINT16)}])
    expect_error(shards[0], str(shards[2]), "split.no")
    shards = write_shards(
        tmp_path, "t", path, groups, kv=[{}, {}, {"split.tensors.count": (5, gguf.GGUFValueType.INT32)}]
    )
    expect_error(shards[0], str(shards[2]), "split.tensors.count")


def test_tensor_count_only_some_shards_give(parts, tmp_path):
    """Found by tools/fuzz.py --target split: the first shard's split.tensors.count was taken from the next shard
    when it was absent or negative, so a set whose shards disagreed about the count loaded (fixed in the core,
    csrc/gguf_index.cpp, 27dfa37)."""
    path, groups = parts
    i32 = gguf.GGUFValueType.INT32
    shards = write_shards(tmp_path, "b", path, groups, kv=[{"split.tensors.count": (-5, i32)}, {}, {}])
    expect_error(shards[1], "split.tensors.count", "-5")
    shards = write_shards(tmp_path, "c", path, groups, kv=[{"split.tensors.count": (-5, i32)}] * 3)
    expect_error(shards[0], "split.tensors.count", "-5")
    # absent from every shard: not checked (llama.cpp's loader does not read it either)
    shards = write_shards(tmp_path, "d", path, groups, kv=[{"split.tensors.count": None}] * 3)
    with moelite.load(str(shards[1]), n_threads=1) as m:
        assert m.info()["files"] == [str(p) for p in shards]


def test_tensor_count_absent_from_the_first_shard_only(parts, tmp_path):
    """The core's check (csrc/gguf_index.cpp: shard 1's value, -1 when absent, is the one every shard must give)."""
    path, groups = parts
    shards = write_shards(tmp_path, "a", path, groups, kv=[{"split.tensors.count": None}, {}, {}])
    for opened in (shards[0], shards[2]):
        expect_error(opened, "split.tensors.count")


def test_tensor_count_negative_in_a_later_shard(parts, tmp_path):
    """-1 written in a shard is not 'absent' (the core read both as -1 before 27dfa37)."""
    path, groups = parts
    shards = write_shards(
        tmp_path,
        "a",
        path,
        groups,
        kv=[
            {"split.tensors.count": None},
            {"split.tensors.count": None},
            {"split.tensors.count": (-1, gguf.GGUFValueType.INT32)},
        ],
    )
    expect_error(shards[0], "split.tensors.count")


def test_tensor_in_two_shards(parts, tmp_path):
    path, groups = parts
    shards = write_shards(
        tmp_path, "m", path, [groups[0], groups[1] + groups[2][:1], groups[2]], kv=[{"split.tensors.count": None}] * 3
    )
    expect_error(shards[0], groups[2][0], "is also in", str(shards[1]))


def test_truncated_shard(parts, tmp_path):
    shards = write_shards(tmp_path, "m", parts[0], parts[1])
    with open(shards[1], "r+b") as f:
        f.truncate(shards[1].stat().st_size - 4096)
    expect_error(shards[0], str(shards[1]), "truncated")


def test_renamed_shard(parts, tmp_path):
    shards = write_shards(tmp_path, "m", parts[0], parts[1])
    lone = shards[1].rename(tmp_path / "renamed.gguf")
    expect_error(lone, "renamed.gguf", "-00002-of-00003.gguf", "cannot be found")


# --- llama.cpp reads the sets moelite writes -------------------------------------------------------------------


@pytest.mark.slow
def test_llama_cpp_loads_moelite_split_set(tmp_path):
    from llama_cpp_ref import llama_cpp_logits, need_llama_cpp

    llama_cpp = need_llama_cpp()
    _, path = fixture_gguf("qwen3_moe")
    shards = convert(path, tmp_path / "m.gguf", "keep", progress=False, split_max_size=third(path)).files
    assert len(shards) >= 3
    err = float(np.abs(llama_cpp_logits(shards[0], IDS[:12]) - run(path)[0][:12]).max())
    assert err <= 1e-3, f"llama.cpp on moelite's split set vs moelite max |logit diff| = {err}"
    with moelite.load(str(shards[0]), n_threads=1, kv_type="f32") as m:
        ours = m.generate(IDS[:6], max_tokens=16, stop_ids=[])
    llm = llama_cpp.Llama(
        model_path=str(shards[0]),
        n_ctx=64,
        n_threads=1,
        type_k=0,
        type_v=0,
        flash_attn=False,
        logits_all=True,
        verbose=False,
    )
    try:
        theirs, seq = [], list(IDS[:6])
        llm.eval(seq)
        for _ in range(16):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            theirs.append(tok)
            llm.eval([tok])
    finally:
        llm.close()
    assert ours == theirs
