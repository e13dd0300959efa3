"""Hostile chat templates in model files (issue 15): `{% set x = 'a' * 100000000 %}` once aborted the process.
Every template below either renders within the limits or falls back to the default template with a warning;
each runs in a subprocess with a 1.5 GiB address space, so an unbounded allocation fails the test instead of the
machine."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

MESSAGES = [{"role": "user", "content": "hi"}]
HOSTILE = [
    "{% set x = 'a' * 100000000 %}{{ x }}",
    "{{ 'ab' * 10**9 }}",
    "{{ [1] * 10**9 }}",
    "{{ 10 ** 10 ** 10 }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% set s = 'x' * 1000 %}{% for a in s %}{% for b in s %}{% for c in s %}{% endfor %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{{ 'x'|center(10**9) }}",
    "{{ 'x'|indent(10**9, true) }}",
    "{{ 'x'.ljust(10**9) }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ '%999999999d' % 1 }}",
    "{{ ('x' * 1000)|replace('x', 'y' * 1000000) }}",
    "{{ messages[5]['content'] }}",
    "{{ 1 / 0 }}",
    "{{ ''.__class__.__mro__ }}",
    "{% for m in messages %}{{ m.content ~ m.content }}{% endfor %}{% for i in range(2000000) %}{% endfor %}",
]

SCRIPT = textwrap.dedent("""
    import json, resource, sys, warnings
    resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))
    from moelite.runtime.chat_template import ChatTemplate
    source, messages = json.loads(sys.stdin.read())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = ChatTemplate.from_gguf_kv({"tokenizer.chat_template": source}, None, "m.gguf")
        out = t.render(messages)
    print(json.dumps({"out": out[:200], "default": t.is_default, "warnings": [str(w.message) for w in caught]}))
""")


@pytest.mark.parametrize("source", HOSTILE)
def test_hostile_template_falls_back(source):
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        input=json.dumps([source, MESSAGES]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["default"], res
    assert res["out"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert any("m.gguf" in w and "default" in w for w in res["warnings"]), res


def test_user_template_errors_are_usage_errors():
    """An explicitly given template (not a file's) still raises, naming what failed."""
    from moelite.errors import UsageError
    from moelite.runtime.chat_template import ChatTemplate

    with pytest.raises(UsageError, match="loop iterations"):
        ChatTemplate("{% for i in range(100000) %}{% for j in range(100) %}{% endfor %}{% endfor %}").render(MESSAGES)


def test_limits_leave_real_templates_alone():
    from moelite.runtime.chat_template import ChatTemplate

    long = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 2000} for i in range(200)]
    t = ChatTemplate("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    assert t.render(long).count("user: ") == 100
