"""The HTTP layer: OpenAI's endpoints over the engine, and nothing the engine could do itself.

    app = build_app(engine, tokenizer, "my-model", api_key="secret")
    uvicorn.run(app, host="127.0.0.1", port=8000)         # what `bitnet serve` does

Endpoints: POST /v1/completions and /v1/chat/completions (`stream: true`: server-sent events in
OpenAI's chunk format, then `data: [DONE]`), GET /v1/models, POST /tokenize and /detokenize and
GET /tokenizer_info (vLLM's), GET /health, GET /metrics (Prometheus text). With an API key, every
/v1 route wants `Authorization: Bearer <key>`.

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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import ContextOverflow, Engine, EngineClosed, Output, QueueFull, SamplingParams, TokenLogprob
from .metrics import Metrics
from .protocol import (
    SEED_RANGE,
    ChatChoice,
    ChatChunkChoice,
    ChatLogprobs,
    ChatTokenLogprob,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    AssistantMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Delta,
    DetokenizeRequest,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TokenizeRequest,
    TopLogprob,
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
@dataclass
class Piece:
    """What one engine output of a choice adds: text (after the detokenizer and the stop strings),
    the finish reason on the last, and the logprobs of the token that came (with where its text
    starts in the choice's completion text)."""

    text: str
    finish: str | None = None
    logprobs: list[tuple[TokenLogprob, int]] = field(default_factory=list)


class Generation:
    """One choice of a request in the engine: its outputs made into Pieces (detokenized, cut at
    stop strings), its timings into the metrics. Outputs arrive on the request's queue (Choices),
    tagged with `index`."""

    def __init__(self, engine: Engine, metrics: Metrics, tokenizer: ServeTokenizer, prompt_ids: list[int],
                 params: SamplingParams, stops: list[str], arrived: float, queue: asyncio.Queue, index: int):
        loop = asyncio.get_running_loop()
        self.engine, self.metrics, self.arrived, self.index = engine, metrics, arrived, index
        self.prompt_ids = prompt_ids
        self.completion_tokens = 0
        self.detok, self.stops = tokenizer.detokenizer(prompt_ids), StopStrings(stops)
        self.chars = 0  # characters of completion text the detokenizer has given
        self.prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
        self.cached_tokens = 0  # of the prompt, read from the prefix cache
        self._last: float | None = None
        self.cancelled = False  # by us (client gone, stop string), not by the server
        self.done = False

        def emit(out: Output) -> None:  # the engine's thread
            loop.call_soon_threadsafe(queue.put_nowait, (index, out))

        self.rid = engine.submit(prompt_ids, params, emit)  # ValueError, QueueFull, EngineClosed
        metrics.prompt_tokens.inc(len(prompt_ids))

    def cancel(self) -> None:
        self.cancelled = True
        self.engine.cancel(self.rid)

    def take(self, out: Output) -> Piece | None:
        """The piece an output makes; None after the end (the engine's "cancelled" that follows a
        stop string) or at an end we asked for. A failure of the model on this choice raises
        RuntimeError, a cancellation by the server Aborted."""
        if self.done:
            return None
        if out.finish_reason == "cancelled":
            self.done = True
            if self.cancelled:
                return None
            raise Aborted("the server cancelled this request (shutting down)")
        if out.error is not None:
            self.done = True
            raise RuntimeError(out.error)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.cached_tokens:
            self.cached_tokens = out.cached_tokens
            self.metrics.cached_tokens.inc(out.cached_tokens)
        text, logprobs = "", []
        if out.token is not None:
            self._observe(out.time)
            if out.logprob is not None:
                logprobs.append((out.logprob, self.chars))
            if out.finish_reason != "stop":  # an EOS / stop token is not text
                text = self.detok.push(out.token)
        if out.finish_reason:
            text += self.detok.end()
        self.chars += len(text)
        text, stopped = self.stops.feed(text)
        finish = out.finish_reason
        if stopped:
            self.cancel()
            finish = "stop"
        elif finish:
            text += self.stops.end()
        if finish:
            self.done = True
            self.metrics.duration.observe(time.perf_counter() - self.arrived)
        return Piece(text, finish, logprobs)

    def _observe(self, t: float) -> None:
        self.completion_tokens += 1
        self.metrics.generation_tokens.inc()
        if self._last is None:
            self.metrics.ttft.observe(t - self.arrived)
        else:
            self.metrics.itl.observe(t - self._last)
        self._last = t


class Choices:
    """The choices of one request (`n` per prompt, prompt by prompt: choice i * n + j), each its
    own engine request, their outputs through one queue."""

    def __init__(self):
        self.queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        self.gens: list[Generation] = []

    def cancel(self) -> None:
        for g in self.gens:
            g.cancel()  # a no-op once it has ended

    async def pieces(self) -> AsyncIterator[tuple[int, Piece]]:
        """(choice index, piece) as outputs come, until every choice has ended."""
        while not all(g.done for g in self.gens):
            index, out = await self.queue.get()
            piece = self.gens[index].take(out)
            if piece is not None:
                yield index, piece

    def usage(self) -> Usage:
        prompts: dict[int, tuple[int, int]] = {}  # a prompt counts once, whatever n (cached: as its first choice found it)
        for g in self.gens:
            prompts.setdefault(id(g.prompt_ids), (len(g.prompt_ids), g.cached_tokens))
        prompt, completion = sum(n for n, _ in prompts.values()), sum(g.completion_tokens for g in self.gens)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(c for _, c in prompts.values())))


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
        if err.get("type") == "json_invalid" or (tuple(err.get("loc", ())) == ("body",) and err.get("type") != "value_error"):
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

    # ----- the tokenizer, as vLLM serves it (lm-evaluation-harness's remote tokenizer reads these)
    @app.get("/tokenizer_info")
    async def tokenizer_info():
        special = dict(tokenizer.special_tokens)
        if "eos_token" not in special and engine.eos_token_ids:  # the model's EOS, where tokenizer_config names none
            special["eos_token"] = tokenizer.tokenizer.id_to_token(engine.eos_token_ids[0])
        return {**{k: special.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
                "chat_template": tokenizer.chat_template, "model_max_length": engine.max_seq_len}

    @app.post("/tokenize")
    async def tokenize_route(req: TokenizeRequest):
        if req.model is not None:
            check_model(req.model)
        if req.messages is not None:
            messages = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in req.messages]
            text = await tokenize(lambda: tokenizer.render_chat(messages, req.add_generation_prompt), param="messages")
            ids = tokenizer.encode(text, add_special_tokens=bool(req.add_special_tokens))
        else:
            add = True if req.add_special_tokens is None else req.add_special_tokens
            ids = await tokenize(tokenizer.encode, req.prompt, add, param="prompt")
        return {"count": len(ids), "max_model_len": engine.max_seq_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize_route(req: DetokenizeRequest):
        if req.model is not None:
            check_model(req.model)
        if any(t < 0 or t >= engine.vocab_size for t in req.tokens):
            raise APIError(400, f"token ids must lie in [0, {engine.vocab_size})", param="tokens", code="invalid_value")
        return {"prompt": tokenizer.decode(req.tokens)}

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model `{name}` does not exist. This server serves `{model_name}` (GET /v1/models).",
                           param="model", code="model_not_found")

    # ----- generation
    def sampling(req, max_tokens: int, choice: int, logprobs: int | None = None,
                 prompt_logprobs: int | None = None) -> SamplingParams:
        temperature = 1.0 if req.temperature is None else req.temperature  # OpenAI's default
        seed = req.seed
        if seed is not None and choice:  # choice j of a seeded request draws with seed + j (wrapped into the range)
            seed = (seed + choice - SEED_RANGE[0]) % (SEED_RANGE[1] - SEED_RANGE[0] + 1) + SEED_RANGE[0]
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=req.top_p, top_k=req.top_k,
                              seed=seed, logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    def start(req, prompts: list[list[int]], max_tokens: int | None, param: str, arrived: float,
              params: Callable[[int, int], SamplingParams]) -> Choices:
        """Every choice of the request submitted (n per prompt), or none: a refusal of any of them
        (full queue, context, shutdown) cancels the ones submitted before it."""
        choices = Choices()
        most = engine.max_batch + engine.scheduler.max_queue
        if len(prompts) * (req.n or 1) > most:  # (a 429 would never clear)
            raise APIError(400, f"this request asks for {len(prompts) * (req.n or 1)} completions ({len(prompts)} prompts "
                           f"x n = {req.n or 1}); the server holds at most {most} at once (--max-batch + --max-queue): "
                           f"send fewer at a time", param="n" if (req.n or 1) > 1 else param, code="invalid_value")
        try:
            for ids in prompts:
                if not ids:
                    raise APIError(400, "The prompt is empty (no tokens)", param=param, code="invalid_value")
                room = engine.max_seq_len - len(ids)
                limit = room if max_tokens is None else max_tokens  # chat without a limit: up to the context
                if limit > room or room < (1 if limit else 0):
                    raise APIError(400, f"This model's maximum context length is {engine.max_seq_len} tokens. However, "
                                   f"you requested {len(ids) + max(limit, 1)} tokens ({len(ids)} in the {param}, "
                                   f"{max(limit, 1)} in the completion). Please reduce the length of the {param} or "
                                   f"the completion.", param=param, code="context_length_exceeded")
                for _ in range(req.n or 1):
                    index = len(choices.gens)
                    choices.gens.append(Generation(engine, metrics, tokenizer, ids, params(limit, index),
                                                   req.stop_list(), arrived, choices.queue, index))
        except QueueFull as e:
            choices.cancel()
            retry = engine.retry_after()
            raise APIError(429, f"The server is at capacity: {e}. Retry after {retry} s.", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(retry)}) from None
        except EngineClosed as e:
            choices.cancel()
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        except ContextOverflow as e:
            choices.cancel()
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
        except ValueError as e:
            choices.cancel()
            raise APIError(400, str(e), param=param, code="invalid_value") from None
        except BaseException:
            choices.cancel()
            raise
        return choices

    async def tokenize(fn, *args, param: str):
        try:
            return await anyio.to_thread.run_sync(fn, *args)
        except (NoChatTemplate, Unsupported) as e:
            raise APIError(400, str(e), param=getattr(e, "param", param),
                           code="chat_template_missing" if isinstance(e, NoChatTemplate) else "unsupported") from None
        except ValueError as e:
            raise APIError(400, str(e), param=param, code="invalid_value") from None

    def prompts_of(prompt) -> list[list[int] | str]:
        """The completion prompts, each text or token ids: a string, a list of token ids, or a list
        of either (several prompts, a choice each)."""
        many = isinstance(prompt, list) and bool(prompt) and all(isinstance(p, (str, list)) for p in prompt)
        out = list(prompt) if many else [prompt]
        for p in out:
            if isinstance(p, list) and not all(isinstance(t, int) for t in p):
                raise APIError(400, "a prompt is a string or a list of token ids", param="prompt", code="invalid_value")
            if isinstance(p, list) and any(t < 0 or t >= engine.vocab_size for t in p):
                raise APIError(400, f"prompt token ids must lie in [0, {engine.vocab_size})", param="prompt",
                               code="invalid_value")
        if not out or not all(isinstance(p, (str, list)) for p in out):
            raise APIError(400, "prompt: a string, a list of token ids, or a list of either", param="prompt",
                           code="invalid_value")
        return out

    def unsupported(req) -> None:
        try:
            req.unsupported()
        except Unsupported as e:
            raise APIError(400, str(e), param=e.param, code="unsupported") from None

    def top_dict(lp: TokenLogprob) -> dict[str, float]:
        return {tokenizer.token_text(t): v for t, v in lp.top}

    def completion_logprobs(entries: list[tuple[TokenLogprob, int]], start: int = 0) -> CompletionLogprobs:
        """The completions API's logprobs of generated tokens, their text offsets counted from `start`."""
        return CompletionLogprobs(tokens=[tokenizer.token_text(lp.token) for lp, _ in entries],
                                  token_logprobs=[lp.logprob for lp, _ in entries],
                                  top_logprobs=[top_dict(lp) for lp, _ in entries],
                                  text_offset=[start + at for _, at in entries])

    def prompt_logprobs(gen: Generation, echo: str) -> CompletionLogprobs:
        """The logprobs of an echoed prompt: its first token's None, its text offsets in `echo` as
        the tokens' text accumulates."""
        ids, scored = gen.prompt_ids, gen.prompt_logprobs or (None,) * len(gen.prompt_ids)
        detok, offsets, chars = tokenizer.detokenizer([]), [], 0
        for t in ids:
            offsets.append(min(chars, len(echo)))
            chars += len(detok.push(t))
        return CompletionLogprobs(tokens=[tokenizer.token_text(t) for t in ids],
                                  token_logprobs=[None if lp is None else lp.logprob for lp in scored],
                                  top_logprobs=[None if lp is None else top_dict(lp) for lp in scored],
                                  text_offset=offsets)

    def joined(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
        return CompletionLogprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                                  top_logprobs=a.top_logprobs + b.top_logprobs, text_offset=a.text_offset + b.text_offset)

    def chat_logprobs(entries: list[tuple[TokenLogprob, int]]) -> ChatLogprobs:
        def one(token: int, logprob: float) -> dict:
            return {"token": tokenizer.token_text(token), "logprob": logprob, "bytes": list(tokenizer.token_bytes(token))}

        return ChatLogprobs(content=[ChatTokenLogprob(**one(lp.token, lp.logprob),
                                                      top_logprobs=[TopLogprob(**one(t, v)) for t, v in lp.top])
                                     for lp, _ in entries])

    def usage_wanted(req) -> bool:
        return bool(req.stream_options and req.stream_options.include_usage)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        arrived = time.perf_counter()
        check_model(req.model)
        unsupported(req)
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens 0 generates nothing: it scores the prompt with echo true (and its tokens' "
                           "logprobs with logprobs)", param="max_tokens", code="invalid_value")
        prompts = prompts_of(req.prompt)
        ids = [await tokenize(tokenizer.encode, p, param="prompt") if isinstance(p, str) else p for p in prompts]
        # echo with logprobs: the prompt's tokens scored too (and alone, with max_tokens 0)
        scored = req.logprobs if req.echo and req.logprobs is not None else 0 if req.max_tokens == 0 else None
        choices = start(req, ids, req.max_tokens, "prompt", arrived,
                        lambda limit, j: sampling(req, limit, j, req.logprobs, scored))
        n = req.n or 1
        echoes = [(p if isinstance(p, str) else tokenizer.decode(p)) if req.echo else "" for p in prompts]
        rid, created_at = request_id("cmpl"), now()

        def echoed(i: int) -> tuple[str, CompletionLogprobs | None]:
            """Choice i's echo (its prompt's text) and, with logprobs, the prompt's."""
            text = echoes[i // n]
            if not req.echo or req.logprobs is None:
                return text, None
            return text, prompt_logprobs(choices.gens[i], text)

        def response(parts: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
            return CompletionResponse(id=rid, created=created_at, model=model_name, choices=parts, usage=usage)

        if req.stream:
            async def events():
                shown = set()
                async for i, piece in choices.pieces():
                    if req.echo and i not in shown:  # its prompt first (its logprobs came with this first output)
                        shown.add(i)
                        text, lps = echoed(i)
                        yield response([CompletionChoice(index=i, text=text, logprobs=lps)])
                    if not (piece.text or piece.finish or piece.logprobs):
                        continue
                    lps = None if req.logprobs is None else completion_logprobs(piece.logprobs, len(echoes[i // n]))
                    yield response([CompletionChoice(index=i, text=piece.text, logprobs=lps,
                                                     finish_reason=piece.finish)])
                if usage_wanted(req):
                    yield response([], choices.usage())

            return stream(choices, events())
        results = await collect(choices, request)
        parts = []
        for i, (text, finish, entries) in enumerate(results):
            echo, lps = echoed(i)
            if req.logprobs is not None:
                mine = completion_logprobs(entries, len(echo))
                lps = joined(lps, mine) if lps is not None else mine
            parts.append(CompletionChoice(index=i, text=echo + text, logprobs=lps, finish_reason=finish))
        return response(parts, choices.usage()).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        arrived = time.perf_counter()
        check_model(req.model)
        unsupported(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs true", param="top_logprobs", code="invalid_value")
        ids = await tokenize(lambda: tokenizer.chat(req.template_messages()), param="messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        choices = start(req, [ids], req.limit(), "messages", arrived, lambda limit, j: sampling(req, limit, j, logprobs))
        rid, created_at = request_id("chatcmpl"), now()

        def chunk(i: int, delta: Delta, finish: str | None = None, lps: ChatLogprobs | None = None,
                  usage: Usage | None = None) -> ChatCompletionChunk:
            parts = [] if usage is not None else [ChatChunkChoice(index=i, delta=delta, logprobs=lps, finish_reason=finish)]
            return ChatCompletionChunk(id=rid, created=created_at, model=model_name, choices=parts, usage=usage)

        if req.stream:
            async def events():
                for i in range(len(choices.gens)):
                    yield chunk(i, Delta(role="assistant", content=""))
                async for i, piece in choices.pieces():
                    if piece.text or piece.finish or piece.logprobs:
                        lps = chat_logprobs(piece.logprobs) if req.logprobs else None
                        yield chunk(i, Delta(content=piece.text or None), piece.finish, lps)
                if usage_wanted(req):
                    yield chunk(0, Delta(), usage=choices.usage())

            return stream(choices, events())
        results = await collect(choices, request)
        return ChatCompletionResponse(
            id=rid, created=created_at, model=model_name, usage=choices.usage(),
            choices=[ChatChoice(index=i, message=AssistantMessage(content=text), finish_reason=finish,
                                logprobs=chat_logprobs(entries) if req.logprobs else None)
                     for i, (text, finish, entries) in enumerate(results)]).model_dump()

    async def collect(choices: Choices, request: Request) -> list[tuple[str, str | None, list]]:
        """Each choice's whole text, finish reason and logprob entries, for a non-streamed request;
        cancels it if its client goes away (its connection checked every DISCONNECT_POLL_S, whether
        or not pieces keep arriving)."""
        texts = [[] for _ in choices.gens]
        finishes: list[str | None] = [None] * len(choices.gens)
        entries = [[] for _ in choices.gens]
        pieces = choices.pieces()
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
                            choices.cancel()
                            raise APIError(499, "client closed the request")
                    if nxt.done():
                        break
                try:
                    i, piece = nxt.result()
                except StopAsyncIteration:
                    break
                texts[i].append(piece.text)
                entries[i] += piece.logprobs
                finishes[i] = piece.finish or finishes[i]
        except RuntimeError as e:
            raise APIError(500, f"the model failed on this request: {e}", type="server_error",
                           code="model_error") from None
        except Aborted as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        finally:
            choices.cancel()  # a no-op once they have ended
        return [("".join(t), f, e) for t, f, e in zip(texts, finishes, entries)]

    def stream(choices: Choices, chunks: AsyncIterator[BaseModel]) -> EventSourceResponse:
        async def events():
            try:
                async for c in chunks:
                    yield {"data": c.model_dump_json()}
            except RuntimeError as e:
                yield {"data": json.dumps(error_json(500, f"the model failed on this request: {e}", "server_error",
                                                     code="model_error"))}
            except Aborted as e:
                yield {"data": json.dumps(error_json(503, str(e), "server_error", code="shutting_down"))}
            finally:
                choices.cancel()  # the client went away (sse-starlette cancelled us) or it ended: the slots are free
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
