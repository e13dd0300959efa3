"""Tokenizers and chat templates of the wave-2 families: Gemma-4, GLM-4.x (incl. GLM-4.7-Flash), ERNIE-4.5,
Hunyuan-MoE.

Real tokenizer files cannot be downloaded here, so each test builds a small one with the same structure as
the family's real one (the kind of model, normalizer, pre-tokenizer, byte fallback, special tokens and the
files a checkpoint ships), converts it with moelite's `add_vocab` into a real GGUF file, and checks that
moelite's runtime tokenizer encodes like the family's reference tokenizer (HF `tokenizers` for tokenizer.json,
`sentencepiece` for tokenizer.model, `tiktoken` for Hunyuan's ranks file), both from moelite's file and from
the same file without `tokenizer.huggingface.json` (what a stock llama.cpp GGUF holds); the pinned llama.cpp
(llama-cpp-python, when installed) loads that file vocab-only and tokenizes every text as moelite does, and the
pinned llama.cpp converter, run on the same checkpoint, writes the same `tokenizer.*` keys. Each family's tiny
checkpoint with its own tokenizer converts, chats and answers as transformers does.
Chat templates (tests/data/templates, see its README) render as transformers' apply_chat_template does.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from moelite.converters.vocab import GLM_SPECIALS, add_vocab
from moelite.errors import ConversionError, TokenizerError
from moelite.runtime.chat_template import ChatTemplate
from moelite.runtime.tokenizer import Tokenizer

core = pytest.importorskip("moelite._core", reason="needs the built moelite._core (read_gguf)")

TEMPLATES = Path(__file__).resolve().parent / "data" / "templates"
SPACE = "\u2581"

# training text: prose, code, numbers, several scripts, whitespace runs
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024 and we're testing tokenizers!",
    "def add(a, b):\n    return a + b\n\n\nprint(add(2, 3))  # 5\n",
    "Hello world, hello World, HELLO WORLD. Hello there; general kenobi.",
    "Numbers: 1 12 123 1234 12345 3.14159 2.71828 1e-5 0x1F",
    "Ünïcödé: café naïve résumé — Straße, Größe; Привет мир; 你好，世界。こんにちは",
    "  two spaces,   three spaces,\ttab,\t\ttwo tabs\n\nnew paragraph\n",
    "User: what is the capital of France?\nAssistant: The capital of France is Paris.",
] * 8
TEXTS = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n\n",
    "Hello world",
    " Hello world",
    "Hello  world",
    "hello\nworld\n\n",
    "\tindented\n    four spaces\n",
    "It's 2024; numbers 123456 and 3.14.",
    "ünïcödé café — 你好 こんにちは",
    "emoji 🦙🚀 and rare ǅ ß",
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x * 2\n",
]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there — what's 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
]


# --- helpers ------------------------------------------------------------------------------------------------
def _write_gguf(path: Path, model_dir: Path, n_vocab: int, family_pre: str, stock: bool = False) -> dict:
    """Convert the tokenizer of `model_dir` into a vocab-only GGUF at `path`; `stock`: without the
    tokenizer.huggingface.json copy, as llama.cpp writes it. Returns the file's metadata as read back."""
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (
        ("context_length", 64),
        ("embedding_length", 64),
        ("block_count", 1),
        ("feed_forward_length", 64),
        ("attention.head_count", 4),
    ):
        w.add_uint32(f"llama.{key}", value)  # enough for llama.cpp to load the file vocab-only
    w.add_layer_norm_rms_eps(1e-5)
    add_vocab(w, model_dir, n_vocab, family_pre)
    if stock:
        w.kv_data[0].pop("tokenizer.huggingface.json", None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return core.read_gguf(str(path))["kv"]


def _both(tmp_path: Path, model_dir: Path, n_vocab: int, family_pre: str) -> list[tuple[dict, Tokenizer]]:
    """(kv, tokenizer) of moelite's file and of the stock-style file."""
    out = []
    for stock in (False, True):
        path = tmp_path / f"{family_pre}-{'stock' if stock else 'moelite'}.gguf"
        kv = _write_gguf(path, model_dir, n_vocab, family_pre, stock=stock)
        assert ("tokenizer.huggingface.json" in kv) != stock
        out.append((kv, Tokenizer.from_gguf_kv(kv, str(path))))
    return out


def _llama_cpp_agrees(tmp_path: Path, model_dir: Path, n_vocab: int, family_pre: str, texts: list[str]) -> None:
    """The pinned llama.cpp (llama-cpp-python), loading the stock-style file vocab-only, tokenizes and
    detokenizes every text as moelite's runtime does (specials parsed and not; BOS as the file says, though
    moelite, unlike llama.cpp, adds none to a text that starts with it)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install .[bench])")
    path = tmp_path / f"{family_pre}-llama-cpp.gguf"
    kv = _write_gguf(path, model_dir, n_vocab, family_pre, stock=True)
    tok = Tokenizer.from_gguf_kv(kv, str(path))
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert tok.encode("Hello") == llm.tokenize(b"Hello", add_bos=True, special=True)  # BOS or not, as the file says
    for text in texts:
        for special in (True, False):
            ours = tok.encode(text, add_special=False, parse_special=special)
            assert ours == llm.tokenize(text.encode(), add_bos=False, special=special), (text, special)
        ids = tok.encode(text, add_special=False)
        theirs = llm.detokenize(ids, special=True).decode("utf-8", "replace")
        if kv["tokenizer.ggml.model"] == "llama" and kv.get("tokenizer.ggml.add_space_prefix", True):
            theirs = theirs[1:] if theirs.startswith(" ") else theirs  # moelite drops the space prefix, as HF does
        assert theirs == tok.decode(ids), text


def _transformers_render(template: str, messages: list[dict], special: dict[str, str], **kw) -> str:
    transformers = pytest.importorskip("transformers", reason="transformers is the reference renderer")
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=HFTokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")), **special
    )
    return hf.apply_chat_template(messages, chat_template=template, tokenize=False, **kw)


def _tokenizer_config(model_dir: Path, template: str, **fields) -> None:
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, **fields}),
        encoding="utf-8",
    )


# --- Gemma-4 ----------------------------------------------------------------------------------------------
GEMMA_SPECIALS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<|tool>",
    "<tool|>",
    "<|think|>",
    "<|turn>",
    "<turn|>",
    "<|image>",
    "<|audio>",
]
GEMMA_VISIBLE = [
    "<|tool_call>",
    "<tool_call|>",
    "<|tool_response>",
    "<tool_response|>",
    '<|"|>',
    "<|channel>",
    "<channel|>",
]


def _gemma4_dir(d: Path) -> tuple[Path, int]:
    """A Gemma-4-shaped tokenizer.json: BPE over raw UTF-8 with `▁` for spaces (a Replace normalizer), no
    space prefix, `<0xXX>` byte fallback (byte tokens in the model vocab), the Gemma-4 specials first and the
    chat-parser tokens as added tokens; tokenizer_config.json names the specials like the real one."""
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tok = HFTokenizer(models.BPE(byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^\n]+|\n+"), behavior="isolated")  # training only
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=GEMMA_SPECIALS + GEMMA_VISIBLE + bytes_, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    tj = json.loads(tok.to_str())
    tj["added_tokens"] = [a for a in tj["added_tokens"] if a["content"] not in bytes_]  # bytes: model vocab
    for a in tj["added_tokens"]:
        a["special"] = a["content"] in GEMMA_SPECIALS
    tj["pre_tokenizer"] = None  # as Gemma's: merges never join a newline to anything else
    tj["decoder"] = json.loads(
        decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]).__getstate__()
    )
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    _tokenizer_config(
        d,
        (TEMPLATES / "gemma4.jinja").read_text(encoding="utf-8"),
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        extra_special_tokens=GEMMA_SPECIALS[5:],
    )
    return d, HFTokenizer.from_str(json.dumps(tj)).get_vocab_size()


def _converted(factory, name: str, make, family_pre: str) -> tuple[Path, int, list[tuple[dict, Tokenizer]]]:
    """A tokenizer.json checkpoint dir made by `make`, its config vocab size, and `_both` of it."""
    d, n = make(factory.mktemp(name) / "hf")
    return d, n, _both(factory.mktemp(f"{name}-gguf"), d, n, family_pre)


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory):
    return _converted(tmp_path_factory, "gemma4", _gemma4_dir, "gemma4")


def test_gemma4_keys_as_llama_cpp_writes_them(gemma4) -> None:
    _, _, [(kv, _), _] = gemma4
    assert kv["tokenizer.ggml.model"] == "gemma4" and "tokenizer.ggml.pre" not in kv
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.add_space_prefix"] is False
    assert set(np.asarray(kv["tokenizer.ggml.scores"]).tolist()) == {-1000.0}
    assert kv["tokenizer.ggml.merges"] and kv["tokenizer.ggml.bos_token_id"] == 2
    assert (kv["tokenizer.ggml.eos_token_id"], kv["tokenizer.ggml.padding_token_id"]) == (1, 0)


def _llama_hf_vocab_types(d: Path) -> list[tuple[str, int]]:
    """Tokens and types as llama.cpp's converter writes them for Gemma-4: gguf-py's LlamaHfVocab (through
    transformers) plus its Gemma4Model override that makes the chat-parser tokens user-defined."""
    pytest.importorskip("transformers")
    return [
        (t.decode(), int(gguf.TokenType.USER_DEFINED if t.decode() in GEMMA_VISIBLE else ty))
        for t, _, ty in gguf.LlamaHfVocab(d).all_tokens()
    ]


def test_gemma4_types_as_llama_cpp_writes_them(gemma4, tmp_path) -> None:
    """CONTROL = the tokens transformers counts as special (named in tokenizer_config.json), so an added
    token marked special but not named there stays NORMAL, as llama.cpp writes it."""
    d, n, [(kv, _), _] = gemma4
    ours = list(zip(kv["tokenizer.ggml.tokens"], (int(t) for t in kv["tokenizer.ggml.token_type"])))
    assert len(ours) == n and ours == _llama_hf_vocab_types(d)
    d2 = tmp_path / "hf"
    shutil.copytree(d, d2)
    cfg = json.loads((d2 / "tokenizer_config.json").read_text())
    (d2 / "tokenizer_config.json").write_text(json.dumps({**cfg, "extra_special_tokens": GEMMA_SPECIALS[5:7]}))
    kv2 = _write_gguf(tmp_path / "g.gguf", d2, n, "gemma4")
    ours = list(zip(kv2["tokenizer.ggml.tokens"], (int(t) for t in kv2["tokenizer.ggml.token_type"])))
    assert ours == _llama_hf_vocab_types(d2) and ours[8] == ("<|turn>", gguf.TokenType.NORMAL)


def test_gemma4_encodes_like_hf_tokenizers(gemma4) -> None:
    d, _, files = gemma4
    hf = HFTokenizer.from_file(str(d / "tokenizer.json"))
    texts = TEXTS + [
        "<bos><|turn>user\nHi<turn|>\n<|turn>model\n",
        'call<|tool_call>f{a:<|"|>x<|"|>}<tool_call|>',
        "<|channel>thought\n<channel|>ok<eos>",
        "\n\n\n\n\n  \n",
    ]
    for kv, tok in files:
        for text in texts:
            want = hf.encode(text, add_special_tokens=False).ids
            assert tok.encode(text, add_special=False) == want, (kv.get("tokenizer.huggingface.json") is None, text)
            assert tok.decode(want) == text
        assert tok.add_bos and tok.encode("Hi")[0] == 2 and tok.encode("<bos>Hi").count(2) == 1
        assert {1, tok.encode("<turn|>", add_special=False)[0]} <= tok.stop_ids


def test_gemma4_llama_cpp_agrees(gemma4, tmp_path) -> None:
    d, n, _ = gemma4
    _llama_cpp_agrees(
        tmp_path,
        d,
        n,
        "gemma4",
        TEXTS + ["<bos><|turn>user\nHi<turn|>\n<|turn>model\n", 'x<|tool_call>f{a:<|"|>y<|"|>}<tool_call|>'],
    )


def test_gemma4_template_matches_transformers(gemma4) -> None:
    d, _, [(kv, tok), _] = gemma4
    tmpl = ChatTemplate.from_gguf_kv(kv, tok, "gemma4.gguf")
    assert not tmpl.is_default and tmpl.special_tokens["bos_token"] == "<bos>"
    chat = [{"role": "system", "content": "You are terse."}, *CHAT[1:]]
    tools = [
        {
            "type": "function",
            "function": {
                "name": "add",
                "description": "Add numbers",
                "parameters": {
                    "type": "object",
                    "properties": {"a": {"type": "number", "description": "first"}},
                    "required": ["a"],
                },
            },
        }
    ]
    for kw in ({}, {"enable_thinking": True}, {"tools": tools}):
        ours = tmpl.render(chat, add_generation_prompt=True, **kw)
        assert ours == _transformers_render(
            kv["tokenizer.chat_template"], chat, tmpl.special_tokens, add_generation_prompt=True, **kw
        )
    assert ours.startswith("<bos><|turn>system\n") and ours.endswith("<|turn>model\n<|channel>thought\n<channel|>")
    ids = tok.encode(ours)
    assert ids.count(2) == 1 and tok.decode(ids) == ours


def test_real_gemma4_vocab_template_and_stops() -> None:
    """llama.cpp's ggml-vocab-gemma-4.gguf (the real 262k vocab and template): the template renders as in
    transformers, the rendered prompt encodes with one BOS and its turn tokens atomically."""
    path = Path(__file__).resolve().parents[1] / "third_party" / "llama.cpp" / "models" / "ggml-vocab-gemma-4.gguf"
    if not path.exists():
        pytest.skip(f"{path.name} not found (fetched by the build with llama.cpp)")
    kv = core.read_gguf(str(path))["kv"]
    tok = Tokenizer.from_gguf_kv(kv, str(path))
    tmpl = ChatTemplate.from_gguf_kv(kv, tok, str(path))
    assert tmpl.source == (TEMPLATES / "gemma4.jinja").read_text(encoding="utf-8")
    ours = tmpl.render(CHAT)
    assert ours == _transformers_render(tmpl.source, CHAT, tmpl.special_tokens, add_generation_prompt=True)
    ids = tok.encode(ours)
    assert ids[:2] == [2, 105] and ids.count(2) == 1  # <bos><|turn>
    assert ids.count(106) == len(CHAT)  # one <turn|> per message
    assert {1, 106, 50} <= tok.stop_ids  # <eos>, <turn|>, <|tool_response>
    no_bos = Tokenizer.from_gguf_kv({**kv, "tokenizer.ggml.add_bos_token": False}, str(path))
    assert no_bos.add_bos  # llama.cpp overrides a false add_bos_token for Gemma-4


@pytest.mark.parametrize("name", ["gemma-4", "qwen35"])
def test_real_templates_render_as_transformers(name) -> None:
    """The real templates in llama.cpp's ggml-vocab files of this wave, with thinking off and with tools."""
    path = Path(__file__).resolve().parents[1] / "third_party" / "llama.cpp" / "models" / f"ggml-vocab-{name}.gguf"
    if not path.exists():
        pytest.skip(f"{path.name} not found (fetched by the build with llama.cpp)")
    kv = core.read_gguf(str(path))["kv"]
    tmpl = ChatTemplate.from_gguf_kv(kv, Tokenizer.from_gguf_kv(kv, str(path)), str(path))
    tools = [
        {
            "type": "function",
            "function": {
                "name": "add",
                "description": "Add two numbers",
                "parameters": {
                    "type": "object",
                    "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                    "required": ["a"],
                },
            },
        }
    ]
    for kw in ({"enable_thinking": False}, {"tools": tools}):
        assert tmpl.render(CHAT, **kw) == _transformers_render(
            tmpl.source, CHAT, tmpl.special_tokens, add_generation_prompt=True, **kw
        )


@pytest.mark.parametrize("model", ["gemma4", "gpt2"])
def test_bad_merges_are_tokenizer_errors(model) -> None:
    kv = {"tokenizer.ggml.model": model, "tokenizer.ggml.tokens": ["<pad>", "a", "aa"]}
    with pytest.raises(TokenizerError, match=rf"g\.gguf.*tokenizer\.ggml\.merges.*{model}"):
        Tokenizer.from_gguf_kv(kv, "g.gguf")
    for merges in (["a b"], ["aa"]):  # a piece the vocab lacks; no separator
        with pytest.raises(TokenizerError, match=r"g\.gguf: key 'tokenizer\.ggml\.merges' does not fit"):
            Tokenizer.from_gguf_kv({**kv, "tokenizer.ggml.merges": merges}, "g.gguf")
    tok = Tokenizer.from_gguf_kv({**kv, "tokenizer.ggml.merges": ["a a"]}, "g.gguf")
    assert tok.encode("aaa", add_special=False) == [2, 1]


# --- GLM-4.x ------------------------------------------------------------------------------------------------
GLM_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GLM_ADDED_SPECIAL = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
]
GLM_ADDED_PLAIN = [
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "<tool_response>",
    "</tool_response>",
]


def _glm_dir(d: Path) -> tuple[Path, int]:
    """A GLM-4.5-shaped tokenizer.json: byte-level BPE (ignore_merges) after the GLM-4 split regex, the
    GLM specials ([gMASK], <sop>, role tokens) after the trained vocab, the think/tool tags plain added
    tokens; tokenizer_config.json with eos/pad <|endoftext|> and no BOS; config.json's eos list."""
    tok = HFTokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(vocab_size=600, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GLM_ADDED_SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in GLM_ADDED_PLAIN])
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in GLM_ADDED_SPECIAL}
    _tokenizer_config(
        d,
        (TEMPLATES / "glm4_moe.jinja").read_text(encoding="utf-8"),
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )
    (d / "config.json").write_text(
        json.dumps(
            {
                "eos_token_id": [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]],
                "pad_token_id": ids["<|endoftext|>"],
            }
        )
    )
    return d, tok.get_vocab_size() + 16  # config vocab_size is padded beyond the tokenizer, like GLM's


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    return _converted(tmp_path_factory, "glm", _glm_dir, "glm4")


def test_glm_keys_as_llama_cpp_writes_them(glm) -> None:
    d, n, [(kv, tok), _] = glm
    hf = HFTokenizer.from_file(str(d / "tokenizer.json"))
    ids = {t: hf.token_to_id(t) for t in GLM_ADDED_SPECIAL + GLM_ADDED_PLAIN}
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "glm4"
    for typ, text in GLM_SPECIALS.items():  # bos [gMASK], eot <|user|>, unk <|endoftext|>, eom <|observation|>
        key = "unknown" if typ == "unk" else typ
        assert kv[f"tokenizer.ggml.{key}_token_id"] == ids[text], typ
    assert kv["tokenizer.ggml.eos_token_id"] == kv["tokenizer.ggml.padding_token_id"] == ids["<|endoftext|>"]
    types = np.asarray(kv["tokenizer.ggml.token_type"])
    assert len(kv["tokenizer.ggml.tokens"]) == n and kv["tokenizer.ggml.tokens"][-1] == f"[PAD{n - 1}]"
    assert all(types[ids[t]] == gguf.TokenType.CONTROL for t in GLM_ADDED_SPECIAL)
    assert all(types[ids[t]] == gguf.TokenType.USER_DEFINED for t in GLM_ADDED_PLAIN)
    assert not tok.add_bos and {ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]} <= tok.stop_ids


def test_glm_encodes_like_hf_tokenizers(glm) -> None:
    d, _, files = glm
    hf = HFTokenizer.from_file(str(d / "tokenizer.json"))
    texts = TEXTS + [
        "[gMASK]<sop><|user|>\nHi<|assistant|>\n<think></think>\nHello",
        "<tool_call>add\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n</tool_call>",
    ]
    for _, tok in files:
        for text in texts:
            want = hf.encode(text, add_special_tokens=False).ids
            assert tok.encode(text) == want, text
            assert tok.decode(want) == text


def test_glm_llama_cpp_agrees(glm, tmp_path) -> None:
    d, n, _ = glm
    _llama_cpp_agrees(tmp_path, d, n, "glm4", TEXTS + ["[gMASK]<sop><|user|>\nHi<|assistant|>\n<think></think>"])


def test_glm_template_matches_transformers(glm) -> None:
    _, _, [(kv, tok), _] = glm
    tmpl = ChatTemplate.from_gguf_kv(kv, tok, "glm.gguf")
    assert tmpl.special_tokens["bos_token"] == "[gMASK]"
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    chat = CHAT + [
        {
            "role": "assistant",
            "content": "<think>sum</think>6",
            "tool_calls": [{"function": {"name": "add", "arguments": {"a": 3, "b": "x"}}}],
        },
        {"role": "tool", "content": "6"},
    ]
    for kw in ({}, {"enable_thinking": False}, {"tools": tools}):
        for gen in (True, False):
            ours = tmpl.render(chat, add_generation_prompt=gen, **kw)
            assert ours == _transformers_render(
                kv["tokenizer.chat_template"], chat, tmpl.special_tokens, add_generation_prompt=gen, **kw
            )
    ours = tmpl.render(CHAT[:2])
    assert ours.startswith("[gMASK]<sop><|system|>\nYou are terse.<|user|>\n") and ours.endswith("<|assistant|>")
    ids = tok.encode(ours)
    assert ids[:2] == [kv["tokenizer.ggml.bos_token_id"], tok._hf.token_to_id("<sop>")]


# The `tokenizer_pre` each family must declare for add_vocab to write its vocab as llama.cpp does (GLM-4.7-Flash
# is model_type glm4_moe_lite, converted as deepseek2, with GLM's tokenizer: llama.cpp's Glm4MoeLiteModel;
# Gemma-4's multimodal checkpoints are converted through their text_config, model_type gemma4_text).
FAMILY_TOKENIZER_PRE = {
    "gemma4_text": "gemma4",
    "glm4_moe": "glm4",
    "glm4_moe_lite": "glm4",
    "ernie4_5_moe": "llama-spm",
    "hunyuan_v1_moe": "hunyuan",
}


@pytest.mark.parametrize("model_type", sorted(FAMILY_TOKENIZER_PRE))
def test_families_declare_their_tokenizer_kind(model_type) -> None:
    from moelite.converters.families import registry

    family = registry().get(model_type)
    if family is None:
        pytest.skip(f"no converter family for model_type {model_type!r} yet")
    assert family.tokenizer_pre == FAMILY_TOKENIZER_PRE[model_type]


# --- ERNIE-4.5 (SentencePiece tokenizer.model) --------------------------------------------------------------
ERNIE_USER = ["<|begin_of_sentence|>", "<|end_of_sentence|>", "<|IMAGE_PLACEHOLDER|>"]
ERNIE_CONTROL = ["<mask:0>", "<mask:1>"]


def _ernie_dir(d: Path) -> tuple[Path, int, object]:
    """An ERNIE-4.5-shaped checkpoint tokenizer: a SentencePiece BPE tokenizer.model with byte fallback,
    <unk>/<s>/</s> at 0/1/2, control and user-defined symbols, no tokenizer.json; tokenizer_config.json with
    added_tokens_decoder entries beyond the model's pieces; config.json's vocab_size padded."""
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        vocab_size=420,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        control_symbols=ERNIE_CONTROL,
        user_defined_symbols=ERNIE_USER,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    n_sp = sp.vocab_size()
    decoder = {str(sp.PieceToId(t)): {"content": t, "special": True} for t in ERNIE_USER}  # as ERNIE's lists them
    decoder |= {
        str(n_sp): {"content": "<|IMAGE_START|>", "special": True},
        str(n_sp + 1): {"content": "<|LOC_0|>", "special": False},
    }
    _tokenizer_config(
        d,
        (TEMPLATES / "ernie4_5.jinja").read_text(encoding="utf-8"),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        cls_token="<|begin_of_sentence|>",
        sep_token="<|end_of_sentence|>",
        added_tokens_decoder=decoder,
    )
    (d / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
    return d, n_sp + 8, sp


@pytest.fixture(scope="module")
def ernie(tmp_path_factory):
    d, n, sp = _ernie_dir(tmp_path_factory.mktemp("ernie") / "hf")
    path = tmp_path_factory.mktemp("ernie-gguf") / "ernie.gguf"
    kv = _write_gguf(path, d, n, "llama-spm")
    return d, n, sp, kv, Tokenizer.from_gguf_kv(kv, str(path))


def test_ernie_keys_as_llama_cpp_writes_them(ernie) -> None:
    _, n, sp, kv, tok = ernie
    assert kv["tokenizer.ggml.model"] == "llama" and kv["tokenizer.ggml.pre"] == "default"
    assert "tokenizer.huggingface.json" not in kv  # the checkpoint ships no tokenizer.json
    tokens, types = kv["tokenizer.ggml.tokens"], np.asarray(kv["tokenizer.ggml.token_type"])
    scores = np.asarray(kv["tokenizer.ggml.scores"])
    assert len(tokens) == n and tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert list(types[:3]) == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    for i in range(sp.vocab_size()):
        score = -1000.0 if tokens[i] in ERNIE_USER else sp.GetScore(i)  # listed in tokenizer_config.json
        assert tokens[i] == sp.IdToPiece(i) and scores[i] == np.float32(score)
    assert types[sp.PieceToId("<0x41>")] == gguf.TokenType.BYTE
    assert all(types[sp.PieceToId(t)] == gguf.TokenType.CONTROL for t in ERNIE_CONTROL)
    assert all(types[sp.PieceToId(t)] == gguf.TokenType.CONTROL for t in ERNIE_USER)  # tokenizer_config's
    n_sp = sp.vocab_size()
    assert (tokens[n_sp], types[n_sp]) == ("<|IMAGE_START|>", gguf.TokenType.CONTROL)
    assert (tokens[n_sp + 1], types[n_sp + 1]) == ("<|LOC_0|>", gguf.TokenType.CONTROL)  # looks special
    assert (tokens[-1], types[-1], scores[-1]) == (f"[PAD{n - 1}]", gguf.TokenType.UNUSED, -10000.0)
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert tok.add_bos and tok.encode("Hi")[0] == 1 and 2 in tok.stop_ids


def _spm_with_specials(sp, text: str) -> list[int]:
    """llama.cpp's SPM encoding from sentencepiece: the text is cut at special tokens, and each piece between
    them is encoded on its own (so gets the space prefix, where sentencepiece on the whole text would not)."""
    ids = []
    for part in re.split("(" + "|".join(map(re.escape, ERNIE_USER)) + ")", text):
        ids += [sp.PieceToId(part)] if part in ERNIE_USER else sp.encode(part) if part else []
    return ids


def test_ernie_encodes_like_sentencepiece(ernie) -> None:
    _, _, sp, _, tok = ernie
    for text in [t for t in TEXTS if t.strip()]:
        assert tok.encode(text, add_special=False) == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == text
    for text in ["User: hi<|end_of_sentence|>Assistant: yo", "<|begin_of_sentence|>User: 3+3?\n"]:
        assert tok.encode(text, add_special=False) == _spm_with_specials(sp, text), text
    ids = tok.encode("a<mask:0>b", add_special=False)  # control pieces are parsed from text, as in llama.cpp
    assert sp.PieceToId("<mask:0>") in ids and sp.PieceToId("<mask:0>") not in sp.encode("a<mask:0>b")


def test_ernie_llama_cpp_agrees(ernie, tmp_path) -> None:
    d, n, _, _, _ = ernie
    _llama_cpp_agrees(tmp_path, d, n, "llama-spm", TEXTS + ["User: hi<|end_of_sentence|>Assistant: yo<mask:0>"])


def test_ernie_add_prefix_space_and_template(ernie, tmp_path) -> None:
    d, n, _, kv, tok = ernie
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    d2 = tmp_path / "hf"
    d2.mkdir()
    for f in ("tokenizer.model", "config.json"):
        (d2 / f).write_bytes((d / f).read_bytes())
    (d2 / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_prefix_space": False}))
    kv2 = _write_gguf(tmp_path / "e.gguf", d2, n, "llama-spm")
    assert kv2["tokenizer.ggml.add_space_prefix"] is False and "tokenizer.ggml.add_space_prefix" not in kv
    tok2 = Tokenizer.from_gguf_kv(kv2, "e.gguf")
    assert tok2.token_text(tok2.encode("Hello", add_special=False)[0]) != tok.token_text(
        tok.encode("Hello", add_special=False)[0]
    )
    tmpl = ChatTemplate.from_gguf_kv(kv, tok, "ernie.gguf")
    special = {**tmpl.special_tokens, "cls_token": "<|begin_of_sentence|>", "sep_token": "<|end_of_sentence|>"}
    for gen in (True, False):
        assert tmpl.render(CHAT, add_generation_prompt=gen) == _transformers_render(
            kv["tokenizer.chat_template"], CHAT, special, add_generation_prompt=gen
        )
    assert tmpl.render(CHAT[1:2]) == "<|begin_of_sentence|>User: Hi there — what's 2+2?\nAssistant: "


# --- Hunyuan-MoE (tiktoken ranks) ---------------------------------------------------------------------------
HY_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
HY_NAMED = ["<|endoftext|>", "<|startoftext|>", "<|bos|>", "<|eos|>", "<|pad|>"]
HY_N_EXTRA = 11  # <|extra_0|> ... (205 in the real vocab)


def _byte_decoder() -> dict[str, int]:
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return {(chr(b) if b in keep else chr(next(extra))): b for b in range(256)}


def _write_tiktoken_ranks(path: Path, pattern: str, corpus: list[str]) -> dict[bytes, int]:
    """A tiktoken ranks file (`base64(token) rank` per line) of a byte-level BPE trained with this split pattern:
    the 256 bytes, then the merged tokens in merge order. Returns the ranks."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(vocab_size=600, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    byte_of = _byte_decoder()
    ranks = {bytes([b]): b for b in range(256)}
    for merge in json.loads(tok.to_str())["model"]["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        ranks.setdefault(bytes(byte_of[c] for c in left + right), len(ranks))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return ranks


def _hunyuan_dir(d: Path) -> tuple[Path, int, dict[bytes, int], dict[str, int]]:
    """A Hunyuan-A13B-shaped checkpoint tokenizer: a tiktoken ranks file hy.tiktoken (the 256 bytes, then
    merged tokens in merge order; trained with Hunyuan's split pattern), no tokenizer.json; the special
    tokens the remote-code tokenizer defines right after the ranks (<|endoftext|> ... <|pad|>,
    <|extra_N|>); config.json with a wrong bos_token_id (as the real one) and eos <|eos|>."""
    ranks = _write_tiktoken_ranks(d / "hy.tiktoken", HY_PAT, CORPUS)
    specials = {t: len(ranks) + k for k, t in enumerate(HY_NAMED + [f"<|extra_{i}|>" for i in range(HY_N_EXTRA)])}
    _tokenizer_config(
        d, (TEMPLATES / "hunyuan_moe.jinja").read_text(encoding="utf-8"), eos_token="<|eos|>", vocab_file="hy.tiktoken"
    )
    (d / "config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": specials["<|eos|>"], "pad_token_id": specials["<|pad|>"]})
    )
    return d, len(ranks) + len(specials), ranks, specials


def _tiktoken_fixture(factory, name: str, make_dir, family_pre: str):
    """A tiktoken-ranks checkpoint (make_dir) converted: (dir, n_vocab, ranks, specials, GGUF keys, Tokenizer)."""
    d, n, ranks, specials = make_dir(factory.mktemp(name) / "hf")
    path = factory.mktemp(f"{name}-gguf") / f"{name}.gguf"
    kv = _write_gguf(path, d, n, family_pre)
    return d, n, ranks, specials, kv, Tokenizer.from_gguf_kv(kv, str(path))


@pytest.fixture(scope="module")
def hunyuan(tmp_path_factory):
    return _tiktoken_fixture(tmp_path_factory, "hunyuan", _hunyuan_dir, "hunyuan")


def test_hunyuan_keys_as_llama_cpp_writes_them(hunyuan) -> None:
    _, n, ranks, specials, kv, tok = hunyuan
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "hunyuan"
    assert "tokenizer.huggingface.json" not in kv
    tokens, types = kv["tokenizer.ggml.tokens"], np.asarray(kv["tokenizer.ggml.token_type"])
    assert len(tokens) == n and tokens[ord("A")] == "A" and tokens[ord(" ")] == "Ġ"
    assert len(kv["tokenizer.ggml.merges"]) == len(ranks) - 256  # every merged token is one merge
    for text, i in specials.items():
        assert tokens[i] == text and types[i] == gguf.TokenType.CONTROL
    assert kv["tokenizer.ggml.bos_token_id"] == specials["<|bos|>"]  # config.json's 1 overwritten
    assert kv["tokenizer.ggml.eos_token_id"] == specials["<|eos|>"]
    assert not tok.add_bos and {specials["<|eos|>"], specials["<|endoftext|>"]} <= tok.stop_ids


def test_hunyuan_encodes_like_tiktoken(hunyuan) -> None:
    tiktoken = pytest.importorskip("tiktoken")
    _, _, ranks, specials, _, tok = hunyuan
    enc = tiktoken.Encoding("hy", pat_str=HY_PAT, mergeable_ranks=ranks, special_tokens=specials)
    for text in TEXTS + ["<|startoftext|>You are terse.<|extra_4|>Hi<|extra_0|>", "4.<|eos|>"]:
        want = enc.encode(text, allowed_special="all")
        assert tok.encode(text) == want, text
        assert tok.decode(want) == text


def test_hunyuan_llama_cpp_agrees(hunyuan, tmp_path) -> None:
    d, n, _, _, _, _ = hunyuan
    _llama_cpp_agrees(tmp_path, d, n, "hunyuan", TEXTS + ["<|startoftext|>Sys<|extra_4|>Hi<|extra_0|>4.<|eos|>"])


def test_hunyuan_template_matches_transformers(hunyuan) -> None:
    _, _, _, specials, kv, tok = hunyuan
    tmpl = ChatTemplate.from_gguf_kv(kv, tok, "hy.gguf")
    assert tmpl.special_tokens["bos_token"] == "<|bos|>" and tmpl.special_tokens["eos_token"] == "<|eos|>"
    for chat in (CHAT, CHAT[1:]):
        for kw in ({}, {"enable_thinking": False}):
            assert tmpl.render(chat, **kw) == _transformers_render(
                kv["tokenizer.chat_template"], chat, tmpl.special_tokens, add_generation_prompt=True, **kw
            )
    ids = tok.encode(tmpl.render(CHAT))
    assert ids[0] == specials["<|startoftext|>"] and ids[-1] == specials["<|extra_0|>"]


def test_merges_rebuilt_from_ranks_equal_a_real_vocabs() -> None:
    """Qwen2's vocab is a tiktoken ranks table (ids = ranks) whose tokenizer.json merges llama.cpp stored in
    ggml-vocab-qwen2.gguf: rebuilding the merges from the ranks, as add_vocab does for Hunyuan's hy.tiktoken,
    gives that list exactly (151k ranks)."""
    from moelite.converters import vocab

    path = Path(__file__).resolve().parents[1] / "third_party" / "llama.cpp" / "models" / "ggml-vocab-qwen2.gguf"
    if not path.exists():
        pytest.skip(f"{path.name} not found (fetched by the build with llama.cpp)")
    kv = core.read_gguf(str(path))["kv"]
    byte_of = _byte_decoder()
    pairs = enumerate(zip(kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]))
    ranks = {bytes(byte_of[c] for c in t): i for i, (t, ty) in pairs if ty == gguf.TokenType.NORMAL}
    assert len(ranks) > 150_000
    assert vocab._rebuild_merges(ranks) == list(kv["tokenizer.ggml.merges"])


# --- bad input ----------------------------------------------------------------------------------------------
def _writer(tmp_path: Path) -> gguf.GGUFWriter:
    return gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")


def test_bad_tokenizer_files_name_the_file(tmp_path) -> None:
    d = tmp_path / "hf"
    d.mkdir()
    with pytest.raises(ConversionError, match=r"no tokenizer\.json.*tokenizer\.model"):
        add_vocab(_writer(tmp_path), d, 10, "llama-spm")
    with pytest.raises(ConversionError, match=r"0 \*\.tiktoken"):
        add_vocab(_writer(tmp_path), d, 10, "hunyuan")
    (d / "hy.tiktoken").write_text("QQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ConversionError, match=r"hy\.tiktoken: line 2"):
        add_vocab(_writer(tmp_path), d, 10, "hunyuan")
    (d / "hy.tiktoken").write_text("QQ== 0\nQg== 2\n")
    with pytest.raises(ConversionError, match=r"hy\.tiktoken: ranks must be 0\.\.1"):
        add_vocab(_writer(tmp_path), d, 10, "hunyuan")
    (d / "hy.tiktoken").unlink()
    (d / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ConversionError, match=r"tokenizer\.model: not a SentencePiece model"):
        add_vocab(_writer(tmp_path), d, 10, "llama-spm")
    (d / "tokenizer.model").unlink()
    (d / "tokenizer.json").write_text("[1, 2]")
    with pytest.raises(ConversionError, match=r"tokenizer\.json: expected a tokenizer\.json"):
        add_vocab(_writer(tmp_path), d, 10, "gemma4")


@pytest.mark.parametrize(
    "family_pre,field,value,message",
    [
        ("gemma4", "extra_special_tokens", 5, "'extra_special_tokens' must be a list or an object"),
        ("gemma4", "chat_template", [1, 2], "'chat_template' must be a string or a list of"),
        ("glm4", "chat_template", [{"name": "x"}], "'chat_template' must be a string or a list of"),
        ("hunyuan", "added_tokens_decoder", [1], "'added_tokens_decoder' must be an object"),
        (
            "llama-spm",
            "added_tokens_decoder",
            {"x": {}},
            r"added_tokens_decoder\['x'\] must be an object under a token id",
        ),
    ],
)
def test_bad_tokenizer_config_fields_name_the_file(
    gemma4, glm, ernie, hunyuan, tmp_path, family_pre, field, value, message
) -> None:
    src = {"gemma4": gemma4[0], "glm4": glm[0], "llama-spm": ernie[0], "hunyuan": hunyuan[0]}[family_pre]
    d = tmp_path / "hf"
    shutil.copytree(src, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(ConversionError, match=rf"tokenizer_config\.json: {message}"):
        add_vocab(_writer(tmp_path), d, 10_000, family_pre)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("pre_tokenizer", 5, "'pre_tokenizer' must be an object or null"),
        ("model", [1], "tokenizer model"),
        (
            "added_tokens",
            [{"content": 1, "id": "a"}],
            "'model.vocab' must map strings to ids and 'added_tokens' be a list",
        ),
    ],
)
def test_bad_tokenizer_json_fields_name_the_file(glm, tmp_path, field, value, message) -> None:
    d = tmp_path / "hf"
    shutil.copytree(glm[0], d)
    tj = json.loads((d / "tokenizer.json").read_text())
    (d / "tokenizer.json").write_text(json.dumps({**tj, field: value}))
    with pytest.raises(ConversionError, match=rf"tokenizer\.json: {message}"):
        add_vocab(_writer(tmp_path), d, 10_000, "glm4")


def test_gemma4_vocab_larger_than_config_is_refused(gemma4, tmp_path) -> None:
    d, n, _ = gemma4
    with pytest.raises(ConversionError, match=rf"tokenizer\.json: token id {n - 1} is outside \[0, vocab_size 100\)"):
        add_vocab(_writer(tmp_path), d, 100, "gemma4")


# --- a family checkpoint with its own tokenizer, end to end ---------------------------------------------------
def _reference_ids(family: str, tok_dir: Path, extra, text: str) -> list[int]:
    """The family's own tokenizer on `text` (specials parsed): HF tokenizers, sentencepiece (cut at the
    specials, as llama.cpp does) or tiktoken."""
    if family == "ernie4_5_moe":
        return _spm_with_specials(extra, text)
    if family == "hunyuan_v1_moe":
        tiktoken = pytest.importorskip("tiktoken")
        ranks, specials = extra
        return tiktoken.Encoding("hy", pat_str=HY_PAT, mergeable_ranks=ranks, special_tokens=specials).encode(
            text, allowed_special="all"
        )
    return HFTokenizer.from_file(str(tok_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def _hunyuan_with_reference(d: Path) -> tuple[Path, int, tuple[dict[bytes, int], dict[str, int]]]:
    d, n, ranks, specials = _hunyuan_dir(d)
    return d, n, (ranks, specials)


E2E = {  # model_type -> tokenizer maker (dir, vocab size, reference extras), what the rendered prompt starts with
    "gemma4_text": (lambda d: (*_gemma4_dir(d), None), "<bos><|turn>user\n"),
    "glm4_moe": (lambda d: (*_glm_dir(d), None), "[gMASK]<sop><|user|>\n"),
    "glm4_moe_lite": (lambda d: (*_glm_dir(d), None), "[gMASK]<sop><|user|>\n"),  # GLM-4.7-Flash: deepseek2
    "ernie4_5_moe": (_ernie_dir, "<|begin_of_sentence|>User: "),
    "hunyuan_v1_moe": (_hunyuan_with_reference, "<|startoftext|>"),
}


def _family_checkpoint(family: str, make, tmp_path: Path) -> tuple[Path, Path, int, object]:
    """A tiny random checkpoint of the family (tests/hf_fixtures) with the family's tokenizer files (made by
    `make`) in place of the fixture's: (checkpoint dir, tokenizer dir, vocab size, reference extras)."""
    hf_fixtures = pytest.importorskip("hf_fixtures")
    pytest.importorskip("transformers")
    tok_dir = tmp_path / "tokenizer"
    _, n_vocab, extra = make(tok_dir)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(hf_fixtures.make_hf_model(family, vocab_size=n_vocab), ckpt)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (ckpt / f).unlink(missing_ok=True)
    cfg = json.loads((ckpt / "config.json").read_text())
    for f in tok_dir.iterdir():
        if f.name == "config.json":  # the family's special token ids
            cfg.update(json.loads(f.read_text()))
        else:
            shutil.copy(f, ckpt / f.name)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ckpt, tok_dir, n_vocab, extra


@pytest.mark.parametrize("family", sorted(E2E))
def test_family_checkpoint_with_its_tokenizer_converts_and_chats(family, tmp_path) -> None:
    """The family's checkpoint with its own tokenizer files: `moelite convert` writes the family's vocab, and
    the loaded model renders the family's chat template, encodes it as the family's tokenizer does and answers
    greedily as transformers does."""
    import hf_fixtures

    from moelite.converters.convert import convert
    from moelite.runtime.model import Model

    make, prefix = E2E[family]
    ckpt, tok_dir, _, extra = _family_checkpoint(family, make, tmp_path)
    out = tmp_path / "model.gguf"
    convert(ckpt, out, "f32", progress=False)
    model = Model(str(out), n_ctx=128, n_threads=1)
    chat = [{"role": "user", "content": "Hi there, what's 2+2?"}]
    prompt = model.chat_template.render(chat, add_generation_prompt=True)
    assert not model.chat_template.is_default and prompt.startswith(prefix)
    ids = model.tokenizer.encode(prompt)
    bos = [model.tokenizer.bos_id] if model.tokenizer.add_bos and not prompt.startswith("<bos>") else []
    assert ids == bos + _reference_ids(family, tok_dir, extra, prompt)
    assert model.generate(ids, max_tokens=4, temperature=0) == hf_fixtures.hf_greedy(ckpt, ids, 4)


# The pinned llama.cpp converter's own vocab code, run vocab-only on a checkpoint; only the pre-tokenizer name is
# given, as llama.cpp finds it by hashing the tokenization of a fixed text and knows no tiny test tokenizer's hash.
_PINNED_VOCAB = """
import sys
from pathlib import Path
src, pre = Path(sys.argv[1]), sys.argv[2]
sys.path[:0] = [str(src / "gguf-py"), str(src)]
sys.argv = [str(src / "convert_hf_to_gguf.py")] + sys.argv[3:]
import convert_hf_to_gguf as conv
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
conv.main()
"""


def _add_hunyuan_remote_code(ckpt: Path) -> None:
    """What llama.cpp's Hunyuan converter loads (AutoTokenizer with trust_remote_code): tokenization_hy.py."""
    shutil.copy(Path(__file__).resolve().parent / "data" / "tokenization_hy.py", ckpt)
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(
        json.dumps(
            {
                **cfg,
                "auto_map": {"AutoTokenizer": ["tokenization_hy.HYTokenizer", None]},
                "tokenizer_class": "HYTokenizer",
                "n_extra": HY_N_EXTRA,
            }
        )
    )


@pytest.mark.parametrize("family", ["gemma4_text", "glm4_moe", "glm4_moe_lite", "ernie4_5_moe", "hunyuan_v1_moe"])
def test_vocab_keys_equal_the_pinned_llama_cpp_converters(family, tmp_path) -> None:
    """Every `tokenizer.*` key moelite writes for the family's checkpoint equals what the pinned llama.cpp
    converter writes for it; but Hunyuan's BOS, which llama.cpp hard-codes as 127959 (<|bos|> of the real
    128167-token vocab) and moelite looks up by text."""
    import subprocess
    import sys

    import llama_cpp_ref

    src = llama_cpp_ref.converter_dir()
    make = E2E[family][0]
    ckpt, _, n_vocab, extra = _family_checkpoint(family, make, tmp_path)
    if family == "hunyuan_v1_moe":
        pytest.importorskip("tiktoken")
        _add_hunyuan_remote_code(ckpt)
    pre = FAMILY_TOKENIZER_PRE[family]
    theirs = tmp_path / "llama-cpp.gguf"
    r = subprocess.run(
        [sys.executable, "-c", _PINNED_VOCAB, str(src), pre, str(ckpt), "--vocab-only", "--outfile", str(theirs)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ref = {k: v for k, v in core.read_gguf(str(theirs))["kv"].items() if k.startswith("tokenizer.")}
    ours = {
        k: v
        for k, v in _write_gguf(tmp_path / "moelite.gguf", ckpt, n_vocab, pre, stock=True).items()
        if k.startswith("tokenizer.")
    }
    assert sorted(ours) == sorted(ref)
    if family == "hunyuan_v1_moe":
        assert (ours.pop("tokenizer.ggml.bos_token_id"), ref.pop("tokenizer.ggml.bos_token_id")) == (
            extra[1]["<|bos|>"],
            127959,
        )
    for key, value in ref.items():
        assert np.array_equal(np.asarray(ours[key]), np.asarray(value)), key


# --- Kimi (tiktoken.model, the kimi-k2 pre-tokenizer) ----------------------------------------------------------
KIMI_NAMED = ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>"]
KIMI_N_RESERVED = 9  # ids after the named ones (256 special ids in the real vocabulary)


def _kimi_dir(d: Path) -> tuple[Path, int, dict[bytes, int], dict[str, int]]:
    """A Kimi-Linear-shaped checkpoint tokenizer: tiktoken.model (the 256 bytes, then merged tokens in merge order;
    trained with Kimi's split pattern), no tokenizer.json; the named special tokens in tokenizer_config.json's
    added_tokens_decoder right after the ranks, the other special ids `<|reserved_token_ID|>` as its
    tokenization_kimi.py names them; BOS [BOS], EOS <|im_end|> by text."""
    from moelite.runtime.tokenizer import PRE_TOKENIZER_REGEXES

    pattern = PRE_TOKENIZER_REGEXES["kimi-k2"][0]
    corpus = CORPUS + ["东京タワー 漢字かな交じり文 中文文本 模型", "camelCase XMLHttpRequest It's DON'T"]
    ranks = _write_tiktoken_ranks(d / "tiktoken.model", pattern, corpus)
    named = {t: len(ranks) + k for k, t in enumerate(KIMI_NAMED)}
    n = len(ranks) + len(KIMI_NAMED) + KIMI_N_RESERVED
    specials = {**named, **{f"<|reserved_token_{i}|>": i for i in range(len(ranks) + len(KIMI_NAMED), n)}}
    cfg = {
        "tokenizer_class": "TikTokenTokenizer",
        "bos_token": "[BOS]",
        "eos_token": "<|im_end|>",
        "added_tokens_decoder": {str(i): {"content": t, "special": True} for t, i in named.items()},
    }
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "config.json").write_text(json.dumps({"bos_token_id": named["[BOS]"], "eos_token_id": named["[EOS]"]}))
    return d, n, ranks, specials


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    return _tiktoken_fixture(tmp_path_factory, "kimi", _kimi_dir, "kimi-k2")


def test_kimi_keys_as_llama_cpp_writes_them(kimi) -> None:
    _, n, ranks, specials, kv, tok = kimi
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "kimi-k2"
    assert "tokenizer.huggingface.json" not in kv
    tokens, types = kv["tokenizer.ggml.tokens"], np.asarray(kv["tokenizer.ggml.token_type"])
    assert len(tokens) == n and len(kv["tokenizer.ggml.merges"]) == len(ranks) - 256
    for text, i in specials.items():
        assert tokens[i] == text and types[i] == gguf.TokenType.CONTROL
    assert kv["tokenizer.ggml.bos_token_id"] == specials["[BOS]"]
    assert kv["tokenizer.ggml.eos_token_id"] == specials["<|im_end|>"]  # the tokenizer's, over config.json's
    assert specials["<|im_end|>"] in tok.stop_ids


def test_kimi_encodes_like_tiktoken(kimi) -> None:
    """Kimi's tokenizer is tiktoken with its pattern: moelite's from the GGUF gives tiktoken's ids (Han runs apart
    from kana and Latin letters, contractions, digit groups), special tokens included."""
    tiktoken = pytest.importorskip("tiktoken")
    from moelite.runtime.tokenizer import PRE_TOKENIZER_REGEXES

    _, _, ranks, specials, _, tok = kimi
    enc = tiktoken.Encoding(
        "kimi", pat_str=PRE_TOKENIZER_REGEXES["kimi-k2"][0], mergeable_ranks=ranks, special_tokens=specials
    )
    for text in TEXTS + ["东京タワーは漢字とかなで書く", "[BOS]<|im_user|>Hi<|im_middle|>It's 12345<|im_end|>"]:
        want = enc.encode(text, allowed_special="all")
        assert tok.encode(text) == want, text
        assert tok.decode(want) == text


def test_kimi_llama_cpp_agrees(kimi, tmp_path) -> None:
    d, n, _, _, _, _ = kimi
    _llama_cpp_agrees(tmp_path, d, n, "kimi-k2", TEXTS + ["东京タワーは漢字", "<|im_user|>Hi<|im_middle|>4.<|im_end|>"])
