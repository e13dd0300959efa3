"""Chat templates: a model's `tokenizer.chat_template` (Jinja) rendered as transformers'
`apply_chat_template(..., tokenize=False)` renders it.

Same environment as transformers: jinja2's ImmutableSandboxedEnvironment with `trim_blocks`, `lstrip_blocks`
and loop controls; `raise_exception(msg)`, `strftime_now(fmt)`, a `tojson` filter that is `json.dumps`
(no HTML escaping, `ensure_ascii=False`); `{% generation %}` accepted as a no-op block. Variables:
`messages` (keys whose value is None dropped), `add_generation_prompt`, `tools`, `documents`, and the
special-token strings `bos_token`, `eos_token`, `unk_token`, `pad_token`, `sep_token`, `mask_token`, `cls_token` when the
model has them. Templates are untrusted input: the sandbox forbids attribute hacks and mutation, and limits
what one render may cost (`_LimitedEnvironment`): strings and lists built by operators, filters and calls of
at most MAX_OUTPUT items, no numeric argument above that, MAX_ITERATIONS loop iterations in all, Python's
recursion limit, and MAX_OUTPUT characters of output. A model file's template that does not parse or fails
while rendering (a limit, a sandbox violation, an error) is replaced by the default template with a warning;
`raise_exception(...)` from the template stays a UsageError (the template refuses the conversation).

A model without a template gets ChatML (`DEFAULT_CHAT_TEMPLATE`): `<|im_start|>{role}\\n{content}<|im_end|>\\n`
per message, then `<|im_start|>assistant\\n` when a generation prompt is asked for.
"""

from __future__ import annotations

import contextvars
import json
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.exceptions import SecurityError
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
    "cls_token": "tokenizer.ggml.cls_token_id",  # ERNIE-4.5's template opens with it
}


MAX_OUTPUT = 1 << 24  # characters of output, and items of any string or list a template builds
MAX_ITERATIONS = 1 << 20  # loop iterations per render, all loops together


class ChatTemplate:
    """One compiled chat template plus the special-token strings it is rendered with. fallback=True (a model
    file's template): a template that does not parse or fails while rendering gives way to the default
    template with a warning, instead of an error."""

    def __init__(
        self,
        source: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        origin: str = "chat template",
        fallback: bool = False,
    ) -> None:
        self.is_default = not source
        self.source = source or DEFAULT_CHAT_TEMPLATE
        self.special_tokens = dict(special_tokens or {})
        self.origin, self.fallback = origin, fallback and not self.is_default
        try:
            self._template = _compile(self.source)
        except (jinja2.TemplateSyntaxError, RecursionError) as e:
            where = f" (line {e.lineno})" if isinstance(e, jinja2.TemplateSyntaxError) else ""
            if not self.fallback:
                raise TokenizerError(f"{origin}: template does not parse: {e}{where}") from e
            self._give_up(f"does not parse: {e}{where}")

    def _give_up(self, why: str) -> None:
        warnings.warn(
            f"{self.origin}: chat template {why}; using the default (ChatML) template instead",
            UserWarning,
            stacklevel=3,
        )
        self.is_default, self.fallback, self.source = True, False, DEFAULT_CHAT_TEMPLATE
        self._template = _compile(DEFAULT_CHAT_TEMPLATE)

    @classmethod
    def from_gguf_kv(
        cls, kv: Mapping[str, Any], tokenizer: Tokenizer | None = None, path: str = "", name: str | None = None
    ) -> ChatTemplate:
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
        source = kv.get(key)
        if source is not None and not isinstance(source, str):
            raise TokenizerError(f"{path}: key '{key}' holds a {type(source).__name__}, expected a string")
        return cls(source, special, origin=f"{path}: key '{key}'", fallback=True)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]). Extra keyword arguments
        become template variables (e.g. `enable_thinking=False`) and override the special tokens."""
        if not messages:
            raise UsageError("cannot render a chat template for an empty conversation; give at least one message")
        chat = []
        for m in messages:
            if not isinstance(m, Mapping):
                raise UsageError(f"chat messages must be dicts with 'role' and 'content', got {m!r}")
            chat.append({k: _plain(v) for k, v in m.items() if v is not None})
        variables = dict(
            messages=chat,
            tools=_plain(tools),
            documents=_plain(documents),
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
            **_plain(kwargs),
        )
        try:
            return _render(self._template, variables)
        except _Refusal as e:  # raise_exception() in the template: it refuses this conversation
            raise UsageError(f"chat template rejected the conversation: {e}") from None
        except (
            jinja2.TemplateError,
            RecursionError,
            ArithmeticError,
            LookupError,
            TypeError,
            ValueError,
            AttributeError,
            MemoryError,
        ) as e:  # a sandbox violation, a limit, a broken template
            if not self.fallback:
                raise UsageError(f"{self.origin}: chat template failed: {type(e).__name__}: {e}") from None
            self._give_up(f"failed ({type(e).__name__}: {str(e)[:200]})")
            return _render(self._template, variables)


def _render(template: jinja2.Template, variables: dict[str, Any]) -> str:
    """Render with a fresh iteration budget, stopping at MAX_OUTPUT characters."""
    token = _budget.set([MAX_ITERATIONS])
    try:
        out, size = [], 0
        for piece in template.generate(**variables):
            size += len(piece)
            if size > MAX_OUTPUT:
                raise SecurityError(f"chat template output exceeds {MAX_OUTPUT} characters")
            out.append(piece)
        return "".join(out)
    finally:
        _budget.reset(token)


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


class _Refusal(jinja2.exceptions.TemplateError):
    """raise_exception(message) called by the template."""


def _raise_exception(message: str) -> None:
    raise _Refusal(message)


# ---- limits ---------------------------------------------------------------------------------------------
_budget: contextvars.ContextVar[list[int]] = contextvars.ContextVar("chat_template_budget")
_BIG_FORMAT = re.compile(r"\d{7,}")  # a width / precision of a million or more in a format string


def _counted(iterable: Iterable[Any]) -> Iterator[Any]:
    """The iterable of a {% for %}, drawing one unit per item from this render's budget."""
    budget = _budget.get([MAX_ITERATIONS])  # outside a render (no budget set): a fresh one, never a shared list
    for item in iterable:
        budget[0] -= 1
        if budget[0] < 0:
            raise SecurityError(f"chat template runs more than {MAX_ITERATIONS} loop iterations")
        yield item


def _check_size(value: Any) -> Any:
    if isinstance(value, (str, list, tuple, dict)) and len(value) > MAX_OUTPUT:
        raise SecurityError(f"chat template builds a value of {len(value)} items (limit {MAX_OUTPUT})")
    return value


def _check_args(args: Iterable[Any]) -> None:
    for a in args:
        if isinstance(a, (int, float)) and not isinstance(a, bool) and abs(a) > MAX_OUTPUT:
            raise SecurityError(f"chat template passes {a!r}, above the limit {MAX_OUTPUT}")
        if isinstance(a, str) and _BIG_FORMAT.search(a) and ("%" in a or "{" in a):
            raise SecurityError("chat template uses a format width or precision above the limit")


def _size_of(x: Any) -> int:
    return len(x) if isinstance(x, (str, list, tuple)) else 1


def _limited_filter(f: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _check_args([*args[1:], *kwargs.values()])
        return _check_size(f(*args, **kwargs))

    for attr in ("jinja_pass_arg",):  # keep @pass_context / @pass_environment markers
        if hasattr(f, attr):
            setattr(wrapper, attr, getattr(f, attr))
    return wrapper


class _LimitedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox plus size, argument and iteration limits (module docstring)."""

    intercepted_binops = frozenset(["*", "**", "+", "%", "//", "/"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*" and (isinstance(left, (str, list, tuple)) or isinstance(right, (str, list, tuple))):
            n = right if isinstance(left, (str, list, tuple)) else left
            if isinstance(n, int) and _size_of(left if n is right else right) * max(n, 0) > MAX_OUTPUT:
                raise SecurityError(f"chat template repeats a sequence beyond {MAX_OUTPUT} items")
        elif operator == "**":
            _check_args([left, right])
        elif operator == "%":
            _check_args([left])
        elif operator == "+" and _size_of(left) + _size_of(right) > MAX_OUTPUT:
            raise SecurityError(f"chat template builds a value beyond {MAX_OUTPUT} items")
        return _check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _check_args([*args, *kwargs.values()])
        if getattr(__obj, "__name__", "") in ("format", "format_map") and isinstance(
            getattr(__obj, "__self__", None), str
        ):
            _check_args([__obj.__self__])
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):  # every loop draws from the render's iteration budget
            loop.iter = nodes.Call(
                nodes.Name("__moelite_counted", "load"), [loop.iter], [], None, None, lineno=loop.iter.lineno
            )
        return tree


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # jinja's own tojson HTML-escapes <, >, &, ' -- chat templates expect plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _dict(*args: Any, **kwargs: Any) -> dict:
    return dict(*args, **kwargs)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = _LimitedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.filters = {name: _limited_filter(f) for name, f in env.filters.items()}
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        dict=_dict,
        namespace=_Namespace,
        __moelite_counted=_counted,
    )
    return env.from_string(source)


__all__ = ["ChatTemplate", "DEFAULT_CHAT_TEMPLATE"]
