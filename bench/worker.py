"""One benchmark run in its own process (so peak RSS, disk reads and the memory cgroup are its own).

    python bench/worker.py {moelite,llama} MODEL --prompt IDS.json --gen 64 --threads 2 [--budget BYTES] [--policy P]
        [--no-prefetch] [--no-calibration] [--cgroup PATH]

A moelite budget below the model's minimum is raised to that minimum (budget_used says so).

Prints one JSON line: prefill_tok_s, decode_tok_s, ttft_s, peak_rss, disk_read_bytes (whole run, from
/proc/self/io), and for moelite the cache counters. Both engines get the same token ids, greedy decoding.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def proc_io_read_bytes() -> int:
    try:
        for line in open("/proc/self/io"):
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_moelite(a, prompt: list[int]) -> dict:
    import moelite
    opts = dict(n_threads=a.threads, n_ctx=len(prompt) + a.gen + 8, policy=a.policy, prefetch=not a.no_prefetch,
                use_calibration=not a.no_calibration)
    budget = a.budget
    try:
        m = moelite.load(a.model, memory_budget=budget, **opts)
    except moelite.errors.BudgetError as e:
        if not e.minimum:
            raise
        budget = e.minimum          # the cap is below what moelite can run in: run at its minimum, say so
        m = moelite.load(a.model, memory_budget=budget, **opts)
    io0 = proc_io_read_bytes()
    t0 = time.perf_counter()
    first = None
    n = 0
    for _ in m.stream_tokens(prompt, max_tokens=a.gen, stop_ids=[]):
        if first is None:
            first = time.perf_counter() - t0
        n += 1
    st = m.last_stats
    s = m.stats()["total"]
    # n tokens = n - 1 forward passes after the prompt, for both engines
    return {"prefill_tok_s": st.prompt_tok_s, "decode_tok_s": (n - 1) / st.decode_s if n > 1 else 0.0,
            "ttft_s": first, "run_s": time.perf_counter() - t0, "budget_used": budget, "policy": m.policy.name, "tokens": n, "disk_read_bytes": proc_io_read_bytes() - io0, "hit_rate": s["hit_rate"],
            "cache_bytes_read": s["bytes_read"], "stall_s": s["stall_s"], "prefetch_issued": s["prefetch_issued"],
            "prefetch_hits": s["prefetch_hits"], "slots": m.info()["expert_slots"]}


def run_llama(a, prompt: list[int]) -> dict:
    from llama_cpp import Llama
    if a.no_repack:
        # llama.cpp's CPU "extra buffer types" repack Q4_K/Q4_0 weights into anonymous memory, which a memory
        # cap cannot reclaim (the cgroup OOM-kills it); without them it runs from its mmap of the file
        import llama_cpp.llama_cpp as C
        default = C.llama_model_default_params

        def no_extra_bufts():
            p = default()
            p.use_extra_bufts = False
            return p
        C.llama_model_default_params = no_extra_bufts
    llm = Llama(model_path=a.model, n_ctx=len(prompt) + a.gen + 8, n_threads=a.threads, n_threads_batch=a.threads,
                n_batch=512, n_ubatch=512, use_mmap=True, verbose=False)
    io0 = proc_io_read_bytes()
    t0 = time.perf_counter()
    llm.eval(prompt)
    tok = llm.sample(top_k=1, temp=0.0)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    n = 1
    for _ in range(a.gen - 1):
        llm.eval([tok])
        tok = llm.sample(top_k=1, temp=0.0)
        n += 1
    dt = time.perf_counter() - t1
    return {"prefill_tok_s": len(prompt) / first, "decode_tok_s": (n - 1) / dt, "ttft_s": first, "tokens": n,
            "run_s": time.perf_counter() - t0,
            "disk_read_bytes": proc_io_read_bytes() - io0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine", choices=("moelite", "llama"))
    ap.add_argument("model")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--policy", default=None)
    ap.add_argument("--no-prefetch", action="store_true")
    ap.add_argument("--no-calibration", action="store_true", help="ignore MODEL.gguf.calibration.json")
    ap.add_argument("--no-repack", action="store_true", help="llama.cpp: use_extra_bufts=false (no weight repacking)")
    ap.add_argument("--cgroup", default=None, help="memory cgroup (v1 or v2 directory) to join first")
    a = ap.parse_args()
    if a.cgroup:
        with open(os.path.join(a.cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    prompt = json.load(open(a.prompt))
    r = run_moelite(a, prompt) if a.engine == "moelite" else run_llama(a, prompt)
    r.update(engine=a.engine, peak_rss=peak_rss(), budget=a.budget, prompt_tokens=len(prompt))
    print(json.dumps(r))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
