"""Resident decode at several context lengths, moelite vs llama.cpp (llama-cpp-python, its default attention and
its flash attention) on the same GGUF file and threads (issue 34): per context, a prompt of that many tokens
(run_bench.prompt_ids) then --gen greedy decode steps, the engines interleaved (A B C A B C ...), medians and
min-max of --runs runs, for KV caches in F16 and Q8_0 (llama.cpp needs flash attention for a Q8_0 V cache).
Then the decode-step attention alone at --attn-ctx (bench_attn.py: moelite's op vs ggml's two, the kernels
llama.cpp runs), which also covers contexts whose prompt takes too long on a small machine. Writes
bench/out/context-<model>.json and its section of bench/RESULTS.md (between the CONTEXT markers, one block per SIMD
level; run_bench.py keeps the blocks when it rewrites the file).

    PYTHONPATH=build/dev python bench/bench_context.py [--ctx 128,4096] [--runs 2] [--kv f16,q8_0]
        [--attn-ctx 128,4096,16384] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

from bench_attn import measure, simd_level
from run_bench import OUT, ROOT, model_path, prompt_ids, run

CONTEXT_BEGIN = "<!-- context ({simd}): begin (bench/bench_context.py) -->"
CONTEXT_END = "<!-- context ({simd}): end -->"

# (label, engine, worker flags) per KV type
ENGINES = {
    "f16": [("moelite", "moelite", []), ("llama.cpp", "llama", []), ("llama.cpp flash", "llama", ["--flash-attn"])],
    "q8_0": [("moelite", "moelite", ["--kv", "q8_0"]), ("llama.cpp flash", "llama", ["--flash-attn", "--kv", "q8_0"])],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-30b-shapes")
    ap.add_argument("--qwen-layers", type=int, default=10)
    ap.add_argument("--ctx", default="128,4096")
    ap.add_argument("--kv", default="f16,q8_0")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--gen", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn-ctx", default="128,4096,16384", help="contexts of the attention-op table ('': skip)")
    ap.add_argument("--attn-rounds", type=int, default=5)
    ap.add_argument("--attn-threads", default="", help="threads of the attention-op tables (default: --threads)")
    ap.add_argument("--note", default="", help="a paragraph for the section (how the machine was, what was skipped)")
    ap.add_argument("--report-only", action="store_true", help="the section again from bench/out/context-*.json")
    ap.add_argument(
        "--append",
        action="store_true",
        help="add these rows (and attention tables) to bench/out/context-*.json of the same commit and machine, e.g. "
        "a long context with fewer runs",
    )
    a = ap.parse_args()
    path = model_path(a.model, a.qwen_layers)
    out = OUT / f"context-{Path(path).stem}.json"
    if a.report_only:
        res = json.loads(out.read_text())
        res["note"] = a.note or res.get("note", "")
        write_section(res)
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    res = {"model": path, "commit": commit.stdout.strip(), "simd": simd_level(), "cpu": platform.processor()}
    res["threads"], res["gen"], res["rows"] = a.threads, a.gen, []
    res["note"] = a.note
    if a.append and out.exists():
        old = json.loads(out.read_text())
        if any(old[k] != res[k] for k in ("commit", "simd", "threads", "gen")):
            raise SystemExit(f"--append: {out} was measured at another commit / machine / settings")
        res = {**old, "note": a.note or old.get("note", "")}
    for n in (int(x) for x in a.ctx.split(",") if x):
        ids, _ = prompt_ids(path, n)
        pf = OUT / f"prompt-{Path(path).stem}-{n}.json"
        pf.write_text(json.dumps(ids))
        for kv in a.kv.split(","):
            runs: dict[str, list[dict]] = {label: [] for label, _, _ in ENGINES[kv]}
            for i in range(a.runs):
                for label, engine, extra in ENGINES[kv]:
                    r = run(engine, path, str(pf), a, None, None, extra)
                    runs[label].append(r)
                    print(n, kv, label, i, json.dumps(r), flush=True)
            res["rows"].append({"ctx": n, "kv": kv, "runs": runs})
            out.write_text(json.dumps(res, indent=1))
    if a.attn_ctx:
        res["attn"] = res.get("attn", []) if a.append else []
        for th in (int(x) for x in (a.attn_threads or str(a.threads)).split(",")):
            ctxs = [int(x) for x in a.attn_ctx.split(",")]
            res["attn"] += measure(ctxs, a.kv.split(","), th, a.attn_rounds, 10) + [""]
        out.write_text(json.dumps(res, indent=1))
    write_section(res)


def write_section(res: dict) -> None:
    """RESULTS.md's block for this SIMD level: replaced where it is, else added after the title's paragraphs."""
    begin, end = (m.format(simd=res["simd"]) for m in (CONTEXT_BEGIN, CONTEXT_END))
    block = [
        begin,
        f"## Decode at long contexts, {res['simd']} machine ({res['cpu'] or 'x86-64'}), measured at commit "
        f"`{res['commit']}`",
        "",
        f"`python bench/bench_context.py` on `{os.path.relpath(res['model'], ROOT)}`, resident, the engines' "
        "runs interleaved.",
        "",
        *([res["note"], ""] if res.get("note") else []),
        *([table(res), ""] if res["rows"] else []),
    ]
    if res.get("attn"):
        block += ["The decode step's attention alone, one layer of the same shapes (`bench/bench_attn.py`):", ""]
        block += res["attn"][:-1] if res["attn"][-1:] == [""] else res["attn"]
    block += [end]
    path = ROOT / "bench" / "RESULTS.md"
    old = path.read_text()
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + "\n".join(block) + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + "\n".join(block) + "\n"
    path.write_text(new)
    print("\n".join(block))


def table(res: dict) -> str:
    lines = [
        f"SIMD: {res['simd']}, {res['threads']} threads, commit `{res['commit']}`; decode tok/s of {res['gen']} "
        "steps after a prompt of the context's length, median (min-max); ratio = moelite / llama.cpp's faster path",
        "",
        "| context | KV | moelite | llama.cpp | llama.cpp flash | moelite / best llama.cpp | prefill: moelite / best |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in res["rows"]:
        med = {}
        cells = []
        for label in ("moelite", "llama.cpp", "llama.cpp flash"):
            ok = [r for r in row["runs"].get(label, []) if "error" not in r]
            if not ok:
                cells.append("-")
                continue
            d = [r["decode_tok_s"] for r in ok]
            med[label] = (statistics.median(d), statistics.median(r["prefill_tok_s"] for r in ok))
            cells.append(f"{med[label][0]:.1f} ({min(d):.1f}-{max(d):.1f})")
        others = [v for k, v in med.items() if k != "moelite"]
        ratio = pre = "-"
        if "moelite" in med and others:
            ratio = f"{med['moelite'][0] / max(o[0] for o in others):.2f}x"
            pre = f"{med['moelite'][1] / max(o[1] for o in others):.2f}x"
        lines.append(f"| {row['ctx']} | {row['kv']} | " + " | ".join(cells) + f" | {ratio} | {pre} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
