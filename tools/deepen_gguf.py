"""A deeper copy of a synthetic (random-weight) MoE GGUF, for full-size offloading benchmarks (issue 34).

    python tools/deepen_gguf.py bench/out/models/qwen3-30b-a3b-shapes-L10-q4_k_m.gguf OUT.gguf --layers 48

tools/synthetic_moe.py + the converter make the Qwen3-30B-A3B-shaped file the path a user takes, but at the full
48 layers that path needs the F16 checkpoint first (~58 GB for ~17 GiB of Q4_K_M). This tool grows an existing
shallow file instead: block il of OUT is block il % n of SRC, already quantized, with its experts relabelled by a
random permutation of its own (the expert tensors and the router's rows permuted alike, so every layer routes its
own way). The keys are SRC's with block_count = --layers; tensors are streamed one at a time (never the whole file
in memory) by the converter's writer (atomic, page-aligned). The weights stay random: routing on such a file is not
the routing of a trained model, and a benchmark on it says so.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import gguf
import numpy as np

from moelite.converters import gguf_out

BLK = re.compile(r"blk\.(\d+)\.(.+)\Z")
EXPERT_TENSORS = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight", "ffn_gate_inp.weight")


def deepen(src: str | Path, out: str | Path, layers: int, seed: int = 0, progress: bool = True) -> Path:
    r = gguf.GGUFReader(str(src))
    arch = str(r.get_field("general.architecture").contents())
    n_src = int(r.get_field(f"{arch}.block_count").contents())
    w = gguf_out.new_writer(arch)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name in ("general.architecture", "general.alignment"):
            continue
        if f.name == f"{arch}.block_count":
            gguf_out.add_kv(w, f.name, layers)
            continue
        w.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    by_name = {t.name: t for t in r.tensors}
    head = [t for t in r.tensors if not BLK.match(t.name) and t.name.startswith("token_embd")]
    tail = [t for t in r.tensors if not BLK.match(t.name) and not t.name.startswith("token_embd")]
    per_block = [BLK.match(t.name).group(2) for t in r.tensors if t.name.startswith("blk.0.")]
    rng = np.random.default_rng(seed)
    n_expert = int(r.get_field(f"{arch}.expert_count").contents())
    perms = [np.arange(n_expert) if il < n_src else rng.permutation(n_expert) for il in range(layers)]
    plan: list[tuple[str, object, np.ndarray | None]] = [(t.name, t, None) for t in head]
    for il in range(layers):
        for part in per_block:
            t = by_name[f"blk.{il % n_src}.{part}"]
            plan.append((f"blk.{il}.{part}", t, perms[il] if part in EXPERT_TENSORS else None))
    plan += [(t.name, t, None) for t in tail]
    # byte shapes: the numpy view's shape with its last axis in bytes (F32 / F16 rows too), as the converter plans them
    infos = [(name, np.asarray(t.data).view(np.uint8).shape, int(t.tensor_type), int(t.n_bytes)) for name, t, _ in plan]

    def produce(i: int) -> np.ndarray:
        _, t, perm = plan[i]
        data = np.asarray(t.data)
        if perm is not None:  # experts (and the router's rows) are the leading axis of the numpy view
            data = data[perm]
        return np.ascontiguousarray(data).view(np.uint8).reshape(-1)

    return gguf_out.write(Path(out), w, infos, produce, progress=progress)[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(deepen(a.src, a.out, a.layers, a.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
