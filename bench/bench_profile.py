"""Where the time goes (issue 21): `perf` profiles of one workload in moelite (one graph per step, and the
per-layer graphs it replaced) and in llama.cpp (llama-cpp-python), same GGUF and threads.

    python bench/bench_profile.py [--model bench-moe] [--what prefill|decode|both]

Each engine runs in its own `perf record` (the load is skipped with --delay); the report groups the sampled
symbols (matmul kernels, attention, activation quantization, thread synchronisation, other) and lists the top ones.
Writes bench/PROFILE.md. Needs `perf` (linux-tools) and permission to profile the process (perf_event_paranoid).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_bench import ROOT, machine, model_path  # noqa: E402

CHILD = r"""
import json, sys, time
engine, path, what, reps, n_prompt = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
ids = [10 + (7 * i) % 3000 for i in range(n_prompt)]
if engine == "llama":
    from llama_cpp import Llama
    m = Llama(model_path=path, n_ctx=n_prompt + reps + 8, n_threads=2, n_threads_batch=2, n_batch=512, n_ubatch=512,
              verbose=False)
    reset, run = m.reset, m.eval
else:
    import moelite
    m = moelite.load(path, n_threads=2, n_ctx=n_prompt + reps + 8, fused_graph=engine != "moelite-layered",
                     expert_gemm=engine != "moelite-mmid")
    reset, run = m.reset, m.eval
run(ids); reset()
time.sleep(1.0)                                   # perf starts here (--delay): the load is not sampled
t = time.perf_counter()
if what == "prefill":
    for _ in range(reps):
        reset(); run(ids)
    n = reps * len(ids)
else:
    run(ids)
    t = time.perf_counter()
    for i in range(reps):
        run([ids[i % len(ids)]])
    n = reps
print(json.dumps({"tok_s": n / (time.perf_counter() - t)}))
"""

GROUPS = [
    ("matmul kernels (weights x activations)", r"gemv|gemm|vec_dot_q|vec_dot_iq|mul_mat|repack"),
    ("attention (KV dot, softmax, flash attention)", r"vec_dot_f16|flash_attn|soft_max|fp32_to_fp16"),
    ("activation quantization", r"quantize_row|quantize_mat"),
    ("thread synchronisation and spin", r"barrier|omp|threadpool|sched_yield|futex"),
    ("unresolved (ggml's static functions: tiled flash attention's GEMM, thread pool loops)", r"^0x"),
    ("kernel (page faults, scheduling)", r"^\[k\]"),
]
# "before" columns: a prompt's experts by mul_mat_id (one GEMV per token, before expert_gemm); a decode step as
# per-layer graphs (before the one-graph step)
ENGINES = {
    "prefill": [
        ("moelite", "moelite (per-expert GEMMs)"),
        ("moelite-mmid", "moelite (mul_mat_id, before)"),
        ("llama", "llama.cpp"),
    ],
    "decode": [
        ("moelite", "moelite (one graph per step)"),
        ("moelite-layered", "moelite (per-layer graphs, before)"),
        ("llama", "llama.cpp"),
    ],
}


def profile(engine: str, path: str, what: str, reps: int, n_prompt: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "perf.data"
        args = [engine, path, what, str(reps), str(n_prompt)]
        load_s = _load_seconds(args)
        child = [sys.executable, "-c", CHILD, *args]
        r = subprocess.run(
            ["perf", "record", "-q", "-F", "1999", "-D", str(int(load_s * 1000)), "-o", str(data), *child],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise SystemExit(f"perf record failed: {r.stderr[-500:]}")
        tok_s = __import__("json").loads(r.stdout.strip().splitlines()[-1])["tok_s"]
        rep = subprocess.run(
            ["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "symbol"],
            capture_output=True,
            text=True,
        ).stdout
    rows = []
    for line in rep.splitlines():
        m = re.match(r"\s*([0-9.]+)%\s+(\[[k.]\])\s+(.+?)\s*$", line)
        if m:
            sym = re.sub(r"(\s+-)+\s*$", "", m.group(3)).strip()  # perf's empty trailing columns
            rows.append((float(m.group(1)), ("[k] " if m.group(2) == "[k]" else "") + sym))
    return {"tok_s": tok_s, "rows": rows}


def _load_seconds(args: list[str]) -> float:
    """How long the child takes to reach its timed part (load + warm-up; the same child, stopped there), so that
    perf skips it; the child sleeps a second at that point, which covers the difference between two loads."""
    import time

    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", CHILD.replace("time.sleep(1.0)", "raise SystemExit(0)"), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )
    return time.perf_counter() - t + 0.5


def group(rows: list[tuple[float, str]]) -> dict[str, float]:
    out = {g: 0.0 for g, _ in GROUPS}
    out["other"] = 0.0
    for pct, sym in rows:
        for g, rx in GROUPS:
            if re.search(rx, sym):
                out[g] += pct
                break
        else:
            out["other"] += pct
    return out


def section(model: str, path: str, what: str, reps: int, n_prompt: int) -> list[str]:
    res = {e: profile(e, path, what, reps, n_prompt) for e, _ in ENGINES[what]}
    work = (
        f"a {n_prompt}-token prefill"
        if what == "prefill"
        else f"one-token decode steps after a {n_prompt}-token prompt"
    )
    lines = [
        f"## {model}: {what} ({reps} x {work})",
        "",
        "| | " + " | ".join(label for _, label in ENGINES[what]) + " |",
        "|---" * (len(ENGINES[what]) + 1) + "|",
        "| tok/s | " + " | ".join(f"{res[e]['tok_s']:.1f}" for e, _ in ENGINES[what]) + " |",
    ]
    grouped = {e: group(res[e]["rows"]) for e, _ in ENGINES[what]}
    for g in [*(g for g, _ in GROUPS), "other"]:
        lines.append(f"| {g} | " + " | ".join(f"{grouped[e][g]:.1f} %" for e, _ in ENGINES[what]) + " |")
    for e, label in ENGINES[what]:
        lines += ["", f"Top symbols, {label}:", "", "| share | symbol |", "|---|---|"]
        lines += [f"| {pct:.2f} % | `{sym[:90]}` |" for pct, sym in res[e]["rows"][:10]]
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench-moe")
    ap.add_argument("--what", choices=("prefill", "decode", "both"), default="both")
    ap.add_argument("--prompt", type=int, default=128)
    a = ap.parse_args()
    if not shutil.which("perf"):
        raise SystemExit("perf not found (install linux-tools)")
    path = model_path(a.model, 10)
    lines = [
        "# Where the time goes: perf profiles",
        "",
        f"Generated by `python bench/bench_profile.py --model {a.model} --what {a.what}` on: {machine()}; 2 threads; "
        f"`{Path(path).name}`, every expert resident; the load is not sampled. Shares are of all samples of the "
        "process (both threads). Both engines' libraries are stripped: their static functions (the tiled flash "
        "attention's GEMM micro-kernel, thread pool loops) show as unresolved addresses, a group of their own.",
        "",
    ]
    for what in ("prefill", "decode") if a.what == "both" else (a.what,):
        lines += section(a.model, path, what, 20 if what == "prefill" else 400, a.prompt)
    (ROOT / "bench" / "PROFILE.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
