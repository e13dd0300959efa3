"""Tokenizer of a GGUF model, built on HF `tokenizers`.

Two sources, in this order:
- `tokenizer.huggingface.json` (a whole tokenizer.json stored in the file): loaded as is.
- `tokenizer.ggml.*` (stock llama.cpp GGUFs): rebuilt as a `tokenizers` pipeline.
  - `model = gpt2`: byte-level BPE (`tokens`, `merges`), pre-tokenized by the regexes that
    `tokenizer.ggml.pre` names (the regexes of the original tokenizer.json, run by the same engine).
  - `model = gemma4`: BPE over raw UTF-8 (spaces as `▁`, `<0xXX>` byte fallback), split at newline runs.
  - `model = llama`: SentencePiece-style BPE: merges derived from `scores` (a pair merges into the
    highest-scoring vocab piece first), spaces as `▁`, `add_space_prefix`, `<0xXX>` byte fallback.
Control / unknown tokens (token_type 3 / 2) become special added tokens and user-defined ones (4) plain
added tokens, so both encode atomically, like llama.cpp's special-token partition.

Encoding never lets a tokenizer.json post-processor add tokens: BOS is added here, from
`tokenizer.ggml.add_bos_token` (absent: llama.cpp's default, true for SPM and llama-bpe, else false).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from moelite.errors import TokenizerError

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# --- pre-tokenizer regexes, per `tokenizer.ggml.pre` ---------------------------------------------------
# Each list is applied in order, every regex isolating its matches (HF `Split(..., "isolated")`), as in the
# models' tokenizer.json files; llama.cpp's llama-vocab.cpp names the same lists.
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN35 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS + "?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS + "?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# DeepSeek-LLM's cased-letter class, as written in its tokenizer.json.
_DEEPSEEK_LETTERS = (  # escaped: several of these code points change under NFC
    "A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377"
    "\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f"
    "\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d"
    "\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb"
    "\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4"
    "\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
    "\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943"
)
_CJK = "\u4e00-\u9fa5"  # CJK unified ideographs
_DEEPSEEK_LLM = (
    r"[\r\n]",
    r"\s?[" + _DEEPSEEK_LETTERS + "]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    r"\s+$",
    "[" + _CJK + "\u0800-\u4e00\uac00-\ud7ff]+",
    r"\p{N}+",
)
_DEEPSEEK_V3 = (
    r"\p{N}{1,3}",
    "[" + _CJK + "\u3040-\u309f\u30a0-\u30ff]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_DEEPSEEK_CODER = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[" + _CJK + "\u0800-\u4e00\uac00-\ud7ff]+", r"\p{N}")
_STARCODER = (r"\p{N}", _GPT2)
_FALCON = (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")
# K-EXAONE (exaone-moe): a word may run on over single spaces between letters (its tokenizer.json's regex).
_EXAONE_MOE = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?"
    r"|\s*[\r\n]|\s+(?!\S)|\s+"
)
# Mistral's tekken (Mistral-Nemo, Mistral Small 4): GPT-4o's cased words without contractions, single digits.
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Cohere's tiny-aya / North (cohere2moe): digits in groups of 3 from the right, then GPT-4o's regex. The digit
# regex is the tokenizer.json's: a digit run followed by a letter is not split by it (llama.cpp's hand-written
# split groups every digit run, whatever follows: "x1234y" differs there).
_TINY_AYA = (r"\d{1,3}(?=(?:\d{3})*\b)", _GPT4O)
# Kimi K2 / Kimi-Linear (kimi-k2): tokenization_kimi.py's tiktoken pattern, Han runs apart from other letters (class
# intersections); llama.cpp implements it by hand (unicode.cpp's K2 split).
_KIMI_NOT_HAN = r"\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]"
_KIMI_K2 = (
    r"[\p{Han}]+"
    rf"|[^\r\n\p{{L}}\p{{N}}]?[{_KIMI_NOT_HAN}]*[\p{{Ll}}\p{{Lm}}\p{{Lo}}\p{{M}}&&[^\p{{Han}}]]+{_CONTRACTIONS}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?[{_KIMI_NOT_HAN}]+[\p{{Ll}}\p{{Lm}}\p{{Lo}}\p{{M}}&&[^\p{{Han}}]]*{_CONTRACTIONS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Ling (bailingmoe, bailingmoe2: Ling-2 / Ling-3.0): its tokenizer.json's regex, possessive quantifiers as written
# (llama.cpp makes them greedy, which splits the same here: neither optional part can give a letter back)
_BAILINGMOE = (
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
)
# Tencent Hy4 (hy_v4): digits by 3, CJK / kana runs, then a word may start with one ASCII punctuation mark.
_HY_V4 = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*"""
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
)
# Arcee Trinity (afmoe): every digit run grouped by 3 from the right (llama.cpp's `\p{AFMoE_digits}` split, the
# one definition of this name), CJK / South-East Asian script runs, then DeepSeek-V3's punctuation-aware regex.
# The script class has llama.cpp's code points as its source holds them (U+8C48 and U+0E40 open two ranges).
_AFMOE = (
    r"\p{N}{1,3}(?=(?:\p{N}{3})*(?!\p{N}))",
    "[\u4e00-\u9fff\u3400-\u4dbf\u8c48-\ufaff\u3040-\u309f\u30a0-\u30ff\uff65-\uff9f\u2f00-\u2fdf"
    "\u0e40-\u0e7f\u0e80-\u0eff\u1780-\u17ff\u1000-\u109f\uaa60-\uaa7f\ua9e0-\ua9ff\uac00-\ud7af\u1100-\u11ff]+",
    _DEEPSEEK_V3[2],
)
# poolside Laguna: runs of newlines isolated first, then Qwen2's regex.
_LAGUNA = (r"[^\n]+|[\n]+", _QWEN2)
# llama.cpp's fallback for a BPE vocab without (or with "default") `tokenizer.ggml.pre`.
_DEFAULT_BPE = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")

PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    "default": _DEFAULT_BPE,
    "llama-bpe": (_LLAMA3,),
    "llama3": (_LLAMA3,),
    "llama-v3": (_LLAMA3,),
    "dbrx": (_LLAMA3,),
    "smaug-bpe": (_LLAMA3,),
    "falcon3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "deepseek-r1-qwen": (_QWEN2,),
    "stablelm2": (_QWEN2,),
    "hunyuan": (_QWEN2,),
    "glm4": (_LLAMA3,),
    "glm5": (_LLAMA3,),
    "chatglm-bpe": (_LLAMA3,),  # llama.cpp's CHATGLM4 = llama3's regex
    "qwen35": (_QWEN35,),
    "deepseek-llm": _DEEPSEEK_LLM,
    "deepseek-v3": _DEEPSEEK_V3,
    "hunyuan-dense": _DEEPSEEK_V3,
    "deepseek-coder": _DEEPSEEK_CODER,
    "gpt-2": (_GPT2,),
    "phi-2": (_GPT2,),
    "mpt": (_GPT2,),
    "olmo": (_GPT2,),
    "starcoder": _STARCODER,
    "refact": _STARCODER,
    "command-r": _STARCODER,
    "smollm": _STARCODER,
    "falcon": _FALCON,
    "gpt-4o": (_GPT4O,),
    "llama4": (_GPT4O,),
    "minimax-m2": (_GPT4O,),
    "exaone-moe": (_EXAONE_MOE,),
    "tekken": (_TEKKEN,),
    "tiny_aya": _TINY_AYA,
    "cohere2moe": _TINY_AYA,
    "afmoe": _AFMOE,
    "laguna": _LAGUNA,
    "kimi-k2": (_KIMI_K2,),
    "bailingmoe": (_BAILINGMOE,),
    "bailingmoe2": (_BAILINGMOE,),
    "llada-moe": (_BAILINGMOE,),
    "hy_v4": _HY_V4,
}
# pre-tokenizers whose tokenizer.json sets `ignore_merges` (a word that is itself a token is not merged)
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3", "falcon3", "glm4", "glm5", "tekken"}
_ADD_BOS_DEFAULT = {"llama-bpe", "llama3", "llama-v3", "falcon3", "tekken"}

# Texts of end-of-turn tokens that stop generation besides EOS (subset of llama.cpp's EOG list).
EOG_TOKEN_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<｜end▁of▁sentence｜>",
    "<|END_OF_TURN_TOKEN|>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",  # Gemma-4
    "[e~[",
)  # MiniMax-M2

_SPM_SPACE = "\u2581"  # ▁


class Tokenizer:
    """Text <-> token ids for one model. Build with `from_gguf_kv` (or `from_gguf`)."""

    def __init__(
        self,
        hf: HFTokenizer,
        *,
        path: str,
        bos_id: int | None,
        eos_id: int | None,
        stop_ids: Iterable[int],
        add_bos: bool,
        vocab_size: int,
    ) -> None:
        self._hf = hf
        self.path = path
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.stop_ids = frozenset(stop_ids)  # eos plus end-of-turn tokens: generation ends on any
        self.add_bos = add_bos
        self.vocab_size = vocab_size
        self._encode_lock = threading.Lock()  # parse_special is a setting of the shared HF tokenizer

    # --- construction -----------------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, path: str) -> Tokenizer:
        from moelite._core import read_gguf  # the C++ GGUF reader; imported here so tests can pass kv dicts

        return cls.from_gguf_kv(read_gguf(path)["kv"], path)

    @classmethod
    def from_gguf_kv(cls, kv: dict[str, Any], path: str) -> Tokenizer:
        """`kv`: the metadata of `moelite._core.read_gguf(path)`; `path` is only used in error messages."""
        hf, add_bos_default = _build(kv, path)
        vocab = hf.get_vocab(with_added_tokens=True)
        tokens = kv.get("tokenizer.ggml.tokens")
        n_vocab = len(tokens) if tokens is not None else hf.get_vocab_size(with_added_tokens=True)

        def special_id(key: str) -> int | None:
            v = kv.get(f"tokenizer.ggml.{key}_token_id")
            return int(v) if v is not None and 0 <= int(v) < n_vocab else None

        bos_id, eos_id = special_id("bos"), special_id("eos")
        stop = {i for i in (eos_id, special_id("eot"), special_id("eom")) if i is not None}
        stop |= {vocab[t] for t in EOG_TOKEN_TEXTS if t in vocab}
        add_bos = bool(kv.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos_id is not None
        if kv.get("tokenizer.ggml.model") == "gemma4":  # llama.cpp overrides a false add_bos_token for Gemma-4
            add_bos = bos_id is not None
        return cls(hf, path=path, bos_id=bos_id, eos_id=eos_id, stop_ids=stop, add_bos=add_bos, vocab_size=n_vocab)

    # --- use ------------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`. `add_special`: prepend BOS when the model asks for it (unless the text
        already starts with it, as rendered chat templates often do). `parse_special`:
        control tokens written in the text (e.g. "<|im_start|>" from a chat template) become their ids;
        False treats them as plain text (user-defined tokens still match, as in llama.cpp)."""
        with self._encode_lock:
            self._hf.encode_special_tokens = not parse_special
            ids = self._hf.encode(text, add_special_tokens=False).ids
        if add_special and self.add_bos and ids[:1] != [self.bos_id]:  # a chat template may write BOS itself
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD. `skip_special` drops control tokens."""
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def pieces(self, ids: Iterable[int]) -> list[str]:
        """Each token's own text, as decode([id]) gives it (one batched call: the server's logprobs and /tokenize
        name every token)."""
        return self._hf.decode_batch([[int(i)] for i in ids], skip_special_tokens=False)

    def token_text(self, token_id: int) -> str | None:
        """The vocabulary entry of `token_id` as stored (e.g. "<|im_end|>", "Ġthe", "▁the")."""
        return self._hf.id_to_token(int(token_id))

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.token_text(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self.token_text(self.eos_id)

    def is_stop(self, token_id: int) -> bool:
        return token_id in self.stop_ids

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special)


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns the text completed by that token ("" while a UTF-8
    character is still split across tokens); `flush()` returns what is left at the end.

    Decodes a short window of recent ids rather than single tokens, so that decoders that look at
    neighbours (SentencePiece's leading-space strip, byte fallback) give the same text as `decode(all)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self._ids: list[int] = []
        self._prefix = 0  # window start: ids before it were emitted and never re-decoded
        self._read = 0  # ids before this were emitted

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        done = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        text = self._tok.decode(self._ids[self._prefix :], self._skip)
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            return ""  # nothing new, or a multi-byte character is still incomplete
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done) :]


# --- builders --------------------------------------------------------------------------------------------
def _build(kv: dict[str, Any], path: str) -> tuple[HFTokenizer, bool]:
    """The HF tokenizer of a GGUF's metadata, and llama.cpp's add-BOS default for its kind."""
    if "tokenizer.huggingface.json" in kv:
        try:
            return HFTokenizer.from_str(str(kv["tokenizer.huggingface.json"])), False
        except Exception as e:  # tokenizers raises plain Exception on bad JSON
            raise TokenizerError(f"{path}: key 'tokenizer.huggingface.json' is not a valid tokenizer.json: {e}") from e
    model, tokens = kv.get("tokenizer.ggml.model"), kv.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        missing = "tokenizer.ggml.model" if model is None else "tokenizer.ggml.tokens"
        raise TokenizerError(f"{path}: no tokenizer: neither 'tokenizer.huggingface.json' nor '{missing}' is present")
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]  # as llama.cpp does
    types = kv.get("tokenizer.ggml.token_type")
    types = [TOKEN_NORMAL] * len(tokens) if types is None else [int(t) for t in types]
    if model == "gpt2":
        pre = str(kv.get("tokenizer.ggml.pre") or "default")
        return _byte_level_bpe(tokens, types, kv.get("tokenizer.ggml.merges"), pre, path), pre in _ADD_BOS_DEFAULT
    if model == "gemma4":  # llama.cpp always adds BOS for it
        return _gemma4_bpe(tokens, types, kv.get("tokenizer.ggml.merges"), path), True
    if model == "llama":
        scores = kv.get("tokenizer.ggml.scores")
        if scores is None:
            raise TokenizerError(
                f"{path}: key 'tokenizer.ggml.scores' is missing (needed for tokenizer.ggml.model = 'llama')"
            )
        add_prefix = bool(kv.get("tokenizer.ggml.add_space_prefix", True))
        return _sentencepiece_bpe(tokens, types, [float(x) for x in scores], add_prefix), True
    raise TokenizerError(
        f"{path}: key 'tokenizer.ggml.model' = {model!r} is not supported (supported: 'gpt2', 'llama', 'gemma4')"
    )


def _added_tokens(tokens: Sequence[str], types: Sequence[int]) -> list[AddedToken]:
    """Control/unknown -> special added tokens, user-defined -> added tokens; matched on the raw text."""
    out = []
    for text, t in zip(tokens, types):
        if t in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED):
            out.append(AddedToken(text, special=t != TOKEN_USER_DEFINED, normalized=False))
    return out


def _split_merge(merge: str) -> tuple[str, str]:
    i = merge.find(" ", 1)  # the left piece may itself be a space (non-byte-level vocabs)
    return merge[:i], merge[i + 1 :]


def _merges_bpe(
    vocab: dict[str, int], merges: Sequence[str] | None, model: str, path: str, **options: Any
) -> models.BPE:
    """A BPE model of the file's `tokenizer.ggml.merges`; missing merges, or a merge naming a piece the vocab
    lacks (or with no space), are TokenizerErrors, where `tokenizers` raises a bare Exception."""
    if merges is None:
        raise TokenizerError(
            f"{path}: key 'tokenizer.ggml.merges' is missing (needed for tokenizer.ggml.model = {model!r})"
        )
    try:
        return models.BPE(vocab, [_split_merge(str(m)) for m in merges], **options)
    except Exception as e:  # tokenizers raises plain Exception on a bad merge
        raise TokenizerError(f"{path}: key 'tokenizer.ggml.merges' does not fit 'tokenizer.ggml.tokens': {e}") from e


def _byte_level_bpe(
    tokens: list[str], types: list[int], merges: Sequence[str] | None, pre: str, path: str
) -> HFTokenizer:
    regexes = PRE_TOKENIZER_REGEXES.get(pre)
    if regexes is None:
        raise TokenizerError(
            f"{path}: key 'tokenizer.ggml.pre' = {pre!r} is not a supported pre-tokenizer "
            f"(supported: {', '.join(sorted(PRE_TOKENIZER_REGEXES))})"
        )
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = _merges_bpe(vocab, merges, "gpt2", path, ignore_merges=pre in _IGNORE_MERGES)
    hf = HFTokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    hf.decoder = decoders.ByteLevel()
    hf.add_tokens(_added_tokens(tokens, types))
    return hf


def _gemma4_bpe(tokens: list[str], types: list[int], merges: Sequence[str] | None, path: str) -> HFTokenizer:
    """Gemma-4: BPE over raw UTF-8 with `▁` for spaces, ranked merges, `<0xXX>` byte fallback, no space
    prefix; llama.cpp splits the text into runs of newlines and runs of everything else first."""
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = _merges_bpe(vocab, merges, "gemma4", path, byte_fallback=TOKEN_BYTE in types)
    hf = HFTokenizer(bpe)
    hf.normalizer = normalizers.Replace(" ", _SPM_SPACE)
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^\n]+|[\n]+"), behavior="isolated", invert=False)
    hf.decoder = decoders.Sequence([decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    hf.add_tokens(_added_tokens(tokens, types))
    return hf


def _sentencepiece_bpe(tokens: list[str], types: list[int], scores: list[float], add_space_prefix: bool) -> HFTokenizer:
    """SentencePiece-style: repeatedly merge the adjacent pair whose concatenation is the vocab piece of
    highest score. As BPE merges: every split (left, right) of a normal piece whose halves are pieces,
    ranked by the piece's score."""
    vocab = {t: i for i, t in enumerate(tokens)}
    mergeable = {t for t, ty in zip(tokens, types) if ty in (TOKEN_NORMAL, TOKEN_USER_DEFINED)}
    ranked = []
    for piece in mergeable:
        score = scores[vocab[piece]]
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in mergeable and right in mergeable:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    has_bytes = any(t == TOKEN_BYTE for t in types)
    unk = next((t for t, ty in zip(tokens, types) if ty == TOKEN_UNKNOWN), None)
    bpe = models.BPE(vocab, [(m[3], m[4]) for m in ranked], unk_token=unk, fuse_unk=True, byte_fallback=has_bytes)
    hf = HFTokenizer(bpe)
    steps = [normalizers.Replace(" ", _SPM_SPACE)]
    if add_space_prefix:
        steps.insert(0, normalizers.Prepend(_SPM_SPACE))
    hf.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    hf.decoder = decoders.Sequence(dec)
    hf.add_tokens(_added_tokens(tokens, types))
    return hf


__all__ = ["Tokenizer", "StreamDecoder", "PRE_TOKENIZER_REGEXES", "EOG_TOKEN_TEXTS"]
