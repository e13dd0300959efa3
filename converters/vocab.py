"""Tokenizer keys: the `tokenizer.ggml.*` keys llama.cpp needs, plus moelite's verbatim copy of the HF
tokenizer (`tokenizer.huggingface.json`) and the chat template.

Reads tokenizer.json with plain JSON (no transformers). Special token ids, add_bos/add_eos, merges and
the chat template come from gguf-py's SpecialVocab, the same code llama.cpp's converter uses.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import gguf

from moelite.errors import ConversionError

NORMAL, USER_DEFINED, CONTROL, UNUSED = (int(gguf.TokenType.NORMAL), int(gguf.TokenType.USER_DEFINED),
                                         int(gguf.TokenType.CONTROL), int(gguf.TokenType.UNUSED))


def _looks_special(tok: str) -> bool:
    return (tok.startswith("<|") and tok.endswith("|>")) or (tok.startswith("<｜") and tok.endswith("｜>"))


def _pre(tj: dict[str, Any], family_pre: str) -> str:
    """llama.cpp pre-tokenizer name. A plain GPT-2 ByteLevel pre-tokenizer (the test fixtures) is "gpt-2";
    otherwise the family's real-checkpoint value (llama.cpp detects it by hashing; we trust the family)."""
    pt = tj.get("pre_tokenizer") or {}
    if pt.get("type") == "ByteLevel" and pt.get("use_regex", True):
        return "gpt-2"
    return family_pre


def add_vocab(w: gguf.GGUFWriter, model_dir: Path, n_vocab: int, family_pre: str) -> dict[str, Any]:
    """Add tokenizer keys to `w`; returns a small summary for the report."""
    tpath = model_dir / "tokenizer.json"
    if not tpath.is_file():
        raise ConversionError(f"{model_dir}: no tokenizer.json (moelite needs the fast tokenizer file)")
    text = tpath.read_text(encoding="utf-8")
    try:
        tj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{tpath}: invalid JSON: {e}") from e
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ConversionError(f"{tpath}: tokenizer model {model.get('type')!r}; moelite converts BPE tokenizers")
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {a["content"]: a for a in tj.get("added_tokens") or []}
    for a in added.values():
        vocab[a["content"]] = a["id"]
    if vocab and max(vocab.values()) >= n_vocab:
        raise ConversionError(f"{tpath}: token id {max(vocab.values())} >= vocab_size {n_vocab} of config.json")
    rev = {i: t for t, i in vocab.items()}
    spm = bool(model.get("byte_fallback"))  # SentencePiece-style BPE (Mixtral, Phi): llama.cpp model "llama"
    tokens, types, scores = [], [], []
    for i in range(n_vocab):
        t = rev.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif t in added:
            tokens.append(t)
            types.append(CONTROL if added[t].get("special") or _looks_special(t) else USER_DEFINED)
        elif spm and t.startswith("<0x") and t.endswith(">") and len(t) == 6:
            tokens.append(t)
            types.append(int(gguf.TokenType.BYTE))
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
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)
    special = gguf.SpecialVocab(model_dir, load_merges=not spm, n_vocab=n_vocab)
    special.add_to_gguf(w, quiet=True)
    if special.chat_template is None:
        cfg = model_dir / "tokenizer_config.json"
        if cfg.is_file() and json.loads(cfg.read_text()).get("chat_template"):
            w.add_chat_template(json.loads(cfg.read_text())["chat_template"])
    w.add_string("tokenizer.huggingface.json", text)
    return {"n_vocab": n_vocab, "special": dict(special.special_token_ids),
            "chat_template": special.chat_template is not None}
