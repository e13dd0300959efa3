"""Streaming: converting a checkpoint whose largest tensor is several hundred MB keeps peak RSS under
2 x (largest output tensor) + 512 MiB. The checkpoint is written with raw safetensors (no transformers):
one qwen3_moe layer with 64 experts of 1024 x 1024 (bf16 on disk, 256 MiB per stacked f32 tensor)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from hf_fixtures import make_hf_model, write_safetensors

psutil = pytest.importorskip("psutil")

H, I, E, V, N_HEAD, N_KV, HEAD_DIM = 1024, 1024, 64, 320, 8, 4, 128


def _bf16(shape, seed) -> bytes:
    a = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * 0.02
    return (a.view(np.uint32) >> 16).astype(np.uint16).tobytes()


def build_big_checkpoint(d):
    d.mkdir(parents=True)
    small = make_hf_model("qwen3_moe")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(small / name, d / name)
    cfg = json.loads((small / "config.json").read_text())
    cfg.update(
        hidden_size=H,
        moe_intermediate_size=I,
        intermediate_size=I,
        num_local_experts=E,
        num_hidden_layers=1,
        num_attention_heads=N_HEAD,
        num_key_value_heads=N_KV,
        head_dim=HEAD_DIM,
    )
    (d / "config.json").write_text(json.dumps(cfg))
    expert = _bf16((I, H), 1)  # the same bytes for every expert: content does not matter here
    p = "model.layers.0"
    ts = {
        "model.embed_tokens.weight": ("BF16", [V, H], _bf16((V, H), 2)),
        "lm_head.weight": ("BF16", [V, H], _bf16((V, H), 3)),
        "model.norm.weight": ("BF16", [H], _bf16((H,), 4)),
        f"{p}.input_layernorm.weight": ("BF16", [H], _bf16((H,), 5)),
        f"{p}.post_attention_layernorm.weight": ("BF16", [H], _bf16((H,), 6)),
        f"{p}.self_attn.q_proj.weight": ("BF16", [N_HEAD * HEAD_DIM, H], _bf16((N_HEAD * HEAD_DIM, H), 7)),
        f"{p}.self_attn.k_proj.weight": ("BF16", [N_KV * HEAD_DIM, H], _bf16((N_KV * HEAD_DIM, H), 8)),
        f"{p}.self_attn.v_proj.weight": ("BF16", [N_KV * HEAD_DIM, H], _bf16((N_KV * HEAD_DIM, H), 9)),
        f"{p}.self_attn.o_proj.weight": ("BF16", [H, N_HEAD * HEAD_DIM], _bf16((H, N_HEAD * HEAD_DIM), 10)),
        f"{p}.self_attn.q_norm.weight": ("BF16", [HEAD_DIM], _bf16((HEAD_DIM,), 11)),
        f"{p}.self_attn.k_norm.weight": ("BF16", [HEAD_DIM], _bf16((HEAD_DIM,), 12)),
        f"{p}.mlp.gate.weight": ("BF16", [E, H], _bf16((E, H), 13)),
    }
    for e in range(E):
        for proj, shape in (("gate_proj", [I, H]), ("up_proj", [I, H]), ("down_proj", [H, I])):
            ts[f"{p}.mlp.experts.{e}.{proj}.weight"] = ("BF16", shape, expert)
    write_safetensors(d / "model.safetensors", ts)
    return d


@pytest.mark.slow
def test_peak_rss_is_bounded_by_the_largest_tensor(tmp_path):
    src = build_big_checkpoint(tmp_path / "big")
    out = tmp_path / "big.gguf"
    largest = E * I * H * 4  # one stacked f32 expert tensor: 256 MiB
    code = textwrap.dedent(f"""
        from moelite.converters import convert
        convert({str(src)!r}, {str(out)!r}, "f32", progress=False, n_threads=1)
        # VmHWM starts afresh at exec (ru_maxrss would also count the forked parent's pages)
        print("MAXRSS_KB", [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")][0])
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ
    )
    ps, peak = psutil.Process(proc.pid), 0
    try:
        while proc.poll() is None:
            try:
                peak = max(peak, ps.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.02)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    maxrss = int(stdout.split("MAXRSS_KB")[1].split()[0]) * 1024
    peak = max(peak, maxrss)
    limit = 2 * largest + 512 * 2**20
    assert out.stat().st_size > 3 * largest
    assert peak < limit, f"peak RSS {peak / 2**20:.0f} MiB >= limit {limit / 2**20:.0f} MiB"
    print(f"peak RSS {peak / 2**20:.0f} MiB for a {largest / 2**20:.0f} MiB largest tensor")


@pytest.mark.slow
def test_the_ple_table_is_written_shard_by_shard(tmp_path):
    """Qwen4-Exp's n-gram table (51B parameters in the release) is converted one shard at a time: a 512 MiB F32
    table in 16 shards (bf16 on disk) converts to F16 with a peak RSS far under the table, where holding it would
    take the table in F32 and its encoding at once; the file then runs."""
    from hf_fixtures import read_fixture_tensors

    small = make_hf_model("qwen4_exp_text")
    src = tmp_path / "big"
    src.mkdir()
    for p in small.iterdir():
        if p.suffix != ".safetensors" and p.name != "model.safetensors.index.json":
            shutil.copy(p, src / p.name)
    n_shards, width = 16, 16
    rows = (512 << 20) // (4 * width) // n_shards  # rows per shard: 512 MiB in F32 altogether
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "split_ngram_parts": n_shards}))
    ts = {}
    for k, v in read_fixture_tensors(small).items():
        if ".ngram_embedding.shard_" in k:
            continue
        dt = "I64" if v.dtype == np.int64 else "F32"
        ts[k] = (dt, list(v.shape), np.ascontiguousarray(v, np.int64 if dt == "I64" else np.float32).tobytes())
    pre = next(k for k in read_fixture_tensors(small) if ".ngram_embedding.shard_" in k).split(".shard_")[0]
    block = _bf16((rows, width), 21)  # the same bytes in every shard: only the size matters here
    for i in range(n_shards):
        ts[f"{pre}.shard_{i}.weight"] = ("BF16", [rows, width], block)
    write_safetensors(src / "model.safetensors", ts)
    out = tmp_path / "big.gguf"
    table = n_shards * rows * width * 4
    code = textwrap.dedent(f"""
        from moelite.converters import convert
        convert({str(src)!r}, {str(out)!r}, "f16", progress=False, n_threads=1)
        print("MAXRSS_KB", [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")][0])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=os.environ)
    assert r.returncode == 0, r.stderr
    peak = int(r.stdout.split("MAXRSS_KB")[1].split()[0]) * 1024
    assert out.stat().st_size > table // 2  # the F16 table is in the file
    assert peak < table // 2, f"peak RSS {peak / 2**20:.0f} MiB for a {table / 2**20:.0f} MiB table"
    print(f"peak RSS {peak / 2**20:.0f} MiB for a {table / 2**20:.0f} MiB table")
    import moelite

    with moelite.load(out, n_threads=1, kv_type="f32") as m:
        assert np.isfinite(m.logits([5, 6, 7])).all()
