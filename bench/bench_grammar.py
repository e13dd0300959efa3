"""Grammar-constrained sampling libraries compared on CPU with this project's tokenizers (issue 32).

    python bench/bench_grammar.py                     # all vocab files found, all libraries, bench/GRAMMAR.md

For each tokenizer (llama.cpp's vocab-only GGUFs, read by moelite's own Tokenizer) and each library (llguidance,
xgrammar, outlines-core), every schema of SCHEMAS is compiled, then the schema's valid instance (compact JSON,
tokenized by moelite's tokenizer as a model would emit it) is walked token by token: at each step the library
computes the allowed-token mask over the whole vocabulary (timed: the cost added to every generated token), then
the instance's token is checked against the mask and consumed. Reported per library and tokenizer: schemas
compiled (coverage), instances fully accepted, compile time, and the mask cost per token (median and p95 over all
steps of all schemas). Every library gets the same bytes per token id: llguidance's, which reads the tokenizer.json
that moelite's Tokenizer holds; xgrammar and outlines-core get that table as a raw vocabulary.

Writes bench/out/grammar.json and the table block of bench/GRAMMAR.md. The machine is shared (2 cores): ratios
between libraries within one run are what counts, not the absolute times.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
REPORT = ROOT / "bench" / "GRAMMAR.md"
BEGIN, END = "<!-- grammar: begin (bench/bench_grammar.py) -->", "<!-- grammar: end -->"
VOCABS = ("qwen35", "llama-bpe", "gemma-4", "llama-spm")

# (name, schema, a valid instance): the features response_format json_schema users send
SCHEMAS: list[tuple[str, dict, object]] = [
    (
        "flat object",
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "ok": {"type": "boolean"}},
            "required": ["name", "age", "ok"],
            "additionalProperties": False,
        },
        {"name": "Ada Lovelace", "age": 36, "ok": True},
    ),
    (
        "enum + const",
        {
            "type": "object",
            "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}, "v": {"const": 2}},
            "required": ["unit", "v"],
        },
        {"unit": "fahrenheit", "v": 2},
    ),
    (
        "nested arrays",
        {
            "type": "object",
            "properties": {
                "rows": {
                    "type": "array",
                    "items": {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 4},
                }
            },
            "required": ["rows"],
        },
        {"rows": [[1.5, -2], [3e-3], [0, 1, 2, 3]]},
    ),
    (
        "string bounds + pattern",
        {
            "type": "object",
            "properties": {
                "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                "note": {"type": "string", "minLength": 2, "maxLength": 24},
            },
            "required": ["code", "note"],
        },
        {"code": "ABC-1234", "note": "tested on the bench"},
    ),
    (
        "number bounds",
        {
            "type": "object",
            "properties": {
                "p": {"type": "number", "minimum": 0, "maximum": 1},
                "n": {"type": "integer", "minimum": -5, "maximum": 500},
            },
            "required": ["p", "n"],
        },
        {"p": 0.25, "n": 317},
    ),
    (
        "anyOf / nullable",
        {
            "type": "object",
            "properties": {"x": {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]}},
            "required": ["x"],
        },
        {"x": None},
    ),
    (
        "$defs / $ref",
        {
            "$defs": {
                "point": {
                    "type": "object",
                    "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                    "required": ["x", "y"],
                }
            },
            "type": "object",
            "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
            "required": ["a", "b"],
        },
        {"a": {"x": 1, "y": 2}, "b": {"x": -3.5, "y": 0}},
    ),
    (
        "recursive tree",
        {
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {
                        "label": {"type": "string"},
                        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                    },
                    "required": ["label", "children"],
                }
            },
            "$ref": "#/$defs/node",
        },
        {"label": "root", "children": [{"label": "leaf", "children": []}]},
    ),
    (
        "format date-time / email",
        {
            "type": "object",
            "properties": {
                "when": {"type": "string", "format": "date-time"},
                "who": {"type": "string", "format": "email"},
            },
            "required": ["when", "who"],
        },
        {"when": "2026-12-07T05:00:00Z", "who": "ada@example.org"},
    ),
    (
        "optional properties",
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "string"}, "c": {"type": "boolean"}},
            "required": ["a"],
            "additionalProperties": False,
        },
        {"a": 1, "c": False},
    ),
    (
        "tool arguments (OpenAI strict)",
        {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City and country"},
                "unit": {"type": ["string", "null"], "enum": ["celsius", "fahrenheit", None]},
                "days": {"type": "integer"},
            },
            "required": ["location", "unit", "days"],
            "additionalProperties": False,
        },
        {"location": "Paris, France", "unit": "celsius", "days": 3},
    ),
    ("any JSON object (json_object)", {"type": "object"}, {"k": [1, "two", {"three": None}], "é": "ü"}),
]


def load_tokenizers(names: list[str]):
    """name -> (moelite Tokenizer, vocab size) for llama.cpp's vocab-only GGUFs."""
    import moelite.runtime.tokenizer as mt

    base = _llama_cpp_models()
    out = {}
    for name in names:
        path = base / f"ggml-vocab-{name}.gguf"
        if path.exists():
            tok = mt.Tokenizer.from_gguf(str(path))
            out[name] = tok
    return out


def _llama_cpp_models() -> Path:
    """llama.cpp's vocab-only GGUFs, which the build fetches into third_party/llama.cpp/models."""
    path = ROOT / "third_party" / "llama.cpp" / "models"
    if not path.is_dir():
        sys.exit(f"no {path}: build moelite first (tools/dev_build.sh fetches llama.cpp's vocab files)")
    return path


# --- one adapter per library: compile(schema) -> matcher; matcher: mask(bits) / consume(id) ----------------------
class Llguidance:
    name = "llguidance"

    def __init__(self, tok) -> None:
        import llguidance as llg

        self.llg = llg
        self.lltok = llg.LLTokenizer(tok._hf.to_str(), n_vocab=tok.vocab_size, eos_token=tok.eos_id)
        self.n = self.lltok.vocab_size

    def token_bytes(self) -> list[bytes]:
        return [self.lltok.decode_bytes([i]) for i in range(self.n)]

    def compile(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
        )
        m = self.llg.LLMatcher(self.lltok, grammar, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def allowed(self, m, bits: np.ndarray) -> np.ndarray:
        m.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        return bits

    def consume(self, m, t: int) -> bool:
        return m.consume_token(t) and not m.is_error()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tok, token_bytes: list[bytes]) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo(
            token_bytes, xgr.VocabType.RAW, vocab_size=len(token_bytes), stop_token_ids=[tok.eos_id]
        )
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.n = len(token_bytes)

    def compile(self, schema: dict):
        g = self.compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"), strict_mode=True)
        return self.xgr.GrammarMatcher(g)

    def allowed(self, m, bits: np.ndarray) -> np.ndarray:
        import torch

        t = torch.from_numpy(bits.reshape(1, -1))
        m.fill_next_token_bitmask(t)
        return bits

    def consume(self, m, t: int) -> bool:
        return m.accept_token(t)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok, token_bytes: list[bytes]) -> None:
        import outlines_core as oc

        self.oc = oc
        vocab: dict[bytes, list[int]] = {}
        for i, b in enumerate(token_bytes):
            if i != tok.eos_id and b:
                vocab.setdefault(b, []).append(i)
        self.vocab = oc.Vocabulary(tok.eos_id, vocab)
        self.n = len(token_bytes)

    def compile(self, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), whitespace_pattern="")
        return self.oc.Guide(self.oc.Index(regex, self.vocab))

    def allowed(self, m, bits: np.ndarray) -> np.ndarray:
        m.write_mask_into(bits.ctypes.data, bits.size, bits.itemsize)
        return bits

    def consume(self, m, t: int) -> bool:
        try:
            m.advance(t)
            return True
        except Exception:  # noqa: BLE001 - outlines-core raises ValueError / its own errors on a refused token
            return False


def walk(lib, tok, table: list[bytes], schema: dict, instance: object) -> dict:
    """Compile, then mask + consume the instance's tokens; the per-step mask times."""
    t0 = time.perf_counter()
    try:
        m = lib.compile(schema)
    except Exception as e:  # noqa: BLE001 - a library refusing a schema is a coverage result
        return {"compiled": False, "error": f"{type(e).__name__}: {str(e)[:160]}"}
    compile_s = time.perf_counter() - t0
    ids = tokens_of(tok, json.dumps(instance, separators=(",", ":"), ensure_ascii=False), table)
    bits = np.zeros((lib.n + 31) // 32, dtype=np.int32)
    times, accepted = [], True
    for k, t in enumerate([*ids, tok.eos_id]):
        t1 = time.perf_counter()
        lib.allowed(m, bits)
        times.append(time.perf_counter() - t1)
        if not (bits[t >> 5] >> (t & 31)) & 1 or (k < len(ids) and not lib.consume(m, t)):
            accepted = False  # the last step only asks whether the end (EOS) is allowed
            break
    return {"compiled": True, "compile_s": compile_s, "accepted": accepted, "mask_s": times, "tokens": len(ids)}


def tokens_of(tok, text: str, table: list[bytes]) -> list[int]:
    """The ids a model emits for `text` in the middle of an answer: SentencePiece tokenizers prefix a lone text
    with a space, so the text is encoded after a newline and the ids whose bytes (`table`) spell `text` are kept."""
    want = text.encode()
    ids = tok.encode(text, add_special=False)
    if b"".join(table[i] for i in ids) == want:
        return ids
    ids = tok.encode("\n" + text, add_special=False)
    for k in range(len(ids)):
        if b"".join(table[i] for i in ids[k:]) == want:
            return ids[k:]
    raise ValueError(f"cannot tokenize {text!r} as a continuation")


def run(vocabs: list[str], libs: list[str]) -> dict:
    results: dict = {"machine": platform.processor() or platform.machine(), "vocabs": {}}
    for vname, tok in load_tokenizers(vocabs).items():
        t0 = time.perf_counter()
        ll = Llguidance(tok)
        setup = {"llguidance": time.perf_counter() - t0}
        table = ll.token_bytes()
        adapters = {"llguidance": ll}
        for cls in (Xgrammar, OutlinesCore):
            if cls.name in libs:
                t0 = time.perf_counter()
                adapters[cls.name] = cls(tok, table)
                setup[cls.name] = time.perf_counter() - t0
        per_lib = {}
        for lname, lib in adapters.items():
            if lname not in libs:
                continue
            rows = {}
            for sname, schema, inst in SCHEMAS:
                rows[sname] = walk(lib, tok, table, schema, inst)
                print(f"{vname:10s} {lname:14s} {sname:32s} {_brief(rows[sname])}", flush=True)
            per_lib[lname] = {"setup_s": setup[lname], "schemas": rows}
        results["vocabs"][vname] = {"n_vocab": tok.vocab_size, "libs": per_lib}
    return results


def _brief(r: dict) -> str:
    if not r["compiled"]:
        return "not compiled: " + r["error"]
    med = statistics.median(r["mask_s"]) * 1e6
    return f"compile {r['compile_s'] * 1e3:8.1f} ms  mask median {med:8.1f} us  accepted {r['accepted']}"


def summary(results: dict) -> str:
    lines = [
        "| tokenizer (n_vocab) | library | setup s | schemas compiled | instances accepted | compile ms (median) "
        "| mask us/token (median) | mask us/token (p95) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for vname, v in results["vocabs"].items():
        for lname, lib in v["libs"].items():
            rows = list(lib["schemas"].values())
            ok = [r for r in rows if r["compiled"]]
            masks = sorted(t for r in ok for t in r["mask_s"])
            comp = statistics.median([r["compile_s"] for r in ok]) * 1e3 if ok else float("nan")
            med = statistics.median(masks) * 1e6 if masks else float("nan")
            p95 = masks[int(0.95 * (len(masks) - 1))] * 1e6 if masks else float("nan")
            lines.append(
                f"| {vname} ({v['n_vocab']}) | {lname} | {lib['setup_s']:.1f} | {len(ok)}/{len(rows)} "
                f"| {sum(r['accepted'] for r in ok)}/{len(rows)} | {comp:.1f} | {med:.0f} | {p95:.0f} |"
            )
    failures = [
        f"- {lname} on {vname}, {sname}: "
        + (r["error"] if not r["compiled"] else "the valid instance was refused mid-way")
        for vname, v in results["vocabs"].items()
        for lname, lib in v["libs"].items()
        for sname, r in lib["schemas"].items()
        if not r["compiled"] or not r["accepted"]
    ]
    return "\n".join(lines + ([""] + failures if failures else []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocabs", default=",".join(VOCABS))
    ap.add_argument("--libs", default="llguidance,xgrammar,outlines-core")
    ap.add_argument("--no-report", action="store_true", help="print only; leave bench/GRAMMAR.md alone")
    a = ap.parse_args()
    results = run(a.vocabs.split(","), a.libs.split(","))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "grammar.json").write_text(json.dumps(results, indent=1))
    table = summary(results)
    print(table)
    if not a.no_report and REPORT.exists():
        text = REPORT.read_text()
        head, rest = text.split(BEGIN, 1)
        REPORT.write_text(head + BEGIN + "\n" + table + "\n" + END + rest.split(END, 1)[1])


if __name__ == "__main__":
    main()
