"""`moelite serve` as a real process on 127.0.0.1, driven by the official openai client and by raw HTTP: OpenAI
answers, one generation at a time, JSON errors for every status (hostile requests included), a client that leaves
cancels its generation, --timeout, --api-key with an open /health, --cors, the request log, a busy port."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

MAX_TOKENS = 48
START_TIMEOUT = 60


def _env(tmp: Path) -> dict:
    import moelite

    env = dict(os.environ, XDG_CACHE_HOME=str(tmp / "cache"), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(moelite.__file__).parent.parent), env.get("PYTHONPATH", "")])
    return env


@contextlib.contextmanager
def running_server(tmp: Path, *extra: str, model: str | os.PathLike | None = None):
    """`moelite serve MODEL --port 0 ...` -> (base url 'http://127.0.0.1:PORT/v1', process, stderr log file); the
    qwen3_moe fixture unless `model` names a GGUF."""
    if model is None:
        from fixture_models import fixture_gguf

        _, model = fixture_gguf("qwen3_moe")
    gguf = model
    log = open(tmp / "stderr.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moelite", "serve", str(gguf), "--port", "0", "--threads", "1", *extra],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=_env(tmp),
    )
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(START_TIMEOUT)
    try:
        assert line and "http://127.0.0.1:" in line[0], f"server did not start: {line} {_tail(log)}"
        base = line[0].split("http://", 1)[1].split()[0]  # 127.0.0.1:PORT/v1
        yield f"http://{base}", proc, log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(
        tmp_path_factory.mktemp("serve"), "--max-tokens", str(MAX_TOKENS), "--max-request-bytes", "65536", "--verbose"
    ) as s:
        yield s


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-2000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key="unused", timeout=60, max_retries=0)


def _chat(client, text: str, **kw):
    return client.chat.completions.create(
        model="moelite",
        messages=[{"role": "user", "content": text}],
        temperature=0,
        max_tokens=kw.pop("max_tokens", 16),
        **kw,
    )


def test_models_and_health(server, client):
    ids = [m.id for m in client.models.list().data]
    assert len(ids) == 1 and ids[0]
    with urllib.request.urlopen(server[0].replace("/v1", "/health"), timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"


def test_chat_non_streaming_and_streaming(client):
    r = _chat(client, "Once upon a time", max_tokens=24)
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(_chat(client, "Once upon a time", max_tokens=24, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [r.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completions(client):
    r = client.completions.create(model="m", prompt="The cat sat on", max_tokens=12, temperature=0, seed=3)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > 0
    s = client.completions.create(model="m", prompt="The cat sat on", max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in s) == r.choices[0].text


def test_stop_strings(client):
    ref = client.completions.create(model="m", prompt="The cat sat on", max_tokens=30, temperature=0).choices[0].text
    assert len(ref) > 8, ref
    stop = ref[4:6]
    want = ref[: ref.find(stop)]
    r = client.completions.create(model="m", prompt="The cat sat on", max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    s = client.completions.create(
        model="m", prompt="The cat sat on", max_tokens=30, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in s) == want


def test_concurrent_requests_match_sequential(client):
    prompts = [f"Request number {i}: tell me" for i in range(20)]
    alone = [_chat(client, p).choices[0].message.content for p in prompts]
    with ThreadPoolExecutor(20) as pool:
        together = list(pool.map(lambda p: _chat(client, p).choices[0].message.content, prompts))
    assert sum(1 for a in alone if a) >= 10  # real answers, not empty ones
    assert together == alone


def _raw_post(base: str, path: str, body: bytes) -> tuple[int, dict]:
    host, port = base.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_bad_requests_get_json_errors_and_server_keeps_serving(server, client):
    base = server[0]
    big = json.dumps({"model": "m", "prompt": "x" * (2 << 20)}).encode()
    status, err = _raw_post(base, "/v1/completions", big)
    assert status == 413 and err["error"]["code"] == "request_too_large" and err["error"]["message"]
    assert "--max-request-bytes" in err["error"]["message"]
    status, err = _raw_post(base, "/v1/chat/completions", b"{not json")
    assert status == 400 and err["error"]["type"] == "invalid_request_error"
    status, err = _raw_post(base, "/v1/nothing", b"{}")
    assert status == 404
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, "hi", max_tokens=MAX_TOKENS + 1)
    assert "max_tokens" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], top_p=5)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=[])
    assert _chat(client, "still there?").choices[0].finish_reason in ("stop", "length")


def test_usage_doc_client_example(server, capsys):
    """The openai example of docs/USAGE.md's "The server" section, run against this server."""
    usage = (Path(__file__).resolve().parent.parent / "docs" / "USAGE.md").read_text()
    section = usage.split("## The server", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "http://127.0.0.1:8080/v1" in code
    exec(compile(code.replace("http://127.0.0.1:8080/v1", server[0]), "docs/USAGE.md", "exec"), {})
    assert "CompletionUsage" in capsys.readouterr().out


def test_client_leaving_mid_stream_frees_the_model(server, client):
    import socket

    host, port = server[0].split("//")[1].split("/")[0].split(":")
    body = json.dumps({"model": "m", "prompt": "The cat sat on", "max_tokens": MAX_TOKENS, "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        assert s.recv(64).startswith(b"HTTP/1.1 200")
    assert _chat(client, "after the hang-up").choices[0].finish_reason in ("stop", "length")


def _host_port(base: str) -> tuple[str, int]:
    host, port = base.split("//")[1].split("/")[0].split(":")
    return host, int(port)


def _raw(base: str, data: bytes) -> tuple[int, dict, bytes]:
    """Send raw bytes, read the whole reply (the server closes) -> (status, JSON body, raw head)."""
    with socket.create_connection(_host_port(base), timeout=30) as s:
        s.sendall(data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body), head


def test_oversized_body_gets_its_413_and_the_connection_stays_usable(server):
    """The server reads a too-large body to its end before answering, so the client never writes into a closed
    connection (no broken pipe, whatever the timing), and the same connection serves the next request."""
    conn = http.client.HTTPConnection(*_host_port(server[0]), timeout=30)
    try:
        for _ in range(2):
            conn.request(
                "POST",
                "/v1/completions",
                body=b'{"prompt": "' + b"x" * (4 << 20) + b'"}',
                headers={"Content-Type": "application/json"},
            )
            r = conn.getresponse()
            assert r.status == 413 and json.loads(r.read())["error"]["code"] == "request_too_large"
        conn.request("GET", "/v1/models")
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["data"]
    finally:
        conn.close()


HOSTILE_HTTP = [
    (b"GARBAGE\r\n\r\n", 400),
    ("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: \u00b2\r\n\r\n".encode(), 400),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", 400),
    (b"PUT /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", 405),
    (b"DELETE /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405),
    (b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405),
    (b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 414),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\nConnection: close\r\n\r\n", 431),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Huge: " + b"a" * 100000 + b"\r\n\r\n", 431),
    # a header flood of 2 MB: the client is still sending when the server answers; the reply must survive the close
    (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"y" * 10000) for i in range(200)), 431),
]


@pytest.mark.parametrize("request_bytes,status", HOSTILE_HTTP, ids=[str(i) for i in range(len(HOSTILE_HTTP))])
def test_every_http_error_is_json(server, request_bytes, status):
    got, body, head = _raw(server[0], request_bytes)
    assert got == status and body["error"]["message"], (head, body)
    assert b"application/json" in head.lower()


def _post_json(base: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*_host_port(base), timeout=60)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
HOSTILE_BODIES = [
    (b"[" * 5000 + b"]" * 5000, "nests deeper"),
    (b'{"a":' * 40 + b"1" + b"}" * 40, "nests deeper"),
    (json.dumps({**CHAT, "temperature": 1}).replace("1}", "1e400}").encode(), "1e400"),
    (json.dumps({**CHAT, "top_p": 1}).replace('"top_p": 1', '"top_p": NaN').encode(), "NaN"),
    (json.dumps({**CHAT, "min_p": 1}).replace('"min_p": 1', '"min_p": -Infinity').encode(), "Infinity"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "lone surrogate"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": "\\udfff"}', "lone surrogate"),
    (b"\xff\xfe{}", "not valid JSON"),
    (json.dumps({**CHAT, "stream_options": "yes"}).encode(), "stream_options"),
    (json.dumps({**CHAT, "temperature": "0.5"}).encode(), "temperature"),
    (json.dumps({**CHAT, "temperature": -1}).encode(), "temperature"),
    (json.dumps({**CHAT, "repetition_penalty": 10**400}).encode(), "repetition_penalty"),
    (json.dumps({**CHAT, "top_k": 2.5}).encode(), "top_k"),
    (json.dumps({**CHAT, "seed": 1 << 70}).encode(), "seed"),
    (json.dumps({**CHAT, "max_tokens": True}).encode(), "max_tokens"),
    (json.dumps({**CHAT, "stop": ["ok", ""]}).encode(), "stop"),
    (json.dumps({**CHAT, "stop": ["s"] * 17}).encode(), "stop"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), "messages.0.role"),
    (
        json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}).encode(),
        "messages.0.content",
    ),
    (json.dumps({"messages": "hi"}).encode(), "messages"),
    (json.dumps({**CHAT, "best_of": 2, "n": 2}).encode(), "n, best_of"),
    (json.dumps({**CHAT, "response_format": {"type": "yaml"}}).encode(), "response_format.type"),
    (json.dumps({**CHAT, "tools": [{"type": "function"}]}).encode(), "tools[0].function"),
    (json.dumps({**CHAT, "n": 2}).encode(), "unsupported parameter: n"),
]


@pytest.mark.parametrize("body,needle", HOSTILE_BODIES, ids=[str(i) for i in range(len(HOSTILE_BODIES))])
def test_hostile_bodies_get_a_400_naming_the_problem(server, body, needle):
    status, err = _post_json(server[0], "/v1/chat/completions", body)
    assert status == 400 and needle in err["error"]["message"], err
    assert err["error"]["type"] == "invalid_request_error"


def test_explicit_defaults_of_unsupported_parameters_are_fine(server):
    body = {
        **CHAT,
        "n": 1,
        "logprobs": False,
        "response_format": {"type": "text"},
        "tools": [],
        "presence_penalty": 0,
        "repeat_penalty": 1.1,
        "ignore_eos": True,
        "seed": -1,
        "temperature": None,
        "stream": None,
        "stop": None,
        "user": "u1",
    }
    status, r = _post_json(server[0], "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200 and r["usage"]["completion_tokens"] == 4, r


def test_request_log_lines(server, client):
    _chat(client, "log me", max_tokens=3)
    lines = _tail(server[2]).splitlines()
    assert any("POST /v1/chat/completions 200" in ln and "tok" in ln and ln.rstrip().endswith(" s") for ln in lines)
    assert any("GET /nothing 404" in ln for ln in lines)


def test_models_by_id(server, client):
    name = client.models.list().data[0].id
    assert client.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A server with an API key, CORS for one origin and room for long generations."""
    with running_server(
        tmp_path_factory.mktemp("guarded"),
        "--api-key",
        "sesame",
        "--cors",
        "http://app.example",
        "--max-tokens",
        "100000",
    ) as s:
        yield s


def _get(base: str, path: str, method: str = "GET", headers: dict | None = None):
    conn = http.client.HTTPConnection(*_host_port(base), timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def test_api_key_guards_the_api_but_not_health(guarded):
    base = guarded[0]
    assert _get(base, "/health")[0] == 200
    status, _, body = _get(base, "/v1/models")
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert _get(base, "/v1/models", headers={"Authorization": "Bearer sesame"})[0] == 200
    keyed = openai.OpenAI(base_url=base, api_key="sesame", timeout=60, max_retries=0)
    assert keyed.models.list().data
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="wrong", timeout=60, max_retries=0).models.list()


def test_cors_preflight_and_headers(guarded):
    base = guarded[0]
    status, headers, _ = _get(
        base,
        "/v1/chat/completions",
        "OPTIONS",
        {
            "Origin": "http://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    low = {k.lower(): v for k, v in headers.items()}
    assert status == 200 and low["access-control-allow-origin"] == "http://app.example"
    assert "POST" in low["access-control-allow-methods"]
    status, headers, _ = _get(base, "/health", headers={"Origin": "http://app.example"})
    assert (
        status == 200
        and {k.lower(): v for k, v in headers.items()}["access-control-allow-origin"] == "http://app.example"
    )
    status, headers, _ = _get(
        base,
        "/v1/chat/completions",
        "OPTIONS",
        {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert status == 400 and "access-control-allow-origin" not in {k.lower() for k in headers}


def _long_request(stream: bool) -> bytes:
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True, "stream": stream}).encode()
    return (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sesame\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


def _log_lines(log, needle: str, n: int) -> list[str]:
    """Wait (the request log is written when a request ends) until `n` lines contain `needle`."""
    for _ in range(600):
        lines = [ln for ln in _tail(log).splitlines() if needle in ln]
        if len(lines) >= n:
            return lines
        threading.Event().wait(0.1)
    raise AssertionError(f"no {n} log lines with {needle!r}: {_tail(log)}")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_client_that_leaves_cancels_its_generation(guarded, stream):
    """The client asks for 3000 tokens and hangs up at once (streaming: after the first event): the request ends
    cancelled, well short of 3000 tokens, and the next request is answered."""
    base, _, log = guarded
    before = len([ln for ln in _tail(log).splitlines() if "POST /v1/completions" in ln])
    with socket.create_connection(_host_port(base), timeout=30) as s:
        s.sendall(_long_request(stream))
        if stream:
            assert s.recv(64).startswith(b"HTTP/1.1 200")
    line = _log_lines(log, "POST /v1/completions", before + 1)[-1]
    prompt, completion = line.split(" tok")[0].split()[-1].split("+")
    assert int(completion) < 3000, line
    keyed = openai.OpenAI(base_url=base, api_key="sesame", timeout=60, max_retries=0)
    assert keyed.completions.create(model="m", prompt="after", max_tokens=3).usage.completion_tokens <= 3


def test_timeout_caps_the_time_a_request_holds_the_model(tmp_path):
    with running_server(tmp_path, "--timeout", "0.01", "--max-tokens", "100000") as (base, _, log):
        status, err = _post_json(
            base,
            "/v1/completions",
            json.dumps({"prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True}).encode(),
        )
        assert status == 504 and err["error"]["code"] == "timeout" and "--timeout" in err["error"]["message"]
        status, r = _post_json(base, "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 0}).encode())
        assert status == 200 and r["usage"]["completion_tokens"] == 0


def test_busy_port_is_named(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "moelite", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            env=_env(tmp_path),
        )
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in r.stderr and "--port" in r.stderr


def test_missing_serve_extra_is_one_clear_line(tmp_path):
    code = (
        "import sys; sys.modules['uvicorn'] = None; from moelite.apps.cli import main; "
        "sys.exit(main(['serve', '--port', '0']))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env(tmp_path))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "pip install 'moelite[serve]'" in r.stderr and "uvicorn" in r.stderr


def test_a_full_queue_gets_503_and_places_come_back(tmp_path):
    """--queue 1: one request generating and one waiting fill it (a streaming answer holds its place from before
    its headers on); the third gets 503; once both clients hang up, requests are served again."""
    with running_server(tmp_path, "--queue", "1", "--max-tokens", "100000") as (base, _, log):
        held = []
        for _ in range(2):
            s = socket.create_connection(_host_port(base), timeout=30)
            s.sendall(_long_request(stream=True).replace(b"Authorization: Bearer sesame\r\n", b""))
            assert s.recv(64).startswith(b"HTTP/1.1 200")
            held.append(s)
        status, err = _post_json(base, "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 1}).encode())
        assert status == 503 and err["error"]["code"] == "busy"
        for s in held:
            s.close()
        _log_lines(log, "POST /v1/completions 200", 2)  # both streams ended (cancelled)
        status, r = _post_json(base, "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 1}).encode())
        assert status == 200 and r["usage"]["completion_tokens"] <= 1
