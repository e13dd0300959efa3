"""Tokenizer parity with llama.cpp's reference tokenizations of real vocab-only GGUFs, and unit checks.

The GGUFs and their .inp/.out files come with the vendored llama.cpp (third_party/llama.cpp/models, fetched
by the build). Format (llama.cpp tests/test-tokenizer-0.cpp): the .inp inputs are joined by
"\\n__ggml_vocab_test__\\n"; line i of .out holds the ids of input i, made with add_special=false and
parse_special=false (no BOS; control tokens written in the text are plain text).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from moelite.errors import TokenizerError
from moelite.runtime.tokenizer import PRE_TOKENIZER_REGEXES, Tokenizer

MODELS = Path(__file__).resolve().parents[1] / "third_party" / "llama.cpp" / "models"
REQUIRED = ["llama-bpe", "qwen2", "deepseek-llm", "gpt-2", "phi-3", "llama-spm"]
EXTRA = ["gemma-4", "qwen35", "deepseek-coder", "starcoder", "refact", "command-r", "falcon", "mpt"]
NOT_SHIPPED = ["deepseek-v3", "gpt-4o"]  # supported pre-tokenizers without a ggml-vocab file upstream


def _vocab_path(name: str) -> Path:
    path = MODELS / f"ggml-vocab-{name}.gguf"
    if not path.exists():
        pytest.skip(f"{path.name} not found under {MODELS} (fetched by the build with llama.cpp)")
    return path


@functools.cache
def _tokenizer(name: str) -> Tokenizer:
    core = pytest.importorskip("moelite._core", reason="needs the built moelite._core (read_gguf)")
    path = _vocab_path(name)
    return Tokenizer.from_gguf_kv(core.read_gguf(str(path))["kv"], str(path))


def _read_cases(name: str) -> list[tuple[str, list[int]]]:
    path = _vocab_path(name)
    raw = Path(f"{path}.inp").read_bytes().decode("utf-8")
    inputs = raw.split("\n__ggml_vocab_test__\n")
    if inputs[-1] == "":
        inputs.pop()  # the file ends with the separator
    outs = Path(f"{path}.out").read_text(encoding="utf-8").split("\n")[: len(inputs)]
    assert len(outs) == len(inputs), f"{path}: .inp and .out disagree on the number of tests"
    return [(s, [int(t) for t in o.split()]) for s, o in zip(inputs, outs)]


@pytest.mark.parametrize("name", REQUIRED + EXTRA)
def test_parity_with_llama_cpp(name: str) -> None:
    if not Path(MODELS / f"ggml-vocab-{name}.gguf.inp").exists():
        pytest.skip(f"no reference tokenization for {name}")
    tok = _tokenizer(name)
    cases = _read_cases(name)
    assert len(cases) >= 40
    wrong = [
        (s, tok.encode(s, add_special=False, parse_special=False), ref)
        for s, ref in cases
        if tok.encode(s, add_special=False, parse_special=False) != ref
    ]
    assert not wrong, f"{name}: {len(wrong)}/{len(cases)} differ, first: {wrong[0]!r}"
    for s, ref in cases:  # detokenizing the reference ids gives the text back; streaming gives the same
        assert tok.decode(ref) == s
        stream = tok.stream_decoder()
        assert "".join([stream.push(i) for i in ref] + [stream.flush()]) == s


@pytest.mark.parametrize("name", NOT_SHIPPED)
def test_pre_tokenizers_without_reference_files(name: str) -> None:
    if (MODELS / f"ggml-vocab-{name}.gguf").exists():
        pytest.skip("a reference file exists: covered by the parity test once added to the list")
    pytest.skip(f"llama.cpp ships no ggml-vocab-{name}.gguf; its regexes are only checked to compile")


def _synthetic_bpe_kv(pre: str) -> dict:
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": alphabet,
        "tokenizer.ggml.token_type": np.ones(len(alphabet), np.int32),
        "tokenizer.ggml.merges": [],
    }


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZER_REGEXES))
def test_every_named_regex_compiles(pre: str) -> None:
    tok = Tokenizer.from_gguf_kv(_synthetic_bpe_kv(pre), "synthetic.gguf")
    text = "Hello, World 123456 — 你好 ÄÖÜ's\n\n  x"
    assert tok.decode(tok.encode(text)) == text


def test_bos_and_stop_ids() -> None:
    llama3 = _tokenizer("llama-bpe")  # no add_bos key: llama.cpp's default for llama-bpe is true
    assert llama3.add_bos and llama3.bos_id == 128000
    ids = llama3.encode("Hello world")
    assert ids == [128000, 9906, 1917]
    assert llama3.encode("<|begin_of_text|>Hello world") == ids  # no double BOS from a template's text
    assert {128001, 128009} <= llama3.stop_ids  # <|end_of_text|>, <|eot_id|>
    qwen = _tokenizer("qwen2")
    assert not qwen.add_bos and qwen.encode("Hello") == qwen.encode("Hello", add_special=False)
    assert qwen.eos_id == 151643 and 151645 in qwen.stop_ids  # <|im_end|>
    spm = _tokenizer("llama-spm")
    assert spm.encode("Hello")[0] == 1 and spm.encode("") == [1] and spm.encode("", add_special=False) == []
    phi3 = _tokenizer("phi-3")
    assert {32000, 32007} <= phi3.stop_ids  # <|endoftext|>, <|end|>
    assert llama3.vocab_size == 128256 and qwen.vocab_size == 151936 and spm.vocab_size == 32000


def test_special_tokens_encode_atomically() -> None:
    qwen = _tokenizer("qwen2")
    text = "<|im_start|>user\nHi<|im_end|>\n"
    ids = qwen.encode(text)
    assert ids[0] == 151644 and ids[-2] == 151645
    assert qwen.decode(ids) == text
    assert qwen.decode(ids, skip_special=True) == "user\nHi\n"
    plain = qwen.encode(text, parse_special=False)
    assert 151644 not in plain and qwen.decode(plain) == text
    phi3 = _tokenizer("phi-3")
    ids = phi3.encode("<|user|>\nHi<|end|>", add_special=False)
    assert ids[0] == 32010 and ids[-1] == 32007  # SPM: text between specials gets the space prefix
    assert phi3.token_text(ids[1]) == "\u2581"


def test_stream_decoder_holds_incomplete_utf8() -> None:
    for name in ("llama-bpe", "llama-spm"):
        tok = _tokenizer(name)
        text = "a🦙b"  # the llama emoji is several byte tokens in both vocabs
        ids = tok.encode(text, add_special=False)
        stream = tok.stream_decoder()
        pieces = [stream.push(i) for i in ids]
        assert "".join(pieces) + stream.flush() == text
        assert all("\ufffd" not in p for p in pieces)
        assert "" in pieces  # some byte tokens completed no character
        assert "🦙" in "".join(p for p in pieces if p not in ("a", "b", " a"))


def _spm_kv(pieces: list[tuple[str, float]], add_space_prefix: bool = True) -> dict:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for text, score in pieces:
        tokens.append(text)
        types.append(1)
        scores.append(score)
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.array(scores, np.float32),
        "tokenizer.ggml.token_type": np.array(types, np.int32),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_space_prefix": add_space_prefix,
    }


def test_spm_merges_highest_score_first_and_falls_back_to_bytes() -> None:
    base = [("\u2581", -1.0), ("a", -1.0), ("b", -1.0)]
    tok = Tokenizer.from_gguf_kv(_spm_kv(base + [("\u2581a", -2.0), ("ab", -3.0)]), "a.gguf")
    pieces = [tok.token_text(i) for i in tok.encode("ab", add_special=False)]
    assert pieces == ["\u2581a", "b"]  # ▁a outscores ab
    tok = Tokenizer.from_gguf_kv(_spm_kv(base + [("\u2581a", -3.0), ("ab", -2.0)]), "b.gguf")
    assert [tok.token_text(i) for i in tok.encode("ab", add_special=False)] == ["\u2581", "ab"]
    ids = tok.encode("é", add_special=False)  # not in the vocab: UTF-8 bytes
    assert [tok.token_text(i) for i in ids] == ["\u2581", "<0xC3>", "<0xA9>"]
    assert tok.decode(ids) == "é" and tok.encode("ab")[0] == 1
    no_prefix = Tokenizer.from_gguf_kv(_spm_kv(base + [("ab", -2.0)], add_space_prefix=False), "c.gguf")
    assert [no_prefix.token_text(i) for i in no_prefix.encode("ab b", add_special=False)] == ["ab", "\u2581", "b"]
    assert no_prefix.decode(no_prefix.encode("ab b")) == "<s>ab b"


def test_huggingface_json_is_used_as_is() -> None:
    gpt2 = _tokenizer("gpt-2")
    kv = {
        "tokenizer.huggingface.json": gpt2._hf.to_str(),
        "tokenizer.ggml.eos_token_id": 50256,
        "tokenizer.ggml.bos_token_id": 50256,
    }
    tok = Tokenizer.from_gguf_kv(kv, "hf.gguf")
    text = "Hello world, it's 2024!<|endoftext|>"
    assert tok.encode(text) == gpt2.encode(text) and tok.encode(text)[-1] == 50256
    assert tok.stop_ids == {50256} and not tok.add_bos


def test_errors_name_file_and_key() -> None:
    kv = _synthetic_bpe_kv("default")
    with pytest.raises(TokenizerError, match=r"m\.gguf.*tokenizer\.ggml\.model.*'rwkv'"):
        Tokenizer.from_gguf_kv({**kv, "tokenizer.ggml.model": "rwkv"}, "m.gguf")
    with pytest.raises(TokenizerError, match=r"m\.gguf.*tokenizer\.ggml\.pre.*'no-such-pre'"):
        Tokenizer.from_gguf_kv({**kv, "tokenizer.ggml.pre": "no-such-pre"}, "m.gguf")
    with pytest.raises(TokenizerError, match=r"m\.gguf.*tokenizer\.ggml\.merges"):
        Tokenizer.from_gguf_kv({k: v for k, v in kv.items() if k != "tokenizer.ggml.merges"}, "m.gguf")
    with pytest.raises(TokenizerError, match=r"m\.gguf.*no tokenizer"):
        Tokenizer.from_gguf_kv({"general.architecture": "llama"}, "m.gguf")
    with pytest.raises(TokenizerError, match=r"m\.gguf.*tokenizer\.huggingface\.json"):
        Tokenizer.from_gguf_kv({"tokenizer.huggingface.json": "{not json"}, "m.gguf")
