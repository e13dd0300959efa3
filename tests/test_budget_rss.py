"""Budget: a generated model with real layer shapes (Qwen3-30B-A3B: n_embd 2048, expert FFN 768, top-8;
64 experts x 3 layers, ~1 GB at Q8_0, made by tools/synthetic_moe.py + moelite's converter) runs 64 tokens
under a 240 MiB budget (the file is > 4x larger) with peak RSS <= budget x 1.1 + the interpreter's baseline,
measured in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "tests" / ".fixtures" / "synthetic"
BUDGET_MIB = 240

CHILD = r"""
import json, resource, sys
import psutil
import moelite
from moelite import _core
_core.cuda_device_count()             # a CUDA build initializes its runtime here (~150 MB, even with no GPU)
base = psutil.Process().memory_info().rss                   # interpreter + numpy + moelite + backend runtimes
with moelite.load(sys.argv[1], memory_budget=sys.argv[2], n_ctx=256, n_threads=2, policy="lfuda") as m:
    ids = m.generate([5, 6, 7, 8], max_tokens=64, stop_ids=[])
    st = m.stats()["total"]
    info = m.info()
def peak_rss():   # VmHWM starts afresh at exec; ru_maxrss would also count the forked parent's pages
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
peak = peak_rss()
print(json.dumps({"base": base, "peak": peak, "n": len(ids), "stats": st, "slots": info["expert_slots"],
                  "file": info["file_size"]}))
"""


@pytest.fixture(scope="module")
def big_gguf():
    sys.path.insert(0, str(ROOT / "tools"))
    from synthetic_moe import make_synthetic_moe

    from moelite.converters import convert

    out = CACHE / "qwen3-30b-shapes-e64-l3-q8_0.gguf"
    if not out.exists():
        hf = make_synthetic_moe(CACHE / "hf-e64-l3", layers=3, n_expert=64, vocab_size=4096)
        convert(hf, out, type="q8_0", progress=False)
        for p in sorted(hf.iterdir()):  # the f16 checkpoint is 2 GB; the GGUF is all we keep
            p.unlink()
        hf.rmdir()
    return out


@pytest.mark.slow
def test_generates_under_budget_with_bounded_rss(big_gguf):
    budget = BUDGET_MIB * 2**20
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(big_gguf), f"{BUDGET_MIB}MiB"], capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["file"] >= 4 * budget
    assert res["n"] == 64
    assert all(s in (0,) or 8 <= s < 64 for s in res["slots"])  # really offloaded
    assert res["stats"]["misses"] > 0 and res["stats"]["bytes_read"] > 0
    assert res["peak"] <= budget * 1.1 + res["base"], (res["peak"] / 2**20, res["base"] / 2**20)
