"""The embedded demo model: ships in the package, loads with no model argument, its tokenizer round-trips
text, greedy output is deterministic, offloading its experts changes nothing, it answers held-out questions in
a sentence or two (issue 19), and the README's first command runs offline."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import moelite
from moelite.runtime.model import DEFAULT_MODEL

pytestmark = pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="demo model not shipped in this tree")
PROMPT = "It is a truth universally"


def test_shipped_file():
    assert DEFAULT_MODEL.stat().st_size <= 30 * 2**20
    with moelite.load() as m:
        info = m.info()
        assert info["architecture"] == "qwen3moe" and info["n_layer"] >= 4
        assert info["n_expert"] >= 16 and info["n_expert_used"] >= 2
        assert m.hparams["n_embd"] % 256 == 0
        assert m.kv.get("tokenizer.chat_template")


def test_tokenizer_round_trip():
    text = "It is a truth universally acknowledged.\ndef f(x):\n    return x + 1  # ok\nfunc main() {}\n"
    with moelite.load() as m:
        ids = m.tokenizer.encode(text, add_special=False)
        assert 0 < len(ids) < len(text)
        assert m.tokenizer.decode(ids) == text


def test_greedy_is_deterministic():
    with moelite.load(n_threads=2) as m:
        a = m.generate(PROMPT, max_tokens=24, temperature=0.0)
        b = m.generate(PROMPT, max_tokens=24, temperature=0.0)
    with moelite.load(n_threads=1) as m:
        c = m.generate(PROMPT, max_tokens=24, temperature=0.0)
    assert a == b == c and len(a.strip()) > 0


def readme_first_command() -> list[str]:
    """argv of the `moelite ...` part of the README's first command line (after `pip install . &&`)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    line = re.search(r"```bash\n(.*)\n", readme).group(1)
    cmd = shlex.split(line.split("&&", 1)[1].split("#", 1)[0])
    assert cmd[0] == "moelite", line
    return cmd[1:]


def test_readme_first_command_answers():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run(
        [sys.executable, "-m", "moelite", *readme_first_command(), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["finish_reason"] == "stop" and len(out["text"].split()) >= 4, out["text"]


# Held-out pairs of tools/build_qa_pairs.py (never trained on): the first three of each source, not picked.
HELD_OUT = [
    (
        "What is the Debian package gobjc-12-multilib-x86-64-linux-gnux32 for?",
        "GNU Objective-C compiler (multilib support) (cross compiler for x32 architecture).",
    ),
    ("What is the Debian package tinymux for?", "Text-based multi-user virtual world server."),
    ("What is the Debian package teseq for?", "Utility for rendering terminal typescripts human-readable."),
    (
        "What is Bluetooth?",
        "A specification for short-range radio links between mobile computers, mobile phones, "
        "digital cameras, and other portable devices.",
    ),
    (
        "What is flame on?",
        "To begin or continue to flame. The punning reference to Marvel Comics's Human Torch is "
        "no longer widely recognised.",
    ),
    ("What is CLU?", "An object-oriented programming language developed at MIT by Liskov et al in 1974-1975."),
    ("What does the openssl-ciphers command do?", "openssl-ciphers is the SSL cipher display and cipher list command."),
    (
        "What does the md5sum command do?",
        "md5sum is used to compute and check MD5 message digest. Print or check MD5 (128-bit) checksums.",
    ),
    ("What does the tempfile command do?", "tempfile is used to create a temporary file in a safe manner."),
    (
        "What does the function tkinter.Text.tag_raise do?",
        "Change the priority of tag TAGNAME such that it is higher than the priority of ABOVETHIS.",
    ),
    ("What does the function http.server.CGIHTTPRequestHandler.run_cgi do?", "Execute a CGI script."),
    ("What does the function pathlib.Path.is_fifo do?", "Whether this path is a FIFO."),
]


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def ask(m, question: str, **opts) -> tuple[str, str]:
    answer = m.chat([{"role": "user", "content": question}], temperature=0, max_tokens=MAX_ANSWER_TOKENS, **opts)
    return answer, m.last_stats.finish_reason


MAX_ANSWER_TOKENS = 48
# Measured on the shipped model (greedy): 10/12 end at <|im_end|>, 5/12 share a content word; the pre-tuning
# demo: 0/12 and 3/12 (it rambled for all 48 tokens). Margins for other CPUs' kernels.
MIN_STOPPED, MIN_OVERLAP = 8, 3


def test_answers_held_out_questions_briefly():
    """Greedy answers end at <|im_end|> within MAX_ANSWER_TOKENS, are a sentence or two, and most share a word
    (beyond the question's own) with the reference. The pre-tuning demo stopped on none of these."""
    stopped, overlapping = 0, 0
    with moelite.load(n_threads=1) as m:
        for question, reference in HELD_OUT:
            answer, finish = ask(m, question)
            stopped += finish == "stop"
            assert len(re.findall(r"[.!?](\s|$)", answer)) <= 3 and "<|im_" not in answer, (question, answer)
            overlapping += bool((words(answer) & words(reference)) - words(question) - STOP_WORDS)
    assert stopped >= MIN_STOPPED, f"{stopped}/{len(HELD_OUT)} answers ended at <|im_end|>"
    assert overlapping >= MIN_OVERLAP, f"{overlapping}/{len(HELD_OUT)} answers share a word with the reference"


STOP_WORDS = {"a", "an", "the", "of", "to", "and", "or", "in", "for", "is", "it", "this", "that", "with", "be", "as"}


def test_offloading_keeps_answers_exact():
    """Four of sixteen expert slots per layer (experts streamed from the file) give the same greedy tokens."""
    question = HELD_OUT[3][0]
    with moelite.load(n_threads=1, n_ctx=512) as m:
        assert not m.info()["offloaded"]
        full = ask(m, question)
    with moelite.load(n_threads=1, n_ctx=512, memory_budget="15MB") as m:
        info = m.info()
        assert info["offloaded"] and max(info["expert_slots"]) < 16
        small = ask(m, question)
        assert m.stats()["total"]["misses"] > 0
    assert small == full
