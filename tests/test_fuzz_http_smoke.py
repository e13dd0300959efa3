"""A CI-sized run of the HTTP fuzzer (tools/fuzz_http.py) against a real `moelite serve` on 127.0.0.1: every
malformed request gets a JSON 4xx (or a well-formed 2xx), nothing hangs, the server never dies, a valid request
keeps getting the same answer, and its RSS stays flat."""

from __future__ import annotations

import json
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def test_http_fuzz_smoke(tmp_path):
    sys.path.insert(0, str(TOOLS))
    try:
        import fuzz_http
    finally:
        sys.path.remove(str(TOOLS))
    rc = fuzz_http.main(["--cases", "300", "--seed", "3", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert rc == 0, summary
    assert summary["counts"].get("rejected", 0) > 0 and summary["counts"].get("ok", 0) > 0
    assert not any(k.startswith("bad") for k in summary["counts"])
