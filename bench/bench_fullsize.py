"""A full-size Qwen3-30B-A3B-shaped file under a laptop's memory (issue 34): 48 layers of Qwen3-30B-A3B's shapes
at Q4_K_M (~17 GiB), run under an 8 GiB and a 4 GiB memory cgroup, moelite vs llama.cpp (llama-cpp-python 0.3.36)
on the same file and threads. Writes the "Full-size file" section of bench/RESULTS.md:

    python bench/bench_fullsize.py [--caps 8,4] [--runs 2] [--prompt 128] [--gen 32] [--threads 2]

The file: bench/out/models/qwen3-30b-a3b-shapes-L48-q4_k_m.gguf, grown by tools/deepen_gguf.py from the 10-layer one
run_bench.py makes (tools/synthetic_moe.py + moelite's converter; each deeper block a copy of a shallow one with its
experts relabelled), cached (git-ignored). Its weights are random, so its routing is not a trained model's: random
routers favour a few experts per layer whatever the token, which makes a cache's job easier than trained routing
does (the trained-routing numbers are bench-moe's in the same report).

Each run is one process (bench/worker.py) in its own memory cgroup of the cap + 10 % + 96 MiB (the same rule as
run_bench.py's capped scenarios), the file's pages dropped from the page cache first; moelite gets the cap as
memory_budget. Prompt: --prompt token ids, then --gen decode steps fed fixed ids (teacher-forced: both engines
decode the same tokens). Reported: prefill and decode tok/s, moelite's expert hit rate and MiB read per token by its
cache, MiB read from disk per decode token (/proc/self/io), peak RSS vs the cap, and what `moelite plan` predicts
for the cap. The file is calibrated first (`moelite analyze` on 1024 tokens of README.md at the first cap, unless its
side file exists): random routers' preferences are nothing the planner's rule for trained models knows, and both
moelite's runs and `moelite plan` use the side file, as they do for a user who ran `moelite analyze`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tools"))
LAYERS = 48
HEAD = "## Full-size file under a laptop's memory"  # the section's start in RESULTS.md, whatever commit it names


def model_path() -> Path:
    from deepen_gguf import deepen
    from run_bench import model_path as shallow

    out = OUT / "models" / f"qwen3-30b-a3b-shapes-L{LAYERS}-q4_k_m.gguf"
    if not out.exists():
        deepen(shallow("qwen3-30b-shapes", 10), out, LAYERS)
    return out


def head() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()


def calibrate(path: Path, cap: float, threads: int) -> None:
    """`moelite analyze` on README.md (1024 tokens) at this cap: writes the file's calibration side file."""
    if Path(str(path) + ".calibration.json").exists():
        return
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "moelite", "analyze", str(path), "--text", str(ROOT / "README.md")]
        cmd += ["--tokens", "1024", "--seq-len", "512", "--memory-budget", f"{cap:g}GiB", "--threads", str(threads)]
        subprocess.run(cmd + ["--out", d], check=True, capture_output=True, text=True, timeout=3600)


def run(engine: str, path: Path, prompt: str, teacher: str, a, budget: int, cgroup: str | None) -> dict:
    from run_bench import drop_page_cache

    cmd = [sys.executable, str(ROOT / "bench" / "worker.py"), engine, str(path), "--prompt", prompt]
    cmd += ["--teacher", teacher, "--threads", str(a.threads)]
    cmd += ["--budget", str(budget)] if engine == "moelite" else ["--no-repack"]  # see worker.py
    if cgroup:
        cmd += ["--cgroup", cgroup]
    drop_page_cache(str(path))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        return {"error": (r.stderr or r.stdout)[-600:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caps", default="8,4", help="memory caps in GiB")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report-only", action="store_true", help="rewrite the section from bench/out/fullsize.json")
    a = ap.parse_args(argv)
    from run_bench import Cgroups, disk_bandwidth, machine, predicted_decode

    if a.report_only:
        res = json.loads((OUT / "fullsize.json").read_text())
        report(argparse.Namespace(**{**vars(a), **res.get("args", {})}), model_path(), res)
        return 0

    path = model_path()
    rng = np.random.default_rng(34)
    ids = [int(x) for x in rng.integers(3, 32000, size=a.prompt + a.gen)]
    caps = [float(c) for c in a.caps.split(",")]
    calibrate(path, caps[0], a.threads)
    res: dict = {"machine": machine(), "disk": disk_bandwidth(str(path)), "caps": {}, "args": vars(a), "commit": head()}
    with tempfile.TemporaryDirectory() as d:
        prompt, teacher = Path(d) / "prompt.json", Path(d) / "teacher.json"
        prompt.write_text(json.dumps(ids[: a.prompt]))
        teacher.write_text(json.dumps(ids[a.prompt :]))
        cg = Cgroups()
        try:
            for cap in caps:
                budget = int(cap * 2**30)
                rows: dict[str, list[dict]] = {"moelite": [], "llama": []}
                for i in range(a.runs):
                    for engine in ("moelite", "llama") if i % 2 == 0 else ("llama", "moelite"):
                        group = (
                            cg.make(f"full-{engine}-{cap:g}-{i}", int(budget * 1.1) + (96 << 20)) if cg.base else None
                        )
                        rows[engine].append(run(engine, path, str(prompt), str(teacher), a, budget, group))
                        print(cap, engine, json.dumps(rows[engine][-1]), flush=True)
                predicted = predicted_decode(str(path), budget, a.threads, a.prompt + a.gen + 8)
                res["caps"][f"{cap:g}"] = {"budget": budget, "runs": rows, "predicted": predicted}
        finally:
            cg.cleanup()
    res["cgroup"] = cg.kind or f"unavailable: {cg.reason}"
    (OUT / "fullsize.json").write_text(json.dumps(res, indent=1))
    report(a, path, res)
    return 0


def report(a, path: Path, res: dict) -> None:
    commit = res.get("commit") or head()  # the commit measured (--report-only keeps it)

    def med(rs: list[dict], key: str, scale: float = 1.0) -> float | None:
        v = [r[key] * scale for r in rs if r.get(key) is not None]
        return statistics.median(v) if v else None

    def fmt(rs: list[dict], key: str, scale: float = 1.0, p: int = 2) -> str:
        v = [r[key] * scale for r in rs if r.get(key) is not None]
        return f"{statistics.median(v):.{p}f} [{min(v):.{p}f}, {max(v):.{p}f}]" if v else "-"

    lines = [
        f"{HEAD}: a Qwen3-30B-A3B-shaped file, measured at commit `{commit}`",
        "",
        f"Written by `python bench/bench_fullsize.py --caps {a.caps} --runs {a.runs} --prompt {a.prompt} --gen {a.gen} "
        f"--threads {a.threads}` on {res['machine']}, {a.threads} threads. `{path.name}`: {LAYERS} layers of "
        f"Qwen3-30B-A3B's shapes (128 experts top-8, H 2048, expert FFN 768, vocabulary 32768), Q4_K_M, "
        f"{path.stat().st_size / 2**30:.2f} GiB, random weights (tools/deepen_gguf.py). **Its routing is not a trained "
        f"model's**: random routers favour a few experts per layer whatever the token (the hit rates below), an easier "
        f"case for a cache than trained routing, whose numbers are bench-moe's above. Each run a process in a memory cgroup of the cap + 10 % + 96 MiB "
        f"({res.get('cgroup')}), the file's pages dropped first; moelite's memory_budget = the cap; prompt "
        f"{a.prompt} ids, then {a.gen} decode steps fed fixed ids (the same for both engines). Disk: "
        f"{res['disk'] / 1e9:.2f} GB/s measured. Median [min, max] of {a.runs} runs.",
        "",
        "| cap | engine | decode tok/s | vs llama.cpp | prefill tok/s | hit rate | MiB read per token (cache) | "
        "MiB read from disk per decode token | peak RSS GiB (vs cap) | `moelite plan` predicts (error) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    checks = []
    for cap, c in res["caps"].items():
        ok = {e: [r for r in rs if "error" not in r] for e, rs in c["runs"].items()}
        dm, dl = med(ok["moelite"], "decode_tok_s"), med(ok["llama"], "decode_tok_s")
        ratio = f"{dm / dl:.2f}x" if dm and dl else "-"
        pred = c["predicted"].get("tok_s")
        for e, name in (("moelite", "moelite"), ("llama", "llama.cpp")):
            rs = ok[e]
            disk = [r["disk_read_bytes"] / 2**20 / max(r["tokens"], 1) for r in rs]
            rss = med(rs, "peak_rss", 1 / 2**30)
            lines.append(
                f"| {cap} GiB | {name} | {fmt(rs, 'decode_tok_s')} | {ratio if e == 'moelite' else ''} | "
                f"{fmt(rs, 'prefill_tok_s', p=1)} | "
                f"{fmt(rs, 'hit_rate', 100, 1) + ' %' if e == 'moelite' and rs else '-'} | "
                f"{fmt(rs, 'bytes_read_per_token', 1 / 2**20, 1) if e == 'moelite' else '-'} | "
                f"{f'{statistics.median(disk):.1f}' if disk else '-'} | "
                f"{f'{rss:.2f} ({100 * rss / float(cap):.0f} %)' if rss else '-'} | "
                f"{f'{pred:.2f} ({100 * (pred - dm) / dm:+.0f} %)' if e == 'moelite' and pred and dm else ''} |"
            )
        if dm and dl:
            checks.append(f"{cap} GiB: decode {dm / dl:.2f}x llama.cpp (target >= 3x at 8 GiB)")
        rss = med(ok["moelite"], "peak_rss", 1 / 2**30)
        if rss:
            checks.append(f"{cap} GiB: moelite's peak RSS {100 * rss / float(cap):.0f} % of the cap (target <= 110 %)")
        if pred and dm:
            checks.append(
                f"{cap} GiB: `moelite plan` predicted {pred:.2f} tok/s, {100 * (pred - dm) / dm:+.0f} % of the "
                f"measured (target within +-30 %), from a hit rate of {100 * c['predicted'].get('hit_rate', 0):.0f} % "
                f"({c['predicted'].get('source')}) where the runs measured {100 * med(ok['moelite'], 'hit_rate'):.0f} %"
            )
        errors = [f"{e}: {r['error']}" for e, rs in c["runs"].items() for r in rs if "error" in r]
        if errors:
            checks.append(f"{cap} GiB, failed runs: " + "; ".join(x.replace("\n", " ")[:300] for x in errors))
    lines += [""] + [f"- {x}" for x in checks]
    section = "\n".join(lines) + "\n"
    from run_bench import replace_section

    replace_section(HEAD, section)
    print(section)


if __name__ == "__main__":
    sys.exit(main())
