"""Pre-tokenizers of the wave-3 families: K-EXAONE (`exaone-moe`), Arcee Trinity (`afmoe`), Mistral Small 4
(`tekken`), Cohere North (`cohere2moe`, llama.cpp's tiny-aya regexes), poolside Laguna (`laguna`), Kimi-Linear
(`kimi-k2`: Kimi's tiktoken pattern, which llama.cpp implements by hand), Ling-3.0 (`bailingmoe2`) and Hy4
(`hy_v4`).

The real tokenizer files cannot be downloaded here and llama.cpp ships no ggml-vocab file for any of them, so each
test builds a byte-level BPE tokenizer.json with HF `tokenizers` whose pre-tokenizer is the family's (the regexes of
its tokenizer.json where llama.cpp quotes them, else llama.cpp's own), trains it on real text, converts it with
moelite's `add_vocab` into a GGUF without the tokenizer.json copy (`tokenizer.ggml.*` only, as llama.cpp's
converter writes it, `tokenizer.ggml.pre` the family's), and checks on real text (Python's own standard library:
prose in docstrings, code, numbers) and on edge cases that moelite's runtime tokenizer, rebuilt from those keys,
encodes as HF `tokenizers` does with the tokenizer.json, and as the pinned llama.cpp (llama-cpp-python, vocab
only) does with the same file. Where llama.cpp's hand-written split differs from the tokenizer.json's regex the
test names the text and asserts the difference (moelite follows the tokenizer.json). Hy3 (`hy_v3`): the pinned
converter knows no hash for its tokenizer, so no `tokenizer.ggml.pre` exists to implement (see docs/FAMILIES.md).
"""

from __future__ import annotations

import json
import re
import sysconfig
from pathlib import Path

import pytest
from test_tokenizer_wave2 import CORPUS, TEXTS, _write_gguf
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from moelite.runtime.tokenizer import PRE_TOKENIZER_REGEXES, Tokenizer

pytest.importorskip("moelite._core", reason="needs the built moelite._core (read_gguf)")

# tokenizer.ggml.pre -> (the model_type whose converter family writes it, the BPE's ignore_merges)
FAMILIES = {
    "exaone-moe": ("exaone_moe", False),
    "afmoe": ("afmoe", False),
    "tekken": ("mistral4", True),
    "cohere2moe": ("cohere2_moe", False),
    "laguna": ("laguna", False),
    "kimi-k2": ("kimi_linear", False),
    "bailingmoe2": ("bailing_hybrid", False),
    "hy_v4": ("hy_v4", False),
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# edge cases for the regexes: digit runs (grouped by 3 or single), contractions, case changes, CJK / Thai /
# Hangul runs, spaces between letters (exaone-moe joins them), newline runs after spaces (laguna)
EDGES = [
    "1 12 123 1234 12345 123456 1234567 3.14159 1,000,000",
    "It's, I'M, they'll, we'd've, DON'T",
    "camelCase PascalCase XMLHttpRequest iPhone ÉCOLE école",
    "东京タワー ภาษาไทย 한국어 텍스트 漢字かな交じり文",
    "a b c  d   e\tf\n g",
    "line one  \n\n  line two \n\n\n",
    "path/to/file.txt; url: https://example.org/a?b=1&c=2",
    "¿Qué? ¡Sí! «Ça va» — naïve café",
    "x² + y³ = z⁴; ½ ¼; ① ② Ⅻ",
]
# Where the pinned llama.cpp splits otherwise than the tokenizer.json's regexes (moelite follows the tokenizer.json,
# as HF `tokenizers` runs it); both with a digit regex run first, llama.cpp's own split:
# - the whitespace run before a digit group: HF's `\s+(?!\S)` sees the end of its piece (the digits were isolated
#   first) and takes every space, llama.cpp's lookahead sees the digit past the piece and leaves one ("        0.75");
# - cohere2moe: a digit run followed by a word character, which the tokenizer.json's `\d{1,3}(?=(?:\d{3})*\b)`
#   leaves to the next regex and llama.cpp groups by 3 anyway ("abc1234def").
LLAMA_CPP_DIFFERS = {
    "afmoe": ["        0.75"],
    "cohere2moe": ["        0.75", "abc1234def", "v12345x"],
}


def _real_text(n_chunks: int = 120, size: int = 400) -> list[str]:
    """Chunks of real text: the interpreter's own standard library sources (docstrings, comments, code)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    for name in ("textwrap.py", "difflib.py", "calendar.py", "fractions.py", "email/_header_value_parser.py"):
        text = (stdlib / name).read_text(encoding="utf-8")
        out += [text[i : i + size] for i in range(0, min(len(text), size * n_chunks // 5 * 3), size * 3)]
    return out[:n_chunks]


def _model_dir(d: Path, pre: str) -> tuple[Path, int, HFTokenizer]:
    """A checkpoint tokenizer with the family's pre-tokenizer: byte-level BPE (ignore_merges as the family's),
    the family's Split regexes then ByteLevel without its own regex, trained on the wave-2 corpus and real
    text; special tokens as added tokens; tokenizer_config.json naming them."""
    ignore_merges = FAMILIES[pre][1]
    tok = HFTokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_REGEXES[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS + EDGES + _real_text(60), trainer)
    tok.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    (d / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}), encoding="utf-8"
    )
    return d, tok.get_vocab_size(), HFTokenizer.from_file(str(d / "tokenizer.json"))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(pre, the HF tokenizer, moelite's tokenizer of the stock-style GGUF, that GGUF's path)."""
    pre = request.param
    d, n, hf = _model_dir(tmp_path_factory.mktemp(pre) / "hf", pre)
    path = tmp_path_factory.mktemp(f"{pre}-gguf") / "vocab.gguf"
    kv = _write_gguf(path, d, n, pre, stock=True)
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == pre
    assert "tokenizer.huggingface.json" not in kv
    return pre, hf, Tokenizer.from_gguf_kv(kv, str(path)), path


def _cases() -> list[str]:
    return TEXTS + EDGES + _real_text()


def test_families_declare_the_pre_tokenizer_llama_cpp_writes(family) -> None:
    from moelite.converters.families import registry

    pre = family[0]
    assert registry()[FAMILIES[pre][0]].tokenizer_pre == pre


def test_encodes_as_the_tokenizer_json(family) -> None:
    """moelite's tokenizer rebuilt from tokenizer.ggml.* = HF tokenizers with the checkpoint's tokenizer.json,
    on real text and the edge cases; decoding gives the text back."""
    pre, hf, tok, _ = family
    cases = _cases() + LLAMA_CPP_DIFFERS.get(pre, [])
    wrong = [s for s in cases if tok.encode(s, add_special=False) != hf.encode(s, add_special_tokens=False).ids]
    assert not wrong, f"{pre}: {len(wrong)}/{len(cases)} differ, first {wrong[0]!r}"
    for s in cases:
        assert tok.decode(tok.encode(s, add_special=False)) == s
    assert tok.encode("<|im_start|>hi<|im_end|>", add_special=False)[::2] == [hf.token_to_id(t) for t in SPECIALS[1:]]


def test_encodes_as_llama_cpp(family) -> None:
    """The pinned llama.cpp, loading the same file vocab-only, tokenizes as moelite does (specials parsed and
    not), except where its digit split is not the tokenizer.json's (LLAMA_CPP_DIFFERS): there moelite is HF's."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install .[bench])")
    pre, hf, tok, path = family
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    differ = []
    for s in _cases():
        for special in (True, False):
            theirs = llm.tokenize(s.encode(), add_bos=False, special=special)
            ours = tok.encode(s, add_special=False, parse_special=special)
            if ours != theirs:
                assert ours == hf.encode(s, add_special_tokens=False).ids, (pre, s)
                differ.append(s)
    # only the two documented splits differ: a space run before digits (or a digit run inside a word)
    assert all(re.search(r"\s\d" if pre == "afmoe" else r"\s\d|\w\d", s) for s in differ), differ
    assert not differ or pre in LLAMA_CPP_DIFFERS
    for s in LLAMA_CPP_DIFFERS.get(pre, []):
        theirs = llm.tokenize(s.encode(), add_bos=False, special=False)
        assert tok.encode(s, add_special=False) == hf.encode(s, add_special_tokens=False).ids != theirs, s
