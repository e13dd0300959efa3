"""moelite serve [MODEL]: an OpenAI-compatible HTTP server on the standard library (ThreadingHTTPServer).

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with "stream": true as server-sent
events), GET /v1/models, GET /health. One model is shared by all requests: its lock runs one generation at
a time and the others wait (at most --queue of them; more get 503). Errors are JSON
{"error": {"message", "type", "code"}} with a 4xx/5xx status. Loopback only unless --host says otherwise.
"""
from __future__ import annotations

import argparse
import hmac
import json
import signal
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..errors import MoeliteError
from .common import add_common, load_model, model_name, port_number, positive_int
from .textgen import TextStream, prompt_ids, sampling_kwargs, stop_list

NAME = "serve"
HELP = "serve the model over an OpenAI-compatible HTTP API"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    g.add_argument("--port", type=port_number, default=8080, help="port (default 8080; 0 picks a free one)")
    g.add_argument("--max-tokens", type=positive_int, default=2048,
                   help="largest max_tokens a request may ask for, and the default (2048)")
    g.add_argument("--max-request-bytes", type=positive_int, default=1 << 20, help="request body limit (1 MiB)")
    g.add_argument("--queue", type=positive_int, default=32, help="requests waiting for the model at most (32)")
    g.add_argument("--api-key", help="require 'Authorization: Bearer KEY'")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type, code


class Api:
    """Requests (parsed JSON) -> responses; knows the model, not HTTP."""

    def __init__(self, model, args: argparse.Namespace) -> None:
        self.model = model
        self.name = model_name(model)
        self.max_tokens = args.max_tokens
        self.slots = threading.BoundedSemaphore(args.queue + 1)   # the running request + the waiting ones

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "moelite"}]}

    def prepare(self, body: dict, chat: bool) -> tuple[list[int], dict[str, Any]]:
        """Validate a request -> (prompt ids, TextStream options); ApiError(400) on anything wrong."""
        if body.get("n", 1) != 1:
            raise ApiError(400, "only n=1 is supported", code="n")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = self.max_tokens
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 0 <= max_tokens <= self.max_tokens:
            raise ApiError(400, f"max_tokens={max_tokens!r}: expected an integer in [0, {self.max_tokens}]",
                           code="max_tokens")
        try:
            opts = dict(max_tokens=max_tokens, stop=stop_list(body.get("stop")), **sampling_kwargs(body))
            if chat:
                ids = prompt_ids(self.model, messages=_messages(body.get("messages")))
            else:
                ids = prompt_ids(self.model, _prompt(body.get("prompt")))
        except MoeliteError as e:
            raise ApiError(400, str(e)) from None
        if len(ids) >= self.model.n_ctx:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; the context holds {self.model.n_ctx}",
                           code="context_length_exceeded")
        return ids, opts

    def acquire(self) -> None:
        if not self.slots.acquire(blocking=False):
            raise ApiError(503, "the server is busy: too many requests are waiting", "server_error", "busy")

    def release(self) -> None:
        self.slots.release()


def _messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: expected a non-empty list", code="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}]: expected an object with a string 'role'", code="messages")
        content = m.get("content") or ""
        if isinstance(content, list):     # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", code="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content: expected a string", code="messages")
        out.append({"role": m["role"], "content": content})
    return out


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "prompt: expected a non-empty string", code="prompt")
    return prompt


def _finish(stream: TextStream) -> str:
    return "length" if stream.finish_reason == "length" else "stop"


def _usage(stream: TextStream) -> dict:
    return {"prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.completion_tokens,
            "total_tokens": stream.prompt_tokens + stream.completion_tokens}


class Handler(BaseHTTPRequestHandler):
    server_version = "moelite"
    protocol_version = "HTTP/1.1"
    timeout = 60                                # seconds a client may take to send its request
    api: Api                                    # set on the subclass made by `serve`
    api_key: str | None = None
    max_body = 1 << 20
    verbose = False

    # --- routing -------------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch({"/health": lambda: {"status": "ok", "model": self.api.name},
                        "/v1/models": self.api.models})

    def do_POST(self) -> None:
        self._dispatch({"/v1/chat/completions": lambda: self._complete(chat=True),
                        "/v1/completions": lambda: self._complete(chat=False)})

    def _dispatch(self, routes: dict) -> None:
        try:
            route = routes.get(self.path.split("?", 1)[0].rstrip("/"))
            if route is None:
                raise ApiError(404, f"no route {self.command} {self.path}", code="not_found")
            self._auth()
            out = route()
            if out is not None:
                self._send_json(200, out)
        except ApiError as e:
            self._send_json(e.status, {"error": {"message": e.message, "type": e.type, "code": e.code}})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except MoeliteError as e:
            self._send_json(500, {"error": {"message": str(e), "type": "server_error", "code": type(e).__name__}})
        except Exception as e:                  # a bug: answer 500, keep serving
            self.log_error("internal error: %r", e)
            self._send_json(500, {"error": {"message": f"internal error: {e}", "type": "server_error", "code": None}})

    def _auth(self) -> None:
        if self.api_key is None:
            return
        got = self.headers.get("Authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key", "authentication_error", "invalid_api_key")

    # --- completions ---------------------------------------------------------------------------------------
    def _body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise ApiError(411, "a Content-Length header is required", code="length_required")
        if int(length) > self.max_body:
            self.close_connection = True        # the body stays unread
            raise ApiError(413, f"request body of {length} bytes exceeds the limit of {self.max_body}",
                           code="request_too_large")
        try:
            body = json.loads(self.rfile.read(int(length)) or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        return body

    def _complete(self, chat: bool) -> dict | None:
        body = self._body()
        ids, opts = self.api.prepare(body, chat)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.api.name}
        self.api.acquire()
        try:
            stream = TextStream(self.api.model, ids, **opts)
            if body.get("stream"):
                self._sse(stream, head, chat, bool((body.get("stream_options") or {}).get("include_usage")))
                return None
            text = "".join(stream)
        finally:
            self.api.release()
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": _finish(stream)} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": _finish(stream)})
        return {**head, "choices": [choice], "usage": _usage(stream)}

    def _sse(self, stream: TextStream, head: dict, chat: bool, include_usage: bool) -> None:
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(piece: str | None, finish: str | None = None, first: bool = False) -> dict:
            if chat:
                delta = {} if piece is None else ({"role": "assistant", "content": piece} if first else {"content": piece})
                return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            return {**head, "choices": [{"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}]}

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.end_headers()
        self.close_connection = True
        pieces = iter(stream)
        try:
            if chat:
                self._event(chunk("", first=True))
            for piece in pieces:
                self._event(chunk(piece))
        except MoeliteError as e:              # too late for a status code: an error event ends the stream
            self._event({"error": {"message": str(e), "type": "server_error", "code": None}})
            return
        finally:
            pieces.close()                     # a client that went away must not keep the model
        self._event(chunk(None, _finish(stream)))
        if include_usage:
            self._event({**head, "choices": [], "usage": _usage(stream)})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")
        self.wfile.flush()

    def _send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        if self.verbose:
            super().log_message(format, *args)


def main(args: argparse.Namespace) -> int:
    if args.host not in LOOPBACK:
        print(f"moelite: warning: listening on {args.host}: anyone who can reach it can use the model"
              + ("" if args.api_key else " (no --api-key)"), file=sys.stderr)
    with load_model(args) as model:
        api = Api(model, args)
        handler = type("BoundHandler", (Handler,), {"api": api, "api_key": args.api_key,
                                                    "max_body": args.max_request_bytes, "verbose": args.verbose})
        server = ThreadingHTTPServer((args.host, args.port), handler)
        server.daemon_threads = True
        signal.signal(signal.SIGTERM, _raise_interrupt)
        host, port = server.server_address[:2]
        print(f"moelite: serving {api.name} on http://{host}:{port}/v1 (Ctrl-C to stop)", flush=True)
        try:
            server.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            print("moelite: stopped", file=sys.stderr)
        finally:
            server.server_close()
    return 0


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
