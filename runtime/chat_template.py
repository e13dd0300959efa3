"""Chat templates: a model's `tokenizer.chat_template` (Jinja) rendered as transformers'
`apply_chat_template(..., tokenize=False)` renders it.

Same environment as transformers: jinja2's ImmutableSandboxedEnvironment with `trim_blocks`, `lstrip_blocks`
and loop controls; `raise_exception(msg)`, `strftime_now(fmt)`, a `tojson` filter that is `json.dumps`
(no HTML escaping, `ensure_ascii=False`); `{% generation %}` accepted as a no-op block. Variables:
`messages` (keys whose value is None dropped), `add_generation_prompt`, `tools`, `documents`, and the
special-token strings `bos_token`, `eos_token`, `unk_token`, `pad_token`, `sep_token`, `mask_token` when the
model has them. Templates are untrusted input: the sandbox forbids attribute hacks and mutation.

A model without a template gets ChatML (`DEFAULT_CHAT_TEMPLATE`): `<|im_start|>{role}\\n{content}<|im_end|>\\n`
per message, then `<|im_start|>assistant\\n` when a generation prompt is asked for.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moelite.errors import TokenizerError, UsageError

if TYPE_CHECKING:
    from moelite.runtime.tokenizer import Tokenizer

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# GGUF key of each special-token variable a template may read
_SPECIAL_TOKEN_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
    "sep_token": "tokenizer.ggml.seperator_token_id",  # sic: llama.cpp's spelling
    "mask_token": "tokenizer.ggml.mask_token_id",
}


class ChatTemplate:
    """One compiled chat template plus the special-token strings it is rendered with."""

    def __init__(self, source: str | None = None, special_tokens: Mapping[str, str] | None = None,
                 origin: str = "chat template") -> None:
        self.is_default = not source
        self.source = source or DEFAULT_CHAT_TEMPLATE
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _compile(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"{origin}: template does not parse: {e} (line {e.lineno})") from e

    @classmethod
    def from_gguf_kv(cls, kv: Mapping[str, Any], tokenizer: "Tokenizer | None" = None, path: str = "",
                     name: str | None = None) -> "ChatTemplate":
        """The template of a GGUF file (`tokenizer.chat_template`, or `tokenizer.chat_template.<name>`),
        with the special-token strings looked up in `tokenizer`."""
        key = "tokenizer.chat_template" + (f".{name}" if name else "")
        if name and key not in kv:
            raise UsageError(f"{path}: no chat template named {name!r} (key '{key}' is missing)")
        special = {}
        if tokenizer is not None:
            for var, id_key in _SPECIAL_TOKEN_KEYS.items():
                if kv.get(id_key) is not None:
                    text = tokenizer.token_text(int(kv[id_key]))
                    if text is not None:
                        special[var] = text
        return cls(kv.get(key), special, origin=f"{path}: key '{key}'")

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None,
               documents: Sequence[Mapping[str, Any]] | None = None, **kwargs: Any) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]). Extra keyword arguments
        become template variables (e.g. `enable_thinking=False`) and override the special tokens."""
        if not messages:
            raise UsageError("cannot render a chat template for an empty conversation; give at least one message")
        chat = []
        for m in messages:
            if not isinstance(m, Mapping):
                raise UsageError(f"chat messages must be dicts with 'role' and 'content', got {m!r}")
            chat.append({k: _plain(v) for k, v in m.items() if v is not None})
        variables = {**self.special_tokens, **_plain(kwargs)}
        try:
            return self._template.render(messages=chat, tools=_plain(tools), documents=_plain(documents),
                                         add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:  # raise_exception() in the template, or a sandbox violation
            raise UsageError(f"chat template rejected the conversation: {e}") from e


def _plain(value: Any) -> Any:
    """A copy made of JSON types only (templates see no objects with methods the sandbox cannot judge)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    for base, convert in ((str, str.__str__), (int, int.__int__), (float, float.__float__)):
        if isinstance(value, base):  # a subclass (str enum, IntEnum): back to the base type's value
            return convert(value)
    if callable(getattr(value, "item", None)):  # numpy scalar
        return _plain(value.item())
    return f"<{type(value).__name__}>"


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here a no-op."""
    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_passthrough"), [], [], body).set_lineno(lineno)

    def _passthrough(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """jinja's `namespace()` without underscore-named attributes (a sandbox escape route)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 -- same signature trick as jinja's
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes <, >, &, ' -- chat templates expect plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _dict(*args: Any, **kwargs: Any) -> dict:
    return dict(*args, **kwargs)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_dict,
                       namespace=_Namespace)
    return env.from_string(source)


__all__ = ["ChatTemplate", "DEFAULT_CHAT_TEMPLATE"]
