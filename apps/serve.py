"""moelite serve [MODEL]: an OpenAI-compatible HTTP server (apps/serve_app.py: starlette on uvicorn).

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with "stream": true as server-sent events),
GET /v1/models, GET /v1/models/{id}, POST /tokenize, POST /detokenize, GET /tokenizer_info, GET /health (no API key
needed); docs/SERVER.md. One model serves every request, one
generation at a time (at most --queue waiting; more get 503). Errors are JSON {"error": {"message", "type",
"code"}}. Loopback only unless --host says otherwise. Needs the `serve` extra: pip install 'moelite[serve]'.
"""

from __future__ import annotations

import argparse
import errno
import signal
import socket
import sys
from typing import Any

from ..errors import UsageError
from .common import add_common, add_speculative, load_model, model_name, nonneg_float, port_number, positive_int
from .serve_logprobs import REASONING_FORMATS

NAME = "serve"
HELP = "serve the model over an OpenAI-compatible HTTP API"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
H11_MAX_EVENT = 64 << 10  # request line + headers that uvicorn buffers at most (beyond: 431)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    add_speculative(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    g.add_argument("--port", type=port_number, default=8080, help="port (default 8080; 0 picks a free one)")
    g.add_argument(
        "--max-tokens",
        type=positive_int,
        default=2048,
        help="largest max_tokens a request may ask for (default 2048); a request without max_tokens gets "
        "the API's default (256) or this, whichever is smaller",
    )
    g.add_argument("--max-request-bytes", type=positive_int, default=1 << 20, help="request body limit (1 MiB)")
    g.add_argument("--queue", type=positive_int, default=32, help="requests waiting for the model at most (32)")
    g.add_argument(
        "--timeout",
        type=nonneg_float,
        default=600.0,
        help="seconds one request may hold the model (default 600; 0 = no limit)",
    )
    g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (not for /health)")
    g.add_argument(
        "--cors",
        nargs="?",
        const="*",
        action="append",
        metavar="ORIGIN",
        help="answer browsers' CORS requests from ORIGIN (repeatable; without ORIGIN: any origin)",
    )
    g.add_argument("--no-log", action="store_true", help="no request log lines on stderr")
    g.add_argument(
        "--read-timeout",
        type=nonneg_float,
        default=15.0,
        metavar="S",
        help="seconds a request body may take to arrive (default 15; 0 = no limit); later: 408 and the "
        "connection closes",
    )
    g.add_argument(
        "--reasoning-format",
        choices=REASONING_FORMATS,
        default="auto",
        help="a chat answer's <think> ... </think> block: deepseek = returned as message.reasoning_content "
        "(llama-server's name), none = left in content, auto (default) = deepseek when the model's chat template "
        "has </think>",
    )


def _imports() -> tuple[Any, Any]:
    try:
        import uvicorn

        from . import serve_app
    except ImportError as e:
        raise UsageError(
            f"moelite serve needs starlette and uvicorn ({e.name} is missing): pip install 'moelite[serve]'"
        ) from None
    return uvicorn, serve_app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; a busy port or a bad address is a UsageError that says what to do."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UsageError(
                f"port {port} on {host} is already in use (another server?): stop it, or pick another "
                "port with --port (0 picks a free one)"
            ) from None
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def main(args: argparse.Namespace) -> int:
    uvicorn, serve_app = _imports()
    if args.host not in LOOPBACK:
        print(
            f"moelite: warning: listening on {args.host}: anyone who can reach it can use the model"
            + ("" if args.api_key else " (no --api-key)"),
            file=sys.stderr,
        )
    sock = bind(args.host, args.port)
    try:
        with load_model(args) as model:
            cfg = serve_app.ServerConfig(
                max_tokens=args.max_tokens,
                max_body=args.max_request_bytes,
                queue=args.queue,
                timeout=args.timeout or None,
                api_key=args.api_key,
                cors=args.cors,
                log=not args.no_log,
                read_timeout=args.read_timeout or None,
                reasoning_format=args.reasoning_format,
            )
            name = model_name(model)
            app = serve_app.build_app(model, name, cfg)
            server = uvicorn.Server(
                uvicorn.Config(
                    app,
                    http=serve_app.JsonErrorH11Protocol,
                    h11_max_incomplete_event_size=H11_MAX_EVENT,
                    log_level="debug" if args.verbose else "error",
                    access_log=False,
                    lifespan="off",
                    timeout_keep_alive=5,
                    timeout_graceful_shutdown=3,
                    server_header=False,
                )
            )
            host, port = sock.getsockname()[:2]
            url_host = f"[{host}]" if ":" in host else host
            print(f"moelite: serving {name} on http://{url_host}:{port}/v1 (Ctrl-C to stop)", flush=True)
            signal.signal(signal.SIGTERM, _raise_interrupt)
            try:
                server.run(sockets=[sock])
            except KeyboardInterrupt:
                pass
            model.cancel()
            print("moelite: stopped", file=sys.stderr)
    finally:
        sock.close()
    return 0


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
