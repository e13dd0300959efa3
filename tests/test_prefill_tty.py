"""A long prompt in a terminal: `run` and `chat` show its progress, and Ctrl-C stops it while it is being read
(run: exit 130; chat: the answer stops, the app stays). The embedded demo model reads ~4000 tokens in chunks of
512; MOELITE_PROGRESS_AFTER=0 shows the progress line from the first chunk on."""
from __future__ import annotations

import sys

import pytest

from test_chat_tty import PROMPT, _env

pexpect = pytest.importorskip("pexpect")


@pytest.fixture()
def long_prompt(tmp_path):
    import moelite
    with moelite.load(n_threads=1) as m:
        words = "the cache of experts is read from the disk and "
        text = words * 2000
        ids = m.tokenizer.encode(text)
        text = m.tokenizer.decode(ids[:3900])
    f = tmp_path / "prompt.txt"
    f.write_text(text, encoding="utf-8")
    return f


def _spawn(tmp_path, *args: str):
    env = dict(_env(tmp_path), MOELITE_PROGRESS_AFTER="0")
    return pexpect.spawn(sys.executable, ["-m", "moelite", *args, "-t", "1"], env=env, encoding="utf-8", timeout=60,
                         dimensions=(40, 200))


def test_run_shows_prefill_progress_and_ctrl_c_stops_it(tmp_path, long_prompt):
    child = _spawn(tmp_path, "run", "-f", str(long_prompt), "-n", "8")
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
    child = _spawn(tmp_path, "chat", "-n", "8", "--temp", "0")
    try:
        child.expect_exact(PROMPT)
        child.sendline(long_prompt.read_text(encoding="utf-8").replace("\n", " ")[:12000])
        child.expect(r"reading the prompt: \d+/\d+ tokens")
        child.sendintr()
        child.expect("answer stopped")
        child.expect(r"\+ 0 tok .* stopped")
        child.expect_exact(PROMPT)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
