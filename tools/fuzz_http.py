"""Fuzz `moelite serve` over real HTTP on 127.0.0.1 (issue 15's HTTP target; tools/fuzz.py covers the files).

    python tools/fuzz_http.py --cases 2000 --seed 1 [--model demo.gguf] [--out fuzz-http]

One server (the embedded demo model unless --model) takes every case: structure-aware mutations of valid OpenAI
requests (JSON values of every type, deep nesting, huge numbers, lone surrogates, unknown and unsupported fields),
of the HTTP framing (methods, paths, Content-Length lies, header floods, bad request lines, truncated bodies) and
raw garbage, each on its own connection with a timeout. A case is

  ok         a 2xx reply with a JSON (or server-sent events) body
  rejected   a 4xx reply whose body is a JSON error object
  bad        a 5xx, a 4xx/2xx body that is not JSON, no reply within the timeout (hang), or a dropped connection
             when the request was complete

and after every 100 cases (and at the end) a valid chat request must still get its correct answer, and the
server's RSS must stay flat (within 64 MiB of its level after warm-up). Exit status 1 if anything was bad.
Requests are only ever sent to 127.0.0.1.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

VALID_CHAT = {"model": "moelite", "messages": [{"role": "user", "content": "What is Python?"}], "max_tokens": 8,
              "temperature": 0}
VALID_COMPLETION = {"model": "moelite", "prompt": "It is a truth", "max_tokens": 8, "temperature": 0}
FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stream", "stream_options",
          "repetition_penalty", "messages", "prompt", "model", "n", "tools", "logprobs", "response_format", "user"]
ODD_VALUES = [None, True, False, 0, -1, 1, 2**31, 2**63, -2**63, 10**400, 1e308, -0.0, 0.5, "", "x" * 10000,
              "\ud800", "\x00", [], {}, [1, 2], {"a": 1}, [[[[[]]]]], "NaN", "Infinity"]
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/moelite", "/health", "/", "/v1",
         "/v1/chat/completions/../models", "/%00", "/" + "a" * 9000, "/v1/models/" + "%ff" * 10]
METHODS = ["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE", "BREW", ""]


def start_server(model: str | None, log) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "moelite", "serve", *([model] if model else []), "--port", "0", "--threads", "1",
           "--max-tokens", "16", "--max-request-bytes", "65536", "--timeout", "30"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()
    if "http://127.0.0.1:" not in line:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    port = int(line.split("http://127.0.0.1:", 1)[1].split("/")[0].split()[0])
    return proc, port


def exchange(port: int, raw: bytes, timeout: float, complete: bool = True) -> tuple[str, int | None, bytes]:
    """-> (outcome, status, body). outcome: 'reply', 'hang', 'dropped' (connection closed with no reply). An
    incomplete request is followed by a half-close (the server must see the end of it); a complete one is not
    (the server takes an early EOF for a client that left, and cancels)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(raw)
            if not complete:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass                                            # the server may close early on a bad request: read it
        data = b""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            return ("hang", None, data) if not data else ("reply", _status(data), _body(data))
        except OSError:
            pass
    if not data:
        return "dropped", None, b""
    return "reply", _status(data), _body(data)


def _status(data: bytes) -> int | None:
    try:
        return int(data.split(b"\r\n", 1)[0].split()[1])
    except (IndexError, ValueError):
        return None


def _body(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in data else b""


def request(method: str, path: str, body: bytes | None, headers: dict[str, str] | None = None) -> bytes:
    head = {"Host": "127.0.0.1", "Connection": "close"}
    if body is not None:
        head["Content-Type"] = "application/json"
        head["Content-Length"] = str(len(body))
    head.update(headers or {})
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in head.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogatepass") + (body or b"")


def mutate_json(rng: random.Random) -> bytes:
    doc = json.loads(json.dumps(rng.choice([VALID_CHAT, VALID_COMPLETION])))
    for _ in range(rng.randint(1, 3)):
        if not isinstance(doc, dict):                       # replaced by a non-object: nothing left to edit
            break
        kind = rng.random()
        if kind < 0.5:
            doc[rng.choice(FIELDS)] = rng.choice(ODD_VALUES)
        elif kind < 0.65 and doc.get("messages"):
            msg = rng.choice(doc["messages"]) if isinstance(doc["messages"], list) and doc["messages"] else {}
            if isinstance(msg, dict):
                msg[rng.choice(["role", "content", "name", "tool_calls"])] = rng.choice(ODD_VALUES)
        elif kind < 0.75:
            depth = rng.choice([10, 100, 1000, 100000])
            doc[rng.choice(FIELDS)] = json.loads("[" * min(depth, 900) + "]" * min(depth, 900))
        elif kind < 0.85:
            if doc:
                doc.pop(rng.choice(list(doc)))
        else:
            doc = rng.choice(ODD_VALUES)
    try:
        text = json.dumps(doc, allow_nan=True)
    except (ValueError, RecursionError):
        text = "[" * 5000 + "]" * 5000
    if rng.random() < 0.1:                                  # raw text edits: truncation, garbage, nesting bombs
        cut = rng.randint(0, len(text))
        text = rng.choice([text[:cut], text[:cut] + "\x00\xff" + text[cut:], "[" * 200000, "1e99999", "nan"])
    return text.encode("utf-8", "surrogatepass")


def make_case(rng: random.Random) -> tuple[bytes, bool]:
    """-> (raw request bytes, complete: whether the request as sent is a whole HTTP message)."""
    r = rng.random()
    if r < 0.6:
        return request("POST", rng.choice(PATHS[:2]), mutate_json(rng)), True
    if r < 0.75:
        body = mutate_json(rng) if rng.random() < 0.5 else None
        return request(rng.choice(METHODS) or "GET", rng.choice(PATHS), body,
                       {"Origin": "http://x"} if rng.random() < 0.2 else None), True
    if r < 0.9:                                              # framing lies
        body = mutate_json(rng)
        lie = rng.choice(["0", "-1", "999999999999", "²", "1" * 5000, "abc", str(len(body) + 100)])
        complete = lie.isdigit() and lie.isascii() and len(lie) < 20 and int(lie) <= len(body)
        return request("POST", "/v1/chat/completions", body, {"Content-Length": lie}), complete
    if r < 0.95:                                             # header flood / huge header
        hdrs = {f"X-{i}": "y" * rng.choice([10, 10000]) for i in range(rng.choice([1, 200]))}
        return request("POST", "/v1/chat/completions", json.dumps(VALID_CHAT).encode(), hdrs), True
    return bytes(rng.randrange(256) for _ in range(rng.randint(0, 300))), False


def judge(outcome: str, status: int | None, body: bytes, complete: bool, head_request: bool = False) -> str:
    if outcome == "hang":
        return "bad:hang"
    if outcome == "dropped":
        return "rejected" if not complete else "bad:dropped"
    if status is None:
        return "bad:no-status"
    if status >= 500:
        return f"bad:{status}"
    if head_request:                                        # a reply to HEAD carries headers only
        return "rejected" if status >= 400 else "ok"
    if b"data:" in body[:64] or status == 204 or (status == 200 and body == b""):   # SSE (chunked or not)
        return "ok"
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return f"bad:{status}-not-json"
    if 400 <= status < 500:
        return "rejected" if isinstance(doc, dict) and "error" in doc else f"bad:{status}-no-error-object"
    return "ok"


def check_alive(port: int, expected: str | None) -> str:
    raw = request("POST", "/v1/chat/completions", json.dumps(VALID_CHAT).encode())
    outcome, status, body = exchange(port, raw, 60)
    if outcome != "reply" or status != 200:
        raise SystemExit(f"the server no longer answers a valid request: {outcome} {status} {body[:200]!r}")
    text = json.loads(body)["choices"][0]["message"]["content"]
    if expected is not None and text != expected:
        raise SystemExit(f"a valid request now gets another answer: {text!r} != {expected!r}")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="GGUF to serve (default: the embedded demo)")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--out", type=Path, default=Path("fuzz-http"))
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    counts: dict[str, int] = {}
    with open(a.out / "server.log", "w") as log:
        proc, port = start_server(a.model, log)
        try:
            answer = check_alive(port, None)
            rss0 = psutil.Process(proc.pid).memory_info().rss
            rss_max = rss0
            for i in range(a.cases):
                raw, complete = make_case(rng)
                verdict = judge(*exchange(port, raw, a.timeout, complete), complete, raw.startswith(b"HEAD "))
                counts[verdict] = counts.get(verdict, 0) + 1
                if verdict.startswith("bad"):
                    (a.out / f"case-{a.seed}-{i}.bin").write_bytes(raw)
                if proc.poll() is not None:
                    counts["bad:server-died"] = 1
                    break
                if (i + 1) % 100 == 0:
                    check_alive(port, answer)
                    rss_max = max(rss_max, psutil.Process(proc.pid).memory_info().rss)
            if proc.poll() is None:
                check_alive(port, answer)
                rss_max = max(rss_max, psutil.Process(proc.pid).memory_info().rss)
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    growth = rss_max - rss0
    if growth > 64 << 20:
        counts["bad:rss-growth"] = 1
    summary = {"seed": a.seed, "cases": a.cases, "counts": counts, "rss_growth_mib": round(growth / 2**20, 1)}
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 1 if any(k.startswith("bad") for k in counts) else 0


if __name__ == "__main__":
    sys.exit(main())
