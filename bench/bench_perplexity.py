"""Quantization quality with `moelite perplexity` (issue 32): PPL and KL divergence against the Q8_0 base, the same
measurement with the pinned llama.cpp for a cross-check, and the same under a memory budget that offloads experts.

    python bench/bench_perplexity.py [--model demo] [--types q4_k_m,q6_k,q4_0] [--ctx 512] [--chunks 48]

The base is the model file as shipped (the demo: Q8_0). Each other type is re-quantized from it with `moelite convert
BASE --type T` (a re-quantization of Q8_0, not of the F32 weights: its error adds to Q8_0's). The text: three modules
of the running Python's standard library (argparse.py, inspect.py, typing.py: code and English docstrings),
concatenated. Writes bench/out/perplexity.json; bench/PERPLEXITY.md reports a run.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
TEXT_MODULES = ("argparse", "inspect", "typing")


def text_file() -> Path:
    import importlib

    out = OUT / "perplexity-text.txt"
    out.write_text("\n\n".join(Path(importlib.import_module(m).__file__).read_text() for m in TEXT_MODULES))
    return out


def moelite_ppl(model: Path, text: Path, ctx: int, chunks: int, *extra: str) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "moelite", "perplexity", str(model), "-f", str(text), "-c", str(ctx)]
    cmd += ["--chunks", str(chunks), "-t", "1", "--json", *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo", help="'demo' (the embedded model) or a GGUF path")
    ap.add_argument("--types", default="q4_k_m,q6_k,q4_0")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=48)
    ap.add_argument("--budget", default="18MB", help="memory budget of the offloaded run (default 18MB)")
    a = ap.parse_args(argv)
    from moelite.converters import convert
    from moelite.runtime.model import default_model_path

    OUT.mkdir(parents=True, exist_ok=True)
    base = Path(default_model_path() if a.model == "demo" else a.model)
    text = text_file()
    kld = OUT / f"{base.stem}-c{a.ctx}.kld"
    rows = []
    res, dt = moelite_ppl(base, text, a.ctx, a.chunks, "--kl-divergence-base", str(kld))
    rows.append({"type": "base", "file": base.name, "seconds": round(dt, 1), **_summary(res)})
    offloaded, dt = moelite_ppl(base, text, a.ctx, a.chunks, "--memory-budget", a.budget)
    rows.append({"type": f"base, --memory-budget {a.budget}", "seconds": round(dt, 1), **_summary(offloaded)})
    for t in a.types.split(","):
        q = OUT / f"{base.stem}-{t}.gguf"
        if not q.exists():
            convert(base, q, type=t, progress=False)
        res, dt = moelite_ppl(q, text, a.ctx, a.chunks, "--kl-divergence-base", str(kld), "--kl-divergence")
        rows.append({"type": t, "file": q.name, "bytes": q.stat().st_size, "seconds": round(dt, 1), **_summary(res)})
    rows[0]["bytes"] = base.stat().st_size
    ref = _llama_cpp(base, text, a.ctx, a.chunks)
    out = {
        "model": base.name,
        "text": "+".join(f"{m}.py" for m in TEXT_MODULES) + f" of Python {platform.python_version()}",
        "ctx": a.ctx,
        "chunks": a.chunks,
        "llama_cpp_base_ppl": ref,
        "rows": rows,
    }
    (OUT / "perplexity.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


def _summary(res: dict) -> dict:
    keep = ("ppl", "ppl_uncertainty", "scored_tokens", "kld", "kld_uncertainty", "same_top", "same_top_uncertainty")
    return {k: res[k] for k in keep if k in res}


def _llama_cpp(model: Path, text: Path, ctx: int, chunks: int) -> float | None:
    """The pinned llama.cpp's perplexity method on the same file and text (tests/test_perplexity.py computes it)."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from test_perplexity import llama_cpp_perplexity
    except ImportError:  # llama-cpp-python (the bench extra) or pytest missing
        return None
    return llama_cpp_perplexity(model, text.read_text(), ctx, chunks)[0]


if __name__ == "__main__":
    sys.exit(main())
