"""Chat templates render exactly as transformers' apply_chat_template(tokenize=False) renders them.

transformers is the reference here only; the runtime never imports it (checked below in a fresh process).
"""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

import pytest

from moelite.errors import TokenizerError, UsageError
from moelite.runtime.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplate

MODELS = Path(__file__).resolve().parents[1] / "third_party" / "llama.cpp" / "models"

# ChatML as Qwen2.5 writes it: whitespace control with {%- -%}, a tools block using tojson
QWEN_STYLE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) or message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA3_STYLE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

MIXTRAL_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# block tags on their own indented lines: trim_blocks / lstrip_blocks decide the whitespace
BLOCKY = """{% for m in messages %}
  {% if m.role == 'user' %}
    U: {{ m.content }}
  {% else %}
    A: {{ m.content }}
  {% endif %}
{% endfor %}
{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}
{% generation %}n={{ ns.n }}{% endgeneration %} {{ messages[-1] | tojson }} {{ messages[0] | tojson(indent=2) }}
"""

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "  Hi <b>&</b> — ünïcode  "},
    {"role": "assistant", "content": "Hello!", "tool_calls": None},
    {"role": "user", "content": "2+2?"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add <two> numbers",
            "parameters": {"type": "object", "properties": {"a": {"type": "number"}}},
        },
    }
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers", reason="transformers is the reference renderer")
    from tokenizers import Tokenizer, models

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def _reference(hf_tokenizer, template, messages, **kw) -> str:
    return hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kw)


SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


@pytest.mark.parametrize(
    "template",
    [QWEN_STYLE, LLAMA3_STYLE, BLOCKY, DEFAULT_CHAT_TEMPLATE],
    ids=["qwen", "llama3", "blocky", "chatml-default"],
)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(hf_tokenizer, template, add_generation_prompt) -> None:
    ours = ChatTemplate(template, SPECIAL).render(CHAT, add_generation_prompt=add_generation_prompt)
    assert ours == _reference(hf_tokenizer, template, CHAT, add_generation_prompt=add_generation_prompt)


def test_tools_and_mixtral_match_transformers(hf_tokenizer) -> None:
    ours = ChatTemplate(QWEN_STYLE, SPECIAL).render(CHAT, tools=TOOLS)
    assert ours == _reference(hf_tokenizer, QWEN_STYLE, CHAT, tools=TOOLS, add_generation_prompt=True)
    assert '"description": "Add <two> numbers"' in ours  # tojson does not HTML-escape
    chat = CHAT[1:]
    ours = ChatTemplate(MIXTRAL_STYLE, SPECIAL).render(chat, add_generation_prompt=False)
    assert ours == _reference(hf_tokenizer, MIXTRAL_STYLE, chat)
    assert ours.startswith("<s>[INST]   Hi") and "Hello!</s>[INST] 2+2? [/INST]" in ours


def test_raise_exception_becomes_usage_error(hf_tokenizer) -> None:
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="alternate"):
        _reference(hf_tokenizer, MIXTRAL_STYLE, CHAT)
    with pytest.raises(UsageError, match="roles must alternate"):
        ChatTemplate(MIXTRAL_STYLE, SPECIAL).render(CHAT)  # a system message first


@pytest.mark.parametrize("name", ["qwen2", "phi-3", "command-r"])
def test_real_templates_from_gguf(hf_tokenizer, name) -> None:
    core = pytest.importorskip("moelite._core", reason="needs the built moelite._core (read_gguf)")
    from moelite.runtime.tokenizer import Tokenizer

    path = MODELS / f"ggml-vocab-{name}.gguf"
    if not path.exists():
        pytest.skip(f"{path.name} not found under {MODELS}")
    kv = core.read_gguf(str(path))["kv"]
    tok = Tokenizer.from_gguf_kv(kv, str(path))
    tmpl = ChatTemplate.from_gguf_kv(kv, tok, str(path))
    assert not tmpl.is_default and tmpl.special_tokens["eos_token"] == tok.eos_token
    hf_tokenizer_for_model = type(hf_tokenizer)(tokenizer_object=hf_tokenizer.backend_tokenizer, **tmpl.special_tokens)
    ours = tmpl.render(CHAT)
    assert ours == _reference(hf_tokenizer_for_model, kv["tokenizer.chat_template"], CHAT, add_generation_prompt=True)
    ids = tok.encode(ours)  # the rendered control tokens encode as single ids
    assert tok.stop_ids & set(ids)
    assert ids.count(tok.bos_id) <= 1 or tok.bos_id == tok.eos_id


def test_default_template_is_chatml() -> None:
    tmpl = ChatTemplate.from_gguf_kv({}, None, "plain.gguf")
    assert tmpl.is_default
    out = tmpl.render([{"role": "user", "content": "Hi"}])
    assert out == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tmpl.render([{"role": "user", "content": "Hi"}], add_generation_prompt=False).endswith("<|im_end|>\n")


def test_globals_and_variables() -> None:
    tmpl = ChatTemplate(
        "{{ strftime_now('%Y') }}|{{ bos_token }}|{{ tools is none }}|{{ flag }}|"
        "{{ messages | length }}|{{ messages[0].tool_calls is defined }}",
        {"bos_token": "<s>"},
    )
    out = tmpl.render([{"role": "user", "content": "x", "tool_calls": None}], flag=False)
    assert out == f"{datetime.date.today().year}|<s>|True|False|1|False"


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.append({'role': 'user', 'content': 'x'}) }}",  # mutation
        "{{ ''.__class__.__mro__ }}",  # attribute escape
        "{% set ns = namespace(_x=1) %}{{ ns._x }}",
    ],
)
def test_sandbox(source) -> None:
    with pytest.raises(UsageError):
        ChatTemplate(source).render([{"role": "user", "content": "x"}])


def test_bad_input() -> None:
    with pytest.raises(TokenizerError, match=r"m\.gguf.*tokenizer\.chat_template.*parse"):
        ChatTemplate("{% for %}", origin="m.gguf: key 'tokenizer.chat_template'")
    with pytest.warns(UserWarning, match=r"m\.gguf.*tokenizer\.chat_template.*parse.*default"):  # a file's: fallback
        assert ChatTemplate.from_gguf_kv({"tokenizer.chat_template": "{% for %}"}, None, "m.gguf").is_default
    with pytest.raises(UsageError, match="empty conversation"):
        ChatTemplate().render([])
    with pytest.raises(UsageError, match="no chat template named 'rag'"):
        ChatTemplate.from_gguf_kv({}, None, "m.gguf", name="rag")


def test_runtime_imports_neither_transformers_nor_torch() -> None:
    code = (
        "import sys, moelite.runtime.tokenizer, moelite.runtime.chat_template, moelite.runtime.sampling; "
        "bad = [m for m in ('transformers', 'torch') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
