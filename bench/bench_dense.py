"""Where the dense (non-expert) weights live, measured under a memory cap far below the file size (issue 28).

moelite keeps the dense weights in anonymous memory (read once at load); llama.cpp maps the file, so its dense
weights are page-cache pages that a memory cap may evict under expert-read pressure and that then come back from
disk. One moelite binary shows both: the default, and MOELITE_DENSE_MMAP=1 (a benchmark switch: the dense tensors
are read-only MAP_SHARED views of the model file, the way llama.cpp holds them, without repacking). llama.cpp
(llama-cpp-python, its default mmap) runs on the same file and threads.

    python bench/bench_dense.py                    # --model qwen3-30b-shapes --caps 25,50 --runs 3 --threads 2

Per cap (percent of the file size) and run, interleaved: moelite default, moelite repack=False (what the mapped
variant is bit-identical to), moelite MOELITE_DENSE_MMAP=1, llama.cpp. Every run is a fresh process (bench/worker.py)
in its own memory cgroup (bench/run_bench.py's Cgroups: the cap + 10 % + 96 MiB for the interpreter, as run_bench
does), the model's pages dropped from the page cache before it; moelite gets the cap as memory_budget. The prompt is
followed by teacher-forced decode steps (the same ids for every engine), so the counters cover decode only: tok/s,
bytes read from the disk per token (/proc/self/io read_bytes, every thread of the process: expert reads, page
faults and readahead) and for moelite the expert cache's own reads (stats()['total']['bytes_read']); what the disk
gave beyond those is the dense weights coming back. Peak RSS (VmHWM, mapped file pages included) and the cgroup's
peak (anonymous + page cache charged to it). Writes bench/out/dense.json and the table block of bench/DENSE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_bench import OUT, ROOT, Cgroups, drop_page_cache, machine, model_path, prompt_ids, run  # noqa: E402

REPORT = ROOT / "bench" / "DENSE.md"
BEGIN, END = "<!-- dense: begin (bench/bench_dense.py) -->", "<!-- dense: end -->"
# label, worker engine, worker flags, environment
ENGINES = [
    ("moelite (anonymous, default)", "moelite", [], {}),
    ("moelite repack=False (anonymous)", "moelite", ["--no-repack"], {}),
    ("moelite MOELITE_DENSE_MMAP=1 (page cache)", "moelite", [], {"MOELITE_DENSE_MMAP": "1"}),
    ("llama.cpp (mmap, page cache)", "llama", [], {}),
]


def simd_flags() -> str:
    """The SIMD extensions /proc/cpuinfo lists (the machine's level, whatever ggml was built for)."""
    want = (
        "sse4_2",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512_vnni",
        "avx512_bf16",
        "amx_tile",
        "amx_int8",
    )
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return " ".join(f for f in want if f in have)
    except OSError:
        pass
    return "unknown"


def stock_copy(path: str) -> str:
    """The model re-written by gguf-py's writer with its default alignment (32 bytes), as llama.cpp's converter writes
    the GGUFs people download: most tensors then start off a page, so moelite reads those experts buffered (through the
    page cache, as it does for stock files) instead of with O_DIRECT. Written once into bench/out/models/."""
    from moelite.converters.gguf_out import rewrite_stock

    out = OUT / "models" / (Path(path).stem + "-align32.gguf")
    if out.exists():
        return str(out)
    tmp = out.with_suffix(".part")
    rewrite_stock(path, tmp)
    os.replace(tmp, out)
    return str(out)


def cgroup_peak(cg: Cgroups, d: str | None) -> int | None:
    if not d:
        return None
    for f in ("memory.max_usage_in_bytes", "memory.peak"):  # v1, v2
        try:
            return int(Path(d, f).read_text().split()[0])
        except (OSError, ValueError):
            continue
    return None


def one(
    label: str,
    engine: str,
    flags: list[str],
    env: dict,
    path: str,
    pf: str,
    tf: str,
    a,
    budget: int,
    cg: Cgroups,
    tag: str,
) -> dict:
    cgroup = cg.make(tag, int(budget * (1 + a.slack)) + (96 << 20)) if cg.base else None
    drop_page_cache(path)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        r = run(engine, path, pf, a, budget, cgroup, [*flags, "--teacher", tf])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    r["cgroup_peak"] = cgroup_peak(cg, cgroup)
    if "error" not in r:
        n = max(r["tokens"], 1)
        r["disk_per_token"] = r["disk_read_bytes"] / n
        if engine == "moelite":
            r["expert_per_token"] = r["cache_bytes_read"] / n
            r["other_per_token"] = max(0.0, r["disk_read_bytes"] - r["cache_bytes_read"]) / n
    return r


def med(rows: list[dict], key: str) -> tuple[float, float, float] | None:
    v = [r[key] for r in rows if r.get(key) is not None and "error" not in r]
    return (statistics.median(v), min(v), max(v)) if v else None


def table(res: dict) -> list[str]:
    lines = [
        "| cap | engine | decode tok/s | vs moelite default | disk MB read / token | of which expert cache MB | "
        "other (dense re-reads, readahead) MB | peak RSS MiB | cgroup peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    f = lambda t, s=1.0, p=1: "-" if t is None else f"{t[0] / s:.{p}f} ({t[1] / s:.{p}f}-{t[2] / s:.{p}f})"
    for key, sc in res["caps"].items():
        slack = sc.get("slack", 0.10)
        cap = f"{sc.get('cap', key)} % ({sc['budget'] / 2**20:.0f} MiB" + (
            ")" if abs(slack - 0.10) < 1e-9 else f"; cgroup = cap + {slack:.0%} + 96 MiB)"
        )
        if sc.get("stock"):
            cap += ", 32-byte-aligned copy"
        if sc.get("commit", res["commit"]) != res["commit"]:
            cap += f", at `{sc['commit']}`"
        base = med(sc["runs"].get(ENGINES[0][0], []), "decode_tok_s")
        for label, *_ in ENGINES:
            rows = sc["runs"].get(label)
            if rows is None:
                continue
            errs = [r["error"] for r in rows if "error" in r]
            if errs and len(errs) == len(rows):
                lines.append(f"| {cap} | {label} | failed: {errs[0][:120]} | | | | | | |")
                continue
            d = med(rows, "decode_tok_s")
            vs = f"{d[0] / base[0]:.2f}x" if d and base else "-"
            err = re.sub(r"(/[^\s/:]+)+/", "", errs[0]) if errs else ""  # file names without their folders
            why = err if len(err) <= 80 else (err[:30] + " ... " + err[-40:] if errs else "")
            failed = f" ({len(errs)} of {len(rows)} runs failed: {why})" if errs else ""
            lines.append(
                f"| {cap} | {label}{failed} | {f(d, 1, 2)} | {vs} | "
                f"{f(med(rows, 'disk_per_token'), 1e6, 2)} | {f(med(rows, 'expert_per_token'), 1e6, 2)} | "
                f"{f(med(rows, 'other_per_token'), 1e6, 2)} | {f(med(rows, 'peak_rss'), 2**20, 0)} | "
                f"{f(med(rows, 'cgroup_peak'), 2**20, 0)} |"
            )
    return lines


def write_report(res: dict) -> None:
    block = (
        [
            BEGIN,
            "",
            f"Measured by `python bench/bench_dense.py` at commit `{res['commit']}` on: {res['machine']}; "
            f"/proc/cpuinfo SIMD: {res['simd']}; {res['threads']} threads; cgroup {res['cgroup']}; swap: {res['swap']}.",
            "",
            f"Model: `{res['model']}` ({res['file_size'] / 2**30:.2f} GiB; dense weights {res['dense_bytes'] / 2**20:.0f} "
            f"MiB, the rest routed experts). Prompt {res['prompt_tokens']} tokens, then {res['gen']} teacher-forced decode "
            f"steps (the same ids for every engine); {res['runs']} interleaved runs per engine and cap, medians "
            "(min-max). Each run in its own cgroup of the cap + 10 % + 96 MiB, the file's pages dropped first; "
            "moelite's memory_budget = the cap. llama.cpp: " + res["llama"] + ", use_mmap, no repacking "
            "(`use_extra_bufts=false`, as run_bench runs it under a cap).",
            "",
        ]
        + table(res)
        + ["", END]
    )
    text = (
        REPORT.read_text()
        if REPORT.exists()
        else "# Dense weights: anonymous memory vs the page cache\n\n" + BEGIN + "\n" + END + "\n"
    )
    head, rest = text.split(BEGIN, 1)
    REPORT.write_text(head + "\n".join(block) + rest.split(END, 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-30b-shapes", help="a GGUF path or a run_bench model name")
    ap.add_argument("--qwen-layers", type=int, default=10)
    ap.add_argument("--caps", default="25,50", help="percent of the file size")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen", type=int, default=32, help="teacher-forced decode steps")
    ap.add_argument(
        "--slack",
        type=float,
        default=0.10,
        help="each cgroup allows the cap x (1 + SLACK) + 96 MiB (run_bench's rule: 0.10); 0: the cap itself "
        "plus the interpreter's room, where what the process owns fills the cgroup",
    )
    ap.add_argument("--merge", action="store_true", help="keep the caps of bench/out/dense.json this run does not redo")
    ap.add_argument(
        "--stock",
        action="store_true",
        help="run on a copy with gguf-py's 32-byte alignment (llama.cpp's converter): moelite's expert reads "
        "then go through the page cache too",
    )
    ap.add_argument("--engines", default="", help="comma-separated indexes into the engine list (default: all)")
    ap.add_argument("--report-only", action="store_true", help="rewrite DENSE.md's table from bench/out/dense.json")
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if a.report_only:
        write_report(json.loads((OUT / "dense.json").read_text()))
        return
    path = model_path(a.model, a.qwen_layers)
    if a.stock:
        path = stock_copy(path)
    ids, sizes = prompt_ids(path, a.prompt_tokens + a.gen)
    stem = Path(path).stem
    pf, tf = OUT / f"dense-prompt-{stem}.json", OUT / f"dense-teacher-{stem}.json"
    pf.write_text(json.dumps(ids[: a.prompt_tokens]))
    tf.write_text(json.dumps(ids[a.prompt_tokens :]))
    import moelite

    try:
        m = moelite.load(path, n_ctx=64, memory_budget=int(sizes["file_size"] * 0.25))
    except moelite.errors.BudgetError as e:  # a small model: its minimum (the dense part is the same)
        m = moelite.load(path, n_ctx=64, memory_budget=e.minimum)
    with m:
        dense = m.info()["dense_bytes"]
    try:
        import llama_cpp

        llama = f"llama-cpp-python {llama_cpp.__version__}"
        engines = ENGINES
    except ImportError:
        llama, engines = "not installed", [e for e in ENGINES if e[1] != "llama"]
    if a.engines:
        engines = [ENGINES[int(i)] for i in a.engines.split(",")]
    swap = subprocess.run(["swapon", "--show", "--noheadings"], capture_output=True, text=True).stdout.strip()
    cg = Cgroups()
    res = {
        "machine": machine(),
        "simd": simd_flags(),
        "platform": platform.platform(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "threads": a.threads,
        "runs": a.runs,
        "prompt_tokens": a.prompt_tokens,
        "gen": a.gen,
        "llama": llama,
        "cgroup": cg.kind or f"unavailable: {cg.reason}",
        "swap": swap or "none",
        "model": os.path.relpath(path, ROOT),
        "file_size": sizes["file_size"],
        "dense_bytes": dense,
        "caps": {},
    }
    if not cg.base:
        raise SystemExit(f"no memory cgroup: {cg.reason} (the caps need one)")
    if a.merge and (OUT / "dense.json").exists():
        old = json.loads((OUT / "dense.json").read_text())
        res["caps"] = old["caps"]
        if a.stock:  # the header names the model the other rows ran on
            res.update({k: old[k] for k in ("model", "file_size", "dense_bytes")})
    try:
        for cap in a.caps.split(","):
            budget = int(sizes["file_size"] * int(cap) / 100)
            key = cap if abs(a.slack - 0.10) < 1e-9 else f"{cap}, cgroup = cap + {a.slack:.0%} + 96 MiB"
            if a.stock:
                key += ", stock alignment"
            runs: dict[str, list[dict]] = {label: [] for label, *_ in engines}
            for i in range(a.runs):
                for k, (label, engine, flags, env) in enumerate(engines):
                    r = one(label, engine, flags, env, path, str(pf), str(tf), a, budget, cg, f"dense-{cap}-{k}-{i}")
                    runs[label].append(r)
                    print(key, label, i, json.dumps(r), flush=True)
            res["caps"][key] = {
                "cap": int(cap),
                "budget": budget,
                "slack": a.slack,
                "runs": runs,
                "commit": res["commit"],
                "model": os.path.relpath(path, ROOT),
                "stock": a.stock,
            }
            (OUT / "dense.json").write_text(json.dumps(res, indent=1))
    finally:
        cg.cleanup()
    write_report(res)


if __name__ == "__main__":
    main()
