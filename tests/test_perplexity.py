"""`moelite perplexity` (runtime/perplexity.py, apps/perplexity_cmd.py) against the pinned llama.cpp's perplexity
method computed here from llama.cpp's own logits and tokens (chunks of n_ctx, BOS in each chunk's first place when the
vocabulary adds one, the second half scored), on the demo model, the demo with add_bos_token set and a fixture model;
offloading changes no bit; the KL divergence against a saved base (zero against itself, the independent float64 sum
for a Q4_K_M re-quantization); bad inputs named."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from llama_cpp_ref import llama_cpp_logits, need_llama_cpp
from logprob_ref import log_softmax64

import moelite
from moelite.errors import ModelFormatError, UsageError
from moelite.runtime.model import default_model_path
from moelite.runtime.perplexity import KLBaseReader, KLBaseWriter, perplexity

# the text: a stdlib module (Python code and English docstrings), the same file on both sides of each comparison
TEXT = Path(textwrap.__file__).read_text()
N_CTX = 128


def llama_cpp_perplexity(gguf: Path, text: str, n_ctx: int, n_chunks: int) -> tuple[float, int, list[int]]:
    """llama-perplexity's method with the pinned llama.cpp: its tokenizer (add_special, no parse_special, as
    common_tokenize(ctx, prompt, true)), BOS replacing each chunk's first token when the vocabulary adds BOS, NLL of
    tokens n_ctx/2 + 1 .. n_ctx - 1 from llama.cpp's logits. -> (PPL, scored tokens, the tokens)."""
    llama_cpp = need_llama_cpp()
    vocab_only = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    try:
        tokens = vocab_only.tokenize(text.encode(), add_bos=True, special=False)
        vocab = llama_cpp.llama_model_get_vocab(vocab_only.model)
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        bos = vocab_only.token_bos()
    finally:
        vocab_only.close()
    first, nll, count = n_ctx // 2, 0.0, 0
    for i in range(min(n_chunks, len(tokens) // n_ctx)):
        chunk = list(tokens[i * n_ctx : (i + 1) * n_ctx])
        if add_bos:
            chunk[0] = bos
        lp = log_softmax64(llama_cpp_logits(gguf, chunk, n_ctx=n_ctx))
        for j in range(first, n_ctx - 1):
            nll -= lp[j, chunk[j + 1]]
            count += 1
    return float(np.exp(nll / count)), count, list(tokens)


@pytest.fixture(scope="module")
def demo_bos(tmp_path_factory) -> Path:
    """The demo with tokenizer.ggml.add_bos_token = true: every chunk then starts with BOS, on both sides."""
    from moelite.converters.gguf_out import rewrite_stock

    out = tmp_path_factory.mktemp("bos") / "demo-bos.gguf"
    rewrite_stock(default_model_path(), out, kv={"tokenizer.ggml.add_bos_token": True})
    return out


def _fixture() -> Path:
    from fixture_models import fixture_gguf

    return fixture_gguf("qwen3_moe")[1]


@pytest.mark.parametrize("which", ["demo", "demo_bos", "fixture"])
def test_perplexity_equals_llama_cpp(which, request):
    gguf = {"demo": lambda: Path(default_model_path()), "demo_bos": lambda: request.getfixturevalue("demo_bos")}.get(
        which, _fixture
    )()
    n_chunks = 4
    ref_ppl, ref_count, ref_tokens = llama_cpp_perplexity(gguf, TEXT, N_CTX, n_chunks)
    with moelite.load(gguf, n_ctx=N_CTX, n_threads=1, kv_type="f32") as m:
        assert m.tokenizer.encode(TEXT)[: n_chunks * N_CTX] == ref_tokens[: n_chunks * N_CTX]
        assert m.tokenizer.add_bos == (which == "demo_bos")
        res = perplexity(m, TEXT, N_CTX, n_chunks)
    assert res.count == ref_count == n_chunks * (N_CTX - 1 - N_CTX // 2)
    assert res.ppl == pytest.approx(ref_ppl, rel=0.01), (res.ppl, ref_ppl)
    assert 0 < res.ppl_uncertainty < res.ppl
    assert [c.index for c in res.chunks] == list(range(n_chunks)) and res.chunks[-1].ppl == res.ppl


def test_offloading_changes_no_bit():
    """The same ubatch size resident and with most experts offloaded: the same NLL to the last bit."""
    runs = []
    for budget in (None, "21MB"):
        with moelite.load(None, n_ctx=N_CTX, n_threads=1, n_ubatch=32, memory_budget=budget) as m:
            runs.append((m.plan.slots is not None, perplexity(m, TEXT, N_CTX, 3)))
    assert [offloaded for offloaded, _ in runs] == [False, True]
    assert runs[0][1].sum_nll == runs[1][1].sum_nll and runs[0][1].sum_nll2 == runs[1][1].sum_nll2


@pytest.fixture(scope="module")
def q4(tmp_path_factory) -> Path:
    from moelite.converters import convert

    out = tmp_path_factory.mktemp("q4") / "demo-q4_k_m.gguf"
    convert(default_model_path(), out, type="q4_k_m", progress=False)
    return out


def test_kl_divergence(tmp_path, q4):
    base = tmp_path / "base.kld"
    with moelite.load(None, n_ctx=N_CTX, n_threads=1) as m:
        ref = perplexity(m, TEXT, N_CTX, 3, KLBaseWriter(base))
        chunk0 = m.tokenizer.encode(TEXT)[:N_CTX]
        base_lp = log_softmax64(m.logits(chunk0))
        r = KLBaseReader(base)
        same = perplexity(m, TEXT, N_CTX, 3, r)
        r.close()
    assert abs(same.kld[0]) < 1e-6 and same.same_top == (1.0, 0.0)
    assert same.ppl == ref.ppl and same.ppl_base == pytest.approx(ref.ppl, rel=1e-6)  # the base is kept in float32
    with moelite.load(q4, n_ctx=N_CTX, n_threads=1) as m:
        r = KLBaseReader(base)
        res = perplexity(m, TEXT, N_CTX, 3, r)
        r.close()
        q_lp = log_softmax64(m.logits(chunk0))
    first = N_CTX // 2
    p, q = base_lp[first : N_CTX - 1], q_lp[first : N_CTX - 1]
    kl0 = float(np.mean(np.sum(np.exp(p) * (p - q), axis=-1)))  # KL(base || Q4_K_M) of chunk 0, from the logits
    assert res.chunks[0].kld == pytest.approx(kl0, rel=1e-4, abs=1e-7)
    assert 0 < res.kld[0] and 0 < res.same_top[0] <= 1 and res.ppl_base == pytest.approx(ref.ppl, rel=1e-6)
    agree = np.mean(np.argmax(p, axis=-1) == np.argmax(q, axis=-1))
    assert res.chunks[0].same_top == pytest.approx(agree)


def test_kl_base_mismatches_and_damage_are_named(tmp_path):
    base = tmp_path / "base.kld"
    with moelite.load(None, n_ctx=N_CTX, n_threads=1) as m:
        perplexity(m, TEXT, N_CTX, 2, KLBaseWriter(base))
        with pytest.raises(UsageError, match=r"base\.kld.*ctx-size 128.*64"):
            perplexity(m, TEXT, 64, 2, KLBaseReader(base))
        with pytest.raises(UsageError, match=r"base\.kld.*another text"):
            perplexity(m, TEXT[1000:], N_CTX, 2, KLBaseReader(base))
        with pytest.raises(UsageError, match="needs at least 256"):
            perplexity(m, TEXT[:300], N_CTX)
    data = base.read_bytes()
    (tmp_path / "cut.kld").write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelFormatError, match=r"cut\.kld"):
        KLBaseReader(tmp_path / "cut.kld")
    (tmp_path / "junk.kld").write_bytes(b"not a base file at all")
    with pytest.raises(ModelFormatError, match=r"junk\.kld: not a moelite KL base"):
        KLBaseReader(tmp_path / "junk.kld")
    (tmp_path / "huge.kld").write_bytes(data[:8] + (1 << 62).to_bytes(8, "little") + data[16:])
    with pytest.raises(ModelFormatError, match=r"huge\.kld: header length"):
        KLBaseReader(tmp_path / "huge.kld")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moelite", "perplexity", *args], capture_output=True, text=True, timeout=600
    )


def test_cli(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    r = _cli("-f", str(text), "-c", str(N_CTX), "--chunks", "2", "-t", "1", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n_chunk"] == 2 and out["scored_tokens"] == 2 * 63 and out["ppl"] > 1 and len(out["chunks"]) == 2
    assert "[1] PPL" in r.stderr and "[2] PPL" in r.stderr
    base = tmp_path / "b.kld"
    r = _cli("-f", str(text), "-c", str(N_CTX), "--chunks", "2", "-t", "1", "--kl-divergence-base", str(base))
    assert r.returncode == 0 and base.is_file() and "Final estimate: PPL = " in r.stdout, r.stderr
    r = _cli(
        "-f",
        str(text),
        "-c",
        str(N_CTX),
        "--chunks",
        "2",
        "-t",
        "1",
        "--kl-divergence-base",
        str(base),
        "--kl-divergence",
    )
    assert r.returncode == 0 and "Mean KLD = " in r.stdout and "Same top p = 100.000" in r.stdout, r.stderr
    for args, needle in (
        (["-f", str(tmp_path / "none.txt")], "none.txt: no such text file"),
        (["-f", str(text), "--kl-divergence"], "--kl-divergence needs --kl-divergence-base"),
        (["-f", str(text), "-c", "2"], "--ctx-size"),
        (["-f", str(text), "--kl-divergence-base", str(tmp_path), "-c", "64"], "is a directory"),
    ):
        r = _cli(*args)
        assert r.returncode == 2 and needle in r.stderr, (args, r.stderr)
    short = tmp_path / "short.txt"
    short.write_text("A short text.")
    r = _cli("-f", str(short))
    assert r.returncode == 2 and "needs at least 1024" in r.stderr
