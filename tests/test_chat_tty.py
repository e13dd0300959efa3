"""`moelite chat` in a real pseudo-terminal (pexpect): two turns, Ctrl-C mid-answer, /stats, /reset, /exit."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

PROMPT = ">>> "


def _env(tmp: Path) -> dict:
    import moelite

    env = dict(os.environ, XDG_CACHE_HOME=str(tmp / "cache"), TERM="xterm", COLUMNS="120")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(moelite.__file__).parent.parent), env.get("PYTHONPATH", "")])
    return env


def _spawn(tmp: Path, *args: str):
    from fixture_models import fixture_gguf

    _, gguf = fixture_gguf("qwen3_moe")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "moelite", "chat", str(gguf), "--threads", "1", *args],
        env=_env(tmp),
        encoding="utf-8",
        timeout=30,
        dimensions=(40, 120),
    )
    child.expect("type /help")
    child.expect_exact(PROMPT)
    return child


def test_two_turns_stats_and_exit(tmp_path):
    child = _spawn(tmp_path, "--temp", "0", "-n", "12", "--ignore-eos")
    try:
        child.sendline("Once upon a time")
        child.expect(r"tok/s · (\d+) prompt \+ 12 tok · cache [\d.]+ % hit · model memory .* process RSS")
        first_prompt = int(child.match.group(1))
        child.expect_exact(PROMPT)
        child.sendline("And then?")
        child.expect(r"tok/s · (\d+) prompt \+ 12 tok")
        assert int(child.match.group(1)) > first_prompt + 12  # the history went into the second turn
        child.expect_exact(PROMPT)
        child.sendline("/stats")
        child.expect(r"hit rate [\d.]+ %")
        child.expect("layer")
        child.expect_exact(PROMPT)
        child.sendline("/reset")
        child.expect("conversation cleared")
        child.expect_exact(PROMPT)
        child.sendline("Once upon a time")
        child.expect(rf"tok/s · {first_prompt} prompt \+ 12 tok")  # back to a one-turn prompt
        child.expect_exact(PROMPT)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_not_the_app(tmp_path):
    # a long answer: no end-of-text stop and a large context, so it is still running when Ctrl-C comes
    child = _spawn(tmp_path, "--temp", "0", "--ignore-eos", "--ctx-size", "32768", "-n", "30000")
    try:
        child.sendline("Tell me a very long story")
        child.expect_exact("Tell me a very long story")
        child.expect(r"\S{8}", timeout=30)  # the answer is streaming
        time.sleep(0.3)
        t0 = time.monotonic()
        child.sendintr()
        child.expect("answer stopped", timeout=10)
        child.expect(r"tok/s · \d+ prompt \+ (\d+) tok .* stopped")
        assert 0 < int(child.match.group(1)) < 30000
        assert time.monotonic() - t0 < 10
        child.expect_exact(PROMPT)
        assert child.isalive()
        child.sendline("/stats")  # the app still answers
        child.expect(r"hit rate [\d.]+ %")
        child.expect_exact(PROMPT)
        child.sendintr()  # Ctrl-C at the prompt: a hint, no exit
        child.expect("Ctrl-D to quit")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_overlong_message_and_full_context_keep_the_app_running(tmp_path):
    child = _spawn(tmp_path, "--temp", "0", "--ignore-eos", "--ctx-size", "96", "-n", "20")
    try:
        child.sendline("word " * 200)  # longer than the whole context
        child.expect("error: .*exceeds the context")
        child.expect_exact(PROMPT)
        for i in range(4):  # old turns are dropped to make room
            child.sendline(f"turn {i}")
            child.expect(r"tok/s · (\d+) prompt \+ 20 tok")
            assert int(child.match.group(1)) <= 72
            child.expect_exact(PROMPT)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
