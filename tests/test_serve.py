"""`moelite serve` as a real process on 127.0.0.1, driven by the official openai client."""
from __future__ import annotations

import http.client
import json
import os
import signal
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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from fixture_models import fixture_gguf
    _, gguf = fixture_gguf("qwen3_moe")
    tmp = tmp_path_factory.mktemp("serve")
    log = open(tmp / "stderr.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "moelite", "serve", str(gguf), "--port", "0", "--threads", "1",
                             "--max-tokens", str(MAX_TOKENS), "--max-request-bytes", "65536", "--verbose"],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=_env(tmp))
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(START_TIMEOUT)
    try:
        assert line and "http://127.0.0.1:" in line[0], f"server did not start: {line} {_tail(log)}"
        base = line[0].split("http://", 1)[1].split()[0]           # 127.0.0.1:PORT/v1
        yield f"http://{base}", proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-2000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key="unused", timeout=60, max_retries=0)


def _chat(client, text: str, **kw):
    return client.chat.completions.create(model="moelite", messages=[{"role": "user", "content": text}],
                                          temperature=0, max_tokens=kw.pop("max_tokens", 16), **kw)


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
    chunks = list(_chat(client, "Once upon a time", max_tokens=24, stream=True,
                        stream_options={"include_usage": True}))
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
    want = ref[:ref.find(stop)]
    r = client.completions.create(model="m", prompt="The cat sat on", max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    s = client.completions.create(model="m", prompt="The cat sat on", max_tokens=30, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in s) == want


def test_concurrent_requests_match_sequential(client):
    prompts = [f"Request number {i}: tell me" for i in range(20)]
    alone = [_chat(client, p).choices[0].message.content for p in prompts]
    with ThreadPoolExecutor(20) as pool:
        together = list(pool.map(lambda p: _chat(client, p).choices[0].message.content, prompts))
    assert sum(1 for a in alone if a) >= 10     # real answers, not empty ones
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


def test_readme_client_example(server, capsys):
    """The openai example of README.md's "Command line and server" section, run against this server."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Command line and server", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "http://127.0.0.1:8080/v1" in code
    exec(compile(code.replace("http://127.0.0.1:8080/v1", server[0]), "README.md", "exec"), {})
    assert "CompletionUsage" in capsys.readouterr().out


def test_client_leaving_mid_stream_frees_the_model(server, client):
    import socket
    host, port = server[0].split("//")[1].split("/")[0].split(":")
    body = json.dumps({"model": "m", "prompt": "The cat sat on", "max_tokens": MAX_TOKENS, "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert s.recv(64).startswith(b"HTTP/1.1 200")
    assert _chat(client, "after the hang-up").choices[0].finish_reason in ("stop", "length")
