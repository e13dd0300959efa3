"""moelite vs llama.cpp (llama-cpp-python 0.3.36) on the same GGUF files and threads, and vs the bandwidth
roofline. Regenerates bench/RESULTS.md and bench/results.png:

    pip install ".[bench]"            # llama-cpp-python, built from source once (~16 min on 2 cores)
    python bench/run_bench.py         # --runs 5 --threads 2 --models demo,qwen3-30b-shapes

Scenarios: (a) resident, (b) memory cap of 50 % and (c) 25 % of the file size. A cap is enforced for both
engines by a memory cgroup (v1 or v2, created under this process's own cgroup) that each run joins; moelite
also gets the cap as memory_budget. The file's pages are dropped from the page cache (posix_fadvise)
before every capped run so that neither engine reads from a cache the other filled. Runs are interleaved
(A B A B ...); the report gives medians and min-max.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
WORKER = ROOT / "bench" / "worker.py"


# --- machine -------------------------------------------------------------------------------------------
def mem_bandwidth(gib: float = 1.0) -> float:
    """Bytes/s of a large copy (read + write counted)."""
    a = np.ones(int(gib * 2**30) // 8)
    b = np.empty_like(a)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        np.copyto(b, a)
        best = max(best, 2 * a.nbytes / (time.perf_counter() - t))
    return best


def disk_bandwidth(path: str, nbytes: int = 1 << 30, block: int = 4 << 20) -> float:
    """Bytes/s of O_DIRECT sequential reads of the model file (buffered after dropping its pages if the
    filesystem refuses O_DIRECT)."""
    size = min(nbytes, os.path.getsize(path) // block * block)
    buf = mmap.mmap(-1, block)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    try:
        t = time.perf_counter()
        off = 0
        while off < size:
            n = os.preadv(fd, [buf], off)
            if n <= 0:
                break
            off += n
        return off / (time.perf_counter() - t)
    finally:
        os.close(fd)


def expert_read_rate(path: str, n: int = 256, seed: int = 0) -> float | None:
    """Bytes/s of reads made the way the expert cache makes them on a miss: one expert's matrices (its rows of a
    layer's ffn_{gate,up,down}_exps), one read each, one after another, O_DIRECT, a random expert of a random layer
    each time. A file that stacks experts per matrix (GGUF) asks for 3 reads of one matrix's bytes per expert, far
    from each other: on a disk whose speed depends on the request size this is not the sequential rate. None: no
    stacked experts, or no O_DIRECT."""
    import random

    from moelite.runtime.model import read_table

    table = read_table(path)
    layers: dict[str, list[tuple[str, int, int]]] = {}  # layer -> [(file, offset, bytes per expert)] of its matrices
    n_expert = 0
    for name, (_, shape, off, nbytes) in table.tensors.items():
        if name.startswith("blk.") and name.endswith("_exps.weight") and len(shape) == 3:
            n_expert = int(shape[2])
            file = table.files[table.tensor_file[name]][0]
            layers.setdefault(name.split(".")[1], []).append((file, off, nbytes // n_expert))
    if not layers or not hasattr(os, "O_DIRECT"):
        return None
    page = 4096
    fds: dict[str, int] = {}
    biggest = max(b for mats in layers.values() for _, _, b in mats)
    buf = mmap.mmap(-1, (biggest + 2 * page) // page * page)
    rng, names, total = random.Random(seed), sorted(layers), 0
    try:
        for f in {f for mats in layers.values() for f, _, _ in mats}:
            fds[f] = os.open(f, os.O_RDONLY | os.O_DIRECT)
        t = time.perf_counter()
        for _ in range(n):
            e = rng.randrange(n_expert)
            for f, off, b in layers[rng.choice(names)]:  # a stock 32-aligned file: the pages around the range
                lo = (off + e * b) // page * page
                size = (off + e * b + b - lo + page - 1) // page * page
                total += os.preadv(fds[f], [memoryview(buf)[:size]], lo)
        return total / (time.perf_counter() - t)
    except OSError:
        return None
    finally:
        for fd in fds.values():
            os.close(fd)
        buf.close()


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil

    import moelite

    be = moelite.cpu_backend()  # the SIMD level moelite's ggml CPU backend was built for
    simd = ",".join(k for k, v in be["features"].items() if v == "1")
    return (
        f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.1f} GiB RAM, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"moelite CPU backend {be['variant']} ({simd})"
    )


# --- memory cgroups ------------------------------------------------------------------------------------
class Cgroups:
    """Child memory cgroups under this process's own (v2 unified, or the v1 memory hierarchy)."""

    def __init__(self) -> None:
        self.base: Path | None = None
        self.kind = ""
        self.reason = ""
        for kind, root, ctl in (
            ("v1", Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"),
            ("v2", Path("/sys/fs/cgroup"), "memory.max"),
            ("v2", Path("/sys/fs/cgroup/unified"), "memory.max"),
        ):
            try:
                rel = self._own(kind)
                parent = root / rel.lstrip("/")
                if not (parent / "cgroup.procs").exists():
                    continue
                base = parent / f"moelite-bench-{os.getpid()}"
                base.mkdir(exist_ok=True)
                probe = base / "probe"
                probe.mkdir(exist_ok=True)
                if not (probe / ctl).exists():
                    probe.rmdir()
                    base.rmdir()
                    continue
                probe.rmdir()
                self.base, self.kind, self.ctl = base, kind, ctl
                return
            except OSError as e:
                self.reason = f"{root}: {e}"
        self.reason = self.reason or "no writable memory cgroup (v1 memory controller or v2 memory.max)"

    @staticmethod
    def _own(kind: str) -> str:
        for line in open("/proc/self/cgroup"):
            hid, ctrls, path = line.rstrip("\n").split(":", 2)
            if (kind == "v2" and hid == "0") or (kind == "v1" and "memory" in ctrls.split(",")):
                return path
        raise OSError("no such hierarchy")

    def make(self, name: str, limit: int) -> str:
        d = self.base / name
        if d.exists():
            d.rmdir()  # a fresh group: a lower memsw limit left behind would make raising memory fail
        d.mkdir()
        (d / self.ctl).write_text(str(limit))
        if self.kind == "v1" and (d / "memory.memsw.limit_in_bytes").exists():
            try:
                (d / "memory.memsw.limit_in_bytes").write_text(str(limit))
            except OSError:
                pass
        return str(d)

    def cleanup(self) -> None:
        if not self.base:
            return
        for d in sorted(self.base.glob("*")):
            try:
                d.rmdir()
            except OSError:
                pass
        try:
            self.base.rmdir()
        except OSError:
            pass


def drop_page_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def replace_section(head: str, section: str) -> None:
    """Put `section` into bench/RESULTS.md in place of the one starting with `head` (up to the next "## "), else at
    the end: the sections other scripts write (bench_ple.py, bench_fullsize.py) survive a rewrite of their own."""
    results = ROOT / "bench" / "RESULTS.md"
    text = results.read_text()
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + section + (text[nxt + 1 :] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    results.write_text(text)


# --- models --------------------------------------------------------------------------------------------
def model_path(name: str, layers: int) -> str:
    if name == "demo":
        from moelite.runtime.model import default_model_path

        return default_model_path()
    if name == "bench-moe":  # learned routing (issue 16): trained here on first use (~90 min)
        if os.environ.get("MOELITE_BENCH_MOE"):  # another build of it (e.g. a checkpoint's)
            return os.environ["MOELITE_BENCH_MOE"]
        sys.path.insert(0, str(ROOT / "tools"))
        from train_bench_moe import build

        return str(build())
    if name == "qwen3-30b-shapes":
        out = OUT / "models" / f"qwen3-30b-a3b-shapes-L{layers}-q4_k_m.gguf"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            sys.path.insert(0, str(ROOT / "tools"))
            from synthetic_moe import make_synthetic_moe

            from moelite.converters import convert

            with tempfile.TemporaryDirectory(dir=OUT) as tmp:
                hf = make_synthetic_moe(Path(tmp) / "hf", layers=layers, vocab_size=32768)
                convert(hf, out, type="q4_k_m", progress=True)
        return str(out)
    return name


def prompt_ids(path: str, n: int) -> list[int]:
    import moelite

    text = (ROOT / "README.md").read_text() * 8
    with moelite.load(path, n_ctx=64) as m:
        try:
            ids = m.tokenizer.encode(text, add_special=False)
        except moelite.errors.MoeliteError:
            ids = []
        ids = (ids + [(7 * i + 3) % m.n_vocab for i in range(n)])[:n]
        info = m.info()
        plan = m.plan
    # per-token bytes for the roofline: dense weights a token touches (all but the embedding table) and the
    # routed experts it uses
    emb = [t for name, t in m.tensors.items() if name == "token_embd.weight"][0][3]
    moe_layers = len(plan.moe_layers)
    active_expert = sum(b for b in plan.expert_slot_bytes if b) / max(moe_layers, 1) * plan.n_expert_used * moe_layers
    return ids, {
        "dense_active": plan.dense_bytes - emb + (emb if "output.weight" not in m.tensors else 0),
        "expert_active": active_expert,
        "file_size": info["file_size"],
    }


def heldout_ids(path: str, prompt: int, gen: int) -> tuple[list[int], list[int]]:
    """Prompt and continuation from one held-out document of the bench MoE's corpus (Python documentation, the
    first held-out document long enough), tokenized by the model itself: decode runs on real text."""
    import moelite

    corpus = ROOT / "build" / "demo_corpus" / "corpus.jsonl"
    with moelite.load(path, n_ctx=64) as m:
        for line in open(corpus, encoding="utf-8"):
            doc = json.loads(line)
            if doc["split"] == "val" and doc["domain"] == "technical":
                ids = m.tokenizer.encode(doc["text"], add_special=False)
                if len(ids) >= prompt + gen:
                    return ids[:prompt], ids[prompt : prompt + gen]
    raise SystemExit(f"{corpus}: no held-out technical document of {prompt + gen} tokens")


def simulated_decode_hits(trace_path: str, n_prompt: int, slots: int, policy: str) -> dict:
    """Hit rates over the decode steps of a recorded run (prompt + continuation, one sequence) at the runtime's
    slot count: the runtime's policy simulated, Belady's optimum and the SCH(16) oracle. Each is simulated over
    the whole run and over the prompt alone; decode = the difference (exact for the online policies, an
    approximation for the two oracles, which see the future)."""
    from moelite.cache_policies import Trace, load_trace, simulate

    t = load_trace(trace_path)
    prompt = Trace(ids=t.ids[:n_prompt], n_expert=t.n_expert)
    decode_accesses = (t.ids.shape[0] - n_prompt) * t.n_layers * t.k
    out = {}
    for label, pol in (("runtime policy", policy), ("belady", "belady"), ("sch oracle", "sch")):
        full, head = simulate(t, pol, slots, m=16), simulate(prompt, pol, slots, m=16)
        out[label] = float(full.hits.sum() - head.hits.sum()) / decode_accesses
    return out


def lookahead_by_distance(trace_path: str) -> list[float] | None:
    """The gate lookahead's precision at each recorded distance over a recorded run, pooled over layers (the analyze
    report's summary): how much of a layer's experts a prefetch d MoE layers ahead names."""
    from moelite.cache_policies import load_trace
    from moelite.cache_policies.report import lookahead_summary

    look = lookahead_summary(load_trace(trace_path))
    return [v for v in look["by_distance"] if v is not None] if look else None


def predicted_decode(path: str, budget: int | None, threads: int, n_ctx: int) -> dict:
    """What `moelite plan` predicts for this budget (runtime/speed.py predict_decode), for comparison with the runs."""
    from moelite.apps.plan import model_table
    from moelite.runtime.planner import plan_memory
    from moelite.runtime.speed import bandwidths, embedding_bytes, predict_decode
    from moelite.runtime.validate import load_hparams

    _, _, kv, tensors, _ = model_table(path, "q8_0", False)  # the file's tables only, as `moelite plan` reads it
    plan = plan_memory(
        load_hparams(path, kv, tensors), tensors, budget=budget or 1 << 62, n_ctx=n_ctx, n_ubatch=None, kv_elsize=2
    )
    slots = plan.slots or [plan.n_expert if b else 0 for b in plan.expert_slot_bytes]
    return predict_decode(plan, slots, embedding_bytes(tensors), bandwidths(), path, threads)


# --- runs ----------------------------------------------------------------------------------------------
def run(
    engine: str, path: str, prompt_file: str, a, budget: int | None, cgroup: str | None, extra: list[str] = ()
) -> dict:
    cmd = [
        sys.executable,
        str(WORKER),
        engine,
        path,
        "--prompt",
        prompt_file,
        "--gen",
        str(a.gen),
        "--threads",
        str(a.threads),
        *extra,
    ]
    if budget and engine == "moelite":
        cmd += ["--budget", str(budget)]
    if budget and engine == "llama":
        cmd += ["--no-repack"]  # under a cap: see worker.py (its repacked copy is anonymous memory)
    if cgroup:
        cmd += ["--cgroup", cgroup]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        return {"engine": engine, "error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def summarize(rows: list[dict], key: str) -> tuple[float, float, float] | None:
    v = [r[key] for r in rows if key in r and r[key] is not None]
    return (statistics.median(v), min(v), max(v)) if v else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="demo,qwen3-30b-shapes,bench-moe")
    ap.add_argument("--qwen-layers", type=int, default=10, help="layers of the Qwen3-30B-shaped model (10: ~3.6 GB)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--scenarios", default="resident,50,25")
    ap.add_argument("--learned-prompt", type=int, default=128, help="bench-moe: prompt tokens of held-out text")
    ap.add_argument(
        "--learned-gen", type=int, default=128, help="bench-moe: decode steps fed the held-out continuation"
    )
    ap.add_argument(
        "--feature-runs", type=int, default=3, help="runs per cache-feature variant at the 25 %% cap (0: skip)"
    )
    ap.add_argument(
        "--prompts",
        default="512,4096",
        help="resident prefill at these prompt lengths, llama.cpp with and without flash attention ('': skip)",
    )
    ap.add_argument("--long", type=int, default=0, help="one prompt of this many tokens under the --long-cap (0: skip)")
    ap.add_argument("--long-cap", type=int, default=50, help="percent of the file size for --long")
    ap.add_argument(
        "--long-engines", default="moelite,llama", help="engines of --long (with --merge, the others' results are kept)"
    )
    ap.add_argument("--prompt-runs", type=int, default=3, help="runs per engine and prompt length")
    ap.add_argument(
        "--report-only", action="store_true", help="rewrite RESULTS.md and the plot from bench/out/results.json"
    )
    ap.add_argument("--merge", action="store_true", help="keep the other models' results from bench/out/results.json")
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if a.report_only:
        write_report(json.loads((OUT / "results.json").read_text()))
        return
    try:
        import llama_cpp  # noqa: F401

        llama_ok, llama_reason = True, ""
    except ImportError:
        llama_ok, llama_reason = False, "llama-cpp-python not installed (pip install '.[bench]')"
    engines = ["moelite", "llama"] if llama_ok else ["moelite"]
    cg = Cgroups()
    results = {
        "machine": machine(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "threads": a.threads,
        "gen": a.gen,
        "prompt_tokens": a.prompt_tokens,
        "llama": llama_reason or "llama-cpp-python 0.3.36",
        "cgroup": cg.kind or f"unavailable: {cg.reason}",
        "models": {},
    }
    # a run of the learned-routing model alone rewrites only its RESULTS.md section (write_report): it keeps the
    # other models in results.json too, or a later --merge run would rewrite RESULTS.md without them
    learned_only = all(name == "bench-moe" for name in a.models.split(","))
    if (a.merge or learned_only) and (OUT / "results.json").exists():
        results["models"] = json.loads((OUT / "results.json").read_text())["models"]
    try:
        for name in a.models.split(","):
            path = model_path(name, a.qwen_layers)
            ids, sizes = prompt_ids(path, a.prompt_tokens)
            teacher = name == "bench-moe"  # decode on held-out text, trained context 256 = prompt + gen
            pf = OUT / f"prompt-{Path(path).stem}.json"
            tf = OUT / f"teacher-{Path(path).stem}.json"
            if teacher:
                ids, forced = heldout_ids(path, a.learned_prompt, a.learned_gen)
                tf.write_text(json.dumps(forced))
            pf.write_text(json.dumps(ids))
            bw = {"mem": mem_bandwidth(), "disk": disk_bandwidth(path), "expert": expert_read_rate(path)}
            label = "src/moelite/data/demo.gguf (embedded)" if name == "demo" else os.path.relpath(path, ROOT)
            entry = {
                "path": label,
                "sizes": sizes,
                "bandwidth": bw,
                "scenarios": {},
                "commit": results["commit"],
                "teacher": teacher,
                "prompt_tokens": len(ids),
                "gen": a.learned_gen if teacher else a.gen,
            }
            if a.merge and name in results["models"]:
                # keep what this run does not redo: its scenarios, prompts, long prompt, features (each scenario
                # remembers the commit it was measured at; the report names it where it differs)
                old_entry = results["models"][name]
                for v in old_entry["scenarios"].values():
                    v.setdefault("commit", old_entry.get("commit"))
                entry = {
                    **old_entry,
                    **({k: entry[k] for k in ("sizes", "bandwidth", "commit")} if a.scenarios else {}),
                }
                entry["scenarios"] = dict(old_entry["scenarios"])
            for sc in filter(None, a.scenarios.split(",")):
                budget = None if sc == "resident" else int(sizes["file_size"] * int(sc) / 100)
                rows: dict[str, list[dict]] = {e: [] for e in engines}
                skipped = None
                for i in range(a.runs):
                    for e in engines:
                        cgroup = None
                        if budget:
                            if not cg.base:
                                skipped = f"no memory cgroup: {cg.reason}"
                                if e == "llama":
                                    continue
                            else:
                                # both engines: the cap plus 10 % and room for the interpreter
                                cgroup = cg.make(f"{name}-{e}-{sc}-{i}", int(budget * 1.1) + (96 << 20))
                            drop_page_cache(path)
                        extra = []
                        if teacher:
                            extra = ["--teacher", str(tf)]
                            if e == "moelite" and i == 0:
                                extra += ["--trace", str(OUT / f"trace-{name}-{sc}.npz")]
                        r = run(e, path, str(pf), a, budget, cgroup, extra)
                        rows[e].append(r)
                        print(name, sc, i, json.dumps(r), flush=True)
                entry["scenarios"][sc] = {
                    "budget": budget,
                    "runs": rows,
                    "skipped_llama": skipped,
                    "commit": results["commit"],
                }
                first = rows["moelite"][0] if rows.get("moelite") else {}
                if teacher and "error" not in first:
                    entry["scenarios"][sc]["predicted"] = predicted_decode(
                        path, first.get("budget_used") if budget else None, a.threads, len(ids) + a.learned_gen + 8
                    )
                if teacher and "error" not in first and (OUT / f"trace-{name}-{sc}.npz").exists():
                    entry["scenarios"][sc]["simulated"] = simulated_decode_hits(
                        str(OUT / f"trace-{name}-{sc}.npz"), len(ids), sum(first["slots"]), first["policy"]
                    )
                    entry["scenarios"][sc]["lookahead"] = lookahead_by_distance(str(OUT / f"trace-{name}-{sc}.npz"))
            if a.prompts and not teacher:
                entry["prompts"] = prompt_lengths(name, path, a, engines)
            if a.long and not teacher:
                old_long = entry.get("long", {}) if a.merge else {}
                old = old_long.get("runs", {})
                for r in old.values():  # engines not rerun keep the commit they were measured at
                    r.setdefault("commit", old_long.get("commit", entry.get("commit")))
                entry["long"] = long_prompt(
                    name,
                    path,
                    a,
                    [e for e in engines if e in a.long_engines.split(",")],
                    cg,
                    int(sizes["file_size"] * a.long_cap / 100),
                )
                entry["long"]["runs"] = {**old, **entry["long"]["runs"]}
                entry["long"]["commit"] = results["commit"]
            if not a.feature_runs and a.merge and "features" in results["models"].get(name, {}):
                entry["features"] = results["models"][name][
                    "features"
                ]  # measured before (its commit in the old report)
            if a.feature_runs:
                entry["features"] = features(
                    name,
                    path,
                    str(pf),
                    a,
                    int(sizes["file_size"] * 0.25),
                    cg,
                    ["--teacher", str(tf)] if teacher else [],
                )
            results["models"][name] = entry
            (OUT / "results.json").write_text(json.dumps(results, indent=1))
    finally:
        cg.cleanup()
    write_report(results, learned_only, measured=set(a.models.split(",")))


# Resident prefill at several prompt lengths: moelite, llama.cpp's defaults (flash attention off in
# llama-cpp-python) and llama.cpp with flash attention, interleaved; the prompt is the model's text ids padded
# with synthetic ones (prompt_ids), a few decode steps after it at that context.
PROMPT_ENGINES = [
    ("moelite", "moelite", []),
    ("llama.cpp", "llama", []),
    ("llama.cpp, flash attention", "llama", ["--flash-attn"]),
]


def prompt_lengths(name: str, path: str, a, engines: list[str]) -> dict:
    out = {}
    for n in (int(x) for x in a.prompts.split(",")):
        ids, _ = prompt_ids(path, n)
        pf = OUT / f"prompt-{Path(path).stem}-{n}.json"
        pf.write_text(json.dumps(ids))
        rows: dict[str, list[dict]] = {label: [] for label, e, _ in PROMPT_ENGINES if e in engines}
        gen = argparse.Namespace(**{**vars(a), "gen": 8})
        for i in range(a.prompt_runs):
            for label, e, extra in PROMPT_ENGINES:
                if e in engines:
                    r = run(e, path, str(pf), gen, None, None, extra)
                    rows[label].append(r)
                    print(name, "prompt", n, label, i, json.dumps(r), flush=True)
        out[str(n)] = rows
    return out


def long_prompt(name: str, path: str, a, engines: list[str], cg, budget: int) -> dict:
    """One long prompt (a.long tokens) under a cap, each engine once, in its own cgroup as the capped scenarios.
    llama.cpp with flash attention: without it its attention scratch ([n_kv, ubatch, n_head] scores, 2 GiB at 32k
    on the Qwen-shaped model) alone exceeds a 50 % cap and the cgroup kills it."""
    ids, _ = prompt_ids(path, a.long)
    pf = OUT / f"prompt-{Path(path).stem}-{a.long}.json"
    pf.write_text(json.dumps(ids))
    gen = argparse.Namespace(**{**vars(a), "gen": 4})
    out = {"tokens": a.long, "budget": budget, "cap_percent": a.long_cap, "runs": {}}
    for e in engines:
        cgroup = cg.make(f"{name}-long-{e}", int(budget * 1.1) + (96 << 20)) if cg.base else None
        drop_page_cache(path)
        r = run(e, path, str(pf), gen, budget, cgroup, ["--flash-attn"] if e == "llama" else [])
        out["runs"][e] = r
        print(name, "long", a.long, e, json.dumps(r), flush=True)
    return out


def long_table(m: dict) -> list[str]:
    lg = m["long"]
    lines = [
        "",
        f"A {lg['tokens']}-token prompt under a cap of {lg['cap_percent']} % of the file "
        f"({lg['budget'] / 2**20:.0f} MiB; each engine in a cgroup of the cap + 10 % + 96 MiB; one run each; "
        "llama.cpp with flash attention and without repacking, as in the capped scenarios"
        + (f"; measured at commit `{lg['commit']}`" if lg.get("commit", m.get("commit")) != m.get("commit") else "")
        + "):",
        "",
        "| engine | prefill tok/s | TTFT s | peak RSS MiB | peak RSS / cap | disk GB read |",
        "|---|---|---|---|---|---|",
    ]
    for e, r in lg["runs"].items():
        if "error" in r:
            lines.append(f"| {e} | failed: {r['error']} | | | | |")
            continue
        at = f" (at commit `{r['commit']}`)" if r.get("commit") else ""  # kept from an earlier run (--merge)
        lines.append(
            f"| {e}{at} | {r['prefill_tok_s']:.1f} | {r['ttft_s']:.1f} | {r['peak_rss'] / 2**20:.0f} | "
            f"{r['peak_rss'] / lg['budget']:.2f} | {r['disk_read_bytes'] / 1e9:.1f} |"
        )
    return lines


def prompts_table(m: dict) -> list[str]:
    """RESULTS.md: resident prefill per prompt length, moelite against llama.cpp with and without flash attention."""
    lines = [
        "",
        f"Resident prompts (medians of {len(next(iter(next(iter(m['prompts'].values())).values())))} interleaved "
        "runs, the first prompt after loading; 8 decode steps after it):",
        "",
        "| prompt tokens | engine | prefill tok/s | TTFT s | decode tok/s at that context | moelite prefill vs this |",
        "|---|---|---|---|---|---|",
    ]
    for n, rows in m["prompts"].items():
        med = {
            label: {
                k: summarize([r for r in runs if "error" not in r], k)
                for k in ("prefill_tok_s", "ttft_s", "decode_tok_s")
            }
            for label, runs in rows.items()
        }
        ours = med.get("moelite", {}).get("prefill_tok_s")
        for label, d in med.items():
            if d["prefill_tok_s"] is None:
                err = next((r["error"] for r in rows[label] if "error" in r), "no successful run")
                lines.append(f"| {n} | {label} | failed: {err} | | | |")
                continue
            fmt = lambda t, p=1: f"{t[0]:.{p}f} ({t[1]:.{p}f}-{t[2]:.{p}f})"
            vs = f"{ours[0] / d['prefill_tok_s'][0]:.2f}x" if ours and label != "moelite" else ""
            lines.append(
                f"| {n} | {label} | {fmt(d['prefill_tok_s'])} | {fmt(d['ttft_s'], 2)} | {fmt(d['decode_tok_s'])} | {vs} |"
            )
    return lines


# Each cache feature at the 25 % cap, moelite alone (same cgroup rule as the capped scenarios).
FEATURES = [
    ("lru, no prefetch", ["--policy", "lru", "--no-prefetch", "--no-calibration"]),
    ("lru + prefetch", ["--policy", "lru", "--no-calibration"]),
    ("lfu + prefetch", ["--policy", "lfu", "--no-calibration"]),
    ("lfuda + prefetch", ["--policy", "lfuda", "--no-calibration"]),
    ("lfuda + prefetch, no read/compute overlap", ["--policy", "lfuda", "--no-calibration", "--no-overlap"]),
    ("consistency(m=16) + prefetch", ["--policy", "consistency", "--no-calibration"]),
    ("lfuda + prefetch 2 MoE layers ahead", ["--policy", "lfuda", "--no-calibration", "--prefetch-depth", "2"]),
    ("lfuda + prefetch 3 MoE layers ahead", ["--policy", "lfuda", "--no-calibration", "--prefetch-depth", "3"]),
    ("calibrated (moelite analyze) + prefetch", []),
]


def calibrated_link(name: str, path: str, budget: int, a) -> str:
    """A symlink to the model in bench/out/calibrated/ with a calibration side file beside it, written by
    `moelite analyze` for the slots this budget gives (as the worker opens it) on text other than the
    benchmark prompt (the repo's docs and code)."""
    import moelite

    opts = dict(n_ctx=a.prompt_tokens + a.gen + 8, use_calibration=False)
    try:
        m = moelite.load(path, memory_budget=budget, **opts)
    except moelite.errors.BudgetError as e:
        m = moelite.load(path, memory_budget=e.minimum, **opts)
    with m:
        slots = [s for s in (m.plan.slots or []) if s]
        fraction = sum(slots) / (len(slots) * m.plan.n_expert) if slots else 1.0
    d = OUT / "calibrated"
    d.mkdir(parents=True, exist_ok=True)
    link = d / Path(path).name
    if not link.exists():
        link.symlink_to(os.path.abspath(path))
    side = Path(str(link) + ".calibration.json")
    if not side.exists():
        text = d / "calibration.txt"
        parts = [p.read_text() for p in sorted(ROOT.glob("*.md")) if p.name != "README.md"]
        parts += [p.read_text() for p in sorted((ROOT / "runtime").glob("*.py"))]
        text.write_text("\n\n".join(parts))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "moelite.apps.cli",
                "analyze",
                str(link),
                "--text",
                str(text),
                "--budget-fraction",
                f"{fraction:.6f}",
                "--tokens",
                "2048",
                "--out",
                str(d / f"analyze-{name}"),
            ],
            check=True,
        )
    return str(link)


def features(name: str, path: str, prompt_file: str, a, budget: int, cg, common: list[str] = ()) -> dict:
    out = {}
    for label, extra in FEATURES:
        extra = [*extra, *common]
        p = calibrated_link(name, path, budget, a) if not extra else path
        rows = []
        for i in range(a.feature_runs):
            cgroup = cg.make(f"{name}-feat-{len(out)}-{i}", int(budget * 1.1) + (96 << 20)) if cg.base else None
            drop_page_cache(path)
            r = run("moelite", p, prompt_file, a, budget, cgroup, extra)
            rows.append(r)
            print(name, "feature", label, i, json.dumps(r), flush=True)
        out[label] = rows
    return out


def roofline(sizes: dict, bw: dict, hit_rate: float, miss_bytes_per_token: float) -> float:
    resident = sizes["dense_active"] + sizes["expert_active"] * hit_rate
    return 1.0 / (resident / bw["mem"] + miss_bytes_per_token / bw["disk"])


def learned_section(name: str, m: dict, res: dict) -> list[str]:
    """RESULTS.md's "learned routing" section: decode teacher-forced on held-out text (see heldout_ids)."""
    bw = m["bandwidth"]
    lines = [
        f"## Learned routing: {name} (`{m['path']}`, {m['sizes']['file_size'] / 1e6:.0f} MB, bench/BENCH_MODEL.md)"
        + (f", measured at commit `{m['commit']}`" if m.get("commit") else ""),
        "",
        f"A trained Qwen3-MoE with Qwen3-30B-A3B's proportions (128 experts, top-8), built by "
        f"`tools/train_bench_moe.py`. Prompt: {m['prompt_tokens']} tokens of a held-out document; decode: the "
        f"next {m['gen']} tokens of the same document fed one at a time (teacher forcing, both engines), so "
        "the routing is the routing of real text (the model's trained context is 256 tokens). Cache counters "
        "cover the decode steps only; the hit rate counts an expert a prefetch brought in before the token asked "
        "as a hit, the one in brackets does not (the policy's own hits, compared with Belady's optimum, which "
        "does not prefetch). Simulated hit rates: the recorded routing of the same run (first "
        "moelite run of the scenario) replayed at the runtime's slot count (cache_policies.simulate: the "
        "runtime's policy, Belady's optimum, the SCH(16) oracle).",
        f"Measured bandwidth: memory {bw['mem'] / 1e9:.1f} GB/s, disk {bw['disk'] / 1e9:.2f} GB/s sequential"
        + (
            f", {bw['expert'] / 1e9:.2f} GB/s read the way a cache miss reads (one expert's gate, up and down rows, "
            "one O_DIRECT read each, random experts: `expert_read_rate`)."
            if bw.get("expert")
            else "."
        ),
        "",
        "| scenario | engine | decode tok/s | % of resident | vs llama.cpp decode | prefill tok/s | TTFT s | peak RSS MiB "
        "| hit rate (before prefetch) | MB read/token | I/O stall % of decode | sim: policy / Belady / SCH | hit ÷ Belady "
        "| `moelite plan` predicts (error) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda t, f=1.0, p=2: f"{t[0] / f:.{p}f} ({t[1] / f:.{p}f}-{t[2] / f:.{p}f})"
    base = {}
    checks = []
    for sc, s in m["scenarios"].items():
        med = {
            e: {
                k: summarize([r for r in runs if "error" not in r], k)
                for k in (
                    "decode_tok_s",
                    "prefill_tok_s",
                    "ttft_s",
                    "peak_rss",
                    "hit_rate",
                    "demand_hit_rate",
                    "bytes_read_per_token",
                    "stall_share",
                )
            }
            for e, runs in s["runs"].items()
        }
        sim = s.get("simulated") or {}
        for e, runs in s["runs"].items():
            d = med[e]
            if d["decode_tok_s"] is None:
                err = next((r["error"] for r in runs if "error" in r), "no successful run")
                lines.append(f"| {sc} | {e} | failed: {err} |" + " |" * 11)
                continue
            if sc == "resident":
                base[e] = d["decode_tok_s"][0]
            pct = f"{100 * d['decode_tok_s'][0] / base[e]:.0f}%" if base.get(e) else "-"
            ratio = (
                f"{d['decode_tok_s'][0] / med['llama']['decode_tok_s'][0]:.2f}x"
                if e == "moelite" and med.get("llama", {}).get("decode_tok_s")
                else ""
            )
            hit = d["hit_rate"][0] if d["hit_rate"] else None
            demand = d["demand_hit_rate"][0] if d["demand_hit_rate"] else None
            simtxt = (
                " / ".join(f"{100 * sim[k]:.1f}%" for k in ("runtime policy", "belady", "sch oracle"))
                if (sim and e == "moelite")
                else ""
            )
            vs_b = (
                f"{demand / sim['belady']:.2f}"
                if sim and e == "moelite" and demand is not None and sim["belady"]
                else ""
            )
            mb = "-" if not d["bytes_read_per_token"] else f"{d['bytes_read_per_token'][0] / 1e6:.2f}"
            stall = "-" if d["stall_share"] is None else f"{100 * d['stall_share'][0]:.0f}%"
            pred = s.get("predicted") if e == "moelite" else None
            predtxt = (
                f"{pred['tok_s']:.1f} at {100 * pred['hit_rate']:.0f}% hits "
                f"({100 * (pred['tok_s'] / d['decode_tok_s'][0] - 1):+.0f}%)"
                if pred
                else ""
            )
            lines.append(
                f"| {sc} | {e} | {fmt(d['decode_tok_s'])} | {pct} | {ratio} | {fmt(d['prefill_tok_s'], p=1)} | "
                f"{fmt(d['ttft_s'])} | {fmt(d['peak_rss'], 2**20, 0)} | "
                f"{'-' if hit is None else f'{100 * hit:.1f}% ({100 * demand:.1f}%)'} | {mb} | {stall} | "
                f"{simtxt} | {vs_b} | {predtxt} |"
            )
            if pred:
                err = pred["tok_s"] / d["decode_tok_s"][0] - 1
                checks.append(
                    f"{sc}: `moelite plan` predicted {pred['tok_s']:.1f} tok/s ({pred['source']}), "
                    f"{100 * err:+.0f} % of the measured (goal within +-30 %): "
                    f"{'met' if abs(err) <= 0.3 else 'missed'}"
                )
            if e == "moelite" and sc != "resident" and base.get("moelite"):
                share = d["decode_tok_s"][0] / base["moelite"]
                want = 0.8 if sc == "50" else 0.5  # issue 34 at 50 %; at 25 % issue 34 asks 90 % of the bound
                checks.append(
                    f"{sc} % cap: decode {100 * share:.0f} % of resident (target >= {100 * want:.0f} %): "
                    f"{'met' if share >= want else 'missed'}"
                )
                if sc == "50" and ratio:
                    x = d["decode_tok_s"][0] / med["llama"]["decode_tok_s"][0]
                    checks.append(f"50 % cap: {x:.2f}x llama.cpp (target >= 3x): {'met' if x >= 3 else 'missed'}")
                if vs_b:
                    checks.append(
                        f"{sc} % cap: hit rate before prefetch {vs_b}x Belady's (target >= 0.9): "
                        f"{'met' if demand / sim['belady'] >= 0.9 else 'missed'}"
                    )
                if d["stall_share"] is not None:
                    checks.append(
                        f"{sc} % cap: I/O stall {100 * d['stall_share'][0]:.0f} % of decode (target <= 20 %): "
                        f"{'met' if d['stall_share'][0] <= 0.2 else 'missed'}"
                    )
    look = (m["scenarios"].get("resident") or {}).get("lookahead")
    if look:  # routing does not depend on the cache: the resident run's trace
        checks.append(
            "gate lookahead precision on this text (the share of a layer's experts its router names from the hidden "
            "state d MoE layers earlier; prefetch reads them d layers ahead, `prefetch_depth`): "
            + ", ".join(f"d = {d}: {100 * v:.0f} %" for d, v in enumerate(look, 1))
        )
    for sc, s in m["scenarios"].items():  # where the time goes, from the counters of the runs above
        ok = [r for r in s["runs"].get("moelite", []) if "error" not in r]
        if sc == "resident" or not ok or not base.get("moelite"):
            continue
        med = lambda k, ok=ok: statistics.median(r[k] for r in ok)
        step, step0 = 1 / med("decode_tok_s"), 1 / base["moelite"]
        issued, useful = med("prefetch_issued"), med("prefetch_hits")
        checks.append(
            f"{sc} % cap, where the time goes: a decode step takes {1e3 * step:.2f} ms vs {1e3 * step0:.2f} "
            f"ms resident; I/O stall {1e3 * step * med('stall_share'):.2f} ms of it, the rest "
            f"({1e3 * step * (1 - med('stall_share')):.2f} ms) compute, graph and cache bookkeeping; "
            f"{med('bytes_read_per_token') / 1e6:.2f} MB read per token; prefetch issued {issued:.0f}, "
            f"used {useful:.0f} ({100 * (issued - useful) / max(issued, 1):.0f} % of prefetched reads wasted)"
        )
        pt = [r["per_token"] for r in ok if r.get("per_token")]
        if pt:  # the runtime's own split of a decode step (Model.stats()['per_token'])
            ptm = lambda k, pt=pt: statistics.median(p[k] for p in pt)
            checks.append(
                f"{sc} % cap, per token (the runtime's counters, medians): {ptm('step_ms'):.2f} ms = I/O wait "
                f"{ptm('io_wait_ms'):.2f} + cache bookkeeping {ptm('cache_ms'):.2f} + compute and graphs "
                f"{ptm('compute_ms'):.2f}"
            )
        sim = s.get("simulated")
        if sim and m["sizes"].get("expert_active"):  # what no exact policy can beat on this disk
            floor = (1 - sim["belady"]) * m["sizes"]["expert_active"]
            rates = [("sequential", bw["disk"])] + ([("miss-pattern", bw["expert"])] if bw.get("expert") else [])
            for kind, rate in rates:
                t_io = floor / rate
                bound = 1 / max(step0, t_io)
                got = 1 / step
                checks.append(
                    f"{sc} % cap, the disk's bound ({kind} rate): even Belady's optimum misses "
                    f"{100 * (1 - sim['belady']):.1f} % of the token's experts = {floor / 1e6:.2f} MB per token, "
                    f"{1e3 * t_io:.2f} ms at {rate / 1e9:.2f} GB/s; with every read hidden behind compute an exact "
                    f"decode could reach {bound:.0f} tok/s ({100 * bound * step0:.0f} % of resident), with none "
                    f"hidden {1 / (step0 + t_io):.0f} tok/s ({100 * step0 / (step0 + t_io):.0f} %); measured "
                    f"{got:.0f} = {100 * got / bound:.0f} % of the bound"
                    + (f" (target at 25 %: >= 90 %): {'met' if got >= 0.9 * bound else 'missed'}" if sc == "25" else "")
                )
    lines += ["", "Targets (issues 16 and 34) and where the time goes:", ""] + [f"- {c}" for c in checks]
    if m.get("features"):
        lines += [
            "",
            "Cache features at the 25 % cap (moelite alone, teacher-forced decode):",
            "",
            "| variant | decode tok/s | hit rate | MB read/token | I/O stall % of decode |",
            "|---|---|---|---|---|",
        ]
        for label, runs in m["features"].items():
            ok = [r for r in runs if "error" not in r]
            if not ok:
                lines.append(f"| {label} | failed: {runs[0]['error'] if runs else 'no run'} | | | |")
                continue
            med = {k: summarize(ok, k) for k in ("decode_tok_s", "hit_rate", "bytes_read_per_token", "stall_share")}
            lines.append(
                f"| {label} ({ok[0].get('policy', '?')}) | {fmt(med['decode_tok_s'])} | "
                f"{100 * med['hit_rate'][0]:.1f}% | {med['bytes_read_per_token'][0] / 1e6:.2f} | "
                f"{100 * med['stall_share'][0]:.0f}% |"
            )
    lines += [
        "",
        "Lossy modes (cache-aware routing), quality cost vs speedup on this model and the demo: bench/LOSSY.md "
        "(`python bench/bench_lossy.py`).",
    ]
    lines += [
        "",
        "Raw runs:",
        "",
        "```json",
        json.dumps({"scenarios": m["scenarios"], "features": m.get("features")})[:40000],
        "```",
        "",
    ]
    return lines


LEARNED_BEGIN, LEARNED_END = "<!-- learned-routing: begin (bench/run_bench.py) -->", "<!-- learned-routing: end -->"


def kept_blocks(rewritten: set[str]) -> list[str]:
    """What a full rewrite of RESULTS.md keeps: the blocks other scripts own (bench_context.py's between markers, one
    per SIMD level; the `## ` sections of bench_ple.py, bench_fullsize.py, ...) and the sections of models this
    report does not hold (measured by an earlier run): everything but the title's paragraphs, the learned-routing
    block and the sections of the `rewritten` models."""
    path = ROOT / "bench" / "RESULTS.md"
    old = path.read_text() if path.exists() else ""
    old = re.sub(re.escape(LEARNED_BEGIN) + ".*?" + re.escape(LEARNED_END), "", old, flags=re.S)
    context = r"<!-- context \((.*?)\): begin.*?<!-- context \(\1\): end -->"
    out = []
    for m in re.finditer(context, old, re.S):
        out += ["", m.group(0)]
    for part in re.split(r"(?m)^(?=## )", re.sub(context, "", old, flags=re.S))[1:]:  # [0]: the title's paragraphs
        if not any(part.startswith(f"## {name}: ") for name in rewritten):
            out += ["", part.strip("\n")]
    return out


def write_report(res: dict, learned_only: bool = False, measured: set[str] | None = None) -> None:
    """RESULTS.md (and the plot) from res; learned_only: this run measured the learned-routing model alone, so only
    its block is replaced; measured: the models this run measured (None: all of res). The sections of the others
    (kept in res by --merge for the plot) stay as RESULTS.md has them, with what was added there by hand or by
    another script (the Qwen-shaped model's 32768-token prompt, measured once)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        "# moelite benchmark results",
        "",
        f"Generated by `python bench/run_bench.py` (each section names the commit it was measured at; the last run: "
        f"`{res['commit']}`) on: {res['machine']}.",
        f"Threads {res['threads']}, prompt {res['prompt_tokens']} tokens, {res['gen']} generated tokens, greedy. "
        f"Reference: {res['llama']}. Memory caps: cgroup {res['cgroup']}; each engine's cgroup allows the cap "
        "+ 10 % + 96 MiB for the interpreter.",
        "",
        "Under a cap llama.cpp runs with `use_extra_bufts=false`: its default CPU weight repacking (Q4_K -> "
        "interleaved rows) copies the weights into anonymous memory, which the cgroup cannot reclaim, and "
        "it is OOM-killed (exit -9 on every capped run here). Without repacking it runs from its mmap of "
        "the file, which the kernel pages in and out under the cap. Resident runs use its defaults.",
        "",
    ]
    learned = {name: m for name, m in res["models"].items() if m.get("teacher")}
    plain = {name: m for name, m in res["models"].items() if not m.get("teacher")}
    block = [
        LEARNED_BEGIN,
        f"Machine of this section: {res['machine']}; {res['threads']} threads; cgroup {res['cgroup']}.",
        "",
    ]
    for name, m in learned.items():
        block += learned_section(name, m, res)
    block.append(LEARNED_END)
    if learned_only or not plain:  # only the learned-routing model was run: replace its section, keep the rest
        path = ROOT / "bench" / "RESULTS.md"
        old = path.read_text() if path.exists() else "# moelite benchmark results\n"
        if LEARNED_BEGIN in old and LEARNED_END in old:
            head, rest = old.split(LEARNED_BEGIN, 1)
            new = head + "\n".join(block) + rest.split(LEARNED_END, 1)[1]
        else:
            new = old.rstrip("\n") + "\n\n" + "\n".join(block) + "\n"
        path.write_text(new)
        print("\n".join(block[:60]))
        return
    lines += block + [""]
    fig, axes = plt.subplots(1, max(1, len(plain)), figsize=(6 * max(1, len(plain)), 4.5), squeeze=False)
    rewritten = set(plain) if measured is None else set(plain) & measured
    for ax, (name, m) in zip(axes[0], plain.items()):
        first = len(lines)  # this model's section: dropped again below when RESULTS.md keeps its own
        bw = m["bandwidth"]
        lines += [
            f"## {name}: `{m['path']}` ({m['sizes']['file_size'] / 2**30:.2f} GiB)"
            + (f", measured at commit `{m['commit']}`" if m.get("commit") else ""),
            "",
            f"Measured bandwidth: memory {bw['mem'] / 1e9:.1f} GB/s, disk {bw['disk'] / 1e9:.2f} GB/s.",
            "",
            "| scenario | engine | decode tok/s | prefill tok/s | TTFT s | peak RSS MiB | disk MB/token | hit rate | I/O stall % of run | vs llama.cpp (decode / prefill) | roofline tok/s | % of roofline |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        notes = []
        labels, ours, theirs = [], [], []
        for sc, s in m["scenarios"].items():
            med = {
                e: {
                    k: summarize([r for r in runs if "error" not in r], k)
                    for k in (
                        "decode_tok_s",
                        "prefill_tok_s",
                        "ttft_s",
                        "peak_rss",
                        "disk_read_bytes",
                        "hit_rate",
                        "stall_s",
                        "run_s",
                    )
                }
                for e, runs in s["runs"].items()
            }
            for e, runs in s["runs"].items():
                d = med[e]
                if d["decode_tok_s"] is None:
                    err = next((r["error"] for r in runs if "error" in r), "no successful run")
                    lines.append(f"| {sc} | {e} | failed: {err} | | | | | | | | | |")
                    continue
                gen_tokens = res["gen"] + res["prompt_tokens"]
                disk_tok = d["disk_read_bytes"][0] / gen_tokens if d["disk_read_bytes"] else 0.0
                hit = d["hit_rate"][0] if d["hit_rate"] else (1.0 if sc == "resident" else None)
                roof = roofline(m["sizes"], bw, hit if hit is not None else 1.0, disk_tok)
                ratio = ""
                if e == "moelite" and "llama" in med and med["llama"]["decode_tok_s"]:
                    ratio = (
                        f"{d['decode_tok_s'][0] / med['llama']['decode_tok_s'][0]:.2f}x / "
                        f"{d['prefill_tok_s'][0] / med['llama']['prefill_tok_s'][0]:.2f}x"
                    )
                fmt = lambda t, f=1.0, p=2: f"{t[0] / f:.{p}f} ({t[1] / f:.{p}f}-{t[2] / f:.{p}f})"
                stall = f"{100 * d['stall_s'][0] / d['run_s'][0]:.0f}%" if d["stall_s"] and d["run_s"] else "-"
                lines.append(
                    f"| {sc} | {e} | {fmt(d['decode_tok_s'])} | {fmt(d['prefill_tok_s'], p=1)} | {fmt(d['ttft_s'])} | "
                    f"{fmt(d['peak_rss'], 2**20, 0)} | {disk_tok / 1e6:.2f} | "
                    f"{'-' if hit is None else f'{100 * hit:.1f}%'} | {stall} | {ratio} | {roof:.1f} | {100 * d['decode_tok_s'][0] / roof:.0f}% |"
                )
                raised = {
                    r["budget_used"]
                    for r in runs
                    if r.get("budget_used") and s["budget"] and r["budget_used"] > s["budget"]
                }
                if raised:
                    notes.append(
                        f"{sc}: the cap ({s['budget'] / 2**20:.1f} MiB) is below moelite's minimum for this model; "
                        f"moelite ran at its minimum budget {max(raised) / 2**20:.1f} MiB (cgroup cap unchanged)."
                    )
            if s.get("skipped_llama"):
                lines.append(f"| {sc} | llama | skipped: {s['skipped_llama']} | | | | | | | | | |")
            labels.append(sc)
            ours.append(med["moelite"]["decode_tok_s"][0] if med["moelite"]["decode_tok_s"] else 0)
            theirs.append(
                med.get("llama", {}).get("decode_tok_s", (0,))[0] if med.get("llama", {}).get("decode_tok_s") else 0
            )
        for sc, s in m["scenarios"].items():
            if s["budget"] and int(s["budget"] * 1.1) + (96 << 20) >= m["sizes"]["file_size"]:
                notes.append(
                    f"{sc}: llama.cpp's cgroup (cap + 10 % + 96 MiB) holds the whole "
                    f"{m['sizes']['file_size'] / 2**20:.0f} MiB file, so it runs unconstrained; moelite "
                    "keeps to the budget it is given (this row compares a capped moelite with an uncapped llama.cpp)."
                )
        res_ok = [r for r in m["scenarios"].get("resident", {}).get("runs", {}).get("moelite", []) if "error" not in r]
        if res_ok:  # where the time goes, from the numbers above
            base = statistics.median(r["decode_tok_s"] for r in res_ok)
            for sc, s in m["scenarios"].items():
                ok = [r for r in s["runs"].get("moelite", []) if "error" not in r]
                if sc == "resident" or not ok:
                    continue
                dec = statistics.median(r["decode_tok_s"] for r in ok)
                stall = statistics.median(r["stall_s"] / r["run_s"] for r in ok if r.get("run_s"))
                notes.append(
                    f"{sc}: moelite decodes at {100 * dec / base:.0f} % of its resident speed; I/O stalls "
                    f"(waiting for expert reads) are {100 * stall:.0f} % of the run, the rest is compute "
                    "and graph overhead (resident decode itself is compute-bound on these threads: "
                    "see its % of the bandwidth roofline)."
                )
        older = sorted(
            {s["commit"] for s in m["scenarios"].values() if s.get("commit") and s["commit"] != m.get("commit")}
        )
        for c in older:
            notes.append(
                ", ".join(sc for sc, s in m["scenarios"].items() if s.get("commit") == c)
                + f": measured at commit `{c}` (kept from an earlier run, `--merge`)."
            )
        lines += [""] + [f"- {n}" for n in notes]
        if m.get("prompts"):
            lines += prompts_table(m)
        if m.get("long"):
            lines += long_table(m)
        if m.get("features"):
            lines += [
                "",
                f"Cache features at the 25 % cap (moelite alone, medians of {len(next(iter(m['features'].values())))} runs):",
                "",
                "| variant | decode tok/s | prefill tok/s | hit rate | disk MB/token | I/O stall % of run |",
                "|---|---|---|---|---|---|",
            ]
            for label, runs in m["features"].items():
                ok = [r for r in runs if "error" not in r]
                if not ok:
                    lines.append(f"| {label} | failed: {runs[0]['error'] if runs else 'no run'} | | | | |")
                    continue
                med = {
                    k: summarize(ok, k)
                    for k in ("decode_tok_s", "prefill_tok_s", "hit_rate", "disk_read_bytes", "stall_s", "run_s")
                }
                lines.append(
                    f"| {label} ({ok[0].get('policy', '?')}) | {med['decode_tok_s'][0]:.2f} ({med['decode_tok_s'][1]:.2f}-{med['decode_tok_s'][2]:.2f}) | "
                    f"{med['prefill_tok_s'][0]:.1f} | {100 * med['hit_rate'][0]:.1f}% | "
                    f"{med['disk_read_bytes'][0] / (res['gen'] + res['prompt_tokens']) / 1e6:.2f} | "
                    f"{100 * med['stall_s'][0] / med['run_s'][0]:.0f}% |"
                )
        x = np.arange(len(labels))
        ax.bar(x - 0.2, ours, 0.4, label="moelite")
        ax.bar(x + 0.2, theirs, 0.4, label="llama.cpp")
        for xi, (o, t) in enumerate(zip(ours, theirs)):
            if o and t:
                ax.annotate(f"{o / t:.2f}x", (xi - 0.2, o), ha="center", va="bottom", fontsize=9)

        def tick(sc: str, m=m) -> str:
            if sc == "resident":
                return sc
            b = m["scenarios"][sc]["budget"]
            uncapped = int(b * 1.1) + (96 << 20) >= m["sizes"]["file_size"]
            return f"cap {sc}%" + ("\n(file fits llama.cpp's\ncgroup: not capped)" if uncapped else "")

        ax.set_xticks(x, [tick(l) for l in labels])
        ax.set_ylabel("decode tokens/s (median)")
        ax.set_title(f"{name} ({m['sizes']['file_size'] / 2**30:.2f} GiB, {res['threads']} threads)")
        ax.legend()
        lines += [
            "",
            "Raw runs:",
            "",
            "```json",
            json.dumps({"scenarios": m["scenarios"], "features": m.get("features")}, indent=None)[:40000],
            "```",
            "",
        ]
        if name not in rewritten:
            del lines[first:]
    fig.tight_layout()
    fig.savefig(ROOT / "bench" / "results.png", dpi=110)
    (ROOT / "bench" / "RESULTS.md").write_text("\n".join(lines + kept_blocks(rewritten)) + "\n")
    print("\n".join(lines[:60]))


if __name__ == "__main__":
    main()
