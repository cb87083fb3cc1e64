"""The OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models,
/health and /metrics, on FastAPI + uvicorn (the ``serve`` extra; the core never imports this).

Every request is validated before it reaches the engine, and every failure is answered in
OpenAI's error shape with a 4xx naming the field; an exception nobody foresaw becomes a 500
in the same shape, logged here, never a traceback to the client. Each request's sequences
are aborted in a ``finally`` when its client goes away, which frees their KV blocks at once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shardlm.engine.outputs import RequestOutput
from shardlm.entrypoints.openai.async_engine import AsyncEngine, EngineDead, RequestStream
from shardlm.entrypoints.openai.metrics import ServerMetrics
from shardlm.entrypoints.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from shardlm.entrypoints.openai.responses import (
    Choice,
    chat_logprobs,
    completion_logprobs,
    envelope,
    sse,
    usage,
)
from shardlm.errors import ShardlmError

logger = logging.getLogger(__name__)

# How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_S = 0.25


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_waiting: int = 1024
    created: int = field(default_factory=lambda: int(time.time()))


# -- request parsing --
def _field_of(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "body"


async def parse_body(request: Request, model: type[BaseModel]) -> BaseModel:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = _field_of(first["loc"])
        got = first.get("input")
        shown = json.dumps(got)[:80] if not isinstance(got, dict) else "an object"
        raise APIError(400, f"{where}: {first['msg']} (got {shown})", where) from None


def _value_error(e: ValueError) -> APIError:
    """SamplingParams and the engine start their messages with the field's name."""
    message = str(e)
    param = message.split(" ", 1)[0]
    return APIError(400, message, param if param.isidentifier() else None)


# -- the app --
def build_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    metrics = ServerMetrics(lambda: engine.stats)
    core = engine.engine
    tokenizer = core.tokenizer
    max_model_len = core.max_model_len
    vocab = core.config.vocab_size

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        logger.info("shutting down: aborting what is left and stopping the engine")
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="shardlm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(CountAndAuthorize, metrics=metrics, api_key=config.api_key)

    @app.exception_handler(APIError)
    async def api_error(_request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), e.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, e: Exception) -> JSONResponse:
        logger.exception("unexpected error")
        body = APIError(500, f"internal error ({type(e).__name__}); see the server log").body()
        return JSONResponse(body, status_code=500)

    # -- shared steps of both endpoints --
    def check_model(body: SamplingFields) -> None:
        if body.model is not None and body.model != config.model_name:
            raise APIError(
                404,
                f"the model {body.model!r} does not exist; this server serves "
                f"{config.model_name!r}",
                "model",
                "model_not_found",
            )

    def prompt_ids(prompt: str | list) -> tuple[str, list[int]]:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise APIError(400, "this server has no tokenizer: send token ids", "prompt")
            return prompt, tokenizer.encode(prompt)
        if not prompt:
            raise APIError(400, "prompt must not be empty", "prompt")
        for t in prompt:
            if not 0 <= t < vocab:
                raise APIError(
                    400, f"prompt token id {t} is outside the vocabulary [0, {vocab})", "prompt"
                )
        text = tokenizer.decode(prompt, skip_special_tokens=False) if tokenizer else ""
        return text, list(prompt)

    def completion_budget(requested: int | None, prompt_len: int, prompt_field: str) -> int:
        """max_tokens, checked against the context; None = what the context leaves."""
        room = max_model_len - prompt_len
        if room < 1:
            raise APIError(
                400,
                f"this model's maximum context length is {max_model_len} tokens and the "
                f"prompt has {prompt_len}, which leaves no room for a completion",
                prompt_field,
            )
        if requested is None:
            return room
        if requested >= 1 and prompt_len + requested > max_model_len:
            raise APIError(
                400,
                f"this model's maximum context length is {max_model_len} tokens, but "
                f"{prompt_len + requested} were requested ({prompt_len} in the prompt, "
                f"{requested} for the completion); shorten the prompt or lower max_tokens",
                "max_tokens",
            )
        return requested

    def check_capacity() -> None:
        waiting = engine.stats.num_waiting + engine.pending_adds
        if waiting >= config.max_waiting:
            raise APIError(
                429,
                f"the server is busy: {waiting} requests are waiting (limit {config.max_waiting});"
                " retry shortly",
                headers={"Retry-After": "1"},
            )

    async def start(
        request_id: str, prompts: list[tuple[str, list[int]]], body: SamplingFields, params
    ) -> list[RequestStream]:
        if engine.dead is not None:
            raise APIError(503, f"the engine has failed: {engine.dead}")
        check_capacity()
        streams: list[RequestStream] = []
        try:
            for i, (text, ids) in enumerate(prompts):
                prompt = {"prompt": text, "prompt_token_ids": ids}
                streams.append(await engine.add(f"{request_id}-{i}", prompt, params))
        except ValueError as e:
            for s in streams:
                s.abort()
            raise _value_error(e) from None
        except EngineDead as e:
            raise APIError(503, str(e)) from None
        return streams

    # -- endpoints --
    @app.get("/health")
    async def health() -> Response:
        if engine.dead is not None:
            raise APIError(503, f"the engine has failed: {engine.dead}")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        card = {
            "id": config.model_name,
            "object": "model",
            "created": config.created,
            "owned_by": "shardlm",
            "max_model_len": max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        arrival = time.perf_counter()
        body = await parse_body(request, CompletionRequest)
        check_model(body)
        body.refuse_unsupported()
        prompts = [prompt_ids(p) for p in body.prompts()]
        budgets = {completion_budget(body.max_tokens, len(ids), "prompt") for _, ids in prompts}
        params = _params(body, min(budgets), body.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = await start(rid, prompts, body, params)
        run = Run(body.n, prompts, streams, metrics, arrival, body.logprobs)
        head = envelope("text_completion", rid, config.model_name)

        def choice_json(c: Choice, lp: dict | None, text: str) -> dict:
            return {
                "index": c.index,
                "text": text,
                "logprobs": lp,
                "finish_reason": c.finish_reason,
            }

        if body.stream:

            async def events() -> AsyncIterator[str]:
                try:
                    async for c, delta, offset in run.deltas():
                        if not (delta.text or delta.token_ids or delta.finish_reason):
                            continue
                        text = delta.text
                        if body.echo and offset == 0 and not run.echoed(c):
                            text = prompts[c.index // body.n][0] + text
                        lp = None
                        if body.logprobs is not None:
                            lp = completion_logprobs(delta, body.logprobs, offset)
                        chunk = {**head, "choices": [choice_json(c, lp, text)]}
                        if body.include_usage:
                            chunk["usage"] = None
                        yield sse(chunk)
                    if body.include_usage:
                        yield sse({**head, "choices": [], "usage": run.usage()})
                    yield sse("[DONE]")
                finally:
                    run.abort()

            return StreamingResponse(events(), media_type="text/event-stream")

        await run.collect(request)
        choices = []
        for c in run.choices:
            text = (prompts[c.index // body.n][0] if body.echo else "") + c.text
            lp = c.completion_logprobs if body.logprobs is not None else None
            choices.append(choice_json(c, lp, text))
        return JSONResponse({**head, "choices": choices, "usage": run.usage()})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrival = time.perf_counter()
        body = await parse_body(request, ChatCompletionRequest)
        check_model(body)
        body.refuse_unsupported()
        if tokenizer is None:
            raise APIError(400, "this server has no tokenizer, so it cannot render chats")
        messages = [m.as_template_dict() for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=body.add_generation_prompt
            )
        except ShardlmError as e:
            raise APIError(400, str(e), "messages") from None
        ids = tokenizer.encode(text, add_special_tokens=False)
        budget = completion_budget(body.requested_max_tokens, len(ids), "messages")
        params = _params(body, budget, body.logprobs_k)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await start(rid, [(text, ids)], body, params)
        run = Run(body.n, [(text, ids)], streams, metrics, arrival, body.logprobs_k)

        if body.stream:
            head = envelope("chat.completion.chunk", rid, config.model_name)

            def chunk(index: int, delta: dict, lp, reason) -> str:
                choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}
                payload = {**head, "choices": [choice]}
                if body.include_usage:
                    payload["usage"] = None
                return sse(payload)

            async def events() -> AsyncIterator[str]:
                try:
                    for i in range(body.n):
                        yield chunk(i, {"role": "assistant", "content": ""}, None, None)
                    async for c, delta, _ in run.deltas():
                        lp = None
                        if body.logprobs_k is not None:
                            lp = {"content": chat_logprobs(delta, body.logprobs_k)}
                        if not (delta.text or lp or delta.finish_reason):
                            continue  # text held back (an incomplete UTF-8 character)
                        content = {"content": delta.text} if delta.text or lp else {}
                        yield chunk(c.index, content, lp, delta.finish_reason)
                    if body.include_usage:
                        yield sse({**head, "choices": [], "usage": run.usage()})
                    yield sse("[DONE]")
                finally:
                    run.abort()

            return StreamingResponse(events(), media_type="text/event-stream")

        await run.collect(request)
        head = envelope("chat.completion", rid, config.model_name)
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": ({"content": c.chat_logprobs} if body.logprobs_k is not None else None),
                "finish_reason": c.finish_reason,
            }
            for c in run.choices
        ]
        return JSONResponse({**head, "choices": choices, "usage": run.usage()})

    app.state.metrics = metrics
    return app


def _params(body: SamplingFields, max_tokens: int, logprobs: int | None):
    try:
        return body.sampling_params(max_tokens, logprobs)
    except ValueError as e:
        raise _value_error(e) from None


class Run:
    """The choices of one HTTP request (n per prompt) as their deltas arrive, with latency
    metrics. Choice index = prompt index · n + sequence index, as OpenAI numbers them."""

    def __init__(
        self,
        n: int,
        prompts: list[tuple[str, list[int]]],
        streams: list[RequestStream],
        metrics: ServerMetrics,
        arrival: float,
        logprobs_k: int | None,
    ) -> None:
        self.n = n
        self.streams = streams
        self.metrics = metrics
        self.arrival = arrival
        self.logprobs_k = logprobs_k
        self.prompt_tokens = sum(len(ids) for _, ids in prompts)
        self.choices = [
            Choice(i * n + j, len(prompts[i][1])) for i in range(len(prompts)) for j in range(n)
        ]
        self._last_token_at: dict[int, float] = {}
        self._echoed: set[int] = set()

    def echoed(self, c: Choice) -> bool:
        seen = c.index in self._echoed
        self._echoed.add(c.index)
        return seen

    async def deltas(self) -> AsyncIterator[tuple[Choice, object, int]]:
        """(choice, delta, length of the choice's text before it), as they come."""
        async for i, out in merge(self.streams):
            for delta in out.outputs:
                c = self.choices[i * self.n + delta.index]
                offset = len(c.text)
                self._observe(c, len(delta.token_ids))
                c.add(delta)
                if self.logprobs_k is not None and delta.logprobs:
                    lp = completion_logprobs(delta, self.logprobs_k, offset)
                    for key, values in lp.items():
                        c.completion_logprobs[key].extend(values)
                    c.chat_logprobs.extend(chat_logprobs(delta, self.logprobs_k))
                yield c, delta, offset
        self.metrics.prompt_tokens.inc(self.prompt_tokens)

    def _observe(self, c: Choice, tokens: int) -> None:
        if tokens == 0:
            return
        now = time.perf_counter()
        last = self._last_token_at.get(c.index)
        if last is None:
            self.metrics.ttft.observe(now - self.arrival)
        else:
            for _ in range(tokens):
                self.metrics.itl.observe((now - last) / tokens)
        self._last_token_at[c.index] = now
        self.metrics.generation_tokens.inc(tokens)

    async def collect(self, request: Request) -> None:
        """Run to the end (non-streaming), giving up if the client disconnects."""

        async def consume() -> None:
            async for _ in self.deltas():
                pass

        task = asyncio.create_task(consume())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    task.result()  # re-raises a failure
                    return
                if await request.is_disconnected():
                    task.cancel()
                    raise APIError(499, "client disconnected")
        finally:
            if not task.done():
                task.cancel()
            self.abort()

    def usage(self) -> dict:
        return usage(self.choices, self.prompt_tokens)

    def abort(self) -> None:
        for s in self.streams:
            s.abort()


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Deltas of several requests as they arrive, tagged with the request's index."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                await queue.put((i, out))
            await queue.put(done)
        except BaseException as e:
            await queue.put(e)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


class CountAndAuthorize:
    """Pure ASGI middleware (streaming-safe): checks the API key on /v1 routes and counts
    every response by endpoint and status for /metrics."""

    def __init__(self, app, metrics: ServerMetrics, api_key: str | None) -> None:
        self.app = app
        self.metrics = metrics
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in KNOWN_PATHS else "other"
        if self.expected is not None and path.startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                why = "wrong API key" if given else "missing API key (Authorization: Bearer ...)"
                error = APIError(401, why, code="invalid_api_key")
                response = JSONResponse(error.body(), status_code=401)
                self.metrics.requests.labels(endpoint, "401").inc()
                await response(scope, receive, send)
                return

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


KNOWN_PATHS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}


def run_server(
    model: str,
    engine_args: dict,
    config: ServerConfig,
    host: str,
    port: int,
    shutdown_timeout: float,
) -> int:
    """Load the engine, serve until SIGINT/SIGTERM, then shut down gracefully: uvicorn stops
    accepting, in-flight requests get ``shutdown_timeout`` seconds to finish (then their
    streams are cancelled, which aborts them), and the engine and its workers stop."""
    import uvicorn

    from shardlm.engine.llm_engine import LLMEngine

    engine = AsyncEngine(LLMEngine(model, **engine_args))
    app = build_app(engine, config)
    logger.info("serving %s on http://%s:%d", config.model_name, host, port)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again for whatever
    # handler was installed before it: make that one a no-op, so a requested stop exits 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.run(
            app,
            host=host,
            port=port,
            timeout_graceful_shutdown=shutdown_timeout,
            log_level="warning",
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
