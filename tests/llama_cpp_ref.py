"""The pinned llama.cpp as a reference (tests only): its runtime through llama-cpp-python, and its own
converter (`convert_hf_to_gguf.py` of the llama-cpp-python 0.3.36 sdist the build fetched into
third_party/sdist). Nothing of llama.cpp is committed: the converter is extracted from the sdist at test time.

    llama_cpp_logits(gguf, ids)        -> [n_tokens, n_vocab] logits of llama.cpp, F32 KV cache
    pinned_convert(hf_dir, out, ...)   -> the GGUF that llama.cpp's converter writes (f32)

In CI (MOELITE_REQUIRE_LLAMA_CPP=1, set by .ci/run) a missing llama-cpp-python or sdist is a failure, never
a skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SDIST_DIR = ROOT / "third_party" / "sdist"
EXTRACT = Path(__file__).resolve().parent / ".fixtures" / "llama_cpp_convert"
REQUIRED = os.environ.get("MOELITE_REQUIRE_LLAMA_CPP") == "1"


def need_llama_cpp():
    """The llama_cpp module, or a skip (a failure when required)."""
    if REQUIRED:
        import llama_cpp

        return llama_cpp
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install .[bench])")


def llama_cpp_logits(gguf_path: str | os.PathLike, ids: list[int], n_ctx: int = 64) -> np.ndarray:
    """llama.cpp's logits for every prompt position, one batch, F32 K and V cache (the F16
    cache alone moves logits by 2-4e-4)."""
    llama_cpp = need_llama_cpp()
    llm = llama_cpp.Llama(
        model_path=str(gguf_path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        n_threads=1,
        logits_all=True,
        type_k=0,
        type_v=0,
        flash_attn=False,
        verbose=False,
    )
    try:
        llm.eval(list(ids))
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def converter_dir() -> Path:
    """convert_hf_to_gguf.py + conversion/ + gguf-py/ extracted from the pinned sdist (once)."""
    marker = EXTRACT / "convert_hf_to_gguf.py"
    if marker.exists():
        return EXTRACT
    sdists = sorted(SDIST_DIR.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        if REQUIRED:
            raise FileNotFoundError(f"no llama-cpp-python sdist under {SDIST_DIR} (the build fetches it)")
        pytest.skip(f"no llama-cpp-python sdist under {SDIST_DIR} (fetched by the build)")
    tmp = EXTRACT.with_name(EXTRACT.name + f".tmp{os.getpid()}")
    with tarfile.open(sdists[-1]) as tar:
        prefix = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
        members = [
            m
            for m in tar.getmembers()
            if m.name.startswith(prefix)
            and (
                m.name == prefix + "convert_hf_to_gguf.py"
                or m.name.startswith((prefix + "conversion/", prefix + "gguf-py/"))
            )
        ]
        for m in members:
            m.name = m.name[len(prefix) :]
        tar.extractall(tmp, members=members, filter="data")
    try:
        tmp.rename(EXTRACT)
    except OSError:  # another test process won the race
        pass
    return EXTRACT


def pinned_convert(hf_dir: str | os.PathLike, out: str | os.PathLike, *extra: str) -> Path:
    """Run llama.cpp's converter (f32) on a tiny fixture, through tests/tools/run_llama_convert.py (which
    patches only the vocabulary step: the fixtures' 320-token GPT-2 BPE is not any real model's)."""
    src = converter_dir()
    cmd = [
        sys.executable,
        str(Path(__file__).parent / "tools" / "run_llama_convert.py"),
        str(src),
        str(hf_dir),
        "--outtype",
        "f32",
        "--outfile",
        str(out),
        *extra,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter failed on {hf_dir}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return Path(out)
