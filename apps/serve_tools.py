"""Tool calls and constrained output for `moelite serve` (issue 32): what a chat request's `tools`, `tool_choice`,
`parallel_tool_calls` and `response_format` change, kept apart from the HTTP plumbing of serve_app.py.

`plan(model, req)` turns a request into a `Plan`: the messages and tools its chat template is rendered with
(HF's convention: an assistant's tool call `arguments` as a dict), the model's tool-call format (detected from its
template: runtime/tool_calls.py), and the grammar the answer is held to (runtime/constrained.py): one or more calls
for `tool_choice` "required" or a named function, free text whose calls (from the format's call-start marker on)
follow the tools' schemas for "auto", the schema's JSON for `response_format` json_schema, any JSON
object for json_object. `Plan.message(content)` splits a finished answer into content and OpenAI `tool_calls`;
`Plan.stream()` does it piece by piece for streamed answers. Errors are UsageErrors naming the field (serve_app
answers them with 400).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from ..runtime import tool_calls as tc


@dataclass
class Plan:
    """What one chat / completion request asks beyond plain text."""

    messages: list[dict] = field(default_factory=list)  # as the chat template gets them
    tools: list[dict] | None = None  # the OpenAI tools the template renders (None: none)
    functions: list[dict] = field(default_factory=list)  # their function definitions
    fmt: tc.ToolFormat | None = None  # the answer is parsed for calls in this format (None: plain content)
    parallel: bool = True  # more than one call allowed
    grammar: str | None = None  # llguidance grammar of the answer (None: unconstrained)
    call_tools: list[dict] | None = None  # tool_choice required / named: the answer is one or more of these calls

    def logits_processor(self, model, prompt: str = "") -> Any:
        """A fresh constraint for one generation (its matcher holds state), or None. `prompt`: the rendered prompt;
        when it leaves a <think> block open, a forced call first closes it (no reasoning before the call)."""
        from ..runtime.constrained import GrammarConstraint

        grammar = self.grammar
        if self.call_tools is not None:
            prefix = "</think>\n\n" if prompt.rstrip().endswith("<think>") else ""
            grammar = tc.call_grammar(self.fmt, model.tokenizer, self.call_tools, self.parallel, prefix)
        return None if grammar is None else GrammarConstraint(model.tokenizer, grammar, model.n_vocab)

    def message(self, content: str) -> tuple[str | None, list[dict] | None]:
        """A finished answer's content -> (content, tool_calls): content None when it was only calls."""
        if self.fmt is None:
            return content, None
        text, calls = tc.parse(self.fmt, content, self.functions)
        if not calls:
            return text, None
        calls = calls if self.parallel else calls[:1]
        return (text.strip() or None), tc.openai_calls(self.fmt, calls)

    def stream(self) -> StreamCalls | None:
        return StreamCalls(self) if self.fmt is not None else None


class StreamCalls:
    """A streamed answer's content -> (content delta, tool_calls delta entries). Each call comes complete in one
    entry (index, id, type, function name and arguments), once the text that writes it is complete."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.parser = tc.StreamParser(plan.fmt, plan.functions)
        self.n_calls = 0

    def push(self, content: str | None) -> tuple[str, list[dict]]:
        text, calls = self.parser.push(content) if content is not None else self.parser.flush()
        if not self.plan.parallel:
            calls = calls[: max(0, 1 - self.n_calls)]
        entries = []
        for call in tc.openai_calls(self.plan.fmt, calls):
            entries.append({"index": self.n_calls, **call})
            self.n_calls += 1
        return text, entries


def plan(model, req: Any, chat: bool = True) -> Plan:
    """The Plan of a validated request (serve_app's ChatRequest / CompletionRequest)."""
    p = Plan()
    grammar = response_format_grammar(getattr(req, "response_format", None))
    if not chat:
        p.grammar = grammar
        return p
    tools = getattr(req, "tools", None)
    choice = getattr(req, "tool_choice", None)
    p.parallel = getattr(req, "parallel_tool_calls", None) is not False
    p.messages = tc.template_messages([_message(m, i) for i, m in enumerate(req.messages)])
    if not tools:  # none, or an empty list
        if choice not in (None, "none"):
            raise UsageError(f"tool_choice={_short(choice)}: there are no tools (give 'tools')")
        p.grammar = grammar
        return p
    p.functions = tc.check_tools(tools)
    choice = "auto" if choice is None else choice
    named = _named_choice(choice, p.functions)
    if choice == "none":
        p.grammar = grammar
        return p
    p.fmt = tc.detect(model.chat_template.source if not model.chat_template.is_default else None)
    if p.fmt is None:
        raise UsageError("tools: this model's chat template defines no tool calls (tool_choice 'none' omits them)")
    p.tools = [{"type": "function", "function": f} for f in p.functions]
    if p.fmt.inline is not None and "tool_calls" not in model.chat_template.source:  # e.g. LFM2-8B-A1B's template
        p.messages = tc.template_messages([_message(m, i) for i, m in enumerate(req.messages)], p.fmt.inline)
    if choice != "auto" and grammar is not None:
        raise UsageError("response_format and tool_choice both constrain the answer; give one of them")
    p.call_tools = [f for f in p.functions if named is None or f["name"] == named]
    p.parallel = p.parallel and named is None
    from ..runtime.constrained import closed, json_schema_grammar

    for i, f in enumerate(p.functions):  # each schema on its own first: the 400 names the tool
        if f in p.call_tools and f.get("parameters") is not None:
            json_schema_grammar(closed(f["parameters"]), f"tools[{i}].function.parameters")
    if choice == "auto":  # free text; a call, once its marker is written, held to the tools' schemas
        p.call_tools = None
        p.grammar = grammar if grammar is not None else tc.auto_grammar(p.fmt, model.tokenizer, p.functions, p.parallel)
        return p
    tc.call_grammar(p.fmt, model.tokenizer, p.call_tools, p.parallel)  # checked now: a bad grammar is a 400 here
    return p


def response_format_grammar(rf: Any) -> str | None:
    """response_format -> the grammar of the answer: None for text, any JSON object for json_object, the schema's
    JSON for json_schema ({"name", "schema", "strict"}; constrained whether strict or not, as llama-server does)."""
    if rf is None:
        return None
    if not isinstance(rf, Mapping) or not isinstance(rf.get("type"), str):
        raise UsageError("response_format: expected {'type': 'text' | 'json_object' | 'json_schema', ...}")
    from ..runtime.constrained import closed, json_schema_grammar

    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar({"type": "object"}, "response_format")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, Mapping):
            raise UsageError("response_format.json_schema: expected {'name': ..., 'schema': {...}, 'strict': ...}")
        schema = js.get("schema", {"type": "object"})
        if js.get("strict") is True:  # OpenAI's strict mode: objects take only their listed properties
            schema = closed(schema)
        return json_schema_grammar(schema, "response_format.json_schema.schema")
    raise UsageError(f"response_format.type={kind[:40]!r}: expected 'text', 'json_object' or 'json_schema'")


def _named_choice(choice: Any, functions: Sequence[dict]) -> str | None:
    if choice in ("auto", "none", "required"):
        return None
    fn = choice.get("function") if isinstance(choice, Mapping) and choice.get("type") == "function" else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise UsageError(
            f"tool_choice={_short(choice)}: expected 'auto', 'none', 'required' or "
            "{'type': 'function', 'function': {'name': ...}}"
        )
    if fn["name"] not in {f["name"] for f in functions}:
        raise UsageError(f"tool_choice: no tool named {fn['name'][:64]!r} in tools")
    return fn["name"]


def _message(m: Any, i: int) -> dict:
    """A chat message (serve_app's Message) -> the dict the template gets: role, content, and for tool use the
    assistant's tool_calls, a tool message's tool_call_id / name."""
    extra = m.model_extra or {}
    out: dict[str, Any] = {"role": m.role, "content": m.text() if m.content is not None else None}
    calls = extra.get("tool_calls")
    if calls is not None:
        if m.role != "assistant" or not isinstance(calls, list):
            raise UsageError(f"messages[{i}].tool_calls: expected a list, on an assistant message")
        for j, c in enumerate(calls):
            fn = c.get("function") if isinstance(c, Mapping) else None
            if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                raise UsageError(f"messages[{i}].tool_calls[{j}]: expected {{'function': {{'name', 'arguments'}}}}")
            if not isinstance(fn.get("arguments", ""), (str, Mapping)):
                raise UsageError(f"messages[{i}].tool_calls[{j}].function.arguments: expected a JSON string")
        out["tool_calls"] = calls
    for key in ("tool_call_id", "name"):
        if isinstance(extra.get(key), str):
            out[key] = extra[key]
    if out["content"] is None and not calls:
        out["content"] = ""
    return out


def _short(v: Any) -> str:
    return repr(v)[:80]
