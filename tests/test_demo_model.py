"""The embedded demo model: ships in the package, loads with no model argument, its tokenizer round-trips
text, greedy output is deterministic, and `moelite run` prints text from it offline."""
from __future__ import annotations

import os
import subprocess
import sys

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


def test_readme_first_command_prints_text():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "moelite", "run", "-p", PROMPT, "-n", "40", "--temp", "0"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 20
