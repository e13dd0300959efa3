"""`moelite chat` in a pseudo-terminal says in one line what it did to the conversation: old messages dropped to
fit the context, an answer cut by a full context; the status line labels model memory and process RSS."""
from __future__ import annotations

import sys

import pytest

from test_chat_tty import PROMPT, _env

pexpect = pytest.importorskip("pexpect")


def test_dropped_turns_and_a_full_context_are_said(tmp_path):
    from fixture_models import fixture_gguf
    _, gguf = fixture_gguf("qwen3_moe")
    child = pexpect.spawn(sys.executable, ["-m", "moelite", "chat", str(gguf), "-t", "1", "--temp", "0",
                                           "--ignore-eos", "-c", "96", "-n", "90"],
                          env=_env(tmp_path), encoding="utf-8", timeout=30, dimensions=(40, 200))
    try:
        child.expect_exact(PROMPT)
        child.sendline("hello there")
        child.expect(r"the context is full \(96 tokens")              # 90 tokens do not fit after the prompt
        child.expect(r"model memory [\d.]+ \w+ \(all resident\) · process RSS")
        child.expect_exact(PROMPT)
        child.sendline("and then?")
        child.expect(r"the (\d+) oldest messages? no longer fit the context of 96 tokens and were dropped")
        assert int(child.match.group(1)) >= 1
        child.expect_exact(PROMPT)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
