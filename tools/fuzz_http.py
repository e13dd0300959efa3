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
server's RSS must stay flat: within 64 MiB of its level after warm-up (one valid request of every kind: chat,
completion, streamed, logprobs, echo, tools, JSON schema, /tokenize, /detokenize, then the first --warmup cases).
summary.json has the counts, the RSS after warm-up, at the end and at its highest, and the RSS every 100 cases.
Exit status 1 if anything was bad. Requests are only ever sent to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

VALID_CHAT = {
    "model": "moelite",
    "messages": [{"role": "user", "content": "What is Python?"}],
    "max_tokens": 8,
    "temperature": 0,
}
VALID_COMPLETION = {"model": "moelite", "prompt": "It is a truth", "max_tokens": 8, "temperature": 0}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
# valid requests with the fields of issue 32 (logprobs, echo, tools, response_format): the mutations start from them too
VALID_EXTRA = [
    {**VALID_COMPLETION, "logprobs": 3, "echo": True, "max_tokens": 2},
    {**VALID_COMPLETION, "prompt": [[5, 6, 7, 8]], "logprobs": 1, "echo": True, "max_tokens": 0},
    {**VALID_CHAT, "logprobs": True, "top_logprobs": 2, "max_tokens": 4},
    {**VALID_CHAT, "logprobs": True, "top_logprobs": 1, "max_tokens": 4, "stream": True},
    {**VALID_CHAT, "tools": [WEATHER_TOOL], "tool_choice": "auto", "max_tokens": 8},
    {**VALID_CHAT, "response_format": {"type": "json_object"}, "max_tokens": 8},
    {**VALID_CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}},
]
VALID_TOKENIZE = [{"content": "It is a truth", "with_pieces": True}, {"prompt": "It is", "add_special_tokens": False}]
VALID_DETOKENIZE = [{"tokens": [5, 6, 7, 8]}]
FIELDS = [
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "repetition_penalty",
    "messages",
    "prompt",
    "model",
    "n",
    "tools",
    "logprobs",
    "response_format",
    "user",
    "echo",
    "top_logprobs",
    "tool_choice",
    "parallel_tool_calls",
    "content",
    "tokens",
    "with_pieces",
    "add_special",
]
ODD_VALUES = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**31,
    2**63,
    -(2**63),
    10**400,
    1e308,
    -0.0,
    0.5,
    "",
    "x" * 10000,
    "\ud800",
    "\x00",
    [],
    {},
    [1, 2],
    {"a": 1},
    [[[[[]]]]],
    "NaN",
    "Infinity",
    20,
    21,
    [0, 1, 2**40],
    [[1, 2]],
    [[1], [2]],
    {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {}}}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}},
    [WEATHER_TOOL],
    [{"type": "function", "function": {"name": ""}}],
    {"type": "function", "function": {"name": "get_weather"}},
    "required",
    "x" * 200000,
]
# prose-like prompts near the 1 MiB body limit (the issue-32 RSS growth came from tokenizing these): varied words,
# and CJK text (3 bytes a character)
WORDS = "the of and to in a is that for it as with was his he be on by at not this had but from have or".split()
_big = random.Random(7)
BIG_TEXTS = [
    " ".join(_big.choice(WORDS) + str(_big.randrange(1000)) for _ in range(120000))[:900000],
    "".join(chr(_big.randrange(0x4E00, 0x9FFF)) for _ in range(300000)),
]
PATHS = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/models/moelite",
    "/health",
    "/",
    "/v1",
    "/v1/chat/completions/../models",
    "/%00",
    "/" + "a" * 9000,
    "/v1/models/" + "%ff" * 10,
    "/tokenize",
    "/detokenize",
    "/tokenizer_info",
]
READ_TIMEOUT = 2  # the server's --read-timeout: a body announced but never sent ends after this
METHODS = ["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE", "BREW", ""]


def start_server(model: str | None, log, max_body: int = 1 << 20) -> tuple[subprocess.Popen, int]:
    cmd = [
        sys.executable,
        "-m",
        "moelite",
        "serve",
        *([model] if model else []),
        "--port",
        "0",
        "--threads",
        "1",
        "--max-tokens",
        "16",
        "--max-request-bytes",
        str(max_body),
        "--timeout",
        "30",
        "--read-timeout",
        str(READ_TIMEOUT),
    ]
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
            pass  # the server may close early on a bad request: read it
        data = b""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
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


def mutate_json(rng: random.Random, bases: list[dict] | None = None) -> bytes:
    doc = json.loads(json.dumps(rng.choice(bases or [VALID_CHAT, VALID_COMPLETION, *VALID_EXTRA])))
    for _ in range(rng.randint(1, 3)):
        if not isinstance(doc, dict):  # replaced by a non-object: nothing left to edit
            break
        kind = rng.random()
        if kind < 0.03:  # a near-limit prompt
            doc["prompt" if "prompt" in doc else "messages"] = rng.choice(BIG_TEXTS)
            if "messages" in doc:
                doc["messages"] = [{"role": "user", "content": doc["messages"]}]
        elif kind < 0.5:
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
        text = json.dumps(doc, allow_nan=True, ensure_ascii=False)
    except (ValueError, RecursionError):
        text = "[" * 5000 + "]" * 5000
    if rng.random() < 0.1:  # raw text edits: truncation, garbage, nesting bombs
        cut = rng.randint(0, len(text))
        text = rng.choice([text[:cut], text[:cut] + "\x00\xff" + text[cut:], "[" * 200000, "1e99999", "nan"])
    return text.encode("utf-8", "surrogatepass")


def make_case(rng: random.Random) -> tuple[bytes, bool]:
    """-> (raw request bytes, complete: whether the request as sent is a whole HTTP message)."""
    r = rng.random()
    if r < 0.55:
        return request("POST", rng.choice(PATHS[:2]), mutate_json(rng)), True
    if r < 0.6:  # the tokenizer endpoints
        path = rng.choice(["/tokenize", "/detokenize"])
        bases = VALID_TOKENIZE if path == "/tokenize" else VALID_DETOKENIZE
        return request("POST", path, mutate_json(rng, bases)), True
    if r < 0.75:
        body = mutate_json(rng) if rng.random() < 0.5 else None
        return request(
            rng.choice(METHODS) or "GET",
            rng.choice(PATHS),
            body,
            {"Origin": "http://x"} if rng.random() < 0.2 else None,
        ), True
    if r < 0.9:  # framing lies
        body = mutate_json(rng)
        lie = rng.choice(["0", "-1", "999999999999", "²", "1" * 5000, "abc", str(len(body) + 100), "2097152"])
        complete = lie.isdigit() and lie.isascii() and len(lie) < 20 and int(lie) <= len(body)
        return request("POST", "/v1/chat/completions", body, {"Content-Length": lie}), complete
    if r < 0.905:  # a body announced and never sent, the connection left open: the server's read timeout ends it
        body = mutate_json(rng)[:20]
        return request("POST", "/v1/completions", body, {"Content-Length": "2097152"}), True
    if r < 0.95:  # header flood / huge header
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
    if head_request:  # a reply to HEAD carries headers only
        return "rejected" if status >= 400 else "ok"
    if b"data:" in body[:64] or status == 204 or (status == 200 and body == b""):  # SSE (chunked or not)
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


def warm_up(port: int) -> None:
    """One valid request of every kind (each must get a 2xx), so that what a first request allocates once (the
    tokenizer, the template, pydantic's schemas, the allocator's arenas) is in the RSS baseline."""
    reqs = [("/v1/chat/completions", VALID_CHAT), ("/v1/completions", VALID_COMPLETION)]
    reqs += [("/v1/completions" if "prompt" in b else "/v1/chat/completions", b) for b in VALID_EXTRA]
    reqs += [("/tokenize", b) for b in VALID_TOKENIZE] + [("/detokenize", b) for b in VALID_DETOKENIZE]
    for path, body in reqs:
        outcome, status, reply = exchange(port, request("POST", path, json.dumps(body).encode()), 60)
        if status is None or status >= 300:  # a field the server does not take yet (issue 32 part B) is a 400
            print(f"warm-up: {path} {json.dumps(body)[:80]}: {status} {reply[:120]!r}", file=sys.stderr)


def probe(port: int, rss, n: int) -> int:
    """Near-limit prompts, N of each kind, one line each: kind, status, seconds, RSS (MiB) after it."""
    print(f"warm-up done: RSS {rss().rss / 2**20:.0f} MiB")
    for label, text in zip(("prose", "cjk"), BIG_TEXTS):
        for path, body in (
            ("/v1/completions", {"prompt": text, "max_tokens": 1}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}], "max_tokens": 1}),
            ("/tokenize", {"content": text[: len(text) // 3]}),  # 300 KB: under the demo's byte bound, tokenized
        ):
            for _ in range(n):
                t0 = time.monotonic()
                raw = request("POST", path, json.dumps(body, ensure_ascii=False).encode())
                _, status, _ = exchange(port, raw, 120)
                dt = time.monotonic() - t0
                print(f"{label} {path} {status} {dt:.2f} s RSS {rss().rss / 2**20:.0f} MiB", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="GGUF to serve (default: the embedded demo)")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--out", type=Path, default=Path("fuzz-http"))
    ap.add_argument("--warmup", type=int, default=200, help="cases run before the RSS baseline is taken (200)")
    ap.add_argument(
        "--probe",
        type=int,
        default=0,
        metavar="N",
        help="instead of fuzzing: N near-limit prompts of each kind (prose / CJK; completion, chat, /tokenize), each "
        "one's status, time and the server's RSS after it (where RSS growth comes from)",
    )
    ap.add_argument(
        "--max-request-bytes", type=int, default=1 << 20, help="the server's body limit (default 1 MiB, its own)"
    )
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    counts: dict[str, int] = {}
    trace: list[int] = []  # RSS (MiB) every 100 cases
    mib = 2**20
    t0 = time.monotonic()
    with open(a.out / "server.log", "w") as log:
        proc, port = start_server(a.model, log, a.max_request_bytes)
        rss = psutil.Process(proc.pid).memory_info
        try:
            answer = check_alive(port, None)
            if a.probe:
                return probe(port, rss, a.probe)
            warm_up(port)
            rss0 = rss_max = rss().rss
            for i in range(a.cases):
                raw, complete = make_case(rng)
                verdict = judge(*exchange(port, raw, a.timeout, complete), complete, raw.startswith(b"HEAD "))
                counts[verdict] = counts.get(verdict, 0) + 1
                if verdict.startswith("bad"):
                    (a.out / f"case-{a.seed}-{i}.bin").write_bytes(raw)
                if proc.poll() is not None:
                    counts["bad:server-died"] = 1
                    break
                if i + 1 == min(a.warmup, a.cases):
                    rss0 = rss_max = rss().rss
                if (i + 1) % 100 == 0:
                    check_alive(port, answer)
                    trace.append(round(rss().rss / mib))
                    rss_max = max(rss_max, rss().rss) if i + 1 > a.warmup else rss_max
            rss_end = rss0
            if proc.poll() is None:
                check_alive(port, answer)
                rss_end = rss().rss
                rss_max = max(rss_max, rss_end)
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    growth = rss_max - rss0
    if growth > 64 * mib:
        counts["bad:rss-growth"] = 1
    summary = {
        "seed": a.seed,
        "cases": a.cases,
        "counts": counts,
        "rss_after_warmup_mib": round(rss0 / mib, 1),
        "rss_end_mib": round(rss_end / mib, 1),
        "rss_max_mib": round(rss_max / mib, 1),
        "rss_growth_mib": round(growth / mib, 1),
        "rss_every_100_mib": trace,
        "seconds": round(time.monotonic() - t0),
    }
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 1 if any(k.startswith("bad") for k in counts) else 0


if __name__ == "__main__":
    sys.exit(main())
