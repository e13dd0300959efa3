"""One benchmark run in its own process (so peak RSS, disk reads and the memory cgroup are its own).

    python bench/worker.py {moelite,llama} MODEL --prompt IDS.json --gen 64 --threads 2 [--budget BYTES] [--policy P]
        [--no-prefetch] [--no-calibration] [--cgroup PATH] [--teacher IDS.json] [--trace OUT.npz]

--teacher: decode feeds these ids (held-out text that continues the prompt) instead of greedy samples, so the
routing of the decode steps is the routing of real text, not of a small model's repetitive greedy output; moelite's
cache counters then cover the decode steps only, and --trace saves the routing of the whole run (cache_policies
trace) for the simulator.

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


def open_moelite(a, n_ctx: int, **extra):
    """(model, budget used): a budget below moelite's minimum for this model is raised to that minimum."""
    import moelite

    opts = dict(
        n_threads=a.threads,
        n_ctx=n_ctx,
        policy=a.policy,
        prefetch=not a.no_prefetch,
        prefetch_depth=a.prefetch_depth,
        use_calibration=not a.no_calibration,
        repack=not a.no_repack,
        swap_threshold=a.swap,
        fused_graph=not a.no_fused,
        expert_gemm=not a.no_gemm,
        overlap_reads=not a.no_overlap,
        standins=a.standins is not None,
        standin_threshold=a.standins or 0.5,
        kv_type=a.kv,
        **extra,
    )
    budget = a.budget
    for _ in range(3):  # the cap is below what moelite can run in: run at its minimum (stand-ins add to it), say so
        try:
            return moelite.load(a.model, memory_budget=budget, **opts), budget
        except moelite.errors.BudgetError as e:
            if not e.minimum or e.minimum == budget:
                raise
            budget = e.minimum
    return moelite.load(a.model, memory_budget=budget, **opts), budget


def run_moelite(a, prompt: list[int]) -> dict:
    m, budget = open_moelite(a, len(prompt) + a.gen + 8)
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
    return {
        "prefill_tok_s": st.prompt_tok_s,
        "decode_tok_s": (n - 1) / st.decode_s if n > 1 else 0.0,
        "ttft_s": first,
        "run_s": time.perf_counter() - t0,
        "budget_used": budget,
        "policy": m.policy.name,
        "tokens": n,
        "disk_read_bytes": proc_io_read_bytes() - io0,
        "hit_rate": s["hit_rate"],
        "cache_bytes_read": s["bytes_read"],
        "stall_s": s["stall_s"],
        "prefetch_issued": s["prefetch_issued"],
        "prefetch_hits": s["prefetch_hits"],
        "slots": m.info()["expert_slots"],
    }


def run_moelite_teacher(a, prompt: list[int], forced: list[int]) -> dict:
    """Prompt, then len(forced) decode steps fed the held-out continuation (Model.eval), timed apart."""
    m, budget = open_moelite(a, len(prompt) + len(forced) + 8, record_trace=bool(a.trace))
    t0 = time.perf_counter()
    rows = [m.eval(prompt)]  # rows[i]: the logits that predict forced[i]
    ttft = time.perf_counter() - t0
    m.reset_stats()  # counters of the decode steps only
    ple0 = m._m.ple_stats()["bytes_read"]  # Qwen4-Exp's n-gram table rows read (0: no table)
    io0 = proc_io_read_bytes()
    t1 = time.perf_counter()
    for tok in forced:
        last = m.eval([tok])
        if a.quality:
            rows.append(last)
    dt = time.perf_counter() - t1
    s = m.stats()["total"]
    if a.trace:
        from moelite.cache_policies import save_trace

        save_trace(m.trace(), a.trace)
    n = len(forced)
    quality = {}
    if a.quality:  # scored after the timing: NLL of each forced token and the argmax
        import numpy as np

        z = np.stack(rows[:n]).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        quality = {"nll": float(-logp[np.arange(n), forced].mean()), "argmax": z.argmax(axis=1).tolist()}
    return {
        **quality,
        "prefill_tok_s": len(prompt) / ttft,
        "decode_tok_s": n / dt,
        "ttft_s": ttft,
        "decode_s": dt,
        "budget_used": budget,
        "policy": m.policy.name,
        "tokens": n,
        "teacher": True,
        "disk_read_bytes": proc_io_read_bytes() - io0,
        "ple_bytes_read": m._m.ple_stats()["bytes_read"] - ple0,
        "hit_rate": s["hit_rate"],
        # hits that were in the cache before the token asked (prefetched arrivals not counted): the policy's own
        "demand_hit_rate": (s["hits"] - s["prefetch_hits"]) / max(s["hits"] + s["misses"], 1),
        "cache_bytes_read": s["bytes_read"],
        "bytes_read_per_token": s["bytes_read"] / n,
        "stall_s": s["stall_s"],
        "stall_share": s["stall_s"] / dt,
        "per_token": m.stats()["per_token"],  # ms per decode step: I/O wait, cache bookkeeping, compute
        "prefetch_issued": s["prefetch_issued"],
        "prefetch_hits": s["prefetch_hits"],
        "prefetch_far_issued": s["prefetch_far_issued"],
        "prefetch_far_hits": s["prefetch_far_hits"],
        "substitutions": s["substitutions"],
        "overlapped": s["overlapped"],
        "swap_threshold": a.swap,
        "standin_uses": s["standin_uses"],
        "slots": m.info()["expert_slots"],
    }


KV_GGML_TYPE = {"f16": 1, "q8_0": 8}  # ggml_type of llama.cpp's type_k / type_v


def llama_model(a, n_ctx: int):
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
    return Llama(
        model_path=a.model,
        n_ctx=n_ctx,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        n_batch=512,
        n_ubatch=512,
        use_mmap=True,
        flash_attn=a.flash_attn,
        type_k=KV_GGML_TYPE[a.kv],
        type_v=KV_GGML_TYPE[a.kv],
        verbose=False,
    )


def run_llama_teacher(a, prompt: list[int], forced: list[int]) -> dict:
    llm = llama_model(a, len(prompt) + len(forced) + 8)
    t0 = time.perf_counter()
    llm.eval(prompt)
    ttft = time.perf_counter() - t0
    io0 = proc_io_read_bytes()
    t1 = time.perf_counter()
    for tok in forced:
        llm.eval([tok])
    dt = time.perf_counter() - t1
    return {
        "prefill_tok_s": len(prompt) / ttft,
        "decode_tok_s": len(forced) / dt,
        "ttft_s": ttft,
        "decode_s": dt,
        "tokens": len(forced),
        "teacher": True,
        "disk_read_bytes": proc_io_read_bytes() - io0,
    }


def run_llama(a, prompt: list[int]) -> dict:
    llm = llama_model(a, len(prompt) + a.gen + 8)
    io0 = proc_io_read_bytes()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - t0  # the prompt's forward passes (moelite's prompt_s: the same span)
    tok = llm.sample(top_k=1, temp=0.0)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    n = 1
    for _ in range(a.gen - 1):
        llm.eval([tok])
        tok = llm.sample(top_k=1, temp=0.0)
        n += 1
    dt = time.perf_counter() - t1
    return {
        "prefill_tok_s": len(prompt) / prefill_s,
        "decode_tok_s": (n - 1) / dt,
        "ttft_s": first,
        "tokens": n,
        "run_s": time.perf_counter() - t0,
        "disk_read_bytes": proc_io_read_bytes() - io0,
    }


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
    ap.add_argument("--prefetch-depth", type=int, default=1, help="prefetch this many MoE layers ahead (1-3)")
    ap.add_argument("--no-calibration", action="store_true", help="ignore MODEL.gguf.calibration.json")
    ap.add_argument(
        "--no-repack",
        action="store_true",
        help="no weight repacking: llama.cpp use_extra_bufts=false, moelite repack=False",
    )
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp: flash attention on (its default: off)")
    ap.add_argument(
        "--kv", default="f16", choices=("f16", "q8_0"), help="KV cache type (llama.cpp: needs --flash-attn)"
    )
    ap.add_argument("--no-gemm", action="store_true", help="moelite: expert_gemm=False (mul_mat_id for prompts too)")
    ap.add_argument(
        "--no-fused", action="store_true", help="moelite: per-layer graphs even when every expert is resident"
    )
    ap.add_argument(
        "--no-overlap",
        action="store_true",
        help="moelite: wait for a step's misses before computing its cached experts",
    )
    ap.add_argument("--cgroup", default=None, help="memory cgroup (v1 or v2 directory) to join first")
    ap.add_argument("--teacher", default=None, help="JSON ids the decode steps are fed (instead of greedy samples)")
    ap.add_argument("--swap", type=float, default=0.0, help="moelite: swap_threshold (cache-aware routing, lossy)")
    ap.add_argument(
        "--standins",
        type=float,
        default=None,
        metavar="X",
        help="moelite: low-bit stand-ins (MODEL.gguf.standins.gguf) with standin_threshold X (lossy)",
    )
    ap.add_argument(
        "--quality",
        action="store_true",
        help="with --teacher: score the forced tokens (mean NLL, argmax per step), after the timing",
    )
    ap.add_argument("--trace", default=None, help="moelite with --teacher: save the run's routing trace here (.npz)")
    a = ap.parse_args()
    if a.cgroup:
        with open(os.path.join(a.cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    prompt = json.load(open(a.prompt))
    if a.teacher:
        forced = json.load(open(a.teacher))
        r = run_moelite_teacher(a, prompt, forced) if a.engine == "moelite" else run_llama_teacher(a, prompt, forced)
    else:
        r = run_moelite(a, prompt) if a.engine == "moelite" else run_llama(a, prompt)
    r.update(engine=a.engine, peak_rss=peak_rss(), budget=a.budget, prompt_tokens=len(prompt))
    print(json.dumps(r))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
