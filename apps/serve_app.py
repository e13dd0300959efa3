"""The OpenAI-compatible HTTP API of `moelite serve`: an ASGI app (starlette) run by uvicorn, as llama-cpp-python's
and vLLM's servers are, with pydantic models for the request and response schema.

One model serves every request, one generation at a time: a FIFO asyncio lock orders them, the generation itself
runs in one worker thread and hands its text pieces to the event loop. A request that cannot get a place in the
queue (--queue waiting at most) gets 503; a client that disconnects, streaming or not, cancels its generation at
once (Model.cancel); --timeout caps how long one request may hold the model. Every error is JSON
{"error": {"message", "type", "code"}}, including those of the HTTP layer (400, 404, 405, 413, 414, 431, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import hmac
import json
import math
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Annotated, Any, Literal

import h11
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import MoeliteError
from ..runtime.perplexity import prompt_logprobs
from ..runtime.sampling import DEFAULT_MAX_TOKENS
from .serve_logprobs import (
    MAX_TOP_LOGPROBS,
    ThinkSplitter,
    chat_logprobs,
    completion_logprobs,
    detokenize_body,
    prompt_opens_thinking,
    reasoning_enabled,
    split_reasoning,
    tokenize_body,
    tokenizer_info,
)
from .serve_tools import Plan
from .serve_tools import plan as tool_plan
from .textgen import MAX_STOP_STRINGS, TextStream, prompt_ids, sampling_kwargs

MAX_JSON_DEPTH = 32
MAX_PATH_BYTES = 8192
MAX_HEADER_BYTES = 32768
# a prompt text longer than 2 * n_ctx characters is first counted window by window (COUNT_WINDOW characters each, cut
# at a space): once the count passes n_ctx + COUNT_SLACK tokens the prompt is refused, the rest never tokenized. Small
# windows keep the tokenizer's allocations small (one 64 K-character encode left tens of MiB of fragmented heap)
COUNT_WINDOW = 4096
COUNT_SLACK = 16
# OpenAI parameters moelite does not implement: refused by name (400), never silently ignored. The value is the
# test that a given value asks for the feature (an explicit default such as "n": 1 or "logprobs": false is fine).
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "functions": bool,
    "function_call": bool,
    "n": lambda v: v not in (None, 1),
    "best_of": lambda v: v not in (None, 1),
    "suffix": bool,
    "logit_bias": bool,
    "audio": bool,
    "modalities": lambda v: v not in (None, ["text"]),
    "prediction": bool,
    "presence_penalty": bool,
    "frequency_penalty": bool,
}


# --- errors ----------------------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type, code
        self.headers = headers


def error_body(status: int, message: str, type: str | None = None, code: str | None = None) -> dict:
    kind = type or ("invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "code": code}}


def error_response(
    status: int, message: str, type: str | None = None, code: str | None = None, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, type, code), status_code=status, headers=headers)


# --- the request schema ----------------------------------------------------------------------------------
Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Request(BaseModel):
    """Fields shared by both endpoints. Types are strict (a string is not a number); unknown fields are allowed
    (clients send extras), the unsupported OpenAI ones are refused before validation."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=0)] | None = None
    temperature: Annotated[Finite, Field(ge=0)] | None = None
    top_p: Annotated[Finite, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[Finite, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[Finite, Field(gt=0)] | None = None
    repeat_penalty: Annotated[Finite, Field(gt=0)] | None = None  # llama.cpp's name
    seed: Annotated[int, Field(ge=-1, lt=1 << 63)] | None = None
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False
    user: str | None = None
    response_format: dict | None = None  # text | json_object | json_schema (apps/serve_tools.py)

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, v: Any) -> Any:
        if v == "":
            raise ValueError("a stop string must not be empty")
        return v


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


TopN = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class ChatRequest(_Request):
    messages: Annotated[list[Message], Field(min_length=1)]
    logprobs: bool | None = None  # the generated tokens' log-probabilities
    top_logprobs: TopN | None = None  # ... with this many most likely alternatives each
    # tool calls (apps/serve_tools.py checks them and names the field)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Request):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=1)]
    )
    logprobs: TopN | None = None  # log-probabilities with this many most likely alternatives each
    echo: bool | None = False  # the prompt comes back before the answer (with logprobs: its tokens' too)

    def _one(self) -> str | list[int]:
        p = self.prompt
        return p[0] if isinstance(p, list) and isinstance(p[0], (str, list)) else p

    def text(self) -> str | None:
        """The prompt text, or None when the prompt is token ids."""
        p = self._one()
        return p if isinstance(p, str) else None

    def token_ids(self) -> list[int] | None:
        """The prompt's token ids, or None when the prompt is text."""
        p = self._one()
        return list(p) if isinstance(p, list) else None


_Request.model_rebuild()
ChatRequest.model_rebuild()
CompletionRequest.model_rebuild()


# --- the response schema ---------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the answer is only tool calls
    reasoning_content: str | None = None  # a reasoning model's thoughts (--reasoning-format)
    tool_calls: list[dict] | None = None  # [{id, type: function, function: {name, arguments}}]


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: dict | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict] | None = None  # each call whole in one entry: {index, id, type, function}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: dict | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: dict | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "moelite"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- JSON body -------------------------------------------------------------------------------------------
def parse_json(raw: bytes) -> dict:
    """Strict JSON: UTF-8, finite numbers only (1e400, NaN, Infinity refused), nesting at most MAX_JSON_DEPTH,
    no lone surrogates in strings, an object at the top."""

    def no_constant(name: str) -> Any:
        raise ApiError(400, f"the body is not valid JSON: {name} is not a number", code="invalid_json")

    def finite(text: str) -> float:
        x = float(text)
        if not math.isfinite(x):
            raise ApiError(
                400, f"the body holds the number {text[:40]}, beyond the range of a double", code="invalid_json"
            )
        return x

    try:
        body = json.loads(raw, parse_constant=no_constant, parse_float=finite)
    except RecursionError:
        raise ApiError(400, f"the body's JSON nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    _check_json(body)
    return body


def _check_json(root: Any) -> None:
    stack: list[tuple[Any, str, int]] = [(root, "", 1)]
    while stack:
        v, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the body's JSON nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
        if isinstance(v, str):
            _check_text(v, where or "body")
        elif isinstance(v, dict):
            for k, x in v.items():
                _check_text(k, f"{where}.{k}" if where else "a key")
                stack.append((x, f"{where}.{k}" if where else k, depth + 1))
        elif isinstance(v, list):
            stack.extend((x, f"{where}[{i}]", depth + 1) for i, x in enumerate(v))


def _check_text(s: str, where: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{where}: a lone surrogate ({s[e.start]!r}) is not text", code="invalid_json") from None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_field(part: str) -> bool:
    """A field name in a pydantic error location, not a union member's tag ('str', 'list[str]', 'TextPart')."""
    return bool(re.fullmatch(r"[a-z_][a-z0-9_]*", part)) and part not in _TYPE_TAGS


def validation_message(e: ValidationError) -> tuple[str, str]:
    """pydantic's first error -> ('temperature: Input should be ...', 'temperature')."""
    first = e.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in first["loc"] if isinstance(p, int) or _is_field(p))
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{loc or 'body'}: {first['msg']}{more}", (str(first["loc"][0]) if first["loc"] else "body")


# --- the app ---------------------------------------------------------------------------------------------
@dataclass
class ServerConfig:
    max_tokens: int = 2048  # largest max_tokens a request may ask for
    max_body: int = 1 << 20
    queue: int = 32  # requests waiting for the model at most
    timeout: float | None = None  # seconds one request may hold the model
    api_key: str | None = None
    cors: list[str] | None = None
    log: bool = True
    read_timeout: float = 15.0  # seconds a request body may take to arrive (then 408 and the connection closes)
    reasoning_format: str = "auto"  # auto | none | deepseek: a chat answer's <think> block as reasoning_content


class Api:
    """The model behind the HTTP endpoints: request -> prompt ids and options -> a generation in the worker."""

    def __init__(self, model, name: str, cfg: ServerConfig) -> None:
        self.model, self.name, self.cfg = model, name, cfg
        self.lock = asyncio.Lock()  # FIFO: one generation at a time, in arrival order
        self.places = cfg.queue + 1  # the running request + the waiting ones
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="moelite-generate")
        self._max_token_bytes: int | None = None

    def prepare(self, req: _Request, chat: bool, plan: Plan | None = None) -> tuple[list[int], dict[str, Any]]:
        """Validated request -> (prompt ids, TextStream options); ApiError(400) on anything the model refuses.
        `plan`: its tools and constraint (apps/serve_tools.py)."""
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, self.cfg.max_tokens)
        if max_tokens > self.cfg.max_tokens:
            raise ApiError(
                400,
                f"max_tokens={max_tokens}: expected an integer in [0, {self.cfg.max_tokens}] "
                "(the server's --max-tokens)",
                code="max_tokens",
            )
        if req.repeat_penalty is not None and req.repetition_penalty is not None:
            raise ApiError(400, "repeat_penalty and repetition_penalty both given", code="repetition_penalty")
        values = req.model_dump(include={"temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"})
        if req.repeat_penalty is not None:
            values["repetition_penalty"] = req.repeat_penalty
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        try:
            opts = dict(max_tokens=max_tokens, stop=stop, ignore_eos=bool(req.ignore_eos), **sampling_kwargs(values))
            plan = plan or Plan()
            if chat:
                messages = plan.messages or [{"role": m.role, "content": m.text()} for m in req.messages]
                self.check_prompt_bytes(sum(len(m["content"].encode()) for m in messages))
                prompt = self.model.chat_template.render(messages, add_generation_prompt=True, tools=plan.tools)
                ids = self.bounded_ids(prompt)
            else:
                prompt, ids = "", self.completion_ids(req)
            opts["logits_processor"] = plan.logits_processor(self.model, prompt)
        except MoeliteError as e:
            raise ApiError(400, str(e)) from None
        if len(ids) >= self.model.n_ctx:
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens; the context holds {self.model.n_ctx}",
                code="context_length_exceeded",
            )
        return ids, opts

    # --- prompt bounds (issue 32: a prompt longer than the context is refused before it is fully tokenized) ---
    @property
    def max_token_bytes(self) -> int:
        """The longest vocabulary entry in UTF-8 bytes (as stored, an upper bound of the text it stands for)."""
        if self._max_token_bytes is None:
            tok = self.model.tokenizer
            self._max_token_bytes = max(len((tok.token_text(i) or "").encode()) for i in range(self.model.n_vocab))
        return max(1, self._max_token_bytes)

    def check_prompt_bytes(self, n_bytes: int) -> None:
        """A text of n_bytes needs at least n_bytes / max_token_bytes tokens: refuse it now if that exceeds
        the context (no token of the vocabulary stands for more text)."""
        bound = self.model.n_ctx * self.max_token_bytes
        if n_bytes > bound:
            raise ApiError(
                400,
                f"the prompt has {n_bytes} bytes, more than the context of {self.model.n_ctx} tokens can hold "
                f"(at most {self.max_token_bytes} bytes per token)",
                code="context_length_exceeded",
            )

    def bounded_ids(self, text: str) -> list[int]:
        """Token ids of a prompt text; a text that is longer than the context is refused by its byte length, or once
        its windows counted so far pass the context, without tokenizing the rest."""
        self.check_prompt_bytes(len(text.encode()))
        n_ctx = self.model.n_ctx
        if len(text) > 2 * n_ctx:
            counted, at = 0, 0
            while at < len(text):
                end = at + COUNT_WINDOW
                if end < len(text):  # cut after a space, where a pre-tokenizer splits anyway
                    end = max(text.rfind(" ", at, end) + 1, at + COUNT_WINDOW // 2)
                counted += len(self.model.tokenizer.encode(text[at:end], add_special=False))
                at = end
                if counted > n_ctx + COUNT_SLACK:  # a window's cut changes a token or two, never many
                    raise ApiError(
                        400,
                        f"the prompt's first {at} characters alone are {counted} tokens; the context holds {n_ctx}",
                        code="context_length_exceeded",
                    )
        return prompt_ids(self.model, text)

    def completion_ids(self, req: CompletionRequest) -> list[int]:
        """A completion prompt (text, or token ids as lm-evaluation-harness sends them) -> checked token ids."""
        ids = req.token_ids()
        if ids is None:
            return self.bounded_ids(req.text() or "")
        bad = [t for t in ids if t >= self.model.n_vocab]
        if bad:
            raise ApiError(400, f"prompt: token id {bad[0]} out of range [0, {self.model.n_vocab})", code="prompt")
        return ids

    async def pieces(self, stream: TextStream, holder: dict) -> AsyncIterator[str]:
        """Run `stream` in the worker thread, yield its pieces here. Leaving early (client gone, --timeout) cancels
        the generation and waits for the worker, so the model is free when this returns."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def work() -> None:
            try:
                for piece in stream:
                    loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece))
                loop.call_soon_threadsafe(queue.put_nowait, ("end", None))
            except BaseException as e:  # noqa: BLE001 - handed to the event loop, raised there
                loop.call_soon_threadsafe(queue.put_nowait, ("error", e))

        deadline = None if self.cfg.timeout is None else loop.time() + self.cfg.timeout
        done = loop.run_in_executor(self.worker, work)
        try:
            while True:
                try:
                    left = None if deadline is None else max(deadline - loop.time(), 0)
                    kind, value = await asyncio.wait_for(queue.get(), left)
                except asyncio.TimeoutError:
                    holder["timed_out"] = True
                    raise ApiError(
                        504,
                        f"the request held the model for more than {self.cfg.timeout:g} s (the server's --timeout)",
                        "server_error",
                        "timeout",
                    ) from None
                if kind == "piece":
                    yield value
                elif kind == "end":
                    return
                else:
                    raise value
        finally:
            if not done.done():
                stream.cancel()
            await _uncancellable(done)


async def _uncancellable(fut: asyncio.Future) -> None:
    """Wait for fut even if this task is being cancelled (the worker must finish before the model is reused)."""
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            continue
        except BaseException:  # noqa: BLE001 - its error was already delivered through the queue
            return


def build_app(model, name: str, cfg: ServerConfig) -> Starlette:
    api = Api(model, name, cfg)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": api.name})

    async def models(request: Request) -> Response:
        _auth(request, cfg)
        return JSONResponse(ModelList(data=[ModelCard(id=api.name)]).model_dump())

    async def model_card(request: Request) -> Response:
        _auth(request, cfg)
        if request.path_params["model_id"] != api.name:
            raise ApiError(
                404,
                f"no model {request.path_params['model_id']!r}; this server has {api.name!r}",
                code="model_not_found",
            )
        return JSONResponse(ModelCard(id=api.name).model_dump())

    async def chat(request: Request) -> Response:
        return await _complete(request, api, chat=True)

    async def completions(request: Request) -> Response:
        return await _complete(request, api, chat=False)

    async def tokenize(request: Request) -> Response:
        return await _tokenizer_call(request, api, tokenize_body)

    async def detokenize(request: Request) -> Response:
        return await _tokenizer_call(request, api, detokenize_body)

    async def tokenizer_info_route(request: Request) -> Response:
        _auth(request, cfg)
        return JSONResponse(await asyncio.to_thread(tokenizer_info, api.model))

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", model_card, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/tokenizer_info", tokenizer_info_route, methods=["GET"]),
    ]
    middleware = []
    if cfg.cors:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=cfg.cors,
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["*"],
                max_age=600,
            )
        )
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: _http_error, ApiError: _api_error, Exception: _internal_error},
    )
    app.state.api = api
    return _Guard(app, cfg)


async def _complete(request: Request, api: Api, chat: bool) -> Response:
    _auth(request, api.cfg)
    body = parse_json(await _read_body(request, api.cfg.max_body, api.cfg.read_timeout))
    asked = [k for k, wants in UNSUPPORTED.items() if k in body and wants(body[k])]
    if asked:
        raise ApiError(
            400,
            f"unsupported parameter{'s' if len(asked) > 1 else ''}: {', '.join(asked)} "
            "(moelite serve generates one plain-text choice)",
            code=asked[0],
        )
    try:
        req = (ChatRequest if chat else CompletionRequest).model_validate(body)
    except ValidationError as e:
        message, field = validation_message(e)
        raise ApiError(400, message, code=field) from None
    try:  # tools, response_format: checked, grammar compiled (apps/serve_tools.py)
        plan = await asyncio.to_thread(tool_plan, api.model, req, chat)
    except MoeliteError as e:
        raise ApiError(400, str(e), code=re.match(r"[a-z_]*", str(e)).group() or None) from None
    ids, opts = await asyncio.to_thread(api.prepare, req, chat, plan)  # chat template, tokenizer: off the loop
    extras = _extras(api, req, chat, ids)
    extras.plan = plan
    if extras.top_n is not None:
        opts["logprobs"] = extras.top_n
    if api.places <= 0:
        raise ApiError(503, "the server is busy: too many requests are waiting", "server_error", "busy")
    head = {
        "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
        "created": int(time.time()),
        "model": api.name,
    }
    log = request.scope.setdefault("state", {})
    api.places -= 1
    if req.stream:
        return _PlaceHoldingStream(
            api,
            _sse(api, ids, opts, head, chat, req, log, extras),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    try:
        async with api.lock:
            await _score_prompt(api, ids, extras)
            stream = TextStream(api.model, ids, **opts)
            text = await _until_disconnect(request, _join(api.pieces(stream, log)), stream)
    finally:
        api.places += 1
    log["tokens"] = (stream.prompt_tokens, stream.completion_tokens)
    if text is None:  # the client left: nobody reads an answer
        return Response(status_code=499)
    usage = _usage(stream)
    tok = api.model.tokenizer
    if chat:
        reasoning, content = split_reasoning(text, extras.thinking) if extras.reasoning else (None, text)
        content, calls = plan.message(content)
        message = AssistantMessage(content=content, reasoning_content=reasoning, tool_calls=calls)
        lps = chat_logprobs(tok, stream.logprobs) if extras.top_n is not None else None
        choice = ChatChoice(message=message, logprobs=lps, finish_reason="tool_calls" if calls else _finish(stream))
        out = ChatCompletion(**head, choices=[choice], usage=usage)
    else:
        lps = None
        if extras.top_n is not None:
            lps = _completion_lps(tok, extras, ids, stream.token_ids, stream.logprobs)
        text = extras.echo_text + text
        out = Completion(
            **head, choices=[CompletionChoice(text=text, logprobs=lps, finish_reason=_finish(stream))], usage=usage
        )
    return JSONResponse(out.model_dump())


# --- logprobs, echo, reasoning (issue 32) ----------------------------------------------------------------
@dataclass
class _Extras:
    """What a request asks beyond the plain answer."""

    top_n: int | None = None  # logprobs wanted (with this many alternatives), or None
    echo: bool = False
    echo_text: str = ""  # the prompt text an echoed completion starts with
    prompt_lps: list = field(default_factory=list)  # echo + logprobs: TokenLogprob of ids[1:]
    reasoning: bool = False  # a chat answer's <think> block goes to reasoning_content
    thinking: bool = False  # ... and the prompt already opened it
    plan: Plan = field(default_factory=Plan)  # tool calls and constraint (apps/serve_tools.py)


def _extras(api: Api, req: _Request, chat: bool, ids: list[int]) -> _Extras:
    ex = _Extras()
    if chat:
        assert isinstance(req, ChatRequest)
        if req.top_logprobs and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", code="top_logprobs")
        ex.top_n = (req.top_logprobs or 0) if req.logprobs else None
        ex.reasoning = reasoning_enabled(api.model, api.cfg.reasoning_format)
        ex.thinking = ex.reasoning and prompt_opens_thinking(api.model.tokenizer, ids)
    else:
        assert isinstance(req, CompletionRequest)
        ex.top_n = req.logprobs
        ex.echo = bool(req.echo)
        if ex.echo:
            text = req.text()
            ex.echo_text = text if text is not None else api.model.tokenizer.decode(ids)
    return ex


async def _score_prompt(api: Api, ids: list[int], extras: _Extras) -> None:
    """echo + logprobs: the prompt tokens' log-probabilities, computed in the worker (the model's thread)."""
    if extras.echo and extras.top_n is not None:
        loop = asyncio.get_running_loop()
        extras.prompt_lps = await loop.run_in_executor(api.worker, prompt_logprobs, api.model, ids, extras.top_n)


def _completion_lps(
    tok, extras: _Extras, ids: list[int] | None, gen_ids: list[int], gen_lps: list, offset: int = 0
) -> dict:
    """The completions logprobs object: with echo and the prompt's `ids`, the prompt's tokens first (the first has no
    log-probability); a streamed chunk passes ids=None and its tokens' text_offset."""
    if extras.echo and ids is not None:
        lps = [None, *extras.prompt_lps, *gen_lps]
        return completion_logprobs(tok, lps, [*ids, *gen_ids])
    return completion_logprobs(tok, gen_lps, gen_ids, offset)


async def _tokenizer_call(request: Request, api: Api, fn: Callable[[Any, dict], dict]) -> Response:
    """/tokenize and /detokenize: a JSON body -> fn(model, body) off the event loop; its ValueError is a 400."""
    _auth(request, api.cfg)
    body = parse_json(await _read_body(request, api.cfg.max_body, api.cfg.read_timeout))
    if isinstance(body.get("content", body.get("prompt")), str):
        api.check_prompt_bytes(len(body.get("content", body.get("prompt")).encode()))
    try:
        return JSONResponse(await asyncio.to_thread(fn, api.model, body))
    except ValueError as e:
        raise ApiError(400, str(e), code=str(e).split(":", 1)[0]) from None


async def _join(pieces: AsyncIterator[str]) -> str:
    return "".join([p async for p in pieces])


async def _until_disconnect(request: Request, work, stream: TextStream) -> str | None:
    """Await `work`; if the client disconnects first, cancel the generation and return None."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        stream.cancel()
        task.cancel()
        await _uncancellable(task)
        return None
    finally:
        watch.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(
    api: Api, ids: list[int], opts: dict, head: dict, chat: bool, req: _Request, log: dict, extras: _Extras
) -> AsyncIterator[bytes]:
    """Server-sent events of one generation. Starlette cancels this when the client disconnects: the finally of
    Api.pieces then cancels the generation."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    stream = None
    try:
        async with api.lock:
            await _score_prompt(api, ids, extras)
            stream = TextStream(api.model, ids, **opts)
            if chat:
                yield _event(
                    ChatCompletionChunk(**head, choices=[ChatChunkChoice(delta=Delta(role="assistant", content=""))])
                )
            elif extras.echo:
                lps = _completion_lps(api.model.tokenizer, extras, ids, [], []) if extras.top_n is not None else None
                yield _event(Completion(**head, choices=[CompletionChoice(text=extras.echo_text, logprobs=lps)]))
            pieces_out = _StreamPieces(api, stream, chat, extras)
            try:
                async with contextlib.aclosing(api.pieces(stream, log)) as pieces:  # closed (cancel + wait) at once
                    async for piece in pieces:
                        event = pieces_out.chunk(head, piece)
                        if event is not None:
                            yield _event(event)
            except (ApiError, MoeliteError) as e:  # too late for a status code: an error event ends the stream
                status = e.status if isinstance(e, ApiError) else 500
                yield b"data: " + json.dumps(error_body(status, str(e))).encode() + b"\n\n"
                return
        yield _event(pieces_out.chunk(head, None, _finish(stream)))
        if include_usage:
            cls = ChatCompletionChunk if chat else Completion
            yield _event(cls(**head, choices=[], usage=_usage(stream)))
        yield b"data: [DONE]\n\n"
    finally:
        if stream is not None:
            log["tokens"] = (stream.prompt_tokens, stream.completion_tokens)


class _PlaceHoldingStream(StreamingResponse):
    """A streaming answer that holds its place in the queue from before its headers until it ends, however it
    ends (its body may never start when the client leaves at once)."""

    def __init__(self, api: Api, content: AsyncIterator[bytes], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.api = api

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.api.places += 1


class _StreamPieces:
    """The streamed chunks of one answer: each text piece with the log-probabilities of the tokens that completed it
    (TextStream.piece_ends), a chat answer's <think> block as reasoning_content deltas; what is still held back (a tag
    split across pieces, tokens past the last piece) comes with the final chunk."""

    def __init__(self, api: Api, stream: TextStream, chat: bool, extras: _Extras) -> None:
        self.stream, self.chat, self.extras = stream, chat, extras
        self.tok = api.model.tokenizer
        self.k = 0  # pieces seen
        self.sent = 0  # logprobs sent
        self.offset = len(extras.echo_text)  # completions' text_offset of the next token
        self.splitter = ThinkSplitter(extras.thinking) if chat and extras.reasoning else None
        self.calls = extras.plan.stream() if chat else None  # tool calls parsed out of the content

    def chunk(self, head: dict, piece: str | None, finish: str | None = None) -> BaseModel | None:
        s = self.stream
        end = s.piece_ends[self.k] if piece is not None else len(s.logprobs)
        if piece is not None:
            self.k += 1
        gen_lps, gen_ids = s.logprobs[self.sent : end], s.token_ids[self.sent : end]
        self.sent = end
        want_lps = self.extras.top_n is not None
        if not self.chat:
            lps = _completion_lps(self.tok, self.extras, None, gen_ids, gen_lps, self.offset) if want_lps else None
            self.offset += sum(len(p) for p in lps["tokens"]) if lps else 0
            return Completion(**head, choices=[CompletionChoice(text=piece or "", logprobs=lps, finish_reason=finish)])
        reasoning, content = (None, piece)
        if self.splitter is not None:
            reasoning, content = self.splitter.push(piece) if piece is not None else self.splitter.flush()
        entries: list[dict] = []
        if self.calls is not None:
            content, entries = self.calls.push(content or "")
            if piece is None:  # the end: what the parser still holds
                rest, late = self.calls.push(None)
                content, entries = content + rest, entries + late
            if finish and self.calls.n_calls:
                finish = "tool_calls"
        lps = chat_logprobs(self.tok, gen_lps) if want_lps and gen_lps else None
        if not (reasoning or content or lps or finish or entries):
            return None  # all held back: nothing to send yet
        delta = Delta(content=content or None, reasoning_content=reasoning or None, tool_calls=entries or None)
        return ChatCompletionChunk(**head, choices=[ChatChunkChoice(delta=delta, logprobs=lps, finish_reason=finish)])


def _event(obj: BaseModel) -> bytes:
    return b"data: " + obj.model_dump_json(exclude_none=False).encode() + b"\n\n"


def _finish(stream: TextStream) -> Literal["stop", "length"]:
    return "length" if stream.finish_reason == "length" else "stop"


def _usage(stream: TextStream) -> Usage:
    return Usage(
        prompt_tokens=stream.prompt_tokens,
        completion_tokens=stream.completion_tokens,
        total_tokens=stream.prompt_tokens + stream.completion_tokens,
    )


def _auth(request: Request, cfg: ServerConfig) -> None:
    if cfg.api_key is None:
        return
    got = request.headers.get("authorization", "")
    if not hmac.compare_digest(got.encode(errors="replace"), f"Bearer {cfg.api_key}".encode()):
        raise ApiError(401, "missing or wrong API key", "authentication_error", "invalid_api_key")


async def _read_body(request: Request, limit: int, timeout: float | None = None) -> bytes:
    """The body, at most `limit` bytes. A larger one is read to its end and dropped before the 413 is sent, so the
    client, still sending, never sees its connection closed under it. A body that has not arrived whole within
    `timeout` seconds (a client announcing more than it sends) gets a 408 and its connection is closed."""
    chunks: list[bytes] = []
    size = 0

    async def drain() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)

    try:
        await asyncio.wait_for(drain(), timeout)
        request.scope.setdefault("state", {})["body_bytes"] = size
    except ClientDisconnect:
        raise ApiError(400, "the client left before sending its body", code="client_disconnected") from None
    except asyncio.TimeoutError:
        raise ApiError(
            408,
            f"the request body did not arrive within {timeout:g} s ({size} bytes came)",
            code="request_timeout",
            headers={"Connection": "close"},
        ) from None
    if size > limit:
        raise ApiError(
            413,
            f"request body of {size} bytes exceeds the limit of {limit} (--max-request-bytes)",
            code="request_too_large",
        )
    return b"".join(chunks)


async def _api_error(request: Request, e: Exception) -> Response:
    assert isinstance(e, ApiError)
    return error_response(e.status, e.message, e.type, e.code, e.headers)


async def _http_error(request: Request, e: Exception) -> Response:
    assert isinstance(e, HTTPException)
    if e.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    elif e.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(e.detail)
    return error_response(
        e.status_code, message, code={404: "not_found", 405: "method_not_allowed"}.get(e.status_code), headers=e.headers
    )


async def _internal_error(request: Request, e: Exception) -> Response:
    if isinstance(e, MoeliteError):
        return error_response(500, str(e), "server_error", type(e).__name__)
    print(f"moelite: internal error on {request.method} {request.url.path}: {type(e).__name__}: {e}", file=sys.stderr)
    return error_response(500, f"internal error: {type(e).__name__}", "server_error")


class _Guard:
    """ASGI middleware in front of the app: JSON errors for what the router never sees (an over-long path or
    header block), the request log line, and no traceback for a client that already left."""

    def __init__(self, app: Starlette, cfg: ServerConfig) -> None:
        self.app, self.cfg = app, cfg
        self.state = app.state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [0]

        async def send_logged(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if (scope.get("state") or {}).get("body_bytes", 0) > TRIM_AFTER_BYTES:
                    _trim_heap()  # before the answer: a client that got it sees the memory handed back
            await send(message)

        early = _refuse_early(scope)
        try:
            if early is not None:
                await early(scope, receive, send_logged)
            else:
                await self.app(scope, receive, send_logged)
        except OSError:  # the client left while we answered: nothing to tell it
            pass
        except Exception:  # noqa: BLE001 - already answered 500 and printed by _internal_error
            if status[0] == 0:
                with contextlib.suppress(OSError):
                    await error_response(500, "internal error", "server_error")(scope, receive, send_logged)
        finally:
            if self.cfg.log:
                _log_line(scope, status[0], time.perf_counter() - t0)


TRIM_AFTER_BYTES = 64 << 10  # a request body this large leaves the allocator's free pages to hand back


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):  # musl, macOS: nothing to call
        return None


def _trim_heap() -> None:
    """Hand the heap's free pages back to the OS after a large request (glibc's malloc_trim). The tokenizer's work on
    a large text is freed but stays as fragments in the heaps of the threads that did it: RSS grew by tens of MiB per
    near-limit request without this (docs/RELIABILITY.md, "The server under hostile load")."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _refuse_early(scope: dict) -> Response | None:
    path = scope.get("raw_path") or scope["path"].encode()
    if len(path) + len(scope.get("query_string", b"")) > MAX_PATH_BYTES:
        return error_response(414, f"the request target is longer than {MAX_PATH_BYTES} bytes", code="uri_too_long")
    if sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES:
        return error_response(
            431, f"the request headers exceed {MAX_HEADER_BYTES} bytes", code="request_header_fields_too_large"
        )
    return None


def _log_line(scope: dict, status: int, dt: float) -> None:
    client = scope.get("client") or ("-", 0)
    tokens = (scope.get("state") or {}).get("tokens")
    tok = f" {tokens[0]}+{tokens[1]} tok" if tokens else ""
    path = scope["path"] if len(scope["path"]) <= 200 else scope["path"][:200] + "..."
    print(f"{client[0]} {scope['method']} {path} {status or '-'}{tok} {dt:.3f} s", file=sys.stderr, flush=True)


class _RecordingConnection(h11.Connection):
    """h11's connection, keeping the last protocol error so the reply can use its status (431, 400, ...)."""

    last_error: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as e:
            self.last_error = e
            raise


class JsonErrorH11Protocol(H11Protocol):
    """uvicorn's h11 protocol whose replies to malformed HTTP (bad request line, bad Content-Length, a header
    block over the limit) are JSON errors like every other answer, not text/plain."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _RecordingConnection(h11.SERVER, self.config.h11_max_incomplete_event_size or 16 * 1024)

    def send_400_response(self, msg: str) -> None:
        err = self.conn.last_error
        status = err.error_status_hint if err is not None else 400
        detail = {431: "the request line and headers are too large"}.get(
            status, f"malformed HTTP request: {err or msg}"
        )
        data = json.dumps(error_body(status, detail, code=HTTPStatus(status).phrase.lower().replace(" ", "_"))).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            (b"connection", b"close"),
        ]
        try:
            for event in (
                h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase),
                h11.Data(data=data),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # h11 cannot answer in this state: just close
            pass
        self._linger()

    # A lingering close: closing a socket whose peer is still sending (a header block over the limit) makes the
    # kernel answer with a reset, which can destroy the reply before the client has read it (tools/fuzz_http.py saw a
    # 431 cut short). So the reply is followed by a half-close, what the client still sends is read and dropped, and
    # the connection closes at its EOF or after LINGER_S.
    LINGER_S = 2.0
    _draining = False

    def _linger(self) -> None:
        if self._draining or self.transport.is_closing():
            return
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self._draining = True
        self.transport.write_eof()
        self._linger_timer = asyncio.get_running_loop().call_later(self.LINGER_S, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if not self._draining:
            super().data_received(data)

    def eof_received(self) -> None:
        if self._draining:
            self.transport.close()
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._draining:
            self._linger_timer.cancel()
        super().connection_lost(exc)
