"""Tool calls and JSON-schema output of `moelite serve` (issue 32), a real server on 127.0.0.1 driven by the openai
client: for every family whose real chat template defines tool calls (tests/tool_templates.py), its tiny fixture
carrying that template makes a call under tool_choice="required" (random weights still write one: the grammar holds
them to it), takes the tool's result and answers; the streamed call reassembles into the non-streamed one. 100
json_schema answers of varied schemas all validate (jsonschema); bad tools / schemas get 400s naming the field."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import pytest
from test_serve import running_server
from tool_templates import FAMILY_TEMPLATES, real_template, with_template

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

MAX_TOKENS = 400
CONTEXT = 4096

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather of a city over the next days",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 1, "maxLength": 12},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "days"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time of a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 10}},
            "required": ["zone"],
        },
    },
}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
USER = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]


@contextlib.contextmanager
def serve(gguf: Path, tmp: Path):
    """`moelite serve GGUF --port 0` -> (base url, openai client)."""
    with running_server(tmp, "--max-tokens", str(MAX_TOKENS), "--no-log", model=gguf) as (base, _, _):
        yield base, openai.OpenAI(base_url=base, api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module", params=sorted(FAMILY_TEMPLATES))
def family_server(request, tmp_path_factory):
    """The family's fixture GGUF with its real chat template, served."""
    from fixture_models import fixture_gguf

    family = request.param
    name, fmt = FAMILY_TEMPLATES[family]
    tmp = tmp_path_factory.mktemp(family)
    _, gguf = fixture_gguf(family, max_position_embeddings=CONTEXT)  # tools prompts of a 320-token vocab are long
    gguf = with_template(gguf, real_template(name), tmp / f"{family}-tools.gguf")
    with serve(gguf, tmp) as (base, client):
        yield family, fmt, client


def _check_call(call, allowed: set[str]) -> dict:
    assert call.type == "function" and call.id
    assert call.function.name in allowed
    args = json.loads(call.function.arguments)
    schema = SCHEMAS[call.function.name]
    jsonschema.validate(args, schema)
    assert set(schema["required"]) <= set(args)
    return args


def _ask(client, messages, **kw):
    kw.setdefault("max_tokens", MAX_TOKENS)
    return client.chat.completions.create(model="m", messages=messages, tools=TOOLS, temperature=0.8, **kw)


def test_tool_round_trip(family_server):
    """call (required) -> the tool's result -> a final answer, through the family's own template."""
    family, fmt, client = family_server
    r = _ask(client, USER, tool_choice="required", seed=11)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", (family, choice)
    assert choice.message.tool_calls, (family, choice.message)
    for call in choice.message.tool_calls:
        _check_call(call, {"get_weather", "get_time"})
    history = USER + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [c.model_dump(exclude_none=True) for c in choice.message.tool_calls],
        },
        *(
            {"role": "tool", "tool_call_id": c.id, "content": json.dumps({"forecast": "sunny", "temp_c": 21})}
            for c in choice.message.tool_calls
        ),
    ]
    final = _ask(client, history, seed=12, max_tokens=16)  # tool_choice auto: the model answers in text
    assert final.choices[0].finish_reason in ("stop", "length")
    assert isinstance(final.choices[0].message.content, str) and not final.choices[0].message.tool_calls
    assert final.usage.prompt_tokens > r.usage.prompt_tokens  # the call and its result are in the prompt


def test_named_and_single_calls(family_server):
    family, fmt, client = family_server
    r = _ask(client, USER, tool_choice={"type": "function", "function": {"name": "get_time"}}, seed=5)
    calls = r.choices[0].message.tool_calls
    assert calls and all(c.function.name == "get_time" for c in calls), (family, r.choices[0].message)
    r = _ask(client, USER, tool_choice="required", parallel_tool_calls=False, seed=6)
    assert len(r.choices[0].message.tool_calls) == 1
    _check_call(r.choices[0].message.tool_calls[0], {"get_weather", "get_time"})


def test_streamed_calls_reassemble(family_server):
    """The streamed deltas of a call, joined by index, are the non-streamed call (same seed, same tokens)."""
    family, fmt, client = family_server
    whole = _ask(client, USER, tool_choice="required", seed=21).choices[0]
    calls: dict[int, dict] = {}
    finish = []
    for chunk in _ask(client, USER, tool_choice="required", seed=21, stream=True):
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        if c.finish_reason:
            finish.append(c.finish_reason)
        for d in c.delta.tool_calls or []:
            got = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            got["id"] += d.id or ""
            got["name"] += (d.function.name or "") if d.function else ""
            got["arguments"] += (d.function.arguments or "") if d.function else ""
    assert finish == ["tool_calls"]
    want = [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]
    assert [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)] == want, family
    assert all(calls[i]["id"] for i in calls)


# --- response_format ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_server(tmp_path_factory):
    """The qwen3_moe fixture with its ChatML template (no tools)."""
    from fixture_models import fixture_gguf

    _, gguf = fixture_gguf("qwen3_moe")
    with serve(gguf, tmp_path_factory.mktemp("plain")) as s:
        yield s


def varied_schemas(n: int, seed: int = 0) -> list[dict]:
    """n JSON schemas mixing the features clients send (every string, array and number bounded, so a random
    model's answer ends within MAX_TOKENS)."""
    rng = random.Random(seed)

    def leaf(depth: int) -> dict:
        kind = rng.choice(["string", "integer", "number", "boolean", "enum", "const", "null", "array", "anyOf", "obj"])
        if kind == "string":
            s = {"type": "string", "maxLength": rng.randint(1, 10)}
            if rng.random() < 0.3:
                s = {"type": "string", "pattern": "^[a-z]{2,5}-[0-9]{1,3}$"}
            return s
        if kind == "integer":
            lo = rng.randint(-50, 50)
            return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 500)}
        if kind == "number":
            return {"type": "number", "minimum": 0, "maximum": 1}
        if kind == "boolean":
            return {"type": "boolean"}
        if kind == "enum":
            return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, None, True], rng.randint(1, 4))}
        if kind == "const":
            return {"const": rng.choice(["fixed", 42, False])}
        if kind == "null":
            return {"type": "null"}
        if kind == "array" and depth < 2:
            return {"type": "array", "items": leaf(depth + 1), "minItems": 0, "maxItems": rng.randint(1, 3)}
        if kind == "anyOf" and depth < 2:
            return {"anyOf": [leaf(depth + 1), leaf(depth + 1)]}
        if kind == "obj" and depth < 2:
            return obj(depth + 1)
        return {"type": "boolean"}

    def obj(depth: int) -> dict:
        names = rng.sample(
            ["id", "name", "tags", "score", "ok", "kind", "items", "meta", "when", "note"], rng.randint(1, 4)
        )
        props = {k: leaf(depth) for k in names}
        required = [k for k in names if rng.random() < 0.7]
        return {"type": "object", "properties": props, "required": required, "additionalProperties": False}

    out = []
    for i in range(n):
        s = obj(0)
        if i % 10 == 3:  # a $defs / $ref schema
            s = {
                "$defs": {"item": obj(1)},
                "type": "object",
                "properties": {
                    "first": {"$ref": "#/$defs/item"},
                    "rest": {"type": "array", "items": {"$ref": "#/$defs/item"}, "maxItems": 2},
                },
                "required": ["first", "rest"],
                "additionalProperties": False,
            }
        out.append(s)
    return out


def test_hundred_json_schema_answers_validate(plain_server):
    base, client = plain_server
    schemas = varied_schemas(100)
    for i, schema in enumerate(schemas):
        r = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": f"Answer {i} as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}},
            max_tokens=MAX_TOKENS,
            temperature=1.0,
            seed=i,
        )
        c = r.choices[0]
        assert c.finish_reason == "stop", (i, schema, c.message.content)
        jsonschema.validate(json.loads(c.message.content), schema)


def test_json_object_and_streamed_schema(plain_server):
    base, client = plain_server
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": {"enum": ["x", "y"]}},
        "required": ["a", "b"],
        "additionalProperties": False,
    }
    rf = {"type": "json_schema", "json_schema": {"name": "ab", "schema": schema}}
    msgs = [{"role": "user", "content": "JSON please"}]
    whole = client.chat.completions.create(model="m", messages=msgs, response_format=rf, seed=3, temperature=1.0)
    parts = client.chat.completions.create(
        model="m", messages=msgs, response_format=rf, seed=3, temperature=1.0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
    assert text == whole.choices[0].message.content
    jsonschema.validate(json.loads(text), schema)
    done = 0
    for seed in range(5):  # any JSON object: unbounded, so only the answers that ended are checked, all of them
        r = client.chat.completions.create(
            model="m", messages=msgs, response_format={"type": "json_object"}, seed=seed, temperature=0.7
        )
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(r.choices[0].message.content), dict)
            done += 1
    r = client.completions.create(model="m", prompt="JSON:", extra_body={"response_format": rf}, seed=1, max_tokens=64)
    jsonschema.validate(json.loads(r.choices[0].text), schema)


def test_bad_tool_requests_are_400s(plain_server):
    base, client = plain_server
    cases = [
        (dict(tools=TOOLS), "tools"),  # ChatML: the template defines no tool calls
        (dict(tool_choice="required"), "tool_choice"),  # no tools
        (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools"),
        (dict(tools=[{"type": "function"}]), "tools"),
        (
            dict(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "objectx"}}}),
            "response_format",
        ),
        (dict(response_format={"type": "yaml"}), "response_format"),
        (dict(response_format={"type": "json_schema", "json_schema": "x"}), "response_format"),
    ]
    for kw, field in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", messages=USER, max_tokens=4, **kw)
        assert e.value.body["code"] == field, (kw, e.value.body)
    assert client.chat.completions.create(model="m", messages=USER, max_tokens=4).choices[0].message.content is not None


def test_bad_tool_choice_with_tools(family_server):
    family, fmt, client = family_server
    for choice in ({"type": "function", "function": {"name": "nope"}}, "sometimes"):
        with pytest.raises(openai.BadRequestError) as e:
            _ask(client, USER, tool_choice=choice)
        assert e.value.body["code"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as e:
        _ask(client, USER, tool_choice="required", response_format={"type": "json_object"})
    assert e.value.body["code"] == "response_format"
    unclosed = {"type": "object", "properties": {"a": {"type": "string", "pattern": "("}}, "required": ["a"]}
    for choice in ("required", "auto"):  # a schema that does not compile names its tool (auto holds calls to it too)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model="m",
                messages=USER,
                tools=[CLOCK, {"type": "function", "function": {"name": "f", "parameters": unclosed}}],
                tool_choice=choice,
            )
        assert e.value.body["code"] == "tools" and e.value.body["message"].startswith("tools[1].function.parameters: ")


def test_calls_stay_in_a_history_the_template_does_not_render(tmp_path):
    """LFM2-8B-A1B's template renders an assistant turn's content only: the server writes the calls into it (LFM2's
    pythonic spelling), so the prompt of the next turn holds the call and its result."""
    from fixture_models import fixture_gguf

    _, gguf = fixture_gguf("lfm2_moe", max_position_embeddings=CONTEXT)
    gguf = with_template(gguf, real_template("LFM2-8B-A1B"), tmp_path / "lfm2-8b.gguf")
    with serve(gguf, tmp_path) as (base, client):
        r = _ask(client, USER, tool_choice="required", seed=3)
        calls = r.choices[0].message.tool_calls
        assert calls, r.choices[0].message
        history = USER + [
            {"role": "assistant", "content": None, "tool_calls": [c.model_dump(exclude_none=True) for c in calls]}
        ]
        without = _ask(client, USER + [{"role": "assistant", "content": ""}], max_tokens=1)
        final = _ask(client, history, max_tokens=1)
        # the call's text (name and arguments) is in the prompt: the tokens it adds over an empty assistant turn
        assert final.usage.prompt_tokens > without.usage.prompt_tokens + len(calls[0].function.name)
