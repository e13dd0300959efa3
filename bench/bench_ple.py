"""Qwen3.8-Flash-Next's PLE n-gram table read from disk (issue 30): decode tok/s and bytes read per token of a
qwen4exp-shaped GGUF whose table is >= 4 GiB (random), under a memory cap far below the table, moelite vs llama.cpp
(llama-cpp-python 0.3.36) on the same file and threads. Writes the "PLE table" section of bench/RESULTS.md:

    python bench/bench_ple.py [--table-gib 4] [--runs 3] [--gen 48] [--threads 2] [--cap-mib 1024]

The file: a small qwen4exp trunk (transformers' Qwen4ExpForCausalLM with random weights, converted by moelite at
q8_0: H 512, 4 layers [DeltaNet, DeltaNet + PLE, DeltaNet, QSA attention], 32 experts top-4) whose
`per_layer_token_embd` is then replaced by a random F16 table of --table-gib GiB (rows of 64 values; 3-grams, 4 heads
per n-gram: 8 rows per token), with the hash heads' vocabularies (primes) resized to fill it. Cached under
bench/out/models/ (git-ignored).

Runs: each engine in its own process (bench/worker.py) inside a memory cgroup of --cap-mib (moelite also gets the cap
minus 256 MiB as memory_budget), the file's pages dropped from the page cache first, decode teacher-forced on random
token ids (each step's n-grams new: the table's worst case, no reuse). Reported per token: the PLE rows' bytes moelite
asked for (ple_stats) and the bytes each process read from disk (/proc/self/io).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

ROW_DIM, N_GRAM, HEADS_PER_NGRAM = 64, 3, 4
CONFIG = dict(
    vocab_size=320,
    hidden_size=ROW_DIM * (N_GRAM - 1) * HEADS_PER_NGRAM,  # 512: the table's concatenated rows are one hidden vector
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    linear_num_key_heads=4,
    linear_num_value_heads=8,
    linear_key_head_dim=64,
    linear_value_head_dim=64,
    num_experts=32,
    num_experts_per_tok=4,
    moe_intermediate_size=128,
    shared_expert_intermediate_size=128,
    hc_count=4,
    hc_lowrank=32,
    ple_layer_ids=[2],
    ngram_size=N_GRAM,
    heads_per_ngram=HEADS_PER_NGRAM,
    ngram_vocab_size_base=97,
    split_ngram_parts=1,
    indexer_n_heads=8,
    indexer_kv_heads=1,
    indexer_head_dim=64,
    indexer_budget=2048,
    indexer_compress_ratio=4,
    output_gate_type="sigmoid",
    eos_token_id=2,
    bos_token_id=0,
    pad_token_id=0,
    tie_word_embeddings=False,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 1e6,
        "partial_rotary_factor": 0.25,
        "mrope_section": [4, 2, 2],
        "mrope_interleaved": True,
    },
)


def _is_prime(n: int) -> bool:
    if n < 2 or n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


def primes_from(start: int, count: int) -> list[int]:
    """`count` consecutive primes above `start` (the hash heads' vocabularies, as the reference derives them)."""
    out, p = [], start
    while len(out) < count:
        p += 1
        if _is_prime(p):
            out.append(p)
    return out


def trunk(path: Path) -> Path:
    """The small qwen4exp model at q8_0, with the tiny table transformers makes (replaced by big_table)."""
    if path.exists():
        return path
    import torch
    from hf_fixtures import _make_tokenizer
    from transformers import Qwen4ExpForCausalLM, Qwen4ExpTextConfig

    from moelite.converters import convert

    torch.manual_seed(7)
    with tempfile.TemporaryDirectory() as d:
        hf = Path(d) / "hf"
        Qwen4ExpForCausalLM(Qwen4ExpTextConfig(**CONFIG)).save_pretrained(hf)
        _make_tokenizer(hf)
        convert(hf, path, type="q8_0", progress=False)
    return path


def big_table(src: Path, out: Path, table_gib: float) -> Path:
    """src with its PLE table replaced by a random F16 one of table_gib GiB and the hash heads resized to it."""
    if out.exists():
        return out
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = "qwen4exp"
    heads = (N_GRAM - 1) * HEADS_PER_NGRAM
    rows_wanted = int(table_gib * 2**30) // (ROW_DIM * 2)
    vocab = primes_from(rows_wanted // heads - 1000, heads)
    offsets = list(np.cumsum([0] + vocab[:-1]))
    rows = -(-sum(vocab) // 128) * 128  # padded as the reference pads its table
    tmp = out.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_custom_alignment(int(reader.alignment))  # moelite writes page-aligned tensors (a numpy uint32 here)
    for f in reader.fields.values():
        if f.name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.ALIGNMENT) or f.name.startswith("GGUF."):
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        value = f.contents()
        if f.name == f"{arch}.ple.head_vocab_sizes":
            value = vocab
        elif f.name == f"{arch}.ple.head_offsets":
            value = [int(x) for x in offsets]
        writer.add_key_value(f.name, value, f.types[0], sub_type=sub)
    table = np.memmap(str(out) + ".table", dtype=np.float16, mode="w+", shape=(rows, ROW_DIM))
    rng = np.random.default_rng(11)
    step = 1 << 22
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        table[r0 : r0 + n] = (rng.standard_normal((n, ROW_DIM), dtype=np.float32) * 0.05).astype(np.float16)
    table.flush()
    tensors = []
    for t in reader.tensors:
        if t.name == "per_layer_token_embd.weight":
            tensors.append((t.name, table, gguf.GGMLQuantizationType.F16))
        else:
            tensors.append((t.name, t.data, t.tensor_type))
    for name, data, qtype in tensors:
        shape = data.shape if qtype == gguf.GGMLQuantizationType.F16 and name.startswith("per_layer") else None
        writer.add_tensor_info(name, shape if shape else data.shape, data.dtype, data.nbytes, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data, _ in tensors:
        writer.write_tensor_data(data)
    writer.close()
    del table
    os.remove(str(out) + ".table")
    os.replace(tmp, out)
    return out


def model_path(table_gib: float) -> Path:
    models = OUT / "models"
    models.mkdir(parents=True, exist_ok=True)
    return big_table(
        trunk(models / "qwen4exp-ple-trunk-q8_0.gguf"), models / f"qwen4exp-ple{table_gib:g}g.gguf", table_gib
    )


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run(engine: str, path: Path, prompt: str, teacher: str, a, cgroup: str | None) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "worker.py"), engine, str(path), "--prompt", prompt]
    cmd += ["--teacher", teacher, "--threads", str(a.threads)]
    if engine == "moelite":
        cmd += ["--budget", str((a.cap_mib - 256) << 20)]
    else:
        cmd += ["--no-repack"]  # llama.cpp's repacked buffers are anonymous memory a cap cannot reclaim
    if cgroup:
        cmd += ["--cgroup", cgroup]
    drop_cache(path)
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=3600, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    )
    if r.returncode != 0:
        return {"error": (r.stderr or r.stdout)[-600:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table-gib", type=float, default=4.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--gen", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cap-mib", type=int, default=1024)
    a = ap.parse_args(argv)
    from run_bench import Cgroups, machine

    path = model_path(a.table_gib)
    rng = np.random.default_rng(3)
    ids = [int(x) for x in rng.integers(3, 320, size=16 + a.gen)]
    with tempfile.TemporaryDirectory() as d:
        prompt, teacher = Path(d) / "prompt.json", Path(d) / "teacher.json"
        prompt.write_text(json.dumps(ids[:16]))
        teacher.write_text(json.dumps(ids[16:]))
        cg = Cgroups()
        rows: dict[str, list[dict]] = {"moelite": [], "llama": []}
        for i in range(a.runs):
            for engine in ("moelite", "llama") if i % 2 == 0 else ("llama", "moelite"):
                group = cg.make(f"ple-{engine}-{i}", a.cap_mib << 20) if cg.base else None
                rows[engine].append(run(engine, path, str(prompt), str(teacher), a, group))
                print(engine, rows[engine][-1], flush=True)
    cg.cleanup()
    report(a, path, rows, machine(), cg.base is not None)
    return 0


def report(a, path: Path, rows: dict[str, list[dict]], simd: str, capped: bool) -> None:
    ok = {e: [r for r in rs if "error" not in r] for e, rs in rows.items()}

    def med(e: str, key: str, scale: float = 1.0) -> str:
        v = [r[key] * scale for r in ok[e] if r.get(key) is not None]
        return f"{statistics.median(v):.1f} [{min(v):.1f}, {max(v):.1f}]" if v else "-"

    tok = {e: [r["tokens"] for r in ok[e]] for e in ok}
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    lines = [
        f"## PLE table read from disk (Qwen3.8-Flash-Next's n-gram embeddings), measured at commit `{commit}`",
        "",
        f"Written by `python bench/bench_ple.py --table-gib {a.table_gib:g} --runs {a.runs} --gen {a.gen} --threads "
        f"{a.threads} --cap-mib {a.cap_mib}` on {simd}, {a.threads} threads: "
        f"`{path.name}`, {path.stat().st_size / 2**30:.2f} GiB, of which the PLE table "
        f"{a.table_gib:g} GiB (F16 rows of {ROW_DIM} values, 8 rows per token); memory capped at {a.cap_mib} MiB "
        f"by a cgroup{'' if capped else ' (NOT ENFORCED: no writable memory cgroup on this machine)'} for both "
        f"engines, moelite's budget {a.cap_mib - 256} MiB; the file's pages dropped before each run; decode fed "
        f"random token ids (every n-gram new: no row reuse). Median [min, max] of {a.runs} runs. disk read: "
        f"/proc/self/io read_bytes of the decode steps over their tokens; PLE rows asked: the bytes of the table rows "
        f"moelite read (ple_stats; each costs a 4 KiB page of the page cache).",
        "",
        "| engine | decode tok/s | disk read per token | PLE rows asked per token |",
        "|---|---|---|---|",
    ]
    for e, name in (("moelite", "moelite"), ("llama", "llama.cpp")):
        per_tok = [r["disk_read_bytes"] / 1024 / max(r["tokens"], 1) for r in ok[e]]
        ple = [r["ple_bytes_read"] / 1024 / max(r["tokens"], 1) for r in ok[e] if r.get("ple_bytes_read") is not None]
        lines.append(
            f"| {name} | {med(e, 'decode_tok_s')} | "
            f"{(f'{statistics.median(per_tok):.1f} KiB' if per_tok else '-')} | "
            f"{(f'{statistics.median(ple):.2f} KiB' if ple else '-')} |"
        )
    errors = [f"{e}: {r['error']}" for e, rs in rows.items() for r in rs if "error" in r]
    if errors:
        lines += ["", "Failed runs: " + "; ".join(x.replace("\n", " ")[:300] for x in errors)]
    del tok
    section = "\n".join(lines) + "\n"
    from run_bench import replace_section

    replace_section("## PLE table read from disk", section)  # the section's start, whatever commit it names
    print(section)


if __name__ == "__main__":
    sys.exit(main())
