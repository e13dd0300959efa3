"""Tokenizer keys: the `tokenizer.ggml.*` keys llama.cpp needs, plus moelite's verbatim copy of the HF
tokenizer (`tokenizer.huggingface.json`, when the checkpoint ships a tokenizer.json) and the chat template.

What is written follows the pinned llama.cpp converter for the family's tokenizer kind, picked by the
family's `tokenizer_pre` (`add_vocab`'s `family_pre`):
- most families: tokenizer.json BPE -> `gpt2` (byte-level, `tokenizer.ggml.pre` = the family's) or, for a
  byte-fallback BPE (Mixtral, Phi), SentencePiece-style `llama`;
- "glm4" (GLM-4.5/4.6/4.7, GLM-4.7-Flash): `gpt2` plus llama.cpp's GLM specials: BOS `[gMASK]`, EOT
  `<|user|>`, UNK `<|endoftext|>`, EOM `<|observation|>`;
- "gemma4": `gemma4` (BPE over raw UTF-8 with `▁` spaces and `<0xXX>` bytes, merges, all scores -1000,
  the chat-parser tokens user-defined), no space prefix, BOS added;
- "llama-spm" (ERNIE-4.5): the SentencePiece `tokenizer.model` -> `llama` with its scores and types;
- "hunyuan" (Hunyuan-MoE): the tiktoken ranks file (`hy.tiktoken`) -> `gpt2` with merges rebuilt from the
  ranks, and the tokenizer's special tokens after the ranks; BOS `<|bos|>`.
- "kimi-k2" (Kimi-Linear, Kimi-K2): the same from `tiktoken.model`, the special tokens those of its
  tokenizer_config.json's added_tokens_decoder and `<|reserved_token_ID|>` for the other ids after the ranks.
Reads tokenizer files with plain JSON (no transformers). Special token ids, add_bos/add_eos, merges and the
chat template come from gguf-py's SpecialVocab, the same code llama.cpp's converter uses.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf

from moelite.errors import ConversionError

NORMAL, USER_DEFINED, CONTROL, UNUSED, BYTE, UNKNOWN = (
    int(gguf.TokenType.NORMAL),
    int(gguf.TokenType.USER_DEFINED),
    int(gguf.TokenType.CONTROL),
    int(gguf.TokenType.UNUSED),
    int(gguf.TokenType.BYTE),
    int(gguf.TokenType.UNKNOWN),
)
_SPM_SPACE = "\u2581"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

# llama.cpp's _set_vocab_glm: special token type -> token text (set unless the tokenizer files set it)
GLM_SPECIALS = {"bos": "[gMASK]", "eot": "<|user|>", "unk": "<|endoftext|>", "eom": "<|observation|>"}
# llama.cpp's Gemma4Model.set_vocab: tokens always rendered (user-defined), so a chat parser can read them
GEMMA4_VISIBLE = frozenset(
    {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>'}
)
# Hunyuan-MoE's tokenizer (tokenization_hy.py): special tokens right after the ranks, then extras to vocab_size
HUNYUAN_SPECIALS = ("<|endoftext|>", "<|startoftext|>", "<|bos|>", "<|eos|>", "<|pad|>")
HUNYUAN_BOS = "<|bos|>"  # llama.cpp overwrites config.json's BOS id with this token's


def add_vocab(w: gguf.GGUFWriter, model_dir: Path, n_vocab: int, family_pre: str) -> dict[str, Any]:
    """Add tokenizer keys to `w`; returns a small summary for the report."""
    writer = _WRITERS.get(family_pre, _write_tokenizer_json)
    if writer is not _write_tokenizer_json and _plain_byte_level(Path(model_dir)):
        writer = _write_tokenizer_json  # a GPT-2 byte-level tokenizer.json (the test fixtures): the generic path
    return writer(w, Path(model_dir), n_vocab, family_pre)


def _plain_byte_level(model_dir: Path) -> bool:
    """tokenizer.json is a byte-level BPE without byte fallback (not the family's own tokenizer kind)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return False
    tj = _read_json(path, "tokenizer.json (JSON object)")
    model, pt = tj.get("model") or {}, tj.get("pre_tokenizer") or {}
    return (
        isinstance(model, dict)
        and isinstance(pt, dict)
        and model.get("type") == "BPE"
        and not model.get("byte_fallback")
        and pt.get("type") == "ByteLevel"
    )


# --- shared ------------------------------------------------------------------------------------------------
def _looks_special(tok: str) -> bool:
    """llama.cpp's does_token_look_special."""
    return (
        tok in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (tok.startswith("<|") and tok.endswith("|>"))
        or (tok.startswith("<｜") and tok.endswith("｜>"))
        or (tok.startswith("<unused") and tok.endswith(">"))
    )


def _read_json(path: Path, what: str = "JSON object") -> Any:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ConversionError(f"{path}: cannot read {what}: {e}") from e
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a {what}, found {type(data).__name__}")
    return data


def _tokenizer_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "tokenizer_config.json"
    return _read_json(path, "tokenizer config (JSON object)") if path.is_file() else {}


def _tokenizer_json(model_dir: Path) -> tuple[str, dict[str, Any], Path]:
    tpath = model_dir / "tokenizer.json"
    if not tpath.is_file():
        raise ConversionError(
            f"{model_dir}: no tokenizer.json (moelite needs the fast tokenizer file, or this "
            "family's tokenizer.model / *.tiktoken)"
        )
    tj = _read_json(tpath, "tokenizer.json (JSON object)")
    model = tj.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else model
        raise ConversionError(f"{tpath}: tokenizer model {kind!r}; moelite converts BPE tokenizers")
    for field in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        if not isinstance(tj.get(field), (dict, type(None))):
            raise ConversionError(f"{tpath}: '{field}' must be an object or null, found {type(tj[field]).__name__}")
    return tpath.read_text(encoding="utf-8"), tj, tpath


def _bpe_vocab(tj: dict[str, Any], tpath: Path, n_vocab: int) -> tuple[dict[int, str], dict[str, dict], int]:
    """id -> text of the BPE vocab plus added tokens, the added tokens by text, and the base vocab size."""
    vocab = tj["model"].get("vocab") or {}
    added_list = tj.get("added_tokens") or []
    if (
        not isinstance(vocab, dict)
        or not isinstance(added_list, list)
        or not all(
            isinstance(a, dict) and isinstance(a.get("content"), str) and isinstance(a.get("id"), int)
            for a in added_list
        )
    ):
        raise ConversionError(
            f"{tpath}: 'model.vocab' must map strings to ids and 'added_tokens' be a list of {{content, id}} objects"
        )
    rev = {i: t for t, i in vocab.items() if isinstance(i, int)}
    if len(rev) != len(vocab):
        raise ConversionError(f"{tpath}: 'model.vocab' has ids that are not unique integers")
    added = {a["content"]: a for a in added_list}
    for a in added.values():
        rev[a["id"]] = a["content"]
    if rev and (max(rev) >= n_vocab or min(rev) < 0):
        bad = max(rev) if max(rev) >= n_vocab else min(rev)
        raise ConversionError(f"{tpath}: token id {bad} is outside [0, vocab_size {n_vocab}) of config.json")
    return rev, added, len(vocab)


def _special_vocab(model_dir: Path, n_vocab: int, load_merges: bool) -> gguf.SpecialVocab:
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)
    try:
        return gguf.SpecialVocab(model_dir, load_merges=load_merges, n_vocab=n_vocab)
    except (ValueError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise ConversionError(
            f"{model_dir}: tokenizer files (tokenizer.json / tokenizer_config.json / "
            f"config.json) have a field of the wrong type: {e}"
        ) from e


def _finish(
    w: gguf.GGUFWriter, model_dir: Path, special: gguf.SpecialVocab, n_vocab: int, hf_json: str | None
) -> dict[str, Any]:
    """Special ids, add_* flags, merges and chat template; the verbatim tokenizer.json when there is one."""
    template = special.chat_template
    if (
        template is not None
        and not isinstance(template, str)
        and not all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
            for t in template
        )
    ):
        raise ConversionError(
            f"{model_dir / 'tokenizer_config.json'}: 'chat_template' must be a string or a list "
            "of {name, template} objects"
        )
    special.add_to_gguf(w, quiet=True)
    if special.chat_template is None:
        template = _tokenizer_config(model_dir).get("chat_template")
        if isinstance(template, str) and template:
            w.add_chat_template(template)
            special.chat_template = template
    if hf_json is not None:
        w.add_string("tokenizer.huggingface.json", hf_json)
    return {
        "n_vocab": n_vocab,
        "special": dict(special.special_token_ids),
        "chat_template": special.chat_template is not None,
    }


def _set_specials_by_text(
    special: gguf.SpecialVocab, wanted: dict[str, str], ids: dict[str, int], override: bool = False
) -> None:
    """Special token ids by token text (`override`: replace ids the tokenizer files set). A token the
    vocabulary lacks (a test tokenizer) is left unset, where llama.cpp's converter stops with a KeyError."""
    for typ, text in wanted.items():
        if text not in ids:
            continue
        if override:
            special.special_token_ids[typ] = ids[text]
        else:
            special.special_token_ids.setdefault(typ, ids[text])


# --- tokenizer.json (BPE) ----------------------------------------------------------------------------------
def _pre(tj: dict[str, Any], family_pre: str) -> str:
    """llama.cpp pre-tokenizer name. A plain GPT-2 ByteLevel pre-tokenizer (the test fixtures) is "gpt-2";
    otherwise the family's real-checkpoint value (llama.cpp detects it by hashing; we trust the family)."""
    pt = tj.get("pre_tokenizer") or {}
    if pt.get("type") == "ByteLevel" and pt.get("use_regex", True):
        return "gpt-2"
    return family_pre


def _write_tokenizer_json(w: gguf.GGUFWriter, model_dir: Path, n_vocab: int, family_pre: str) -> dict[str, Any]:
    text, tj, tpath = _tokenizer_json(model_dir)
    rev, added, _ = _bpe_vocab(tj, tpath, n_vocab)
    spm = bool(tj["model"].get("byte_fallback"))  # SentencePiece-style BPE (Mixtral, Phi): llama.cpp model "llama"
    tokens, types, scores = [], [], []
    for i in range(n_vocab):
        t = rev.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif t in added:
            tokens.append(t)
            types.append(CONTROL if added[t].get("special") or _looks_special(t) else USER_DEFINED)
        elif spm and _BYTE_TOKEN.fullmatch(t):
            tokens.append(t)
            types.append(BYTE)
        else:
            tokens.append(t)
            types.append(NORMAL)
        scores.append(-float(i) if t is not None and t not in added else -1000.0)

    if spm:
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_scores(scores)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(_pre(tj, family_pre))
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = _special_vocab(model_dir, n_vocab, load_merges=not spm)
    if family_pre == "glm4":
        _set_specials_by_text(special, GLM_SPECIALS, {t: i for i, t in rev.items()})
    return _finish(w, model_dir, special, n_vocab, text)


def _special_texts(cfg: dict[str, Any], where: Path) -> set[str]:
    """The tokens transformers counts as special (`all_special_tokens`): the named ones of
    tokenizer_config.json plus `extra_special_tokens` / `additional_special_tokens`."""

    def text(v: Any) -> str | None:
        return v if isinstance(v, str) else v.get("content") if isinstance(v, dict) else None

    out = {text(cfg.get(f"{k}_token")) for k in ("bos", "eos", "unk", "sep", "pad", "cls", "mask")}
    for key in ("extra_special_tokens", "additional_special_tokens"):
        extra = cfg.get(key) or []
        if not isinstance(extra, (list, dict)):
            raise ConversionError(
                f"{where}: '{key}' must be a list or an object of tokens, found {type(extra).__name__}"
            )
        out |= {text(v) for v in (extra.values() if isinstance(extra, dict) else extra)}
    return {t for t in out if t}


def _write_gemma4(w: gguf.GGUFWriter, model_dir: Path, n_vocab: int, family_pre: str) -> dict[str, Any]:
    """llama.cpp's Gemma4Model.set_vocab (its LlamaHfVocab): CONTROL = the tokenizer's special tokens,
    BYTE = `<0xXX>`, USER_DEFINED = added tokens beyond the base vocab and the chat-parser tokens.
    A tokenizer.json that is not a byte-fallback BPE (a test checkpoint's byte-level BPE) is converted as
    any other, where llama.cpp's converter stops ("Cannot find Llama BPE tokenizer")."""
    text, tj, tpath = _tokenizer_json(model_dir)
    if not tj["model"].get("byte_fallback"):
        return _write_tokenizer_json(w, model_dir, n_vocab, "default")
    rev, _, n_base = _bpe_vocab(tj, tpath, n_vocab)
    special_texts = _special_texts(_tokenizer_config(model_dir), model_dir / "tokenizer_config.json")
    tokens, types = [], []
    for i in range(n_vocab):
        t = rev.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        tokens.append(t)
        if t in GEMMA4_VISIBLE:
            types.append(USER_DEFINED)
        elif _BYTE_TOKEN.fullmatch(t):
            types.append(BYTE)
        elif t in special_texts:
            types.append(CONTROL)
        elif i >= n_base:
            types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
    w.add_tokenizer_model("gemma4")
    w.add_token_list(tokens)
    w.add_token_scores([-1000.0] * n_vocab)
    w.add_token_types(types)
    special = _special_vocab(model_dir, n_vocab, load_merges=True)
    special.add_special_token["bos"] = True
    w.add_add_space_prefix(False)
    return _finish(w, model_dir, special, n_vocab, text)


def _added_tokens_decoder(cfg: dict[str, Any], model_dir: Path) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json's `added_tokens_decoder`: {"<id>": {"content": ..., "special": ...}}, checked."""
    decoder = cfg.get("added_tokens_decoder") or {}
    where = model_dir / "tokenizer_config.json"
    if not isinstance(decoder, dict):
        raise ConversionError(f"{where}: 'added_tokens_decoder' must be an object, found {type(decoder).__name__}")
    for key, data in decoder.items():
        if not isinstance(data, dict) or not str(key).isdigit():
            raise ConversionError(f"{where}: added_tokens_decoder[{key!r}] must be an object under a token id")
    return decoder


# --- SentencePiece tokenizer.model (ERNIE-4.5) ---------------------------------------------------------------
def _write_sentencepiece(w: gguf.GGUFWriter, model_dir: Path, n_vocab: int, family_pre: str) -> dict[str, Any]:
    """llama.cpp's _set_vocab_sentencepiece (+ ERNIE's add_prefix_space): pieces, scores and types of
    tokenizer.model, then added_tokens.json and tokenizer_config.json's added_tokens_decoder. Without a
    tokenizer.model, the tokenizer.json is converted as for other families."""
    path = model_dir / "tokenizer.model"
    if not path.is_file():
        return _write_tokenizer_json(w, model_dir, n_vocab, "default")
    try:
        import sentencepiece
    except ImportError as e:  # a dependency of moelite; only missing from a broken install
        raise ConversionError(
            f"{path}: reading it needs the 'sentencepiece' package (pip install sentencepiece)"
        ) from e
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise ConversionError(f"{path}: not a SentencePiece model: {e}") from e
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [UNUSED] * n_vocab
    if sp.vocab_size() > n_vocab:
        raise ConversionError(f"{path}: {sp.vocab_size()} pieces, more than vocab_size {n_vocab} of config.json")
    for i in range(sp.vocab_size()):
        tokens[i], scores[i] = sp.IdToPiece(i), sp.GetScore(i)
        types[i] = (
            UNKNOWN
            if sp.IsUnknown(i)
            else CONTROL
            if sp.IsControl(i)
            else UNUSED
            if sp.IsUnused(i)
            else BYTE
            if sp.IsByte(i)
            else NORMAL
        )

    def put(i: Any, text: Any, kind: int, where: str) -> None:
        if not isinstance(i, int) or not isinstance(text, str):
            raise ConversionError(f"{where}: added token {text!r} -> {i!r}: expected a string and an integer id")
        if 0 <= i < n_vocab:  # llama.cpp drops (with a warning) ids beyond the vocab
            tokens[i], scores[i], types[i] = text, -1000.0, kind

    added_file = model_dir / "added_tokens.json"
    if added_file.is_file():
        for text, i in _read_json(added_file, "JSON object of added tokens").items():
            put(i, text, USER_DEFINED, str(added_file))
    cfg = _tokenizer_config(model_dir)
    for key, data in _added_tokens_decoder(cfg, model_dir).items():
        text = data.get("content")
        is_control = bool(data.get("special")) or (isinstance(text, str) and _looks_special(text))
        if isinstance(text, str) and not is_control:
            text = text.replace(_SPM_SPACE, " ")  # llama.cpp pre-normalizes user-defined spaces
        put(int(key), text, CONTROL if is_control else USER_DEFINED, str(model_dir / "tokenizer_config.json"))

    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    special = _special_vocab(model_dir, n_vocab, load_merges=False)
    if isinstance(cfg.get("add_prefix_space"), bool):
        w.add_add_space_prefix(cfg["add_prefix_space"])
    return _finish(w, model_dir, special, n_vocab, None)


# --- tiktoken ranks (Hunyuan-MoE) -------------------------------------------------------------------------------
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (the alphabet of byte-level BPE vocabularies)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


_BYTE_CHARS = _byte_to_unicode()


def _byte_level(b: bytes) -> str:
    return "".join(_BYTE_CHARS[x] for x in b)


def _read_tiktoken(path: Path) -> dict[bytes, int]:
    """A tiktoken ranks file: one `base64(token) rank` per line."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected two fields")
            ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
        except (ValueError, binascii.Error) as e:
            raise ConversionError(f"{path}: line {n}: not 'base64-token rank' ({e})") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ConversionError(f"{path}: ranks must be 0..{len(ranks) - 1}, each once")
    return ranks


def _merge_parts(ranks: dict[bytes, int], token: bytes, rank: int) -> list[bytes]:
    """The two parts a token is merged from: byte-level BPE of `token` using only merges ranked below it."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best = min(range(len(parts) - 1), key=lambda k: ranks.get(parts[k] + parts[k + 1], rank))
        if ranks.get(parts[best] + parts[best + 1], rank) >= rank:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def _rebuild_merges(ranks: dict[bytes, int]) -> list[str]:
    """Byte-level merges ("left right") of a ranks table, in rank order (llama.cpp's QwenModel.bpe way)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1 and len(parts := _merge_parts(ranks, token, rank)) == 2:
            merges.append(f"{_byte_level(parts[0])} {_byte_level(parts[1])}")
    return merges


def _tiktoken_file(model_dir: Path, cfg: dict[str, Any]) -> Path:
    name = cfg.get("vocab_file")
    if isinstance(name, str) and (model_dir / name).is_file() and "/" not in name:
        return model_dir / name
    found = sorted(model_dir.glob("*.tiktoken")) + [p for p in (model_dir / "tiktoken.model",) if p.is_file()]
    if len(found) != 1:
        raise ConversionError(
            f"{model_dir}: no tokenizer.json and {len(found)} *.tiktoken / tiktoken.model ranks files (expected one: "
            "Hunyuan's hy.tiktoken, Kimi's tiktoken.model)"
        )
    return found[0]


def _write_tiktoken(w: gguf.GGUFWriter, model_dir: Path, n_vocab: int, family_pre: str) -> dict[str, Any]:
    """llama.cpp's HunYuanMoEModel.set_vocab and its Kimi (`kimi-k2`) set_vocab: tokens are the ranks (byte-level
    text), merges rebuilt from the ranks, the special tokens after them CONTROL: Hunyuan's named defaults and
    `<|extra_N|>`, Kimi's `<|reserved_token_ID|>` (its tokenization_kimi.py's names), each overridden by the
    tokenizer_config.json's added_tokens_decoder; BOS `<|bos|>` (Hunyuan) or the tokenizer_config's BOS / EOS texts
    (Kimi: llama.cpp takes the remote-code tokenizer's, which reads them there). A checkpoint with a tokenizer.json
    uses it instead."""
    if (model_dir / "tokenizer.json").is_file():
        return _write_tokenizer_json(w, model_dir, n_vocab, family_pre)
    cfg = _tokenizer_config(model_dir)
    path = _tiktoken_file(model_dir, cfg)
    ranks = _read_tiktoken(path)
    if len(ranks) > n_vocab:
        raise ConversionError(f"{path}: {len(ranks)} ranks, more than vocab_size {n_vocab} of config.json")
    if family_pre == "kimi-k2":
        special_ids = {f"<|reserved_token_{i}|>": i for i in range(len(ranks), n_vocab)}
    else:
        free = n_vocab - len(ranks)
        specials = list(HUNYUAN_SPECIALS) + [f"<|extra_{k}|>" for k in range(free - len(HUNYUAN_SPECIALS))]
        special_ids = {t: len(ranks) + k for k, t in enumerate(specials[:free])}
    for key, data in _added_tokens_decoder(cfg, model_dir).items():  # explicit ids win over the defaults
        if isinstance(data.get("content"), str):
            special_ids = {t: i for t, i in special_ids.items() if i != int(key)}  # the id's default name goes
            special_ids[data["content"]] = int(key)
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    for token, rank in ranks.items():
        tokens[rank], types[rank] = _byte_level(token), NORMAL
    for text, i in special_ids.items():
        if 0 <= i < n_vocab:
            tokens[i], types[i] = text, CONTROL
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(family_pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(_rebuild_merges(ranks))
    special = _special_vocab(model_dir, n_vocab, load_merges=False)
    if family_pre == "kimi-k2":
        texts = {t: _special_text(cfg.get(f"{t}_token")) for t in ("bos", "eos", "pad", "unk")}
        _set_specials_by_text(special, {t: x for t, x in texts.items() if x}, special_ids, override=True)
    else:
        _set_specials_by_text(special, {"bos": HUNYUAN_BOS}, special_ids, override=True)
    return _finish(w, model_dir, special, n_vocab, None)


def _special_text(v: Any) -> str | None:
    """A tokenizer_config.json special token: its text, or the `content` of its AddedToken object."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


_WRITERS: dict[str, Callable[[gguf.GGUFWriter, Path, int, str], dict[str, Any]]] = {
    "gemma4": _write_gemma4,
    "llama-spm": _write_sentencepiece,
    "hunyuan": _write_tiktoken,
    "kimi-k2": _write_tiktoken,
}
