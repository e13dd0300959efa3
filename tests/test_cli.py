"""The `moelite` command line: run (text, --json, HF dir converted on the fly), convert, plan, the analyze hook,
and every bad argument as one line on stderr with a non-zero status."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moelite.apps.cli import main

PROMPT = "It is a truth universally"


@pytest.fixture(scope="module")
def fixture():
    from fixture_models import fixture_gguf

    return fixture_gguf("qwen3_moe")  # (hf_dir, gguf)


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "moelite"


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _env(tmp: Path) -> dict:
    import moelite

    env = dict(os.environ, XDG_CACHE_HOME=str(tmp / "cache"))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(moelite.__file__).parent.parent), env.get("PYTHONPATH", "")])
    return env


def test_python_m_moelite_run_streams_text(fixture, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "moelite",
            "run",
            fixture[1],
            "-p",
            PROMPT,
            "-n",
            "16",
            "--temp",
            "0",
            "--threads",
            "1",
            "--ignore-eos",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    import moelite

    with moelite.load(fixture[1], n_threads=1) as m:
        ids = m.generate(m.tokenizer.encode(PROMPT), max_tokens=16, stop_ids=())
        assert r.stdout == m.tokenizer.decode(ids) + "\n"


def test_run_json(fixture, capsys):
    rc, out, err = cli(
        capsys, "run", fixture[1], "-p", PROMPT, "-n", "20", "--temp", "0", "--threads", "1", "--json", "--ignore-eos"
    )
    assert rc == 0, err
    d = json.loads(out)
    assert d["usage"]["completion_tokens"] == len(d["token_ids"]) == 20 and d["finish_reason"] == "length"
    assert d["usage"]["prompt_tokens"] > 0 and d["stats"]["cache"]["hit_rate"] == 1.0 and d["stats"]["rss_bytes"] > 0
    import moelite

    with moelite.load(fixture[1], n_threads=1) as m:
        assert d["text"] == m.tokenizer.decode(d["token_ids"])
    # a stop string cuts the text; sampling with a seed is reproducible
    stop = d["text"][5:7]
    rc, out, _ = cli(
        capsys,
        "run",
        fixture[1],
        "-p",
        PROMPT,
        "-n",
        "20",
        "--temp",
        "0",
        "-t",
        "1",
        "--json",
        "--ignore-eos",
        "--stop",
        stop,
    )
    cut = json.loads(out)
    assert cut["text"] == d["text"][: d["text"].find(stop)] and cut["finish_reason"] == "stop"
    offload = str(_offload_budget(fixture[1]))  # fewer slots than experts: reads from disk
    runs = [
        json.loads(
            cli(
                capsys,
                "run",
                fixture[1],
                "-p",
                PROMPT,
                "-n",
                "12",
                "--temp",
                "1",
                "--seed",
                "7",
                "-t",
                "1",
                "--json",
                "--memory-budget",
                offload,
                "--policy",
                "lfu",
            )[1]
        )
        for _ in range(2)
    ]
    assert runs[0]["token_ids"] == runs[1]["token_ids"]
    assert runs[0]["stats"]["memory_budget"] > 0 and runs[0]["stats"]["policy"] == "lfu"
    assert runs[0]["stats"]["cache"]["misses"] > 0


def test_run_chat_and_stats(fixture, capsys):
    rc, out, err = cli(
        capsys,
        "run",
        fixture[1],
        "-p",
        "hello",
        "--chat",
        "--system",
        "Be brief.",
        "-n",
        "8",
        "--temp",
        "0",
        "-t",
        "1",
        "--stats",
    )
    assert rc == 0 and "tok/s" in err and "cache" in err


def test_hf_dir_is_converted_once_into_the_cache(fixture, capsys, cache_home):
    hf, gguf = fixture
    args = ["-p", PROMPT, "-n", "10", "--temp", "0", "-t", "1", "--json", "--ignore-eos"]
    rc, out, err = cli(capsys, "run", hf, "--convert-type", "f32", *args)
    assert rc == 0, err
    converted = list((cache_home / "converted").glob("*.gguf"))
    assert len(converted) == 1
    mtime = converted[0].stat().st_mtime_ns
    assert json.loads(out)["token_ids"] == json.loads(cli(capsys, "run", gguf, *args)[1])["token_ids"]
    assert cli(capsys, "run", hf, "--convert-type", "f32", *args)[0] == 0
    assert converted[0].stat().st_mtime_ns == mtime  # reused, not converted again


def test_convert(fixture, capsys, tmp_path):
    out = tmp_path / "m.gguf"
    rc, stdout, err = cli(capsys, "convert", fixture[0], "-o", out, "--type", "q8_0", "--no-progress")
    assert rc == 0, err
    assert out.is_file() and "qwen3moe" in stdout


def test_plan(fixture, capsys, cache_home):
    cache_home.mkdir(parents=True)
    (cache_home / "machine.json").write_text(json.dumps({"mem_bw": 10e9, "disk_bw": 1e9, "disk_method": "test"}))
    rc, out, err = cli(capsys, "plan", fixture[1], "--memory", "1GiB")
    assert rc == 0, err
    assert "everything resident" in out and "tok/s" in out
    rc, out, _ = cli(capsys, "plan", fixture[1], "--memory", str(_offload_budget(fixture[1])))
    assert rc == 0 and "offloaded" in out and "read from disk" in out
    rc, out, _ = cli(capsys, "plan", fixture[1], "--memory", "100KiB")
    assert rc == 1 and "NO" in out and "too small" in out


def test_plan_predicts_decode_speed_from_the_split_and_a_hit_rate(fixture, capsys, cache_home, tmp_path):
    """The prediction: layers x per-layer overhead + resident bytes / memory bw + missed bytes / disk bw, with the
    hit rate of the calibration side file when it was calibrated for this many slots, else 1 - (1 - slots/E)^4."""
    import re
    import shutil

    import moelite
    from moelite.runtime.speed import active_bytes

    cache_home.mkdir(parents=True)
    (cache_home / "machine.json").write_text(
        json.dumps({"mem_bw": 10e9, "disk_bw": 1e9, "disk_method": "test", "step_overhead_t1": 1e-4})
    )
    model = tmp_path / "m.gguf"
    shutil.copy(fixture[1], model)
    budget = _offload_budget(model)

    def predicted(*extra):
        rc, out, err = cli(capsys, "plan", model, "--memory", *extra, "-t", "1", "-c", "64")
        assert rc == 0, err
        m = re.search(r"predicted ([0-9.]+) tok/s decode at hit rate ([0-9.]+) % \(([^;]+);", out)
        return float(m.group(1)), float(m.group(2)) / 100, m.group(3)

    with moelite.load(model, n_ctx=64, memory_budget=None, n_threads=1) as m:
        plan, emb = m.plan, (m.tensors["token_embd.weight"][3] if "output.weight" in m.tensors else 0)
    tok_s, hit, source = predicted("1GiB")
    assert hit == 1.0 and source == "everything resident"
    expect = 1 / (len(plan.expert_slot_bytes) * 1e-4 + active_bytes(plan, emb) / 10e9)
    assert tok_s == pytest.approx(expect, rel=2e-3)
    tok_s_cap, hit, source = predicted(str(budget))
    assert "assumed 1 - (1 - slots / experts)^4" in source and 0 < hit < 1 and tok_s_cap < tok_s
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged that a single man in possession of a good fortune " * 20)
    rc = main(
        [
            "analyze",
            str(model),
            "--text",
            str(text),
            "--tokens",
            "200",
            "--seq-len",
            "100",
            "--threads",
            "1",
            "--memory-budget",
            str(budget),
            "-c",
            "64",
            "--out",
            str(tmp_path / "rep"),
        ]
    )
    assert rc == 0
    side = json.loads((tmp_path / "m.gguf.calibration.json").read_text())
    capsys.readouterr()
    _, hit, source = predicted(str(budget))
    assert "moelite analyze" in source and hit == pytest.approx(side["moelite.calibration.hit_rate"], abs=1e-3)


def test_plan_gpu_tiers(fixture, capsys):
    vram = _offload_budget(fixture[1])  # an arena smaller than the experts
    rc, out, err = cli(capsys, "plan", fixture[1], "--vram", str(vram), "--memory", "1GiB")
    assert rc == 0, err
    assert "VRAM" in out and "RAM       expert tier" in out and "pinned" in out
    rc, out, _ = cli(capsys, "plan", fixture[1], "--vram", "1GiB", "--memory", "1GiB")
    assert rc == 0 and "no tier needed" in out
    rc, out, _ = cli(capsys, "plan", fixture[1], "--vram", str(vram), "--memory", "10KiB")
    assert rc == 1 and "NO" in out and "RAM tier" in out


def _offload_budget(path) -> int:
    """The smallest budget (in 64 KiB steps) under which the model runs with fewer slots than experts."""
    import moelite
    from moelite.errors import BudgetError

    for b in range(1 << 20, 1 << 30, 1 << 16):
        try:
            with moelite.load(str(path), memory_budget=b, n_threads=1) as m:
                if m.plan.slots is not None:
                    return b
        except BudgetError:
            continue
    raise AssertionError("no budget offloads the fixture")


def test_plan_measures_the_machine_once(fixture, capsys, cache_home):
    assert cli(capsys, "plan", fixture[1], "--memory", "1GiB")[0] == 0
    d = json.loads((cache_home / "machine.json").read_text())
    assert d["mem_bw"] > 1e8 and d["disk_bw"] > 1e6


def test_analyze_bad_text_file(capsys, tmp_path):
    rc, out, err = cli(capsys, "analyze", "--text", str(tmp_path / "missing.txt"))
    assert rc == 2 and err.count("\n") == 1 and "no such text file" in err


def test_help_of_every_command(capsys):
    for cmd in ("chat", "run", "serve", "convert", "plan", "analyze"):
        rc, out, _ = cli(capsys, cmd, "--help")
        assert rc == 0 and "usage: moelite " + cmd in out


def test_readme_first_command_default_model(capsys):
    """`moelite run -p "It is a truth universally" -n 40 --temp 0`: MODEL defaults to the embedded demo."""
    from moelite.runtime.model import DEFAULT_MODEL

    rc, out, err = cli(capsys, "run", "-p", PROMPT, "-n", "40", "--temp", "0", "--threads", "1")
    if DEFAULT_MODEL.exists():
        assert rc == 0 and out.strip(), err
    else:  # not shipped yet: one clean line, no traceback
        assert rc == 1 and err.count("\n") == 1 and "demo model" in err


BAD = [
    (2, ["run", "missing.gguf", "-p", "x"], "no such file"),
    (2, ["run", "{gguf}", "-p", "x", "--memory-budget", "12XB"], "bad memory budget size"),
    (2, ["run", "{gguf}", "-p", "x", "--policy", "mru"], "unknown cache policy"),
    (2, ["run", "{gguf}", "-p", "x", "-n", "abc"], "'abc' is not an integer"),
    (2, ["run", "{gguf}", "-p", "x", "--temp", "-1"], "is not a finite number >= 0"),
    (2, ["run", "{gguf}", "-p", "x", "--top-p", "3"], "argument --top-p: '3' is not a finite number in (0, 1]"),
    (2, ["run", "{gguf}", "-p", "x", "--top-p", "nan"], "'nan' is not a finite number in (0, 1]"),
    (2, ["run", "{gguf}", "-p", "x", "--swap-threshold", "inf"], "--swap-threshold: 'inf' is not a finite number"),
    (2, ["run", "{gguf}", "-p", "x", "--seed", "9223372036854775808"], "--seed"),
    (2, ["run", "{gguf}", "-p", "x", "--threads", "0"], "--threads"),
    (2, ["run", "{gguf}"], "-p/--prompt"),
    (2, ["run", "{hf}/..", "-p", "x"], "without config.json"),
    (1, ["run", "{gguf}", "-p", "x", "--memory-budget", "100KiB"], "too small"),
    (1, ["run", "{notgguf}", "-p", "x"], "{notgguf}"),
    (2, ["frobnicate"], "invalid choice"),
    (2, ["serve", "{gguf}", "--port", "70000"], "port"),
    (2, ["convert", "{hf}", "-o", "x.gguf", "--type", "q3"], "--type"),
    (1, ["convert", "missing_dir", "-o", "{tmp}/x.gguf"], "missing_dir"),
    (2, ["plan", "{gguf}"], "--memory"),
    (2, ["chat", "{gguf}", "--ctx-size", "1e3"], "--ctx-size"),
]


@pytest.mark.parametrize("code,argv,needle", BAD, ids=[" ".join(a[:4]) for _, a, _ in BAD])
def test_bad_arguments_print_one_line(fixture, capsys, tmp_path, code, argv, needle):
    notgguf = tmp_path / "notes.gguf"
    notgguf.write_text("this is not a GGUF file\n")
    names = dict(gguf=fixture[1], hf=fixture[0], notgguf=notgguf, tmp=tmp_path)
    argv = [a.format(**names) for a in argv]
    rc, out, err = cli(capsys, *argv)
    assert rc == code, err
    assert err.startswith("moelite: error: ") and err.count("\n") == 1, err
    assert needle.format(**names) in err and "Traceback" not in err


def test_verbose_shows_the_traceback(fixture, capsys):
    rc, _, err = cli(capsys, "run", fixture[1], "-p", "x", "--memory-budget", "100KiB", "--verbose")
    assert rc == 1 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("moelite: error: ")


@pytest.mark.skipif(shutil.which("moelite") is None, reason="the console script is not installed (dev tree)")
def test_console_script(tmp_path):
    r = subprocess.run(["moelite", "run", "nope.gguf", "-p", "x"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("moelite: error: ")


# --- llama.cpp's names, one size rule, one-line errors (issue 20, issue 15) ---------------------------------
def _run(tmp_path, *argv: str, check: bool = False) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "-m", "moelite", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=180,
        env=_env(tmp_path),
    )
    assert not check or r.returncode == 0, r.stderr
    return r


def test_model_flag_and_budget_short_form(fixture, capsys):
    gguf = fixture[1]
    args = ["-p", PROMPT, "-n", "8", "--temp", "0", "-t", "1", "--json", "--ignore-eos"]
    want = json.loads(cli(capsys, "run", gguf, *args)[1])
    assert json.loads(cli(capsys, "run", "-m", gguf, *args)[1])["token_ids"] == want["token_ids"]
    assert json.loads(cli(capsys, "run", "--model", gguf, "-M", "1G", *args)[1])["stats"]["memory_budget"] == 1 << 30
    rc, _, err = cli(capsys, "run", gguf, "-m", str(gguf) + "x", *args)
    assert rc == 2 and "two models given" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "size,bytes_",
    [
        ("1g", 1 << 30),
        ("1G", 1 << 30),
        ("1GiB", 1 << 30),
        ("1gib", 1 << 30),
        ("1GB", 10**9),
        ("1gb", 10**9),
        ("1536M", 1536 << 20),
        ("1536m", 1536 << 20),
        ("1.5GiB", 3 << 29),
    ],
)
def test_one_case_insensitive_size_rule(fixture, capsys, size, bytes_):
    rc, out, err = cli(capsys, "run", fixture[1], "-p", "x", "-n", "1", "-t", "1", "--json", "-M", size)
    assert rc == 0, err
    assert json.loads(out)["stats"]["memory_budget"] == bytes_


def test_budget_errors_show_the_resolved_size(fixture, capsys):
    rc, _, err = cli(capsys, "run", fixture[1], "-p", "x", "-M", "100k")
    assert rc == 1 and "memory budget 100.00 KiB is too small" in err and "need at least" in err
    rc, _, err = cli(capsys, "run", fixture[1], "-p", "x", "-M", "3 bananas")
    assert rc == 2 and "MB/GB decimal" in err and "binary" in err


def test_prompt_file_and_random_seed(fixture, capsys, tmp_path):
    f = tmp_path / "prompt.txt"
    f.write_text(PROMPT, encoding="utf-8")
    args = ["-n", "8", "--temp", "0", "-t", "1", "--json", "--ignore-eos"]
    by_p = json.loads(cli(capsys, "run", fixture[1], "-p", PROMPT, *args)[1])
    by_f = json.loads(cli(capsys, "run", fixture[1], "-f", f, *args)[1])
    assert by_f["token_ids"] == by_p["token_ids"]
    rc, _, err = cli(capsys, "run", fixture[1], "-f", tmp_path / "nope.txt", *args)
    assert rc == 2 and "no such prompt file" in err
    rc, _, err = cli(capsys, "run", fixture[1], "-p", "x", "-f", f, *args)
    assert rc == 2 and "not allowed with" in err
    assert cli(capsys, "run", fixture[1], "-p", "x", "--temp", "0.8", "--seed", "-1", "-n", "4", "-t", "1")[0] == 0
    rc, _, err = cli(capsys, "run", fixture[1], "-p", "x", "--seed", "-2")
    assert rc == 2 and "-1: random" in err


def test_gpu_flags(fixture, capsys):
    from moelite import _core

    args = ["-p", "x", "-n", "2", "-t", "1", "--json"]
    assert cli(capsys, "run", fixture[1], "-ngl", "0", *args)[0] == 0
    assert cli(capsys, "run", fixture[1], "--device", "cpu", *args)[0] == 0
    rc, _, err = cli(capsys, "run", fixture[1], "-ngl", "0", "--device", "cuda", *args)
    assert rc == 2 and "-ngl 0 means --device cpu" in err
    if not _core.has_cuda:
        rc, _, err = cli(capsys, "run", fixture[1], "-ngl", "99", *args)
        assert rc == 2 and err.count("\n") == 1 and "no CUDA support" in err
    rc, _, err = cli(capsys, "run", fixture[1], "--vram-budget", "12 parsecs", *args)
    assert rc == 2 and "bad memory budget size" in err


def test_status_line_labels_model_memory_and_process_rss(fixture, capsys):
    rc, _, err = cli(
        capsys, "run", fixture[1], "-p", PROMPT, "-n", "4", "-t", "1", "--stats", "-M", str(_offload_budget(fixture[1]))
    )
    assert rc == 0 and "model memory" in err and " of budget " in err and "process RSS" in err


def test_context_above_training_warns_and_a_full_context_is_said(fixture, tmp_path):
    import moelite

    with moelite.load(fixture[1], n_threads=1, n_ctx=64) as m:
        trained = int(m.hparams["context_length"])
    r = _run(tmp_path, "run", fixture[1], "-p", "x", "-n", "1", "-t", "1", "-c", trained + 8, check=True)
    assert f"moelite: warning: n_ctx={trained + 8} is above the context the model was trained with" in r.stderr
    r = _run(tmp_path, "run", fixture[1], "-p", "x", "-n", "100", "-t", "1", "-c", "16", "--ignore-eos", check=True)
    assert "moelite: the context is full (16 tokens" in r.stderr


def test_native_stderr_lines_stay_below_the_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    r = _run(tmp_path, "run", bad, "-p", "x")
    assert r.returncode == 1 and r.stderr.startswith("moelite: error: ") and r.stderr.count("\n") == 1, r.stderr
    v = _run(tmp_path, "run", bad, "-p", "x", "--verbose")
    assert v.returncode == 1 and v.stderr.rstrip().splitlines()[-1].startswith("moelite: error: ")
    assert len(v.stderr.splitlines()) > 1  # the hidden lines (and the traceback) with --verbose


def test_a_bug_is_one_line_asking_for_a_report(fixture, tmp_path):
    code = (
        "import sys; import moelite.apps.run_cmd as r; r.read_prompt = lambda a: 1 / 0; "
        "from moelite.apps.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    argv = [sys.executable, "-c", code, "run", str(fixture[1]), "-p", "x"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=_env(tmp_path))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "internal error (ZeroDivisionError: division by zero); please report" in r.stderr
    r = subprocess.run(argv + ["--verbose"], capture_output=True, text=True, timeout=120, env=_env(tmp_path))
    assert "Traceback" in r.stderr and "please report" in r.stderr.splitlines()[-1]


def test_convert_default_name_and_llama_cpp_spellings(fixture, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, out, err = cli(capsys, "convert", fixture[0], "--outtype", "Q8_0", "--no-progress")
    assert rc == 0, err
    want = tmp_path / f"{Path(fixture[0]).resolve().name}-q8_0.gguf"
    assert want.is_file() and str(want.name) in out
    rc, out, err = cli(
        capsys, "convert", fixture[0], "--outfile", tmp_path / "x.gguf", "--type", "Q5_K_M", "--no-progress"
    )
    assert rc == 0 and (tmp_path / "x.gguf").is_file(), err
    import moelite

    with moelite.load(tmp_path / "x.gguf", n_threads=1) as m:
        assert m.kv["general.file_type"] == 17  # LlamaFileType.MOSTLY_Q5_K_M
        assert m.generate("hello", max_tokens=3) is not None


def test_plan_names_the_vram_budget(fixture, capsys):
    rc, out, _ = cli(capsys, "plan", "-m", fixture[1], "--vram", "10KiB", "-M", "1GiB")
    assert rc == 1 and "VRAM budget 10.00 KiB is too small" in out


def test_loading_says_which_calibration_it_uses(fixture, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.symlink_to(fixture[1])
    side = tmp_path / "m.gguf.calibration.json"
    side.write_text(json.dumps({"moelite.calibration.policy": "lfu"}))
    r = _run(tmp_path, "run", gguf, "-p", "x", "-n", "1", "-t", "1", check=True)
    assert f"moelite: using calibration {side} (policy lfu)" in r.stderr
    side.unlink()
    assert "calibration" not in _run(tmp_path, "run", gguf, "-p", "x", "-n", "1", "-t", "1", check=True).stderr


def test_cache_list_and_remove(fixture, capsys, cache_home):
    rc, out, _ = cli(capsys, "cache")
    assert rc == 0 and "0 file(s)" in out
    assert cli(capsys, "run", fixture[0], "--convert-type", "f32", "-p", "x", "-n", "1", "-t", "1")[0] == 0
    rc, out, _ = cli(capsys, "cache", "list")
    names = [ln.split()[0] for ln in out.splitlines()[1:]]
    assert rc == 0 and "1 file(s)" in out and len(names) == 1 and names[0].endswith("-f32-" + names[0][-17:])
    rc, _, err = cli(capsys, "cache", "remove")
    assert rc == 2 and "NAMEs" in err
    rc, _, err = cli(capsys, "cache", "remove", "nope.gguf")
    assert rc == 2 and "no cached file 'nope.gguf'" in err
    rc, out, _ = cli(capsys, "cache", "remove", names[0])
    assert rc == 0 and "removed 1 file(s)" in out and not list((cache_home / "converted").glob("*.gguf"))


def test_plan_reads_a_hf_directory_without_converting_it(fixture, capsys, cache_home):
    cache_home.mkdir(parents=True)
    (cache_home / "machine.json").write_text(json.dumps({"mem_bw": 10e9, "disk_bw": 1e9, "disk_method": "test"}))
    budget = str(_offload_budget(fixture[1]))
    rc, from_hf, err = cli(capsys, "plan", fixture[0], "--convert-type", "f32", "-M", budget)
    assert rc == 0, err
    assert not (cache_home / "converted").exists()  # nothing converted
    rc, from_gguf, _ = cli(capsys, "plan", fixture[1], "-M", budget)
    assert rc == 0 and "offloaded" in from_hf and "(as f32)" in from_hf
    assert from_hf.splitlines()[1:] == from_gguf.splitlines()[1:]  # the same plan, line for line
