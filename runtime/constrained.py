"""Grammar-constrained sampling: the tokens a grammar allows next, applied to the logits before sampling.

The grammar engine is llguidance (chosen by measurement against xgrammar and outlines-core with this project's
tokenizers: bench/GRAMMAR.md). It compiles a JSON schema or a Lark grammar (which may embed JSON schemas with
`%json{...}` and name special tokens as `<[id]>`) against the model's vocabulary and, at each step, computes the
bitmask of the token ids that keep the output inside the grammar: one bit per id, `(n_vocab + 31) // 32` int32
words. `GrammarConstraint` is the logits processor that `Model.stream_tokens(logits_processor=...)` calls once
per generated token: it consumes the tokens sampled since its last call, computes the mask and returns the logits
with every refused id at -inf. When the grammar is complete only the end-of-text ids stay allowed, so generation
ends there.

llguidance is an optional dependency (the `serve` extra); only this module imports it, and only when a request
asks for a constraint.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from moelite.errors import UsageError

# JSON as models usually write it (json.dumps' separators), no free whitespace: a model cannot pad forever
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_SCHEMA_BYTES = 1 << 18  # a schema's JSON text at most (the request body is 1 MiB at most anyway)

_vocabs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_vocabs_lock = threading.Lock()


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise UsageError(
            "grammar-constrained output (response_format, tool_choice) needs llguidance: pip install 'moelite[serve]'"
        ) from None
    return llguidance


def vocabulary(tokenizer) -> Any:
    """llguidance's view of a moelite Tokenizer (its tokenizer.json, the model's end-of-text ids as EOS); built
    once per tokenizer (about a second for a 150k vocabulary) and cached with it."""
    with _vocabs_lock:
        vocab = _vocabs.get(tokenizer)
        if vocab is None:
            llg = _llguidance()
            # Tokenizer._hf: the HF `tokenizers` object moelite built from the GGUF's vocabulary
            vocab = llg.LLTokenizer(
                tokenizer._hf.to_str(), n_vocab=tokenizer.vocab_size, eos_token=sorted(tokenizer.stop_ids)
            )
            _vocabs[tokenizer] = vocab
    return vocab


# --- grammars (llguidance's serialized form, a string) --------------------------------------------------------
def json_schema_grammar(schema: Any, where: str = "json_schema") -> str:
    """The grammar of the JSON documents `schema` accepts; a schema llguidance cannot compile is a UsageError
    naming `where`."""
    if not isinstance(schema, Mapping) and not isinstance(schema, bool):
        raise UsageError(f"{where}: expected a JSON schema (an object), got {type(schema).__name__}")
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_BYTES:
        raise UsageError(f"{where}: the schema is {len(text)} bytes; at most {MAX_SCHEMA_BYTES}")
    llg = _llguidance()
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{where}: not a JSON schema: {e}") from None
    return check_grammar(grammar, where)


def lark_grammar(lark: str, where: str = "grammar") -> str:
    """A Lark grammar (llguidance's dialect: `%json{schema}` embeds a schema, `<[id]>` is a token id)."""
    return check_grammar(_llguidance().LLMatcher.grammar_from_lark(lark), where)


def check_grammar(grammar: str, where: str) -> str:
    err = _llguidance().LLMatcher.validate_grammar(grammar)
    if err and not err.startswith("WARNING"):
        raise UsageError(f"{where}: {err.strip()}")
    return grammar


def closed(schema: Any) -> Any:
    """`schema` with every object that lists `properties` but says nothing of `additionalProperties` closed to
    other keys (OpenAI's strict mode; a tool's arguments are its declared parameters). A copy; subschemas under
    properties, items, prefixItems, anyOf / oneOf / allOf, $defs / definitions too."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {k: closed(v) if k in _SUBSCHEMA_LISTS or k == "items" else v for k, v in schema.items()}
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(schema.get(key), Mapping):
            out[key] = {k: closed(v) for k, v in schema[key].items()}
    if isinstance(schema.get("properties"), Mapping) and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")


def schema_rule(schema: Any) -> str:
    """A Lark expression for one JSON value of `schema`, with JSON_OPTIONS' separators."""
    opts = {"x-guidance": JSON_OPTIONS}
    body = dict(schema) if isinstance(schema, Mapping) else ({} if schema is True else {"not": {}})
    return "%json" + json.dumps({**body, **opts})


def literal(tokenizer, text: str) -> str:
    """A Lark expression that matches `text`, its special tokens (`<|call|>`, `[TOOL_CALLS]`, ...) as their ids:
    llguidance never spells a special token out of bytes, so a quoted literal could not produce one."""
    vocab = vocabulary(tokenizer)
    specials = _special_texts(tokenizer, vocab)
    parts, i = [], 0
    while i < len(text):
        hit = next(((s, t) for s, t in specials if text.startswith(s, i)), None)
        if hit is not None:
            parts.append(f"<[{hit[1]}]>")
            i += len(hit[0])
            continue
        j = i + 1
        while j < len(text) and not any(text.startswith(s, j) for s, _ in specials):
            j += 1
        parts.append(json.dumps(text[i:j]))
        i = j
    return " ".join(parts) if parts else '""'


_specials_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _special_texts(tokenizer, vocab) -> list[tuple[str, int]]:
    """(text, id) of the tokens llguidance treats as special, longest first."""
    found = _specials_cache.get(tokenizer)
    if found is None:
        found = []
        for tid in range(vocab.vocab_size):
            if vocab.is_special_token(tid):
                text = tokenizer.token_text(tid)
                if text:
                    found.append((text, tid))
        found.sort(key=lambda p: -len(p[0]))
        _specials_cache[tokenizer] = found
    return found


# --- the logits processor ---------------------------------------------------------------------------------------
class GrammarConstraint:
    """Logits processor of one generation: `processor(generated_ids, logits) -> masked logits`."""

    def __init__(self, tokenizer, grammar: str, n_vocab: int, where: str = "grammar") -> None:
        llg = _llguidance()
        self.vocab = vocabulary(tokenizer)
        self.matcher = llg.LLMatcher(self.vocab, grammar, log_level=0)
        if self.matcher.is_error():
            raise UsageError(f"{where}: {self.matcher.get_error()}")
        self.n_vocab = n_vocab
        self.bits = np.zeros((self.vocab.vocab_size + 31) // 32, dtype=np.int32)  # [ceil(n_tok / 32)] bitmask
        self.n_seen = 0  # generated tokens already consumed by the matcher

    def __call__(self, generated: Sequence[int], logits: np.ndarray) -> np.ndarray:
        for tok in generated[self.n_seen :]:
            if not self.matcher.consume_token(int(tok)):
                raise UsageError(f"the constrained output took token {tok}, which its grammar refuses")
        self.n_seen = len(generated)
        self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        if self.matcher.is_error():
            raise UsageError(f"constrained output: {self.matcher.get_error()}")
        allowed = np.unpackbits(self.bits.view(np.uint8), bitorder="little")[: self.n_vocab].astype(bool)
        if allowed.size < self.n_vocab:  # ids past the tokenizer (padded output rows) are never allowed
            allowed = np.concatenate([allowed, np.zeros(self.n_vocab - allowed.size, dtype=bool)])
        return np.where(allowed, logits, -np.inf).astype(np.float32, copy=False)

    @property
    def accepting(self) -> bool:
        """The output so far is a complete sentence of the grammar."""
        return self.matcher.is_accepting()


__all__ = [
    "GrammarConstraint",
    "closed",
    "JSON_OPTIONS",
    "check_grammar",
    "json_schema_grammar",
    "lark_grammar",
    "literal",
    "schema_rule",
    "vocabulary",
]
