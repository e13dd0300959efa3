"""`moelite serve` for evaluators and reasoning models (issue 32), as a real process on 127.0.0.1 serving the embedded
demo model: logprobs / top_logprobs, echo with the prompt's log-probabilities (exactly what `Model.logits` gives, in
float64), the exact request lm-evaluation-harness sends for a loglikelihood, /tokenize and /detokenize, the reasoning
split into reasoning_content, and the hostile-load bounds (a prompt refused by its size before it is tokenized whole,
with no RSS growth; a body that never arrives ends at --read-timeout)."""

from __future__ import annotations

import http.client
import json
import socket
import time

import numpy as np
import psutil
import pytest
from logprob_ref import demo_model, log_softmax64
from test_serve import running_server

openai = pytest.importorskip("openai")

READ_TIMEOUT = 2
PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


@pytest.fixture(scope="module")
def demo():
    yield from demo_model()


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo):
    with running_server(
        tmp_path_factory.mktemp("serve-lp"), "--read-timeout", str(READ_TIMEOUT), "--max-tokens", "32", model=demo.path
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key="none", max_retries=0)


def _post(base: str, path: str, body: dict) -> tuple[int, dict]:
    host, port = base.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def _root(base: str) -> str:
    return base[: -len("/v1")]


def test_echo_logprobs_are_the_models_own(server, demo):
    """echo + logprobs=5 + max_tokens=0: every prompt token's log-probability and its top 5 are float64 log_softmax
    of Model.logits of the same tokens (the server scores in a fresh context, as Model.logits does)."""
    status, r = _post(server[0], "/v1/completions", {"prompt": PROMPT, "echo": True, "logprobs": 5, "max_tokens": 0})
    assert status == 200, r
    choice = r["choices"][0]
    ids = demo.tokenizer.encode(PROMPT)
    lp = choice["logprobs"]
    assert choice["text"] == PROMPT and r["usage"]["completion_tokens"] == 0
    assert len(lp["tokens"]) == len(ids) == len(lp["token_logprobs"]) == len(lp["text_offset"])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = log_softmax64(demo.logits(ids))
    for t in range(1, len(ids)):
        assert lp["token_logprobs"][t] == pytest.approx(ref[t - 1, ids[t]], abs=1e-9)
        top = sorted(lp["top_logprobs"][t].values(), reverse=True)
        assert top == pytest.approx(np.sort(ref[t - 1])[::-1][: len(top)], abs=1e-9)
        assert 1 <= len(top) <= 5  # two ids that decode to the same text share one key
    assert "".join(lp["tokens"]) == PROMPT


def test_lm_eval_loglikelihood_request(server, demo):
    """The body lm-evaluation-harness's local-completions sends for a loglikelihood (token ids, echo, logprobs 1,
    max_tokens 1), parsed as it parses it: the continuation's summed log-probability equals Model.logits', and
    is_greedy says whether each continuation token is the argmax."""
    ctx = demo.tokenizer.encode("The capital of France is", add_special=False)
    for cont_text in (" Paris", " a city in the north"):
        cont = demo.tokenizer.encode(cont_text, add_special=False)
        body = {
            "model": "moelite",
            "prompt": [ctx + cont],
            "temperature": 0,
            "max_tokens": 1,
            "logprobs": 1,
            "seed": 1234,
            "echo": True,
        }
        status, r = _post(server[0], "/v1/completions", body)
        assert status == 200, r
        lp = r["choices"][0]["logprobs"]
        assert len(lp["token_logprobs"]) == len(ctx) + len(cont) + 1  # the prompt, then the generated token
        values, tops = lp["token_logprobs"][len(ctx) : -1], lp["top_logprobs"][len(ctx) : -1]  # as lm-eval slices
        ll = sum(values)
        greedy = all(t == max(top.values()) for t, top in zip(values, tops))
        ref = log_softmax64(demo.logits(ctx + cont))
        rows = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
        assert ll == pytest.approx(sum(ref[i, cont[i - len(ctx) + 1]] for i in rows), abs=1e-9)
        want_greedy = all(int(np.argmax(ref[i])) == cont[i - len(ctx) + 1] for i in rows)
        assert greedy == want_greedy


def test_chat_logprobs_with_the_openai_client(client):
    r = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "What is Python?"}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens > 0
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0
        assert e.logprob == tops[0] and e.top_logprobs[0].token == e.token  # greedy: the chosen token is the argmax
        assert bytes(e.bytes) == e.token.encode()
    streamed = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "What is Python?"}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=1,
        stream=True,
    )
    entries, text = [], ""
    for chunk in streamed:
        if chunk.choices and chunk.choices[0].logprobs is not None:
            entries += chunk.choices[0].logprobs.content
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert "".join(e.token for e in entries) == text and len(entries) == len(content)
    assert all(len(e.top_logprobs) == 1 and e.top_logprobs[0].logprob == e.logprob for e in entries)


def test_streamed_completion_with_echo_and_logprobs(server, demo):
    host, port = server[0].split("//")[1].split("/")[0].split(":")
    body = {"prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": 5, "temperature": 0, "stream": True}
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    events = [
        json.loads(line[6:]) for line in conn.getresponse().read().decode().split("\n") if line.startswith("data: {")
    ]
    conn.close()
    first = events[0]["choices"][0]
    assert first["text"] == PROMPT and first["logprobs"]["token_logprobs"][0] is None
    assert len(first["logprobs"]["tokens"]) == len(demo.tokenizer.encode(PROMPT))
    gen = [e["choices"][0] for e in events[1:]]
    assert gen[-1]["finish_reason"] in ("stop", "length")
    tokens = [t for c in gen for t in c["logprobs"]["tokens"]]
    assert "".join(tokens) == "".join(c["text"] for c in gen) and 0 < len(tokens) <= 5
    offsets = [o for c in gen for o in c["logprobs"]["text_offset"]]
    assert offsets[0] == len(PROMPT) and offsets == sorted(offsets)


@pytest.mark.parametrize(
    "path,body,needle",
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": 1}, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "logprobs": -1}, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "logprobs": True}, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "echo": "yes"}, "echo"),
        ("/v1/completions", {"prompt": [1, 2, 99999999]}, "prompt"),
        ("/v1/completions", {"prompt": [[1, 2], [3]]}, "prompt"),
        ("/v1/completions", {"prompt": [1, -2]}, "prompt"),
    ],
)  # fmt: skip
def test_bad_logprobs_requests_get_a_400_naming_the_field(server, path, body, needle):
    status, r = _post(server[0], path, body)
    assert status == 400 and needle in r["error"]["message"], r


def test_tokenize_and_detokenize(server, demo):
    root = _root(server[0])
    text = "Hello world, it is a truth"
    ids = demo.tokenizer.encode(text, add_special=False)
    status, r = _post(root, "/tokenize", {"content": text})
    assert status == 200 and r["tokens"] == ids and r["count"] == len(ids) and r["max_model_len"] == demo.n_ctx
    status, r = _post(root, "/tokenize", {"prompt": text, "add_special_tokens": False})  # vLLM's names
    assert status == 200 and r["tokens"] == ids
    status, r = _post(root, "/tokenize", {"content": text, "with_pieces": True})
    assert [p["id"] for p in r["tokens"]] == ids and "".join(p["piece"] for p in r["tokens"]) == text
    status, r = _post(root, "/detokenize", {"tokens": ids})
    assert status == 200 and r["content"] == text == r["prompt"]
    for bad, needle in (
        ({"tokens": [demo.n_vocab]}, "tokens"),
        ({"tokens": [-1]}, "tokens"),
        ({"tokens": "1 2"}, "tokens"),
        ({"tokens": [True]}, "tokens"),
    ):
        status, r = _post(root, "/detokenize", bad)
        assert status == 400 and needle in r["error"]["message"], r
    status, r = _post(root, "/tokenize", {"content": 5})
    assert status == 400 and "content" in r["error"]["message"]
    status, r = _post(root, "/tokenize", {"content": "x", "add_special": "yes"})
    assert status == 400 and "add_special" in r["error"]["message"]
    with urlopen(root + "/tokenizer_info") as f:
        info = json.loads(f.read())
    assert info["eos_token"] == demo.tokenizer.eos_token and "<|im_start|>" in info["chat_template"]


def urlopen(url: str):
    import urllib.request

    return urllib.request.urlopen(url, timeout=30)


def test_a_body_that_never_comes_ends_at_the_read_timeout(server):
    """Content-Length 2 MiB, a few bytes sent, the connection left open: 408 after --read-timeout, connection closed
    (before the fix the server waited for the client's own timeout)."""
    host, port = server[0].split("//")[1].split("/")[0].split(":")
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2097152\r\n\r\n{"prompt": "x')
        reply = b""
        while chunk := s.recv(65536):  # returns b"" once the server closes
            reply += chunk
    assert time.monotonic() - t0 < READ_TIMEOUT + 10
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["error"]["code"] == "request_timeout"


def test_oversized_prompts_are_refused_before_tokenizing_without_rss_growth(server, demo):
    """Prompts near the body limit (prose, CJK, chat) are refused as longer than the context, by their byte length
    or their first 16 x n_ctx characters, and the server's RSS stays put (issue 32: +100 MiB over a few of these
    when each was tokenized whole)."""
    proc = psutil.Process(server[1].pid)
    rng = np.random.default_rng(0)
    words = np.array("the of and to in a is that for it as with was his he be on by at not this had".split())
    prose = " ".join(w + str(i) for w, i in zip(rng.choice(words, 110000), rng.integers(0, 1000, 110000)))
    cjk = "".join(chr(c) for c in rng.integers(0x4E00, 0x9FFF, 100000))
    short_tokens = "ab " * (6 * demo.n_ctx)  # under the byte bound, over the context: the prefix check refuses it
    _post(server[0], "/v1/completions", {"prompt": prose[:1000], "max_tokens": 1})
    rss0 = proc.memory_info().rss
    for text in (prose[:900000], cjk, short_tokens) * 3:
        for path, body in (
            ("/v1/completions", {"prompt": text, "max_tokens": 1}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}], "max_tokens": 1}),
        ):
            status, r = _post(server[0], path, body)
            assert status == 400 and r["error"]["code"] == "context_length_exceeded", r
    grown = proc.memory_info().rss - rss0
    assert grown < 32 << 20, f"RSS grew by {grown / 2**20:.1f} MiB"


def test_large_tokenize_requests_are_answered_in_full(server):
    """/tokenize of texts just under the byte bound (100 000 CJK characters: 300 000 tokens) is answered in full, like
    llama-server's: its bound is the body limit and the byte bound, not the context. (The heap its tokenizing frees
    is handed back before each answer, malloc_trim; docs/RELIABILITY.md has the RSS measured.)"""
    rng = np.random.default_rng(1)
    for _ in range(3):
        text = "".join(chr(c) for c in rng.integers(0x4E00, 0x9FFF, 100000))
        status, r = _post(_root(server[0]), "/tokenize", {"content": text})
        assert status == 200 and r["count"] == len(r["tokens"]) > len(text)
    status, r = _post(_root(server[0]), "/tokenize", {"content": text + text[:10000]})  # over the byte bound
    assert status == 400 and r["error"]["code"] == "context_length_exceeded"


def test_reasoning_splitter_at_every_cut():
    """The <think> block is split the same however the text is cut into streamed pieces."""
    from moelite.apps.serve_logprobs import ThinkSplitter, split_reasoning

    cases = [
        ("<think>\nweighing it\n</think>\n\nThe answer.", False, "weighing it", "The answer."),
        ("weighing it\n</think>\n\nThe answer.", True, "weighing it", "The answer."),  # the prompt opened it
        ("  <think>a</think>b", False, "a", "b"),
        ("The answer <think> is text", False, None, "The answer <think> is text"),  # not at the start: content
        ("<thin", False, None, "<thin"),
        ("still thinking", True, "still thinking", ""),
        ("", False, None, ""),
    ]
    for text, opened, reasoning, content in cases:
        assert split_reasoning(text, opened) == (reasoning, content), text
        for cut in range(1, max(2, len(text))):
            s = ThinkSplitter(opened)
            r = c = ""
            for i in range(0, len(text), cut):
                a, b = s.push(text[i : i + cut])
                r, c = r + a, c + b
            a, b = s.flush()
            assert ((r + a).strip() or None, c + b) == (reasoning, content), (text, cut)


def test_reasoning_content_from_a_template_that_opens_thinking(tmp_path, demo):
    """A chat template whose generation prompt opens <think> (as DeepSeek-R1's): the answer, never closing the
    block here, is all reasoning_content under the default --reasoning-format auto, all content under none."""
    from moelite.converters.gguf_out import rewrite_stock

    template = demo.chat_template.source.replace("<|im_start|>assistant\\n", "<|im_start|>assistant\\n<think>\\n")
    assert template != demo.chat_template.source and "</think>" not in template
    template += "{# </think> #}"  # auto: the template knows the closing tag
    gguf = tmp_path / "thinking.gguf"
    rewrite_stock(demo.path, gguf, kv={"tokenizer.chat_template": template})
    ask = {"messages": [{"role": "user", "content": "What is Python?"}], "max_tokens": 6, "temperature": 0}
    answers = {}
    for fmt in ("auto", "none"):
        with running_server(tmp_path, "--reasoning-format", fmt, model=gguf) as (base, _, _):
            status, r = _post(base, "/v1/chat/completions", {**ask, "ignore_eos": True})
            assert status == 200, r
            answers[fmt] = r["choices"][0]["message"]
            if fmt == "auto":
                c = openai.OpenAI(base_url=base, api_key="none", max_retries=0)
                stream = c.chat.completions.create(model="m", stream=True, extra_body={"ignore_eos": True}, **ask)
                chunks = list(stream)
                streamed = "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks)
    assert answers["auto"]["content"] == "" and answers["auto"]["reasoning_content"]
    assert answers["auto"]["reasoning_content"] == answers["none"]["content"].strip()
    assert answers["none"]["reasoning_content"] is None
    assert streamed.strip() == answers["auto"]["reasoning_content"]
