"""runtime/tool_calls.py and runtime/constrained.py without a server: each real chat template's tool-call format is
detected; a call the template renders into the history parses back into the same call, whole and streamed in any
chunking; the grammar of a forced call accepts the template's own spelling of it (the tokens moelite's tokenizer
makes of it), and what a random model samples under that grammar always parses into a valid call."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from tool_templates import DETECT_ONLY, FAMILY_TEMPLATES, MORE_TEMPLATES, real_template

from moelite.errors import UsageError
from moelite.runtime import tool_calls as tc
from moelite.runtime.chat_template import ChatTemplate

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

VOCABS = Path(__file__).resolve().parents[1] / "third_party" / "llama.cpp" / "models"
WEATHER = {
    "name": "get_weather",
    "description": "The weather of a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 16}, "days": {"type": "integer", "minimum": 1}},
        "required": ["city", "days"],
    },
}
CLOCK = {
    "name": "get_time",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"]},
}
FUNCTIONS = [WEATHER, CLOCK]
TOOLS = [
    {"type": "function", "function": f}
    for f in tc.check_tools([{"type": "function", "function": f} for f in FUNCTIONS])
]
USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
CALLS = [("get_weather", {"city": "Paris, France", "days": 3}), ("get_time", {"zone": "CET"})]
# formats whose templates render one call per assistant turn
ONE_CALL = {"harmony", "llama3_json"}
TEMPLATES = {name: fmt for name, fmt in FAMILY_TEMPLATES.values()} | MORE_TEMPLATES


def _history_calls(calls, ids=("abcdefghi", "jklmnopqr")):
    return [
        {"id": i, "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
        for i, (n, a) in zip(ids, calls)
    ]


def rendered_answer(name: str, calls) -> str:
    """The assistant turn the template renders for `calls` (as the model would have written it): the text from where
    the generation prompt and the rendering with the assistant turn part (backed off to a marker's start: Gemma-4's
    generation prompt and its '<|tool_call>' share '<|')."""
    t = ChatTemplate(real_template(name), {"bos_token": "<s>", "eos_token": "</s>"})
    before = t.render(tc.template_messages(USER), tools=TOOLS, add_generation_prompt=True)
    msgs = USER + [{"role": "assistant", "content": None, "tool_calls": _history_calls(calls)}]
    after = t.render(tc.template_messages(msgs), tools=TOOLS, add_generation_prompt=False)
    k = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))
    while k > 0 and after[k - 1] in "<|[":  # back to the start of a marker the common part cut
        k -= 1
    open_tag = after.rfind("<", 0, k)
    if open_tag > after.rfind(">", 0, k):  # inside a marker (Cohere's '<|START_RESPONSE|>' / '<|START_ACTION|>')
        k = open_tag
    return after[k:]


@pytest.mark.parametrize("name", sorted(TEMPLATES | DETECT_ONLY))
def test_detect_real_templates(name):
    fmt = tc.detect(real_template(name))
    assert fmt is not None and fmt.name == (TEMPLATES | DETECT_ONLY)[name]


def test_templates_without_tools_have_no_format():
    from moelite.runtime.chat_template import DEFAULT_CHAT_TEMPLATE

    assert tc.detect(DEFAULT_CHAT_TEMPLATE) is None and tc.detect(None) is None
    assert tc.detect(real_template("google-gemma-2-2b-it")) is None


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_rendered_calls_parse_back(name):
    """What the template writes for an assistant's calls in the history parses back into those calls, whole and
    streamed in random pieces (the same calls, the same content)."""
    if name == "llama-cpp-deepseek-r1":
        pytest.skip("its tools list goes through map() into tojson, which transformers refuses too")
    fmt = tc.detect(real_template(name))
    calls = CALLS[:1] if fmt.name in ONE_CALL else CALLS
    text = rendered_answer(name, calls)
    content, got = tc.parse(fmt, text, FUNCTIONS)
    assert got == calls, (name, text)
    rng = random.Random(0)
    for _ in range(5):
        parser, streamed, out = tc.StreamParser(fmt, FUNCTIONS), [], ""
        i = 0
        while i < len(text):
            n = rng.randint(1, 7)
            piece, new = parser.push(text[i : i + n])
            out, streamed = out + piece, streamed + new
            i += n
        piece, new = parser.flush()
        assert streamed + new == calls
        assert out + piece == content


def test_content_before_a_call_and_plain_answers():
    fmt = tc.FORMATS["hermes"]
    text = 'Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    assert tc.parse(fmt, text) == ("Let me check.", [("get_time", {"zone": "UTC"})])
    assert tc.parse(fmt, "no call here") == ("no call here", [])
    parser = tc.StreamParser(fmt)
    assert parser.push("Sure <tool_") == ("Sure", [])  # a possible opening is held back, and the space before it
    assert parser.push("x") == (" <tool_x", [])
    broken = "Hi <tool_call>{not json</tool_call>"  # no call parses: all of it is content, streamed too
    assert tc.parse(fmt, broken) == (broken, [])
    parser = tc.StreamParser(fmt)
    pieces = [parser.push(broken[i : i + 3]) for i in range(0, len(broken), 3)] + [parser.flush()]
    assert "".join(p for p, _ in pieces) == broken and not any(c for _, c in pieces)
    # an unclosed call counts at the end (generation stopped at an end-of-turn token instead)
    assert tc.parse(fmt, '<tool_call>\n{"name": "f", "arguments": {}}')[1] == [("f", {})]


@pytest.mark.parametrize(
    "fmt,text,want",
    [
        ("deepseek_v3", '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{"zone": "UTC"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>', [("get_time", {"zone": "UTC"})]),
        ("harmony", '<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>{"zone": "UTC"}<|call|>', [("get_time", {"zone": "UTC"})]),
        ("harmony", "<|channel|>final<|message|>Hello.<|return|>", []),
        ("gemma4", '<|tool_call>call:f{a:{b:[1,2.5,<|"|>x, y<|"|>],c:None},d:true}<tool_call|>', [("f", {"a": {"b": [1, 2.5, "x, y"], "c": None}, "d": True})]),
        ("mistral_json", '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": "{}"}]', [("f", {"a": 1}), ("g", {})]),
    ],
)  # fmt: skip
def test_model_spellings(fmt, text, want):
    """Spellings a model writes that the history rendering does not (DeepSeek-V3's fenced JSON, harmony's
    analysis channel and final answer, Gemma's nested values, Nemo's list)."""
    content, calls = tc.parse(tc.FORMATS[fmt], text)
    assert calls == want
    if fmt == "harmony" and not want:
        assert content == "Hello."


def test_check_tools_names_the_item():
    assert [t["function"] for t in TOOLS] == tc.check_tools(TOOLS) == [{"description": "", **f} for f in FUNCTIONS]
    for bad, where in [
        ({"type": "function"}, "tools[0].function"),
        ({"type": "retrieval", "function": WEATHER}, "tools[0]"),
        ({"type": "function", "function": {"name": "a b"}}, "tools[0].function.name"),
        ({"type": "function", "function": {"name": "f", "parameters": "x"}}, "tools[0].function.parameters"),
    ]:
        with pytest.raises(UsageError) as e:
            tc.check_tools([bad])
        assert str(e.value).startswith(where + ":"), (bad, str(e.value))
    with pytest.raises(UsageError, match="defined twice"):
        tc.check_tools(TOOLS + TOOLS[:1])


# --- grammars -----------------------------------------------------------------------------------------------------
def _tokenizer(name: str):
    from moelite.runtime.tokenizer import Tokenizer

    path = VOCABS / f"ggml-vocab-{name}.gguf"
    if not path.exists():
        pytest.skip(f"{path.name} not found under {VOCABS}")
    return Tokenizer.from_gguf(str(path))


@pytest.fixture(scope="module")
def qwen_tok():
    return _tokenizer("qwen2")


@pytest.fixture(scope="module")
def gemma_tok():
    return _tokenizer("gemma-4")


def _matcher(tok, grammar):
    import llguidance

    from moelite.runtime.constrained import vocabulary

    return llguidance.LLMatcher(vocabulary(tok), grammar, log_level=0)


CALL_ENDS = (
    "</tool_call>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁calls▁end｜>",
    "<tool_call|>",
    "</minimax:tool_call>",
    "</｜DSML｜function_calls>",
    "<|tool_calls_section_end|>",
    "<|END_ACTION|>",
    "</tool_calls:opensource>",
    "<|tool_call_end|>",
    "}",
    "]",
)


@pytest.mark.parametrize("name", sorted(set(TEMPLATES) - {"openai-gpt-oss-120b", "llama-cpp-deepseek-r1"}))
def test_grammar_accepts_the_templates_spelling(name, qwen_tok, gemma_tok):
    """The forced-call grammar (one call of get_weather, its required arguments) accepts the tokens of the call as
    the family's template writes it: the constraint and the template agree on the format."""
    fmt = tc.detect(real_template(name))
    tok = gemma_tok if fmt.name == "gemma4" else qwen_tok
    text = rendered_answer(name, [("get_weather", {"city": "Paris", "days": 3})])
    start = min(i for i in (text.find(s) for s in fmt.starts) if i >= 0)
    end = max(text.rfind(e) + len(e) for e in CALL_ENDS)  # the call alone: a token may straddle its end
    m = _matcher(tok, tc.call_grammar(fmt, tok, [WEATHER], parallel=False))
    ids = tok.encode(text[start:end], add_special=False)
    n = m.try_consume_tokens(ids)
    assert n > 0 and tok.decode(ids[:n]).rstrip() and m.is_accepting(), (name, tok.decode(ids[:n]), text[start:])


@pytest.mark.parametrize("fmt", sorted(tc.FORMATS))
def test_sampled_calls_always_parse(fmt, qwen_tok, gemma_tok):
    """Random logits under a forced-call grammar: every answer parses into calls of the allowed tools whose
    arguments satisfy their schemas (required / named tool_choice always yields a call)."""
    from moelite.runtime.constrained import GrammarConstraint
    from moelite.runtime.sampling import Sampler, SamplerConfig

    f = tc.FORMATS[fmt]
    tok = gemma_tok if fmt == "gemma4" else qwen_tok
    rng = np.random.default_rng(0)
    for seed in range(4):
        parallel = seed % 2 == 1
        tools = FUNCTIONS if seed < 2 else [CLOCK]
        c = GrammarConstraint(tok, tc.call_grammar(f, tok, tools, parallel), tok.vocab_size)
        sampler, out, ended = Sampler(SamplerConfig(temperature=1.0, seed=seed)), [], False
        for _ in range(300):
            t = sampler.sample(c(out, rng.normal(size=tok.vocab_size).astype(np.float32)))
            if t in tok.stop_ids:
                ended = True
                break
            out.append(t)
        text = tok.decode(out)
        assert ended or parallel, (fmt, text)  # one call always ends; random logits may chain calls past 300 tokens
        assert not ended or c.accepting, (fmt, text)
        content, calls = tc.parse(f, text, tools)
        assert calls and (parallel or len(calls) == 1), (fmt, text)
        for name, args in calls:
            schema = next(t for t in tools if t["name"] == name)["parameters"]
            jsonschema.validate(args, schema)


def test_closed_and_schema_errors():
    from moelite.runtime.constrained import closed, json_schema_grammar

    s = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "object", "properties": {}}}}}
    c = closed(s)
    assert c["additionalProperties"] is False and c["properties"]["a"]["items"]["additionalProperties"] is False
    assert "additionalProperties" not in s  # a copy
    open_ = {"type": "object", "properties": {}, "additionalProperties": True}
    assert closed(open_)["additionalProperties"] is True
    with pytest.raises(UsageError, match="^response_format: "):
        json_schema_grammar({"type": "objectx"}, "response_format")
    with pytest.raises(UsageError, match="expected a JSON schema"):
        json_schema_grammar("{}", "response_format")


def test_harmony_analysis_is_reasoning():
    """gpt-oss's thoughts (its analysis channel, as its real template writes them) split into reasoning_content and
    the rest into content that the harmony parser reads the call or the final answer from: whole and at every cut
    of a streamed answer (apps/serve_logprobs.py's splitter, before the tool-call parser, as the server runs them)."""
    from moelite.apps.serve_logprobs import ThinkSplitter, split_reasoning

    name, fmt = "openai-gpt-oss-120b", tc.FORMATS["harmony"]
    t = ChatTemplate(real_template(name), {"bos_token": "<s>", "eos_token": "</s>"})
    before = t.render(tc.template_messages(USER), tools=TOOLS, add_generation_prompt=True)
    turns = [
        ({"content": None, "tool_calls": _history_calls(CALLS[:1])}, ("", CALLS[:1])),
        ({"content": "Sunny, 21 C."}, ("Sunny, 21 C.", [])),
    ]
    for turn, want in turns:
        msgs = USER + [{"role": "assistant", "thinking": "The user wants the weather.", **turn}]
        after = t.render(tc.template_messages(msgs), tools=TOOLS, add_generation_prompt=False)
        assert after.startswith(before)
        answer = after[len(before) :]  # what the model writes after the generation prompt's <|start|>assistant
        assert answer.startswith("<|channel|>analysis<|message|>"), answer
        reasoning, content = split_reasoning(answer, False)
        assert reasoning == "The user wants the weather." and tc.parse(fmt, content, FUNCTIONS) == want, content
        for cut in range(len(answer) + 1):
            s = ThinkSplitter(False)
            parts = [s.push(answer[:cut]), s.push(answer[cut:]), s.flush()]
            assert "".join(r for r, _ in parts) == reasoning and "".join(c for _, c in parts) == content, cut
    assert split_reasoning("Plain <|x", False) == (None, "Plain <|x")  # no channel markup: all content


@pytest.mark.parametrize("name", sorted(set(TEMPLATES) - {"llama-cpp-deepseek-r1"}))
def test_auto_grammar_holds_calls_to_their_schema(name, qwen_tok, gemma_tok):
    """tool_choice auto: text, then the template's own call, then text is accepted (the marker ends the free text,
    the call follows its grammar); the same call with an argument outside its schema ('days' not an integer) is
    refused at that argument; a plain answer stays free."""
    import llguidance

    from moelite.runtime.constrained import vocabulary

    fmt = tc.detect(real_template(name))
    tok = gemma_tok if fmt.name == "gemma4" else qwen_tok
    grammar = tc.auto_grammar(fmt, tok, [WEATHER, CLOCK], parallel=True)
    if not fmt.lazy:
        assert grammar is None
        return

    def consumed(text: str) -> tuple[bool, bool]:
        m = llguidance.LLMatcher(vocabulary(tok), grammar, log_level=0)
        ids = tok.encode(text, add_special=False)
        return m.try_consume_tokens(ids) == len(ids), m.is_accepting()

    def call_text(args) -> str:
        text = rendered_answer(name, [("get_weather", args)])
        start = min(i for i in (text.find(s) for s in fmt.starts) if i >= 0)
        end = max(text.rfind(e) + len(e) for e in CALL_ENDS)
        return text[start:end]

    good, bad = call_text({"city": "Paris", "days": 3}), call_text({"city": "Paris", "days": "three"})
    assert consumed("Let me look.\n" + good + "\nDone.") == (True, True), good
    assert consumed("Let me look.\n" + bad)[0] is False, bad
    assert consumed("A plain answer, <b>no</b> call.") == (True, True)


def test_calls_inlined_for_a_template_that_renders_none():
    """LFM2-8B-A1B's template renders an assistant turn's content only: the calls, written into it in LFM2's own
    spelling, stay in the prompt and parse back into the same calls."""
    name, fmt = "LFM2-8B-A1B", tc.FORMATS["lfm2"]
    t = ChatTemplate(real_template(name), {"bos_token": "<s>", "eos_token": "</s>"})
    msgs = USER + [{"role": "assistant", "content": None, "tool_calls": _history_calls(CALLS)}]
    plain = t.render(tc.template_messages(msgs), tools=TOOLS, add_generation_prompt=False)
    assert "get_time" not in plain.split("<|tool_list_end|>")[-1]  # the template alone drops the calls
    rendered = t.render(tc.template_messages(msgs, fmt.inline), tools=TOOLS, add_generation_prompt=False)
    turn = rendered.split("<|im_start|>assistant\n")[-1]
    assert turn.startswith("<|tool_call_start|>[") and tc.parse(fmt, turn, FUNCTIONS)[1] == CALLS, turn
