"""`moelite chat` and `run` in a pseudo-terminal (pexpect): what they say in one line about the conversation (old
messages dropped to fit the context, an answer cut by a full context), the status line's memory labels, and a long
prompt: its progress shows, Ctrl-C stops it while it is being read (run: exit 130; chat: the answer stops, the app
stays). The embedded demo model reads ~4000 tokens in chunks of 512; MOELITE_PROGRESS_AFTER=0 shows the progress
line from the first chunk on."""

from __future__ import annotations

import contextlib
import sys

import pytest
from test_chat_tty import PROMPT, _env

pexpect = pytest.importorskip("pexpect")


def _spawn(tmp_path, *args: str, **env: str):
    return pexpect.spawn(
        sys.executable,
        ["-m", "moelite", *args, "-t", "1"],
        env=dict(_env(tmp_path), **env),
        encoding="utf-8",
        timeout=60,
        dimensions=(40, 200),
    )


@contextlib.contextmanager
def chat_session(tmp_path, *args: str, **env: str):
    """A chat child at its first prompt; on leaving, /exit and a clean exit status are checked."""
    child = _spawn(tmp_path, "chat", *args, **env)
    try:
        child.expect_exact(PROMPT)
        yield child
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_dropped_turns_and_a_full_context_are_said(tmp_path):
    from fixture_models import fixture_gguf

    _, gguf = fixture_gguf("qwen3_moe")
    with chat_session(tmp_path, str(gguf), "--temp", "0", "--ignore-eos", "-c", "96", "-n", "90") as child:
        child.sendline("hello there")
        child.expect(r"the context is full \(96 tokens")  # 90 tokens do not fit after the prompt
        child.expect(r"model memory [\d.]+ \w+ \(all resident\) · process RSS")
        child.expect_exact(PROMPT)
        child.sendline("and then?")
        child.expect(r"the (\d+) oldest messages? no longer fit the context of 96 tokens and were dropped")
        assert int(child.match.group(1)) >= 1
        child.expect_exact(PROMPT)


@pytest.fixture()
def long_prompt(tmp_path):
    import moelite

    with moelite.load(n_threads=1) as m:
        ids = m.tokenizer.encode("the cache of experts is read from the disk and " * 2000)
        text = m.tokenizer.decode(ids[:3900])
    f = tmp_path / "prompt.txt"
    f.write_text(text, encoding="utf-8")
    return f


def test_run_shows_prefill_progress_and_ctrl_c_stops_it(tmp_path, long_prompt):
    child = _spawn(tmp_path, "run", "-f", str(long_prompt), "-n", "8", MOELITE_PROGRESS_AFTER="0")
    try:
        child.expect(r"reading the prompt: (\d+)/(\d+) tokens")
        assert int(child.match.group(1)) < int(child.match.group(2))
        child.sendintr()
        child.expect("moelite: interrupted")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 130


def test_chat_ctrl_c_during_the_prompt_stops_the_answer_not_the_app(tmp_path, long_prompt):
    with chat_session(tmp_path, "-n", "8", "--temp", "0", MOELITE_PROGRESS_AFTER="0") as child:
        child.sendline(long_prompt.read_text(encoding="utf-8").replace("\n", " ")[:12000])
        child.expect(r"reading the prompt: \d+/\d+ tokens")
        child.sendintr()
        child.expect("answer stopped")
        child.expect(r"\+ 0 tok .* stopped")
        child.expect_exact(PROMPT)
