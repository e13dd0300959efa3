"""Optional cross-check: llama.cpp (llama-cpp-python) loads moelite's output and greedy-decodes the same
tokens as transformers. Skipped when llama_cpp is not importable."""
from __future__ import annotations

import pytest

from hf_fixtures import FAMILIES, hf_greedy, make_hf_model

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install .[bench])")
from moelite.converters import convert  # noqa: E402

PROMPT = [5, 17, 42, 99, 123, 7, 250, 33, 64]
LLAMA_CPP_FAMILIES = [f for f in FAMILIES if f != "phimoe"]  # phimoe: llama.cpp's sparsemixer differs


@pytest.mark.slow
@pytest.mark.parametrize("family", LLAMA_CPP_FAMILIES)
def test_llama_cpp_greedy_matches_transformers(family, tmp_path):
    src = make_hf_model(family)
    out = tmp_path / f"{family}.gguf"
    convert(src, out, "f32", progress=False)
    want = hf_greedy(src, PROMPT, 8)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=1, verbose=False, logits_all=False)
    got = []
    for tok in llm.generate(PROMPT, temp=0.0, top_k=1, reset=True):
        got.append(int(tok))
        if len(got) == len(want):
            break
    assert got == want
