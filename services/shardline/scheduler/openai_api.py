"""The OpenAI-compatible HTTP API (FastAPI), served by the scheduler process beside gRPC.

`/v1/completions` and `/v1/chat/completions` turn their bodies into GenerateRequests
(openai_schemas) and run them through the same `Generation` as gRPC's Generate: the same
checks, the same engine, no extra hop. Choices (n, or several prompts) run as concurrent
sequences; streams are server-sent events ending in `data: [DONE]`. Errors are OpenAI error
objects: 400 bad input, 404 unknown model or path, 429 no room, 503 not serving. A request's
id is its valid `x-request-id` header, else the response's `id`; its choices carry it (logs,
spans) and the response returns it in `x-request-id`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from shardline.common import telemetry
from shardline.common.auth import ApiKeys, bearer
from shardline.common.server import InvalidArgument, ResourceExhausted, Unavailable
from shardline.scheduler.generation import (TENANT_KEY, Generation, RequestStream,
                                            valid_request_id)
from shardline.scheduler.openai_schemas import (ChatCompletionRequest, CompletionRequest,
                                                UnsupportedField)
from shardline.v1 import generate_pb2

log = logging.getLogger(__name__)

_ERRORS = [  # exception -> (HTTP status, OpenAI error type)
    (InvalidArgument, 400, "invalid_request_error"),
    (ResourceExhausted, 429, "rate_limit_error"),
    (Unavailable, 503, "service_unavailable"),
]


def error_body(message: str, status: int, type_: str, param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code or status}}


def error_response(exc: BaseException) -> JSONResponse:
    for cls, status, type_ in _ERRORS:
        if isinstance(exc, cls):
            param = exc.param if isinstance(exc, UnsupportedField) else None
            log.warning("HTTP request refused: %d %s", status, exc)
            return JSONResponse(error_body(str(exc), status, type_, param), status)
    log.error("HTTP request failed: %r", exc, exc_info=exc)
    return JSONResponse(error_body("internal error", 500, "internal_error"), 500)


def build_app(generation: Generation, serving: Callable[[], bool],
              api_keys: Optional[ApiKeys] = None, max_body_bytes: Optional[int] = None) -> FastAPI:
    """The API's routes over generation; serving() says whether to take new requests. The
    model's name is the one GetModelInfo reports. With api_keys, every route but /health
    wants `Authorization: Bearer KEY`. A body over max_body_bytes is refused (413) unread."""
    app = FastAPI(title="Shardline", docs_url=None, redoc_url=None, openapi_url=None)
    if max_body_bytes is not None:
        app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if api_keys is not None:
        app.add_middleware(ApiKeyMiddleware, api_keys=api_keys)
    tokens = TokenTexts(generation)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request body"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = f"{'.'.join(loc)}: {first['msg']}" if loc else first["msg"]
        log.warning("HTTP request refused: 400 %s", msg)
        return JSONResponse(error_body(msg, 400, "invalid_request_error", ".".join(loc) or None), 400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        detail = str(exc.detail)
        if exc.status_code < 500:
            log.warning("HTTP request refused: %d %s", exc.status_code, detail)
        return JSONResponse(error_body(detail, exc.status_code, "invalid_request_error"),
                            exc.status_code)

    for cls, _, _ in _ERRORS:
        app.add_exception_handler(cls, lambda request, exc: error_response(exc))

    def model_name() -> str:
        return generation.model_info.model if generation.model_info else ""

    def ready() -> bool:
        return serving() and generation.model_info is not None

    def check(model: Optional[str]) -> None:
        if not ready():
            raise Unavailable("the server is not serving (starting or draining)")
        if model is not None and model != model_name():
            raise ModelNotFound(model)

    # A handler of its own (Starlette's handler for Exception logs a traceback after it answers).
    @app.exception_handler(ModelNotFound)
    async def unknown_model(request: Request, exc: ModelNotFound):
        return JSONResponse(error_body(f"the model {exc.args[0]!r} does not exist; this "
                                       f"server serves {model_name()!r}", 404,
                                       "invalid_request_error", "model", "model_not_found"), 404)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        return error_response(exc)

    @app.get("/health")
    async def health():
        if not ready():
            return JSONResponse(error_body("not serving", 503, "service_unavailable"), 503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        info = generation.model_info
        return {"object": "list", "data": [{
            "id": model_name(), "object": "model", "created": 0, "owned_by": "shardline",
            "max_model_len": info.max_context if info else None}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check(body.model)
        out = _Output("cmpl", "text_completion", model_name(), tokens, chat=False,
                      top_logprobs=body.logprobs)
        rid = request_id_of(request, out.id)
        streams = await open_all(generation, to_requests(body), tenant(request, body.user), rid)
        return await respond(out, streams, body.stream, include_usage(body), body.n, rid,
                             request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check(body.model)
        out = _Output("chatcmpl", "chat.completion", model_name(), tokens, chat=True,
                      top_logprobs=body.top_logprobs if body.logprobs else None)
        rid = request_id_of(request, out.id)
        streams = await open_all(generation, to_requests(body), tenant(request, body.user), rid)
        return await respond(out, streams, body.stream, include_usage(body), body.n, rid,
                             request)

    return app


class ModelNotFound(LookupError):
    """A request named a model this server does not serve (404)."""


def tenant(request: Request, user: Optional[str]) -> str:
    """The tenant the API key is bound to, else the tenant header, else the body's `user`,
    else the shared default tenant."""
    return (request.scope.get(API_TENANT) or request.headers.get(TENANT_KEY) or user or "")


REQUEST_ID_HEADER = "x-request-id"


def request_id_of(request: Request, default: str) -> str:
    """The request's x-request-id header when it is a valid request id, else default."""
    rid = request.headers.get(REQUEST_ID_HEADER, "")
    return rid if valid_request_id(rid) else default


API_TENANT = "shardline.api_tenant"      # ASGI scope key: the tenant of the request's API key


class BodyLimitMiddleware:
    """Plain ASGI middleware: a body over max_bytes gets 413 and an OpenAI error object, unread
    when its Content-Length says so, else once the bytes read pass the limit."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"the request body is larger than {self.max_bytes} bytes"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:              # the server reads no more than it says
            if length.isdigit() and int(length) > self.max_bytes:
                log.warning("HTTP request refused: 413 %s", self._message())
                body = error_body(self._message(), 413, "invalid_request_error")
                return await JSONResponse(body, 413)(scope, receive, send)
            return await self.app(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:   # to the app's handler of HTTPException
                raise HTTPException(413, self._message())
            return message
        return await self.app(scope, counted, send)


def to_requests(body) -> list[generate_pb2.GenerateRequest]:
    """The body's GenerateRequests; text that protobuf cannot hold (a lone surrogate, which a
    JSON escape such as \\ud800 can make) is a 400, not a crash."""
    try:
        return body.requests()
    except UnicodeEncodeError as exc:
        raise InvalidArgument(f"the request holds {exc.object[exc.start:exc.end]!r}, which is "
                              "not valid Unicode text (a lone surrogate)") from None


class ApiKeyMiddleware:
    """Plain ASGI middleware (no per-chunk overhead on streams): a request without a listed
    key gets 401 and an OpenAI error object before its body is read."""

    def __init__(self, app, api_keys: ApiKeys):
        self.app = app
        self.api_keys = api_keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        token = bearer([("authorization", header)]) if header else None
        if not self.api_keys.check(token):
            telemetry.rejected("unauthenticated")
            log.warning("refused %s %s: %s API key", scope["method"], scope["path"],
                        "missing" if token is None else "invalid")
            body = error_body("missing or invalid API key (Authorization: Bearer ...)", 401,
                              "invalid_request_error", code="invalid_api_key")
            return await JSONResponse(body, 401)(scope, receive, send)
        scope[API_TENANT] = self.api_keys.tenant(token)
        return await self.app(scope, receive, send)


def include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def open_all(generation: Generation, requests: list[generate_pb2.GenerateRequest],
                   tenant_: str, request_id: str = "") -> list[RequestStream]:
    """Open every choice (each with request_id), or none: a refusal closes the ones already
    queued. Choices after the first of a prompt reuse its token ids (tokenized once)."""
    streams: list[RequestStream] = []
    first_of: dict[bytes, list[int]] = {}
    try:
        for req in requests:
            req.request_id = request_id
            key = _prompt_key(req)
            if key in first_of:
                req.token_ids.ids[:] = first_of[key]
            s = await generation.open(req, tenant_)
            first_of.setdefault(key, s.seq.prompt_token_ids)
            streams.append(s)
    except BaseException:
        for s in streams:
            s.close()
        raise
    return streams


def _prompt_key(req: generate_pb2.GenerateRequest) -> bytes:
    kind = req.WhichOneof("prompt")
    if kind == "text":
        return b"text:" + req.text.encode()
    return kind.encode() + b":" + getattr(req, kind).SerializeToString(deterministic=True)


async def respond(out: "_Output", streams: list[RequestStream], stream: bool, usage: bool,
                  n: int, request_id: str, request: Optional[Request] = None):
    headers = {REQUEST_ID_HEADER: request_id}
    if stream:          # Starlette ends the stream (and so the sequences) on a disconnect
        return StreamingResponse(_sse(out, streams, usage, n), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", **headers})
    collect = asyncio.ensure_future(out.collect(streams, n))
    gone = asyncio.ensure_future(_disconnected(request)) if request is not None else None
    try:
        await asyncio.wait([t for t in (collect, gone) if t is not None],
                           return_when=asyncio.FIRST_COMPLETED)
        if not collect.done():            # the client went away: stop generating for it
            collect.cancel()
            return Response(status_code=499)
        return JSONResponse(collect.result(), headers=headers)
    finally:
        for task in (collect, gone):
            if task is not None and not task.done():
                task.cancel()
        for s in streams:
            s.close()


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone away (the body is read: what comes next is the
    disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(out: "_Output", streams: list[RequestStream], usage: bool,
               n: int) -> AsyncIterator[str]:
    try:
        if out.chat:
            for i in range(len(streams)):
                yield _event(out.chunk(i, {"role": "assistant", "content": ""}, None, None,
                                       usage))
        async for i, resp in merged(streams):
            yield _event(await out.delta(i, resp, usage))
        if usage:
            yield _event(out.usage_chunk(streams, n))
    except (InvalidArgument, ResourceExhausted, Unavailable) as exc:
        yield _event(json.loads(error_response(exc).body))
    finally:
        for s in streams:
            s.close()
    yield "data: [DONE]\n\n"


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, generate_pb2.GenerateResponse]]:
    """(choice index, chunk) from every stream as they come; the first error is raised."""
    if len(streams) == 1:
        async for resp in streams[0]:
            yield 0, resp
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for resp in s:
                queue.put_nowait((i, resp, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, None, exc))
        queue.put_nowait((i, None, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            i, resp, exc = await queue.get()
            if exc is not None:
                raise exc
            if resp is None:
                live -= 1
                continue
            yield i, resp
    finally:
        for t in tasks:
            t.cancel()


class TokenTexts:
    """Token id -> its text, for logprobs (asked of the tokenizer once per id)."""

    def __init__(self, generation: Generation):
        self.generation = generation
        self.cache: dict[int, str] = {}

    async def texts(self, ids: list[int]) -> list[str]:
        missing = sorted({i for i in ids if i not in self.cache})
        if missing:
            texts = await self.generation.tokenizer.token_texts(missing)
            if len(self.cache) > 200_000:
                self.cache.clear()
            self.cache.update(zip(missing, texts))
        return [self.cache[i] for i in ids]


class _Output:
    """Builds one endpoint's response objects (completion or chat) from GenerateResponses."""

    def __init__(self, id_prefix: str, obj: str, model: str, tokens: TokenTexts, chat: bool,
                 top_logprobs: Optional[int]):
        self.id = f"{id_prefix}-{uuid.uuid4().hex}"
        self.object = obj
        self.model = model
        self.created = int(time.time())
        self.tokens = tokens
        self.chat = chat
        self.top_logprobs = top_logprobs       # None: no logprobs asked for
        self.offsets: dict[int, int] = {}      # completions' text_offset, per choice

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, i: int, delta, logprobs, finish: Optional[str], usage: bool) -> dict:
        out = self._head(self.object + ".chunk" if self.chat else self.object)
        choice = {"index": i, "logprobs": logprobs, "finish_reason": finish}
        if self.chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta
        out["choices"] = [choice]
        if usage:
            out["usage"] = None
        return out

    async def delta(self, i: int, resp: generate_pb2.GenerateResponse, usage: bool) -> dict:
        logprobs = await self.logprobs(i, resp)
        delta = resp.text
        if self.chat:       # the last chunk of a chat choice carries an empty delta
            delta = {"content": resp.text} if resp.text or not resp.finish_reason else {}
        return self.chunk(i, delta, logprobs, resp.finish_reason or None, usage)

    async def logprobs(self, i: int, resp: generate_pb2.GenerateResponse) -> Optional[dict]:
        if self.top_logprobs is None or not resp.logprobs:
            return None
        lps = resp.logprobs
        ids = [lp.token_id for lp in lps] + [t for lp in lps for t in lp.top_token_ids]
        texts = dict(zip(ids, await self.tokens.texts(ids)))
        if self.chat:
            return {"content": [{
                "token": texts[lp.token_id], "logprob": lp.logprob,
                "bytes": list(texts[lp.token_id].encode()),
                "top_logprobs": [{"token": texts[t], "logprob": v, "bytes": list(texts[t].encode())}
                                 for t, v in zip(lp.top_token_ids, lp.top_logprobs)]}
                for lp in lps]}
        offsets = []
        for lp in lps:
            offsets.append(self.offsets.get(i, 0))
            self.offsets[i] = offsets[-1] + len(texts[lp.token_id])
        return {"tokens": [texts[lp.token_id] for lp in lps],
                "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{texts[t]: v for t, v in zip(lp.top_token_ids, lp.top_logprobs)}
                                 for lp in lps] if self.top_logprobs else None,
                "text_offset": offsets}

    def usage_of(self, streams: list[RequestStream], n: int = 1) -> dict:
        prompt = sum(s.prompt_tokens for s in streams[::n])       # each prompt counted once
        completion = sum(len(s.seq.output_token_ids) for s in streams)
        cached = sum(s.seq.num_cached_tokens for s in streams[::n])
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def usage_chunk(self, streams: list[RequestStream], n: int) -> dict:
        out = self._head(self.object + ".chunk" if self.chat else self.object)
        out["choices"] = []
        out["usage"] = self.usage_of(streams, n)
        return out

    async def collect(self, streams: list[RequestStream], n: int) -> dict:
        texts = [[] for _ in streams]
        finish: list[Optional[str]] = [None] * len(streams)
        logprobs: list[list] = [[] for _ in streams]
        async for i, resp in merged(streams):
            texts[i].append(resp.text)
            finish[i] = resp.finish_reason or finish[i]
            lp = await self.logprobs(i, resp)
            if lp is not None:
                logprobs[i].append(lp)
        out = self._head(self.object)
        out["choices"] = [self._choice(i, "".join(texts[i]), finish[i], logprobs[i])
                          for i in range(len(streams))]
        out["usage"] = self.usage_of(streams, n)
        return out

    def _choice(self, i: int, text: str, finish: Optional[str], parts: list[dict]) -> dict:
        logprobs = None
        if self.top_logprobs is not None:
            if self.chat:
                logprobs = {"content": [c for p in parts for c in p["content"]]}
            else:
                logprobs = {k: [v for p in parts for v in (p[k] or [])] for k in
                            ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
                if not self.top_logprobs:
                    logprobs["top_logprobs"] = None
        if self.chat:
            return {"index": i, "message": {"role": "assistant", "content": text},
                    "logprobs": logprobs, "finish_reason": finish}
        return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}
