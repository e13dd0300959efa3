"""Tool calls as each model family writes them: the format a chat template defines, detected from its source,
parsed back into OpenAI `tool_calls`, and the grammar that makes a required call always parse.

Formats (as the families' own templates render an assistant's calls; llama.cpp's common/chat.cpp lists the same):

| format | families | a call |
| --- | --- | --- |
| `hermes` | Qwen3, Qwen3-Next, Qwen2.5, Hermes | `<tool_call>\\n{"name": N, "arguments": {...}}\\n</tool_call>` |
| `qwen3_coder` | Qwen3.5, Qwen3-Coder, Nemotron 3 | `<tool_call>\\n<function=N>\\n<parameter=K>\\nV\\n</parameter>\\n</function>\\n</tool_call>` |
| `glm4` | GLM-4.5 / 4.6 / 4.7 | `<tool_call>N\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>\\n</tool_call>` |
| `harmony` | gpt-oss | `<\\|channel\\|>commentary to=functions.N <\\|constrain\\|>json<\\|message\\|>{...}<\\|call\\|>` |
| `deepseek_v3` | DeepSeek-V3 / R1 | `<｜tool▁call▁begin｜>function<｜tool▁sep｜>N\\n```json\\n{...}\\n```<｜tool▁call▁end｜>` |
| `deepseek_v3_1` | DeepSeek-V3.1 | `<｜tool▁call▁begin｜>N<｜tool▁sep｜>{...}<｜tool▁call▁end｜>` |
| `mistral` | Mistral Small 3.2, Ministral 3, Mistral 4, Devstral | `[TOOL_CALLS]N[ARGS]{...}` (`[CALL_ID]id` optional) |
| `mistral_json` | Mistral Nemo | `[TOOL_CALLS][{"name": N, "arguments": {...}, "id": ...}]` |
| `gemma4` | Gemma-4 | `<\\|tool_call>call:N{k:<\\|"\\|>text<\\|"\\|>,n:5}<tool_call\\|>` |
| `minimax_m2` | MiniMax-M2 | `<minimax:tool_call>\\n<invoke name="N">\\n<parameter name="K">V</parameter>\\n</invoke>\\n</minimax:tool_call>` |
| `llama3_json` | Llama 3.1 / 3.2 / 3.3 | `{"name": N, "parameters": {...}}` (the whole answer) |
| `deepseek_v3_2` | DeepSeek-V3.2 (DSML) | `<｜DSML｜function_calls>\n<｜DSML｜invoke name="N">\n<｜DSML｜parameter name="K" string="true">V</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜function_calls>` |
| `kimi_k2` | Kimi-K2, Kimi-Linear | `<\\|tool_calls_section_begin\\|><\\|tool_call_begin\\|>functions.N:0<\\|tool_call_argument_begin\\|>{...}<\\|tool_call_end\\|><\\|tool_calls_section_end\\|>` |
| `cohere` | Command-A, North (cohere2moe) | `<\\|START_ACTION\\|>[{"tool_call_id": "0", "tool_name": N, "parameters": {...}}]<\\|END_ACTION\\|>` |
| `hy3` | Hy3 (hy_v3) | `<tool_calls:opensource>\n<tool_call:opensource>N<tool_sep:opensource>\n<arg_key:opensource>K</arg_key:opensource>\n<arg_value:opensource>V</arg_value:opensource>\n</tool_call:opensource>\n</tool_calls:opensource>` |
| `lfm2` | LFM2 / LFM2.5 (pythonic) | `<\\|tool_call_start\\|>[N(k='text', n=5), M()]<\\|tool_call_end\\|>` |

Laguna writes `glm4`, Step-3.5 `qwen3_coder`, Granite-4.0 `hermes`.

V is raw text where the parameter is a string, JSON otherwise (the templates render it so; DSML says which in
its `string` attribute; LFM2's values are Python literals). `detect(source)`
names a template's format (None: the template renders no tool calls). `parse(format, text, tools)` splits a
model's answer into content and calls; `StreamParser` does it piece by piece for streamed answers (content
deltas until a call begins, then each call once it is complete). `call_grammar` is the Lark grammar (llguidance's
dialect, runtime/constrained.py) of one or more calls of the allowed tools: with `tool_choice` `required` or a
named function the output is constrained to it, so it always parses. `auto_grammar` is the grammar of a
`tool_choice: auto` answer: free text until the format's call-start marker, then a call held to the same rules.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from moelite.errors import UsageError

# --- registry ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolFormat:
    """One family's tool-call syntax. `starts`: texts that open a call (what a streamed answer is held back at);
    `detect(template source)`; `parse(text, final) -> (content, calls)`, calls as (name, arguments dict), only
    complete ones unless `final`; `grammar(lit, tool)`: the Lark rule body of one call of `tool`."""

    name: str
    starts: tuple[str, ...]
    detect: Callable[[str], bool]
    parse: Callable[[str, bool, Mapping[str, dict]], tuple[str, list[tuple[str, dict]]]]
    grammar: Callable[[Callable[[str], str], dict], str]
    separator: str = ""  # between two calls in the grammar
    wrap: tuple[str, str] = ("", "")  # around all the calls of an answer in the grammar
    owns_text: bool = False  # content is always what parse() says (harmony's final channel), even without calls
    id_chars: int = 0  # ids of this length of [a-zA-Z0-9] (Mistral's templates insist on 9), else call_<24 hex>
    lazy: bool = True  # tool_choice auto constrains a call from starts[0] on (auto_grammar); False: no marker fits
    # the calls as the model writes them, for a template that renders no `tool_calls` (LFM2-8B-A1B's: the assistant
    # turn is its content only), so that a call stays in the history
    inline: Callable[[Sequence[tuple[str, dict]]], str] | None = None


FORMATS: dict[str, ToolFormat] = {}


def register(fmt: ToolFormat) -> ToolFormat:
    FORMATS[fmt.name] = fmt
    return fmt


def detect(template_source: str | None) -> ToolFormat | None:
    """The tool-call format a chat template renders (the first format whose markers it holds), or None."""
    if not template_source:
        return None
    for fmt in FORMATS.values():  # registration order: the specific formats before the generic ones
        if fmt.detect(template_source):
            return fmt
    return None


# --- shared helpers ---------------------------------------------------------------------------------------------
def _params(tools: Mapping[str, dict], name: str) -> dict:
    """The JSON schema of a tool's parameters ({} when unknown)."""
    p = tools.get(name, {}).get("parameters")
    return p if isinstance(p, Mapping) else {}


def _is_string(schema: Any) -> bool:
    t = schema.get("type") if isinstance(schema, Mapping) else None
    return t == "string" or (isinstance(t, list) and t and all(x in ("string", "null") for x in t) and "string" in t)


def _typed_value(raw: str, schema: Any) -> Any:
    """A parameter written as text (XML-ish formats): a string where the schema says so, else JSON if it parses."""
    if _is_string(schema):
        return raw
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return raw


def _json_at(text: str, i: int) -> tuple[Any, int] | None:
    """The JSON value starting at text[i] (after whitespace) and where it ends, or None when incomplete/invalid."""
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    try:
        return json.JSONDecoder().raw_decode(text, i)
    except (ValueError, RecursionError):  # a model's answer may nest deeper than Python recurses
        return None


def _arguments(v: Any) -> dict:
    """A call's arguments as a dict (a JSON string of an object decoded; anything else wrapped)."""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except (ValueError, RecursionError):
            return {"value": v}
    return v if isinstance(v, dict) else ({} if v is None else {"value": v})


def _blocks(
    text: str, begin: str, end: str, final: bool, body: Callable[[str], tuple[str, dict] | None]
) -> tuple[str, list[tuple[str, dict]]]:
    """Calls written as begin...end blocks: content = the text outside them (before the first block); an unclosed
    last block counts only when `final` (generation stopped at an end-of-turn token instead of `end`)."""
    first = text.find(begin)
    if first < 0:
        return text, []
    calls, i = [], first
    while True:
        j = text.find(begin, i)
        if j < 0:
            break
        k = text.find(end, j + len(begin))
        if k < 0:
            if final:
                got = body(text[j + len(begin) :])
                if got is not None:
                    calls.append(got)
            break
        got = body(text[j + len(begin) : k])
        if got is not None:
            calls.append(got)
        i = k + len(end)
    return text[:first], calls


MAX_RAW_CHARS = 512  # a constrained raw-text parameter value at most (its schema's maxLength if smaller)


def _string_rule(schema: Mapping, exclude: str = "<") -> str:
    """Lark: a raw-text parameter value of the schema's minLength..maxLength characters (at most MAX_RAW_CHARS),
    without '<' (it cannot run into the closing tag) nor the other `exclude` characters (a newline where the tag
    after the value starts with one: the lexer's longest match would take it into the value)."""
    lo, hi = schema.get("minLength", 0), schema.get("maxLength", MAX_RAW_CHARS)
    lo = lo if isinstance(lo, int) and 0 <= lo <= MAX_RAW_CHARS else 0
    hi = hi if isinstance(hi, int) and lo <= hi <= MAX_RAW_CHARS else MAX_RAW_CHARS
    chars = "".join({"\n": "\\n", "\r": "\\r", "\x00": "\\x00"}.get(c, re.escape(c)) for c in exclude)
    return f"/[^{chars}]{{{lo},{hi}}}/"


def _value_rule(schema: Any, lit: Callable[[str], str], quote: str | None = None, exclude: str = "<") -> str:
    from .constrained import schema_rule

    if not _is_string(schema):
        return schema_rule(schema)
    text = _string_rule(schema, exclude)
    return f"{lit(quote)} {text} {lit(quote)}" if quote else text


def _required(params: dict) -> list[tuple[str, Any]]:
    """(name, schema) of the parameters a constrained call writes: the required ones, in the schema's order."""
    props = params.get("properties") if isinstance(params.get("properties"), Mapping) else {}
    req = params.get("required") if isinstance(params.get("required"), list) else []
    return [(k, props.get(k, {})) for k in props if k in req] + [(k, {}) for k in req if k not in props]


# --- hermes: <tool_call>{json}</tool_call> ------------------------------------------------------------------------
def _hermes_body(s: str) -> tuple[str, dict] | None:
    got = _json_at(s, 0)
    if got is None or not isinstance(got[0], dict) or not isinstance(got[0].get("name"), str):
        return None
    obj = got[0]
    return obj["name"], _arguments(obj.get("arguments", obj.get("parameters")))


def _hermes_grammar(lit: Callable[[str], str], tool: dict) -> str:
    from .constrained import schema_rule

    schema = {
        "type": "object",
        "properties": {"name": {"const": tool["name"]}, "arguments": tool.get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    return f"{lit('<tool_call>' + chr(10))} {schema_rule(schema)} {lit(chr(10) + '</tool_call>')}"


# --- qwen3_coder: <tool_call><function=N><parameter=K>V</parameter></function></tool_call> -------------------------
_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.S)


def _qwen3_coder_parse(text: str, final: bool, tools: Mapping[str, dict]) -> tuple[str, list[tuple[str, dict]]]:
    def body(s: str) -> tuple[str, dict] | None:
        m = _FUNCTION.search(s)
        if m is None:
            return None
        name = m.group(1).strip()
        props = _params(tools, name).get("properties") or {}
        args = {k.strip(): _typed_value(v, props.get(k.strip(), {})) for k, v in _PARAMETER.findall(m.group(2))}
        return name, args

    return _blocks(text, "<tool_call>", "</tool_call>", final, body)


def _qwen3_coder_grammar(lit: Callable[[str], str], tool: dict) -> str:
    parts = [lit(f"<tool_call>\n<function={tool['name']}>\n")]
    for k, schema in _required(tool.get("parameters") or {}):
        parts += [lit(f"<parameter={k}>\n"), _value_rule(schema, lit, exclude="<\n"), lit("\n</parameter>\n")]
    parts.append(lit("</function>\n</tool_call>"))
    return " ".join(parts)


# --- glm4: <tool_call>N<arg_key>K</arg_key><arg_value>V</arg_value></tool_call> -----------------------------------
_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


def _glm4_parse(text: str, final: bool, tools: Mapping[str, dict]) -> tuple[str, list[tuple[str, dict]]]:
    def body(s: str) -> tuple[str, dict] | None:
        name = s.split("<arg_key>", 1)[0].strip()
        if not name:
            return None
        props = _params(tools, name).get("properties") or {}
        return name, {k.strip(): _typed_value(v, props.get(k.strip(), {})) for k, v in _ARG.findall(s)}

    content, calls = _blocks(text, "<tool_call>", "</tool_call>", final, body)
    return content.rstrip("\n"), calls


def _glm4_grammar(lit: Callable[[str], str], tool: dict) -> str:
    nl = '"\\n"?'  # GLM-4.5 / 4.6 put a newline after the name and each tag pair, GLM-4.7 none
    parts = [lit(f"<tool_call>{tool['name']}"), nl]
    for k, schema in _required(tool.get("parameters") or {}):
        parts += [lit(f"<arg_key>{k}</arg_key>"), nl, lit("<arg_value>"), _value_rule(schema, lit), lit("</arg_value>")]
        parts.append(nl)
    parts.append(lit("</tool_call>"))
    return " ".join(parts)


# --- harmony (gpt-oss): channels; calls go to the commentary channel addressed to=functions.N ---------------------
_HARMONY_MSG = re.compile(
    r"(?:<\|start\|>assistant)?(?P<head>(?:(?!<\|message\|>).)*)<\|message\|>(?P<body>.*?)(?:<\|end\|>|<\|call\|>|<\|return\|>|$)",
    re.S,
)


def _harmony_parse(text: str, final: bool, tools: Mapping[str, dict]) -> tuple[str, list[tuple[str, dict]]]:
    if "<|message|>" not in text:  # no channel markup (yet): plain text, known to be so only at the end
        return (text if final and "<|channel|>" not in text else ""), []
    content, calls = [], []
    for m in _HARMONY_MSG.finditer(text):
        head, body = m.group("head"), m.group("body")
        closed = m.group(0).endswith(("<|end|>", "<|call|>", "<|return|>"))
        target = re.search(r"to=functions\.([^\s<]+)", head)
        if target is not None:
            if not (closed or final):
                break
            got = _json_at(body, 0)
            if got is not None:
                calls.append((target.group(1), _arguments(got[0])))
        elif "<|channel|>final" in head:
            content.append(body)
    return "".join(content), calls


def _harmony_grammar(lit: Callable[[str], str], tool: dict) -> str:
    from .constrained import schema_rule

    head = lit(f"<|channel|>commentary to=functions.{tool['name']} <|constrain|>json<|message|>")
    return f"{head} {schema_rule(tool.get('parameters') or {'type': 'object'})} {lit('<|call|>')}"


# --- DeepSeek V3 / R1 and V3.1 -------------------------------------------------------------------------------------
_DS_BEGIN, _DS_SEP, _DS_END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"
_DS_CALLS, _DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"


def _deepseek_parse(text: str, final: bool, tools: Mapping[str, dict]) -> tuple[str, list[tuple[str, dict]]]:
    def body(s: str) -> tuple[str, dict] | None:
        if _DS_SEP not in s:
            return None
        left, right = s.split(_DS_SEP, 1)
        if left.strip() == "function" and "\n" in right:  # V3 / R1: function<sep>NAME\n```json\n{...}\n```
            name, rest = right.split("\n", 1)
            rest = rest.strip().removeprefix("```json").removesuffix("```")
        else:  # V3.1: NAME<sep>{...}
            name, rest = left, right
        got = _json_at(rest, 0)
        return (name.strip(), _arguments(got[0])) if got is not None and name.strip() else None

    _, calls = _blocks(text, _DS_BEGIN, _DS_END, final, body)
    cut = min((i for i in (text.find(_DS_CALLS), text.find(_DS_BEGIN)) if i >= 0), default=len(text))
    return text[:cut], calls


def _deepseek_v3_grammar(lit: Callable[[str], str], tool: dict) -> str:
    from .constrained import schema_rule

    head = lit(f"{_DS_BEGIN}function{_DS_SEP}{tool['name']}\n```json\n")
    return f"{head} {schema_rule(tool.get('parameters') or {'type': 'object'})} {lit(chr(10) + '```' + _DS_END)}"


def _deepseek_v3_1_grammar(lit: Callable[[str], str], tool: dict) -> str:
    from .constrained import schema_rule

    head = lit(f"{_DS_BEGIN}{tool['name']}{_DS_SEP}")
    return f"{head} {schema_rule(tool.get('parameters') or {'type': 'object'})} {lit(_DS_END)}"


# --- Mistral: [TOOL_CALLS]N[ARGS]{...} and Nemo's [TOOL_CALLS][{...}] ----------------------------------------------
def _mistral_parse(text: str, final: bool, tools: Mapping[str, dict]) -> tuple[str, list[tuple[str, dict]]]:
    first = text.find("[TOOL_CALLS]")
    if first < 0:
        return text, []
    calls = []
    for chunk in text[first:].split("[TOOL_CALLS]")[1:]:
        if chunk.lstrip().startswith("["):  # Nemo: a JSON list of {"name", "arguments"}
            got = _json_at(chunk, 0)
            if got is None or not isinstance(got[0], list):
                break
            calls += [
                (c["name"], _arguments(c.get("arguments")))
                for c in got[0]
                if isinstance(c, dict) and isinstance(c.get("name"), str)
            ]
            continue
        if "[ARGS]" not in chunk:
            break
        name, args = chunk.split("[ARGS]", 1)
        got = _json_at(args, 0)
        if got is None:
            break
        calls.append((name.split("[CALL_ID]", 1)[0].strip(), _arguments(got[0])))
    return text[:first], calls


def _mistral_grammar(lit: Callable[[str], str], tool: dict) -> str:
    from .constrained import schema_rule

    call_id = f"({lit('[CALL_ID]')} /[a-zA-Z0-9]{{9}}/)?"  # Mistral Small 3.2's templates write one, others not
    args = schema_rule(tool.get("parameters") or {"type": "object"})
    return f"{lit('[TOOL_CALLS]' + tool['name'])} {call_id} {lit('[ARGS]')} {args}"


def _mistral_json_grammar(lit: Callable[[str], str], tool: dict) -> str:
    from .constrained import schema_rule

    call = {
        "type": "object",
        "properties": {
            "name": {"const": tool["name"]},
            "arguments": tool.get("parameters") or {"type": "object"},
            "id": {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"},  # Nemo's template writes the call's id
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    schema = {"type": "array", "items": call, "minItems": 1, "maxItems": 1}
    return f"{lit('[TOOL_CALLS]')} {schema_rule(schema)}"


# --- Gemma-4: <|tool_call>call:N{key:value,...}<tool_call|>, strings between <|"|> ------------------------------
_GEMMA_Q = '<|"|>'
_GEMMA_TOKEN = re.compile(
    r'\s*(?:(?P<q><\|"\|>(?P<qs>.*?)<\|"\|>)|(?P<js>"(?:[^"\\]|\\.)*")|(?P<num>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)'
    r"|(?P<word>[A-Za-z_][\w.-]*)|(?P<p>[{}\[\]:,]))",
    re.S,
)


def _gemma_value(text: str) -> Any:
    """Gemma-4's argument syntax -> Python: {k:v}, [..], <|"|>text<|"|> (or JSON "text"), numbers, true/false/None."""
    toks: list[tuple[str, Any]] = []
    i = 0
    while i < len(text):
        m = _GEMMA_TOKEN.match(text, i)
        if m is None:
            if text[i:].strip():
                raise ValueError(f"unexpected {text[i : i + 20]!r}")
            break
        i = m.end()
        if m.group("q") is not None:
            toks.append(("s", m.group("qs")))
        elif m.group("js") is not None:
            toks.append(("s", json.loads(m.group("js"))))
        elif m.group("num") is not None:
            toks.append(("v", json.loads(m.group("num"))))
        elif m.group("word") is not None:
            w = m.group("word")
            toks.append(
                ("v", {"true": True, "false": False, "None": None, "null": None}[w])
                if w in ("true", "false", "None", "null")
                else ("w", w)
            )
        else:
            toks.append(("p", m.group("p")))
    value, k = _gemma_read(toks, 0)
    if k != len(toks):
        raise ValueError("trailing text")
    return value


def _gemma_read(toks: list[tuple[str, Any]], k: int) -> tuple[Any, int]:
    kind, v = toks[k]
    if kind in ("s", "v", "w"):
        return v, k + 1
    if v == "{":
        out, k = {}, k + 1
        while toks[k] != ("p", "}"):
            key, k = _gemma_read(toks, k)
            if toks[k] != ("p", ":"):
                raise ValueError("expected ':'")
            out[str(key)], k = _gemma_read(toks, k + 1)
            if toks[k] == ("p", ","):
                k += 1
        return out, k + 1
    if v == "[":
        items, k = [], k + 1
        while toks[k] != ("p", "]"):
            item, k = _gemma_read(toks, k)
            items.append(item)
            if toks[k] == ("p", ","):
                k += 1
        return items, k + 1
    raise ValueError(f"unexpected {v!r}")


def _gemma4_parse(text: str, final: bool, tools: Mapping[str, dict]) -> tuple[str, list[tuple[str, dict]]]:
    def body(s: str) -> tuple[str, dict] | None:
        m = re.match(r"\s*call:([^{\s]+)\s*(\{.*\})\s*$", s, re.S)
        if m is None:
            return None
        try:
            args = _gemma_value(m.group(2))
        except (ValueError, IndexError, KeyError, RecursionError):
            return None
        return m.group(1), args if isinstance(args, dict) else {"value": args}

    return _blocks(text, "<|tool_call>", "<tool_call|>", final, body)


def _gemma4_grammar(lit: Callable[[str], str], tool: dict) -> str:
    parts = [lit(f"<|tool_call>call:{tool['name']}{{")]
    for n, (k, schema) in enumerate(_required(tool.get("parameters") or {})):
        parts += [lit(("," if n else "") + f"{k}:"), _value_rule(schema, lit, quote=_GEMMA_Q)]
    parts.append(lit("}<tool_call|>"))
    return " ".join(parts)


# --- MiniMax-M2: <minimax:tool_call><invoke name="N"><parameter name="K">V</parameter></invoke></minimax:tool_call>
_INVOKE = re.compile(r'<invoke name="([^"]+)">(.*?)(?:</invoke>|$)', re.S)
_MM_PARAM = re.compile(r'<parameter name="([^"]+)">(.*?)</parameter>', re.S)


def _minimax_parse(text: str, final: bool, tools: Mapping[str, dict]) -> tuple[str, list[tuple[str, dict]]]:
    first = text.find("<minimax:tool_call>")
    if first < 0:
        return text, []
    calls = []
    for block in text[first:].split("<minimax:tool_call>")[1:]:
        if "</minimax:tool_call>" not in block and not final:
            break
        for name, inner in _INVOKE.findall(block.split("</minimax:tool_call>", 1)[0]):
            props = _params(tools, name).get("properties") or {}
            calls.append(
                (name, {k: _typed_value(v.strip("\n"), props.get(k, {})) for k, v in _MM_PARAM.findall(inner)})
            )
    return text[:first].rstrip("\n"), calls


def _minimax_grammar(lit: Callable[[str], str], tool: dict) -> str:
    parts = [lit(f'<minimax:tool_call>\n<invoke name="{tool["name"]}">\n')]
    for k, schema in _required(tool.get("parameters") or {}):
        parts += [lit(f'<parameter name="{k}">'), _value_rule(schema, lit), lit("</parameter>\n")]
    parts.append(lit("</invoke>\n</minimax:tool_call>"))
    return " ".join(parts)


# --- Llama 3.x: the whole answer is {"name": N, "parameters": {...}} (after <|python_tag|> in ipython mode) --------
def _llama3_parse(text: str, final: bool, tools: Mapping[str, dict]) -> tuple[str, list[tuple[str, dict]]]:
    head = text.lstrip()
    head = head.removeprefix("<|python_tag|>").lstrip()
    if not head.startswith("{"):
        return text, []
    calls, i = [], len(text) - len(head)
    while i < len(text):
        got = _json_at(text, i)
        if got is None or not isinstance(got[0], dict) or not isinstance(got[0].get("name"), str):
            break
        calls.append((got[0]["name"], _arguments(got[0].get("parameters", got[0].get("arguments")))))
        i = got[1]
        while i < len(text) and text[i] in " \t\r\n;":
            i += 1
    return "", calls


def _llama3_grammar(lit: Callable[[str], str], tool: dict) -> str:
    from .constrained import schema_rule

    schema = {
        "type": "object",
        "properties": {"name": {"const": tool["name"]}, "parameters": tool.get("parameters") or {"type": "object"}},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }
    return schema_rule(schema)


# --- DeepSeek-V3.2 DSML: <｜DSML｜function_calls><｜DSML｜invoke name="N"><｜DSML｜parameter name="K" string="true">V ...
_DSML = "｜DSML｜"
_DSML_CALLS, _DSML_CALLS_END = f"<{_DSML}function_calls>", f"</{_DSML}function_calls>"
_DSML_INVOKE = re.compile(f'<{_DSML}invoke name="([^"]+)">(.*?)(?:</{_DSML}invoke>|$)', re.S)
_DSML_PARAM = re.compile(f'<{_DSML}parameter name="([^"]+)" string="(true|false)">(.*?)</{_DSML}parameter>', re.S)


def _dsml_parse(text: str, final: bool, tools: Mapping[str, dict]) -> tuple[str, list[tuple[str, dict]]]:
    """string="true": the raw text is the value; "false": it is JSON (the model says which, not the schema)."""
    first = text.find(_DSML_CALLS)
    if first < 0:
        return text, []
    body = text[first + len(_DSML_CALLS) :]
    calls = []
    for m in _DSML_INVOKE.finditer(body.split(_DSML_CALLS_END, 1)[0]):
        if not m.group(0).endswith(f"</{_DSML}invoke>"):
            break  # still being written, or cut by max_tokens: an invoke counts once closed
        params = _DSML_PARAM.findall(m.group(2))
        calls.append((m.group(1), {k: (v if is_str == "true" else _typed_value(v, {})) for k, is_str, v in params}))
    return text[:first].rstrip("\n"), calls


def _dsml_grammar(lit: Callable[[str], str], tool: dict) -> str:
    parts = [lit(f'<{_DSML}invoke name="{tool["name"]}">\n')]
    for k, schema in _required(tool.get("parameters") or {}):
        flag = "true" if _is_string(schema) else "false"
        parts += [lit(f'<{_DSML}parameter name="{k}" string="{flag}">'), _value_rule(schema, lit)]
        parts.append(lit(f"</{_DSML}parameter>\n"))
    parts.append(lit(f"</{_DSML}invoke>\n"))
    return " ".join(parts)


# --- Kimi-K2: <|tool_calls_section_begin|><|tool_call_begin|>functions.N:0<|tool_call_argument_begin|>{...}... -----
_KIMI_SECTION, _KIMI_SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
_KIMI_BEGIN, _KIMI_ARGS, _KIMI_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def _kimi_parse(text: str, final: bool, tools: Mapping[str, dict]) -> tuple[str, list[tuple[str, dict]]]:
    def body(s: str) -> tuple[str, dict] | None:
        if _KIMI_ARGS not in s:
            return None
        call_id, args = s.split(_KIMI_ARGS, 1)  # the id is functions.NAME:INDEX
        name = call_id.strip().removeprefix("functions.").rsplit(":", 1)[0]
        got = _json_at(args, 0)
        return (name, _arguments(got[0])) if got is not None and name else None

    _, calls = _blocks(text, _KIMI_BEGIN, _KIMI_END, final, body)
    cut = min((i for i in (text.find(_KIMI_SECTION), text.find(_KIMI_BEGIN)) if i >= 0), default=len(text))
    return text[:cut], calls


def _kimi_grammar(lit: Callable[[str], str], tool: dict) -> str:
    from .constrained import schema_rule

    head = f"{lit(_KIMI_BEGIN + 'functions.' + tool['name'] + ':')} /[0-9]{{1,3}}/ {lit(_KIMI_ARGS)}"
    return f"{head} {schema_rule(tool.get('parameters') or {'type': 'object'})} {lit(_KIMI_END)}"


# --- Cohere (Command-A, North): <|START_ACTION|>[{"tool_call_id": "0", "tool_name": N, "parameters": {...}}]... ----
_CO_ACTION, _CO_ACTION_END = "<|START_ACTION|>", "<|END_ACTION|>"


def _cohere_parse(text: str, final: bool, tools: Mapping[str, dict]) -> tuple[str, list[tuple[str, dict]]]:
    first = text.find(_CO_ACTION)
    if first < 0:
        return text, []
    got = _json_at(text, first + len(_CO_ACTION))
    if got is None or not isinstance(got[0], list):
        return text[:first], []  # a list is handed out whole, once it is complete
    calls = [
        (c["tool_name"], _arguments(c.get("parameters")))
        for c in got[0]
        if isinstance(c, dict) and isinstance(c.get("tool_name"), str)
    ]
    return text[:first], calls


def _cohere_grammar(lit: Callable[[str], str], tool: dict) -> str:
    from .constrained import schema_rule

    head = f"/[ \\n]{{0,8}}/ {lit(chr(123) + chr(34) + 'tool_call_id' + chr(34) + ': ' + chr(34))} /[0-9]{{1,3}}/"
    name = lit(f'", "tool_name": "{tool["name"]}", "parameters": ')
    return f"{head} {name} {schema_rule(tool.get('parameters') or {'type': 'object'})} {lit(chr(125))}"


# --- Hy3: <tool_calls:opensource><tool_call:opensource>N<tool_sep:opensource><arg_key:opensource>K</arg_key:...> --
def _hy(tag: str) -> str:
    return f"<{tag}:opensource>"  # the released template's HYTK suffix on every tool tag


_HY_ARG = re.compile(f"{_hy('arg_key')}(.*?){_hy('/arg_key')}\\s*{_hy('arg_value')}(.*?){_hy('/arg_value')}", re.S)


def _hy3_parse(text: str, final: bool, tools: Mapping[str, dict]) -> tuple[str, list[tuple[str, dict]]]:
    def body(s: str) -> tuple[str, dict] | None:
        if _hy("tool_sep") not in s:
            return None
        name, rest = s.split(_hy("tool_sep"), 1)
        props = _params(tools, name.strip()).get("properties") or {}
        return name.strip(), {k.strip(): _typed_value(v, props.get(k.strip(), {})) for k, v in _HY_ARG.findall(rest)}

    # a call counts once closed, even at the end: its template always closes it, and a call cut by max_tokens (each
    # tag is many tokens where the tags are not special tokens) would lose its last arguments
    _, calls = _blocks(text, _hy("tool_call"), _hy("/tool_call"), False, body)
    cut = min((i for i in (text.find(_hy("tool_calls")), text.find(_hy("tool_call"))) if i >= 0), default=len(text))
    return text[:cut], calls


def _hy3_grammar(lit: Callable[[str], str], tool: dict) -> str:
    parts = [lit(f"{_hy('tool_call')}{tool['name']}{_hy('tool_sep')}\n")]
    for k, schema in _required(tool.get("parameters") or {}):
        parts += [lit(f"{_hy('arg_key')}{k}{_hy('/arg_key')}\n{_hy('arg_value')}"), _value_rule(schema, lit)]
        parts.append(lit(f"{_hy('/arg_value')}\n"))
    parts.append(lit(f"{_hy('/tool_call')}\n"))
    return " ".join(parts)


# --- LFM2: pythonic calls, <|tool_call_start|>[f(a='x', n=3), g()]<|tool_call_end|> ---------------------------------
_LFM_START, _LFM_END = "<|tool_call_start|>", "<|tool_call_end|>"
_PY_NAMES = {"True": True, "False": False, "None": None, "true": True, "false": False, "null": None}


def _py_value(node: Any) -> Any:
    """A Python literal (or JSON's true/false/null, which a constrained call writes) from its ast node."""
    import ast

    if isinstance(node, ast.Name) and node.id in _PY_NAMES:
        return _PY_NAMES[node.id]
    if isinstance(node, ast.List):
        return [_py_value(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {str(_py_value(k)): _py_value(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)  # numbers, strings, tuples, -1 (ValueError on anything else)


def _pythonic_calls(src: str) -> list[tuple[str, dict]] | None:
    import ast

    try:
        tree = ast.parse(src.strip(), mode="eval").body
        items = tree.elts if isinstance(tree, ast.List) else [tree]
        calls = []
        for c in items:
            if not isinstance(c, ast.Call) or not isinstance(c.func, ast.Name) or c.args:
                return None
            calls.append((c.func.id, {k.arg: _py_value(k.value) for k in c.keywords if k.arg}))
        return calls
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None


def _lfm2_parse(text: str, final: bool, tools: Mapping[str, dict]) -> tuple[str, list[tuple[str, dict]]]:
    calls: list[tuple[str, dict]] = []
    _blocks(text, _LFM_START, _LFM_END, final, lambda s: calls.extend(_pythonic_calls(s) or []))
    first = text.find(_LFM_START)
    return (text if first < 0 else text[:first]), calls


def _lfm2_inline(calls: Sequence[tuple[str, dict]]) -> str:
    """Calls in LFM2's pythonic spelling (the values as Python literals: repr)."""
    items = [f"{name}({', '.join(f'{k}={v!r}' for k, v in args.items())})" for name, args in calls]
    return f"{_LFM_START}[{', '.join(items)}]{_LFM_END}"


def _lfm2_grammar(lit: Callable[[str], str], tool: dict) -> str:
    parts = [lit(tool["name"] + "(")]
    for n, (k, schema) in enumerate(_required(tool.get("parameters") or {})):
        value = _value_rule(schema, lit)
        if _is_string(schema):  # a Python string literal: the template's repr() quotes with ', JSON's with "
            # no quote, backslash or line break inside (ast reads a raw \r as a line break), no NUL (refused in source)
            value = " | ".join(_value_rule(schema, lit, quote=q, exclude=q + "\\\n\r\x00") for q in ("'", '"'))
        parts += [lit((", " if n else "") + f"{k}="), f"({value})"]
    parts.append(lit(")"))
    return " ".join(parts)


def _hermes_parse(text: str, final: bool, tools: Mapping[str, dict]) -> tuple[str, list[tuple[str, dict]]]:
    content, calls = _blocks(text, "<tool_call>", "</tool_call>", final, _hermes_body)
    return content.rstrip("\n"), calls


# registration order = detection order: specific markers first, the generic <tool_call> JSON last.
# harmony: every answer is channel markup (content = the final channel), so all of it goes through the parser
register(
    ToolFormat(
        "harmony",
        ("",),
        lambda s: "<|channel|>" in s and "<|call|>" in s,
        _harmony_parse,
        _harmony_grammar,
        owns_text=True,
        lazy=False,  # every answer is channel markup: no marker tells a call from text
    )
)
register(
    ToolFormat(
        "deepseek_v3_2",
        (_DSML_CALLS,),
        lambda s: "DSML" in s and "function_calls" in s,
        _dsml_parse,
        _dsml_grammar,
        wrap=(_DSML_CALLS + "\n", _DSML_CALLS_END),
    )
)
register(
    ToolFormat(
        "kimi_k2",
        (_KIMI_SECTION, _KIMI_BEGIN),
        lambda s: _KIMI_SECTION in s,
        _kimi_parse,
        _kimi_grammar,
        wrap=(_KIMI_SECTION, _KIMI_SECTION_END),
    )
)
register(
    ToolFormat(
        "cohere",
        (_CO_ACTION,),
        lambda s: _CO_ACTION in s,
        _cohere_parse,
        _cohere_grammar,
        separator=",",
        wrap=(_CO_ACTION + "[", "\n]" + _CO_ACTION_END),
    )
)
register(
    ToolFormat(
        "hy3",
        (_hy("tool_calls"), _hy("tool_call")),
        lambda s: "'<tool_sep{}>'" in s or _hy("tool_sep") in s,
        _hy3_parse,
        _hy3_grammar,
        wrap=(_hy("tool_calls") + "\n", _hy("/tool_calls")),
    )
)
register(
    ToolFormat(
        "lfm2",
        (_LFM_START,),
        lambda s: "<|tool_list_start|>" in s or _LFM_START in s,
        _lfm2_parse,
        _lfm2_grammar,
        inline=_lfm2_inline,
        separator=", ",
        wrap=(_LFM_START + "[", "]" + _LFM_END),
    )
)
register(
    ToolFormat(
        "deepseek_v3",
        (_DS_CALLS, _DS_BEGIN),
        lambda s: _DS_BEGIN in s and "```json" in s,
        _deepseek_parse,
        _deepseek_v3_grammar,
        wrap=(_DS_CALLS, _DS_CALLS_END),
    )
)
register(
    ToolFormat(
        "deepseek_v3_1",
        (_DS_CALLS, _DS_BEGIN),
        lambda s: _DS_BEGIN in s,
        _deepseek_parse,
        _deepseek_v3_1_grammar,
        wrap=(_DS_CALLS, _DS_CALLS_END),
    )
)
register(
    ToolFormat(
        "mistral",
        ("[TOOL_CALLS]",),
        lambda s: "[TOOL_CALLS]" in s and "[ARGS]" in s,
        _mistral_parse,
        _mistral_grammar,
        id_chars=9,
    )
)
register(
    ToolFormat(
        "mistral_json",
        ("[TOOL_CALLS]",),
        lambda s: "[TOOL_CALLS]" in s,
        _mistral_parse,
        _mistral_json_grammar,
        id_chars=9,
        lazy=False,  # one [TOOL_CALLS] opens a list of any number of calls
    )
)
register(ToolFormat("gemma4", ("<|tool_call>",), lambda s: "<|tool_call>call:" in s, _gemma4_parse, _gemma4_grammar))
register(
    ToolFormat(
        "minimax_m2",
        ("<minimax:tool_call>",),
        lambda s: "<minimax:tool_call>" in s,
        _minimax_parse,
        _minimax_grammar,
        separator="\n",
    )
)
register(
    ToolFormat(
        "glm4",
        ("<tool_call>",),
        lambda s: "<arg_key>" in s and "<tool_call>" in s,
        _glm4_parse,
        _glm4_grammar,
        separator="\n",
    )
)
register(
    ToolFormat(
        "qwen3_coder",
        ("<tool_call>",),
        lambda s: "<function=" in s and "<parameter=" in s,
        _qwen3_coder_parse,
        _qwen3_coder_grammar,
        separator="\n",
    )
)
register(
    ToolFormat(
        "llama3_json",
        ("{", "<|python_tag|>"),
        lambda s: '"parameters": dictionary of argument name' in s,
        _llama3_parse,
        _llama3_grammar,
        separator="; ",
        lazy=False,  # a call is a bare JSON object: '{' is no marker
    )
)
register(
    ToolFormat("hermes", ("<tool_call>",), lambda s: "<tool_call>" in s, _hermes_parse, _hermes_grammar, separator="\n")
)


# --- OpenAI objects ---------------------------------------------------------------------------------------------
def new_call_id(fmt: ToolFormat) -> str:
    if fmt.id_chars:
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(fmt.id_chars))
    return "call_" + secrets.token_hex(12)


def openai_calls(fmt: ToolFormat, calls: Sequence[tuple[str, dict]]) -> list[dict]:
    """(name, arguments) -> OpenAI tool_calls: arguments as a JSON string, a fresh id each."""
    return [
        {
            "id": new_call_id(fmt),
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
        }
        for name, args in calls
    ]


def parse(fmt: ToolFormat, text: str, tools: Sequence[dict] = ()) -> tuple[str, list[tuple[str, dict]]]:
    """A whole answer -> (content, calls). `tools`: the request's function definitions (their parameter types
    decide whether an XML-ish value stays text). An answer without a call that parses is all content (unless the
    format owns the text: harmony's content is its final channel)."""
    content, calls = fmt.parse(text, True, {t["name"]: t for t in tools})
    return (content if calls or fmt.owns_text else text), calls


def template_messages(
    messages: Sequence[Mapping[str, Any]], inline: Callable[[Sequence[tuple[str, dict]]], str] | None = None
) -> list[dict]:
    """OpenAI chat messages -> what chat templates expect (HF's convention): an assistant's tool_calls with
    `arguments` as a dict (templates iterate it or tojson it), `tool_call_id` / `name` kept on tool messages.
    `inline`: the template renders no tool_calls, so they are appended to the content in the model's spelling."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            if m.get("content") is None:  # OpenAI clients send null; templates test `content is string` or read it
                m["content"] = ""
            calls = []
            for c in m["tool_calls"]:
                c = dict(c)
                fn = dict(c.get("function") or {})
                fn["arguments"] = _arguments(fn.get("arguments"))
                c["function"] = fn
                calls.append(c)
            m["tool_calls"] = calls
            if inline is not None:
                named = [(c["function"].get("name", ""), c["function"]["arguments"]) for c in calls]
                m["content"] = (m["content"] if isinstance(m["content"], str) else "") + inline(named)
        out.append(m)
    return out


# --- constrained calls --------------------------------------------------------------------------------------------
def call_grammar(fmt: ToolFormat, tokenizer, tools: Sequence[dict], parallel: bool, prefix: str = "") -> str:
    """The llguidance grammar of the calls a `required` / named tool_choice allows: one call of any of `tools`,
    or (parallel) one or more, after `prefix` (e.g. the </think> that closes a block the prompt opened)."""
    from .constrained import closed, lark_grammar, literal

    def lit(text: str) -> str:
        return literal(tokenizer, text)

    tools = [{**t, "parameters": closed(t.get("parameters") or {"type": "object", "properties": {}})} for t in tools]
    rules = [f"call_{i}: {fmt.grammar(lit, t)}" for i, t in enumerate(tools)]
    alts = " | ".join(f"call_{i}" for i in range(len(tools)))
    sep = lit(fmt.separator) + " " if fmt.separator else ""
    head = " ".join(lit(t) for t in (prefix, fmt.wrap[0]) if t)
    tail = lit(fmt.wrap[1]) if fmt.wrap[1] else ""
    top = f"start: {head} call ({sep}call)* {tail}" if parallel else f"start: {head} call {tail}"
    return lark_grammar("\n".join([top, f"call: {alts}", *rules]), "tool_choice")


def auto_grammar(fmt: ToolFormat, tokenizer, tools: Sequence[dict], parallel: bool) -> str | None:
    """The llguidance grammar of a `tool_choice: auto` answer: free text (any special token included, as the model
    may think or end its turn) until the format's call-start marker, then the call held to the tools' schemas, then
    free text again (and, with `parallel`, more calls). The marker ends the text as a lazy lexeme (the first place
    it appears), or is its special token. None where the format has no such marker (`lazy` False) or the marker is
    part text, part special tokens."""
    from .constrained import _special_texts, closed, lark_grammar, literal, vocabulary

    if not fmt.lazy:
        return None
    trigger = fmt.starts[0]
    trig_lit = literal(tokenizer, trigger)
    special_trigger = trig_lit.startswith("<[") and " " not in trig_lit
    if "<[" in trig_lit and not special_trigger:
        return None

    def lit(text: str) -> str:  # the call's literals, without the marker the text before it already ended with
        return literal(tokenizer, text.removeprefix(trigger)) if text.startswith(trigger) else literal(tokenizer, text)

    tools = [{**t, "parameters": closed(t.get("parameters") or {"type": "object", "properties": {}})} for t in tools]
    rules = [f"call_{i}: {fmt.grammar(lit, t)}" for i, t in enumerate(tools)]
    if fmt.wrap[0]:  # the marker opens a block of one or more calls
        sep = literal(tokenizer, fmt.separator) + " " if fmt.separator else ""
        many = f"({sep}call)*" if parallel else ""
        after = f"{lit(fmt.wrap[0])} call {many} {literal(tokenizer, fmt.wrap[1])}"
    else:  # each call opens with the marker
        after = "call"
    vocab = vocabulary(tokenizer)
    others = [t for _, t in _special_texts(tokenizer, vocab) if t not in tokenizer.stop_ids and trig_lit != f"<[{t}]>"]
    segment = f"TEXT {trig_lit} tagged" if special_trigger else "trig tagged"
    plain = "plain*" if others else ""  # text up to a special token that opens no call
    if parallel:
        start = f"start: (plain | {segment})* TEXT" if others else f"start: ({segment})* TEXT"
    else:
        start = f"start: {plain} ({segment} {plain})? TEXT"
    lines = [
        start,
        f"plain: TEXT <[{','.join(map(str, sorted(others)))}]>" if others else "",
        "" if special_trigger else f"trig[lazy]: TEXT {json.dumps(trigger)}",
        "TEXT: /(.|\\n)*/",
        f"tagged: {after}",
        f"call: {' | '.join(f'call_{i}' for i in range(len(tools)))}",
        *rules,
    ]
    return lark_grammar("\n".join(x for x in lines if x), "tool_choice")


# --- streaming ------------------------------------------------------------------------------------------------------
class StreamParser:
    """Feed a streamed answer's pieces; get back content text to send now and calls as they complete.
    Content is passed through until a call may begin (a suffix that could open one is held back); from the first
    call on, the text is buffered and each complete call is handed out once."""

    def __init__(self, fmt: ToolFormat, tools: Sequence[dict] = ()) -> None:
        self.fmt = fmt
        self.tools = {t["name"]: t for t in tools}
        self.text = ""
        self.sent = 0  # characters of content sent
        self.calls = 0  # calls handed out
        self.in_calls = False

    def push(self, piece: str) -> tuple[str, list[tuple[str, dict]]]:
        self.text += piece
        return self._step(final=False)

    def flush(self) -> tuple[str, list[tuple[str, dict]]]:
        return self._step(final=True)

    def _step(self, final: bool) -> tuple[str, list[tuple[str, dict]]]:
        if not self.in_calls:
            hits = [i for i in (self.text.find(s, self.sent) for s in self.fmt.starts) if i >= 0]
            if hits:
                self.in_calls = True
            else:
                # held back: a suffix that may open a call, and trailing whitespace (parsers strip it before a call)
                keep = 0
                if not final:
                    keep = _partial_suffix(self.text, self.fmt.starts)
                    keep += _trailing_space(self.text[: len(self.text) - keep])
                out = self.text[self.sent : len(self.text) - keep]
                self.sent += len(out)
                return out, []
        content, calls = self.fmt.parse(self.text, final, self.tools)
        if final and not self.calls and not calls and not self.fmt.owns_text:
            content = self.text  # no call parsed after all: the answer is content, as parse() says
        out = content[self.sent :] if len(content) > self.sent else ""
        self.sent += len(out)
        new = calls[self.calls :]
        self.calls = len(calls)
        return out, new


def _trailing_space(text: str) -> int:
    return len(text) - len(text.rstrip())


def _partial_suffix(text: str, starts: Sequence[str]) -> int:
    best = 0
    for s in starts:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def check_tools(tools: Any, where: str = "tools") -> list[dict]:
    """OpenAI `tools` -> the function definitions [{name, description?, parameters?}], checked (UsageError naming
    the item)."""
    if not isinstance(tools, list):
        raise UsageError(f"{where}: expected a list of tools")
    out, names = [], set()
    for i, t in enumerate(tools):
        if not isinstance(t, Mapping) or t.get("type", "function") != "function":
            raise UsageError(f"{where}[{i}]: expected {{'type': 'function', 'function': {{...}}}}")
        fn = t.get("function")
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise UsageError(f"{where}[{i}].function: expected an object with a string 'name'")
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", fn["name"]):
            raise UsageError(f"{where}[{i}].function.name: {fn['name'][:80]!r}: expected 1-64 of a-z A-Z 0-9 _ . : -")
        if fn["name"] in names:
            raise UsageError(f"{where}[{i}].function.name: {fn['name']!r} is defined twice")
        names.add(fn["name"])
        params = fn.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise UsageError(f"{where}[{i}].function.parameters: expected a JSON schema object")
        out.append({"description": "", **fn})  # templates read it unguarded (gpt-oss: '// ' + description)
    return out


__all__ = [
    "FORMATS",
    "StreamParser",
    "ToolFormat",
    "auto_grammar",
    "call_grammar",
    "check_tools",
    "detect",
    "openai_calls",
    "parse",
    "register",
    "template_messages",
]
