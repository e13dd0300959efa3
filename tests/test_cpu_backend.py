"""moelite.cpu_backend(): which ggml CPU backend runs. A native build reports its built-in backend and the
SIMD features it was compiled with; a portable build (MOELITE_PORTABLE) picks the variant with ggml's best
score for this CPU, obeys MOELITE_CPU_VARIANT, and names its variants when asked for one it lacks. The
portable tests run where MOELITE_PORTABLE_TREE names a folder holding a portable moelite (an installed
wheel's folder): tools/portable_check.sh runs them on the wheel it builds. The emulated checks (an
AVX2-only CPU, aarch64) are tools/portable_check.sh and tools/arm64_check.sh (docs/ARM64.md)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import moelite
from moelite import _cpu

PORTABLE_TREE = Path(os.environ.get("MOELITE_PORTABLE_TREE", "/nonexistent")).resolve()
BASE_FEATURE = {"x86_64": "SSE3", "AMD64": "SSE3", "aarch64": "NEON", "arm64": "NEON"}


def test_native_build_reports_its_builtin_backend():
    if _cpu.variants():
        pytest.skip("this moelite is a portable build")
    be = moelite.cpu_backend()
    assert be["variant"] == "built-in" and be["scores"] is None
    assert Path(be["library"]).name.startswith("_core")
    feature = BASE_FEATURE.get(platform.machine())
    if feature:
        assert be["features"].get(feature) == "1", be["features"]
    with moelite.load(n_threads=1) as m:
        assert m.info()["cpu_backend"] == "built-in"


def portable(code: str, variant: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(PORTABLE_TREE))
    env.pop("MOELITE_CPU_VARIANT", None)
    if variant is not None:
        env["MOELITE_CPU_VARIANT"] = variant
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


needs_portable = pytest.mark.skipif(
    not (PORTABLE_TREE / "moelite" / "ggml").is_dir(),
    reason="MOELITE_PORTABLE_TREE names no portable moelite (tools/portable_check.sh)",
)
REPORT = (
    "import json, moelite; b = moelite.cpu_backend(); print(json.dumps([b['variant'], b['scores'], b['features']]))"
)


@needs_portable
def test_portable_build_picks_the_best_scoring_variant_and_runs_it():
    r = portable(
        REPORT + "; m = moelite.load(n_threads=1); print(m.info()['cpu_backend']);"
        "print(m.generate('Once upon a time', max_tokens=4))"
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    variant, scores, features = json.loads(lines[0])
    assert len(scores) >= 2 and scores[variant] == max(scores.values()) > 0
    assert features and lines[1] == variant and lines[2].strip()


@needs_portable
def test_portable_build_obeys_a_forced_variant():
    r = portable(REPORT)
    scores = json.loads(r.stdout)[1]
    lowest = min((v for v in scores if scores[v] > 0), key=scores.get)
    r = portable(REPORT, variant=lowest)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0] == lowest


@needs_portable
def test_portable_build_names_its_variants_for_an_unknown_one():
    r = portable("import moelite", variant="pentium-mmx")
    assert r.returncode != 0
    assert "UsageError" in r.stderr and "MOELITE_CPU_VARIANT='pentium-mmx'" in r.stderr
    assert "x64" in r.stderr or "armv8.0_1" in r.stderr


@needs_portable
def test_portable_build_refuses_a_forced_variant_this_cpu_cannot_run():
    scores = json.loads(portable(REPORT).stdout)[1]
    unrunnable = [v for v, s in scores.items() if s == 0]
    if not unrunnable:
        pytest.skip(f"this CPU runs every variant of the build: {scores}")
    r = portable("import moelite", variant=unrunnable[0])
    assert r.returncode != 0 and "UsageError" in r.stderr and "lacks features that variant needs" in r.stderr
