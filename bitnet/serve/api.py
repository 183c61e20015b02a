"""The HTTP layer: OpenAI's endpoints over the engine, and nothing the engine could do itself.

    app = build_app(engine, tokenizer, "my-model", api_key="secret")
    uvicorn.run(app, host="127.0.0.1", port=8000)         # what `bitnet serve` does

Endpoints: POST /v1/completions and /v1/chat/completions (`stream: true`: server-sent events in
OpenAI's chunk format, then `data: [DONE]`), GET /v1/models, GET /health, GET /metrics
(Prometheus text). With an API key, every /v1 route wants `Authorization: Bearer <key>`.

Every error is OpenAI's body {"error": {"message", "type", "param", "code"}} with its status:
400 malformed JSON, bad or unsupported parameters, a prompt beyond the context; 401 a wrong or
missing key; 404 an unknown model or route; 413 a body over MAX_BODY_BYTES; 429 a full queue
(with Retry-After); 500 a request the model failed on (the server keeps serving); 503 shutting
down.

A request's life: validated (bitnet.serve.protocol), tokenized (in a worker thread: a long prompt
does not block the event loop), submitted to the engine (a full queue or context refuses it here,
before any byte of a stream is sent), then its tokens come back through an asyncio queue fed
from the engine's thread, are detokenized and cut at stop strings (bitnet.serve.text). A client
that disconnects cancels its request: sse-starlette watches the connection while streaming, and a
non-streamed request polls it, so the slot is freed within a step either way. On shutdown
(SIGTERM) uvicorn stops accepting connections and waits for the ones open; the streams run to
their end (sse-starlette's shutdown grace period is the drain timeout), then the engine stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import ContextOverflow, Engine, EngineClosed, Output, QueueFull, SamplingParams
from .metrics import Metrics
from .protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    AssistantMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Delta,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
    Unsupported,
    Usage,
    now,
    request_id,
)
from .text import NoChatTemplate, ServeTokenizer, StopStrings

log = logging.getLogger("bitnet.serve")

MAX_BODY_BYTES = 16 * 2**20
ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat_completions"}
DISCONNECT_POLL_S = 0.25  # a non-streamed request checks its connection this often


def SSE_DRAIN(seconds: float) -> dict:
    """sse-starlette >= 3.3 ends streams when uvicorn starts shutting down unless given a grace period
    (older ones only on their own exit flag, which `bitnet serve` never sets): the drain timeout."""
    return {"shutdown_grace_period": seconds} if _SSE_GRACE else {}


_SSE_GRACE = "shutdown_grace_period" in inspect.signature(EventSourceResponse.__init__).parameters


class Aborted(Exception):
    """The engine dropped a request that its client had not given up (the server is stopping)."""


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, ErrorBody(message=message, type=type, param=param, code=code), headers

    def response(self) -> JSONResponse:
        return JSONResponse(ErrorResponse(error=self.body).model_dump(), status_code=self.status, headers=self.headers)


def error_json(status: int, message: str, type: str = "invalid_request_error", param=None, code=None) -> dict:
    return ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code)).model_dump()


# ----------------------------------------------------------------------------- a request in flight
class Generation:
    """One request in the engine: its outputs as an async iterator, its text through the
    detokenizer and the stop strings, its timings into the metrics."""

    def __init__(self, engine: Engine, metrics: Metrics, tokenizer: ServeTokenizer, prompt_ids: list[int],
                 params: SamplingParams, stops: list[str], arrived: float):
        loop = asyncio.get_running_loop()
        self.engine, self.metrics, self.arrived = engine, metrics, arrived
        self.queue: asyncio.Queue[Output] = asyncio.Queue()
        self.prompt_tokens, self.completion_tokens = len(prompt_ids), 0
        self.detok, self.stops = tokenizer.detokenizer(prompt_ids), StopStrings(stops)
        self._last: float | None = None
        self.cancelled = False  # by us (client gone, stop string), not by the server

        def emit(out: Output) -> None:  # the engine's thread
            loop.call_soon_threadsafe(self.queue.put_nowait, out)

        self.rid = engine.submit(prompt_ids, params, emit)  # ValueError, QueueFull, EngineClosed
        metrics.prompt_tokens.inc(len(prompt_ids))

    def cancel(self) -> None:
        self.cancelled = True
        self.engine.cancel(self.rid)

    async def pieces(self) -> AsyncIterator[tuple[str, str | None]]:
        """(text, finish_reason) as tokens come; the last piece has a finish_reason. A failure of
        the model on this request raises RuntimeError."""
        while True:
            out = await self.queue.get()
            if out.finish_reason == "cancelled":
                if self.cancelled:
                    return
                raise Aborted("the server cancelled this request (shutting down)")
            if out.error is not None:
                raise RuntimeError(out.error)
            text = ""
            if out.token is not None:
                self._observe(out.time)
                if out.finish_reason != "stop":  # an EOS / stop token is not text
                    text = self.detok.push(out.token)
            if out.finish_reason:
                text += self.detok.end()
            text, stopped = self.stops.feed(text)
            finish = out.finish_reason
            if stopped:
                self.cancel()
                finish = "stop"
            elif finish:
                text += self.stops.end()
            if finish:
                self.metrics.duration.observe(time.perf_counter() - self.arrived)
            yield text, finish
            if finish:
                return

    def _observe(self, t: float) -> None:
        self.completion_tokens += 1
        self.metrics.generation_tokens.inc()
        if self._last is None:
            self.metrics.ttft.observe(t - self.arrived)
        else:
            self.metrics.itl.observe(t - self._last)
        self._last = t

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=self.prompt_tokens + self.completion_tokens)


# ----------------------------------------------------------------------------- the app
def build_app(engine: Engine, tokenizer: ServeTokenizer, model_name: str, *, api_key: str | None = None,
              drain_timeout: float = 30.0, manage_engine: bool = True) -> FastAPI:
    """The ASGI app. manage_engine: the app's startup starts the engine's loop in a thread and its
    shutdown stops it (in-process servers); `bitnet serve` runs the loop in its main thread instead."""
    metrics = Metrics(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if manage_engine:
            engine.start()
        yield
        if manage_engine:  # uvicorn has waited for the open connections (drained); what is left is cancelled
            await anyio.to_thread.run_sync(lambda: engine.stop(drain=False, timeout=drain_timeout))

    app = FastAPI(title="bitnet serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics = engine, metrics
    created = now()

    # ----- errors: OpenAI's body everywhere
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        if err.get("type") == "json_invalid" or tuple(err.get("loc", ())) == ("body",):
            return APIError(400, "We could not parse the JSON body of your request. (HINT: This likely means you "
                            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)").response()
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if err.get("type") == "extra_forbidden":
            return APIError(400, f"Unrecognized request argument supplied: {param}", param=param).response()
        what = f"{param}: " if param else ""
        return APIError(400, f"Invalid request: {what}{err.get('msg', 'invalid value')}", param=param,
                        code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            return APIError(404, f"Unknown route {request.method} {request.url.path}", code="unknown_url").response()
        return APIError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").response()

    # ----- the plain routes
    @app.get("/health")
    async def health():
        if not engine.running:
            raise APIError(503, "the engine is not running", type="server_error", code="engine_down")
        return {"status": "ok", "running": engine.num_running, "waiting": engine.num_waiting}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    card = ModelCard(id=model_name, created=created, max_model_len=engine.max_seq_len)

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[card]).model_dump()

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        check_model(model)
        return card.model_dump()

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model `{name}` does not exist. This server serves `{model_name}` (GET /v1/models).",
                           param="model", code="model_not_found")

    # ----- generation
    def sampling(req, max_tokens: int) -> SamplingParams:
        temperature = 1.0 if req.temperature is None else req.temperature  # OpenAI's default
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=req.top_p, top_k=req.top_k,
                              seed=req.seed)

    async def start(req, prompt_ids: list[int], max_tokens: int | None, param: str, arrived: float) -> Generation:
        if not prompt_ids:
            raise APIError(400, "The prompt is empty (no tokens)", param=param, code="invalid_value")
        room = engine.max_seq_len - len(prompt_ids)
        if max_tokens is None:  # chat without a limit: up to the context
            max_tokens = room
        if room < 1 or max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {engine.max_seq_len} tokens. However, you "
                           f"requested {len(prompt_ids) + max(max_tokens, 1)} tokens ({len(prompt_ids)} in the "
                           f"{param}, {max(max_tokens, 1)} in the completion). Please reduce the length of the "
                           f"{param} or the completion.", param=param, code="context_length_exceeded")
        try:
            return Generation(engine, metrics, tokenizer, prompt_ids, sampling(req, max_tokens), req.stop_list(),
                              arrived)
        except QueueFull as e:
            retry = engine.retry_after()
            raise APIError(429, f"The server is at capacity: {e}. Retry after {retry} s.", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(retry)}) from None
        except EngineClosed as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        except ContextOverflow as e:
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e), param=param, code="invalid_value") from None

    async def tokenize(fn, *args, param: str):
        try:
            return await anyio.to_thread.run_sync(fn, *args)
        except (NoChatTemplate, Unsupported) as e:
            raise APIError(400, str(e), param=getattr(e, "param", param),
                           code="chat_template_missing" if isinstance(e, NoChatTemplate) else "unsupported") from None
        except ValueError as e:
            raise APIError(400, str(e), param=param, code="invalid_value") from None

    def prompt_ids_of(prompt) -> list[int] | str:
        """The completion prompt as text or token ids; one prompt per request."""
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            if any(t < 0 or t >= engine.vocab_size for t in prompt):
                raise APIError(400, f"prompt token ids must lie in [0, {engine.vocab_size})", param="prompt",
                               code="invalid_value")
            return prompt
        raise APIError(400, "one prompt per request (a string or a list of token ids)", param="prompt",
                       code="unsupported")

    def unsupported(req) -> None:
        try:
            req.unsupported()
        except Unsupported as e:
            raise APIError(400, str(e), param=e.param, code="unsupported") from None

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        arrived = time.perf_counter()
        check_model(req.model)
        unsupported(req)
        prompt = prompt_ids_of(req.prompt)
        ids = await tokenize(tokenizer.encode, prompt, param="prompt") if isinstance(prompt, str) else prompt
        gen = await start(req, ids, req.max_tokens, "prompt", arrived)
        rid, created_at = request_id("cmpl"), now()

        def chunk(text: str, finish: str | None) -> str:
            return CompletionResponse(id=rid, created=created_at, model=model_name,
                                      choices=[CompletionChoice(text=text, finish_reason=finish)]).model_dump_json()

        def usage_chunk() -> str:
            return CompletionResponse(id=rid, created=created_at, model=model_name, choices=[],
                                      usage=gen.usage()).model_dump_json()

        if req.stream:
            return stream(gen, chunk, None, usage_chunk if req.stream_options and req.stream_options.include_usage else None)
        text, finish = await collect(gen, request)
        return CompletionResponse(id=rid, created=created_at, model=model_name, usage=gen.usage(),
                                  choices=[CompletionChoice(text=text, finish_reason=finish)]).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        arrived = time.perf_counter()
        check_model(req.model)
        unsupported(req)
        ids = await tokenize(lambda: tokenizer.chat(req.template_messages()), param="messages")
        gen = await start(req, ids, req.limit(), "messages", arrived)
        rid, created_at = request_id("chatcmpl"), now()

        def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
            delta = Delta(role="assistant", content="") if role else Delta(content=text if text else None)
            return ChatCompletionChunk(id=rid, created=created_at, model=model_name,
                                       choices=[ChatChunkChoice(delta=delta, finish_reason=finish)]).model_dump_json()

        def usage_chunk() -> str:
            return ChatCompletionChunk(id=rid, created=created_at, model=model_name, choices=[],
                                       usage=gen.usage()).model_dump_json()

        if req.stream:
            return stream(gen, chunk, chunk(None, None, role=True),
                          usage_chunk if req.stream_options and req.stream_options.include_usage else None)
        text, finish = await collect(gen, request)
        return ChatCompletionResponse(id=rid, created=created_at, model=model_name, usage=gen.usage(),
                                      choices=[ChatChoice(message=AssistantMessage(content=text),
                                                          finish_reason=finish)]).model_dump()

    async def collect(gen: Generation, request: Request) -> tuple[str, str | None]:
        """The whole text of a non-streamed request; cancels it if its client goes away (its
        connection checked every DISCONNECT_POLL_S, whether or not pieces keep arriving)."""
        parts, finish = [], None
        pieces = gen.pieces()
        clock = asyncio.get_running_loop().time
        checked = clock()
        try:
            while True:
                nxt = asyncio.ensure_future(pieces.__anext__())
                while True:
                    left = checked + DISCONNECT_POLL_S - clock()
                    if left > 0 and not nxt.done():
                        await asyncio.wait([nxt], timeout=left)
                    if clock() >= checked + DISCONNECT_POLL_S:
                        checked = clock()
                        if await request.is_disconnected():
                            nxt.cancel()
                            gen.cancel()
                            raise APIError(499, "client closed the request")
                    if nxt.done():
                        break
                try:
                    text, finish = nxt.result()
                except StopAsyncIteration:
                    break
                parts.append(text)
        except RuntimeError as e:
            raise APIError(500, f"the model failed on this request: {e}", type="server_error",
                           code="model_error") from None
        except Aborted as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        finally:
            gen.cancel()  # a no-op once it has ended
        return "".join(parts), finish

    def stream(gen: Generation, chunk, first: str | None, usage_chunk) -> EventSourceResponse:
        async def events():
            try:
                if first is not None:
                    yield {"data": first}
                async for text, finish in gen.pieces():
                    if text or finish:
                        yield {"data": chunk(text, finish)}
                if usage_chunk is not None:
                    yield {"data": usage_chunk()}
            except RuntimeError as e:
                yield {"data": json.dumps(error_json(500, f"the model failed on this request: {e}", "server_error",
                                                     code="model_error"))}
            except Aborted as e:
                yield {"data": json.dumps(error_json(503, str(e), "server_error", code="shutting_down"))}
            finally:
                gen.cancel()  # the client went away (sse-starlette cancelled us) or it ended: the slot is free
            yield {"data": "[DONE]"}

        return EventSourceResponse(events(), **SSE_DRAIN(drain_timeout))

    return CountAndGuard(app, metrics, api_key)


class CountAndGuard:
    """Plain ASGI middleware (not BaseHTTPMiddleware, which would get between a stream and its
    disconnect): the API key on /v1 routes, the body size limit, and requests_total by status."""

    def __init__(self, app: FastAPI, metrics: Metrics, api_key: str | None):
        self.app, self.metrics, self.api_key = app, metrics, api_key
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = ENDPOINTS.get(path)
        status_seen = False

        async def counted_send(message):
            nonlocal status_seen
            if message["type"] == "http.response.start" and endpoint and not status_seen:
                status_seen = True
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = None
        if self.api_key is not None and path.startswith("/v1"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                message = ("You didn't provide an API key (Authorization: Bearer <key>)." if not token else
                           "Incorrect API key provided.")
                refusal = APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length", "0")
        if refusal is None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            refusal = APIError(413, f"request body of {int(length)} bytes is over the limit of {MAX_BODY_BYTES}",
                               code="request_too_large")
        if refusal is not None:
            return await refusal.response()(scope, receive, counted_send)
        await self.app(scope, receive, counted_send)
