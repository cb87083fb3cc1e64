"""The OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models,
/health and /metrics, on FastAPI + uvicorn (the ``serve`` extra; the core never imports this).

Every request is validated before it reaches the engine, and every failure is answered in
OpenAI's error shape with a 4xx naming the field; an exception nobody foresaw becomes a 500
in the same shape, logged here, never a traceback to the client. Each request's sequences
are aborted in a ``finally`` when its client goes away, which frees their KV blocks at the
engine's next step.
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
from starlette.requests import ClientDisconnect

from shardlm.engine.outputs import CompletionOutput, RequestOutput
from shardlm.engine.sampling_params import SamplingParams
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
# Prompts longer than this many characters are tokenized off the event loop.
INLINE_TOKENIZE_CHARS = 4096
KNOWN_PATHS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}
# pydantic names the member of a union it tried (prompt.str, ...): not a field the client knows.
_TYPE_TAGS = ("str", "int", "float", "bool", "list", "dict", "function", "union")


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_waiting: int = 1024
    created: int = field(default_factory=lambda: int(time.time()))


# -- request parsing --
def _field_of(loc: tuple) -> str:
    parts = [str(p) for p in loc if str(p).split("[")[0].split("-")[0] not in _TYPE_TAGS]
    return ".".join(parts) or "body"


def _first_bad_string(value: object, where: str) -> str | None:
    """The field holding a string that is not valid Unicode (a lone surrogate), if any."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
    elif isinstance(value, dict):
        for k, v in value.items():
            bad = _first_bad_string(v, f"{where}.{k}" if where else str(k))
            if bad:
                return bad
    elif isinstance(value, list):
        for i, v in enumerate(value):
            bad = _first_bad_string(v, f"{where}.{i}")
            if bad:
                return bad
    return None


async def parse_body(request: Request, model: type[BaseModel]) -> BaseModel:
    try:
        raw = await request.body()
    except ClientDisconnect:
        raise APIError(499, "client disconnected") from None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, huge ints, depth
        raise APIError(400, f"request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}")
    bad = _first_bad_string(data, "")
    if bad:
        raise APIError(400, f"{bad}: the string is not valid Unicode (a lone surrogate)", bad)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = _field_of(first["loc"])
        got = first.get("input")
        shown = "an object" if isinstance(got, dict) else json.dumps(got)[:80]
        raise APIError(400, f"{where}: {first['msg']} (got {shown})", where) from None


def _value_error(e: Exception, rename: dict[str, str] | None = None) -> APIError:
    """SamplingParams and the engine start their messages with the field's name; ``rename``
    maps it to what this endpoint's client called it."""
    message = str(e)
    param = message.split(" ", 1)[0]
    if not param.isidentifier():
        return APIError(400, message)
    return APIError(400, message, (rename or {}).get(param, param))


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
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        # Runs outside the counting middleware: count it here.
        path = request.url.path
        metrics.requests.labels(path if path in KNOWN_PATHS else "other", "500").inc()
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

    async def encode(text: str, **kwargs) -> list[int]:
        if tokenizer is None:
            raise APIError(400, "this server has no tokenizer: send token ids", "prompt")
        try:
            if len(text) <= INLINE_TOKENIZE_CHARS:
                return tokenizer.encode(text, **kwargs)
            return await asyncio.to_thread(tokenizer.encode, text, **kwargs)
        except (TypeError, ValueError) as e:
            raise APIError(400, f"the prompt could not be tokenized: {e}", "prompt") from None

    async def prompt_ids(prompt: str | list) -> tuple[str, list[int]]:
        if isinstance(prompt, str):
            return prompt, await encode(prompt)
        if not prompt:
            raise APIError(400, "prompt must not be empty", "prompt")
        for t in prompt:
            if not 0 <= t < vocab:
                raise APIError(
                    400, f"prompt token id {t} is outside the vocabulary [0, {vocab})", "prompt"
                )
        text = tokenizer.decode(prompt, skip_special_tokens=False) if tokenizer else ""
        return text, list(prompt)

    def check_context(requested: int | None, prompt_len: int, fields: tuple[str, str]) -> None:
        """The prompt must leave room, and prompt + max_tokens must fit the context."""
        prompt_field, max_field = fields
        if prompt_len >= max_model_len:
            raise APIError(
                400,
                f"this model's maximum context length is {max_model_len} tokens and the "
                f"prompt has {prompt_len}, which leaves no room for a completion",
                prompt_field,
            )
        if requested is not None and requested >= 1 and prompt_len + requested > max_model_len:
            raise APIError(
                400,
                f"this model's maximum context length is {max_model_len} tokens, but "
                f"{prompt_len + requested} were requested ({prompt_len} in the prompt, "
                f"{requested} for the completion); shorten the prompt or lower {max_field}",
                max_field,
            )

    def check_capacity(sequences: int) -> None:
        if sequences > config.max_waiting:
            raise APIError(
                400,
                f"this request asks for {sequences} sequences (prompts × n); this server "
                f"takes at most {config.max_waiting} at once",
                "n",
            )
        waiting = engine.stats.num_waiting + engine.pending_sequences
        if waiting + sequences > config.max_waiting:
            raise APIError(
                429,
                f"the server is busy: {waiting} sequences are waiting to start (limit "
                f"{config.max_waiting}); retry shortly",
                headers={"Retry-After": "1"},
            )

    async def start(
        request_id: str,
        prompts: list[tuple[str, list[int]]],
        params: list[SamplingParams],
        rename: dict[str, str],
    ) -> list[RequestStream]:
        """Queue every prompt at once; all accepted, or none left running."""
        if engine.dead is not None:
            raise APIError(503, f"the engine is not running: {engine.dead}")
        check_capacity(sum(p.n for p in params))
        adds = [
            engine.add(f"{request_id}-{i}", {"prompt": text, "prompt_token_ids": ids}, p)
            for i, ((text, ids), p) in enumerate(zip(prompts, params, strict=True))
        ]
        results = await asyncio.gather(*adds, return_exceptions=True)
        streams = [r for r in results if isinstance(r, RequestStream)]
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            for s in streams:
                s.abort()
            if isinstance(failure, EngineDead):
                raise APIError(503, str(failure))
            if isinstance(failure, ValueError):
                raise _value_error(failure, rename)
            raise failure
        return streams

    def sampling(body: SamplingFields, max_tokens: int | None, logprobs, rename) -> SamplingParams:
        try:
            return body.sampling_params(max_tokens, logprobs)
        except ValueError as e:
            raise _value_error(e, rename) from None

    async def stream_events(run: Run, chunks) -> AsyncIterator[str]:
        """SSE body: the endpoint's chunks, a usage chunk if asked, then [DONE]. A failure
        after the headers went out is sent as an error event."""
        try:
            async for event in chunks:
                yield event
            if run.include_usage:
                yield sse({**run.head, "choices": [], "usage": run.usage()})
        except EngineDead as e:
            yield sse(APIError(503, str(e)).body())
        except Exception as e:
            logger.exception("stream failed")
            yield sse(APIError(500, f"internal error ({type(e).__name__})").body())
        finally:
            run.abort()
        yield sse("[DONE]")

    # -- endpoints --
    @app.get("/health")
    async def health() -> Response:
        if engine.dead is not None:
            raise APIError(503, f"the engine is not running: {engine.dead}")
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
        prompts = [await prompt_ids(p) for p in body.prompts()]
        rename = {"prompt_token_ids": "prompt"}
        for _, ids in prompts:
            check_context(body.max_tokens, len(ids), ("prompt", "max_tokens"))
        params = [sampling(body, body.max_tokens, body.logprobs, rename) for _ in prompts]
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = await start(rid, prompts, params, rename)
        head = envelope("text_completion", rid, config.model_name)
        run = Run(body, prompts, streams, metrics, arrival, head, "completion")
        echo = [p[0] if body.echo else "" for p in prompts]

        def choice_json(c: Choice, text: str, lp: dict | None, reason: str | None) -> dict:
            return {"index": c.index, "text": text, "logprobs": lp, "finish_reason": reason}

        if body.stream:

            async def chunks() -> AsyncIterator[str]:
                async for c, delta, lp in run.deltas():
                    text = delta.text
                    if run.first_output(c):
                        text = echo[c.index // run.n] + text
                    yield run.chunk(choice_json(c, text, lp, c.finish_reason))

            return StreamingResponse(stream_events(run, chunks()), media_type="text/event-stream")

        await run.collect(request)
        choices = [
            choice_json(
                c,
                echo[c.index // run.n] + c.text,
                c.completion_logprobs if body.logprobs is not None else None,
                c.finish_reason,
            )
            for c in run.choices
        ]
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
                messages, add_generation_prompt=body.add_generation_prompt is not False
            )
        except ShardlmError as e:
            raise APIError(400, str(e), "messages") from None
        ids = await encode(text, add_special_tokens=False)
        max_field = body.max_tokens_field
        rename = {
            "max_tokens": max_field,
            "prompt": "messages",
            "prompt_token_ids": "messages",
            "logprobs": "top_logprobs",
        }
        check_context(body.requested_max_tokens, len(ids), ("messages", max_field))
        params = [sampling(body, body.requested_max_tokens, body.logprobs_k, rename)]
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await start(rid, [(text, ids)], params, rename)
        kind = "chat.completion.chunk" if body.stream else "chat.completion"
        head = envelope(kind, rid, config.model_name)
        run = Run(body, [(text, ids)], streams, metrics, arrival, head, "chat")

        if body.stream:

            def chunk(index: int, delta: dict, lp, reason) -> str:
                return run.chunk(
                    {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}
                )

            async def chunks() -> AsyncIterator[str]:
                for i in range(run.n):
                    yield chunk(i, {"role": "assistant", "content": ""}, None, None)
                async for c, delta, lp in run.deltas():
                    content = {"content": delta.text} if delta.text or delta.token_ids else {}
                    logprobs = {"content": lp} if lp is not None else None
                    yield chunk(c.index, content, logprobs, delta.finish_reason)

            return StreamingResponse(stream_events(run, chunks()), media_type="text/event-stream")

        await run.collect(request)
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


class Run:
    """The choices of one HTTP request (n per prompt) as their deltas arrive, with latency
    metrics. Choice index = prompt index · n + sequence index, as OpenAI numbers them."""

    def __init__(
        self,
        body: SamplingFields,
        prompts: list[tuple[str, list[int]]],
        streams: list[RequestStream],
        metrics: ServerMetrics,
        arrival: float,
        head: dict,
        kind: str,  # "completion" | "chat": which logprobs format to build
    ) -> None:
        self.n = body.num_choices
        self.include_usage = body.include_usage
        self.logprobs_k = body.logprobs if kind == "completion" else body.logprobs_k
        self.kind = kind
        self.head = head
        self.streams = streams
        self.metrics = metrics
        self.arrival = arrival
        self.prompt_tokens = sum(len(ids) for _, ids in prompts)
        self.choices = [Choice(i * self.n + j) for i in range(len(prompts)) for j in range(self.n)]
        self._last_token_at: dict[int, float] = {}
        self._started: set[int] = set()

    def first_output(self, c: Choice) -> bool:
        """True the first time it is asked for a choice (where echo puts the prompt)."""
        first = c.index not in self._started
        self._started.add(c.index)
        return first

    async def deltas(self) -> AsyncIterator[tuple[Choice, CompletionOutput, object]]:
        """(choice, delta, the delta's logprobs in this endpoint's format or None) as they
        come; skips deltas with nothing in them (text held back for an incomplete UTF-8
        character arrives with a later token)."""
        async for i, out in merge(self.streams):
            for delta in out.outputs:
                if not (delta.text or delta.token_ids or delta.finish_reason):
                    continue
                c = self.choices[i * self.n + delta.index]
                lp = None
                if self.logprobs_k is not None and delta.logprobs:
                    if self.kind == "completion":
                        lp = completion_logprobs(delta, self.logprobs_k, len(c.text))
                        for key, values in lp.items():
                            c.completion_logprobs[key].extend(values)
                    else:
                        lp = chat_logprobs(delta, self.logprobs_k)
                        c.chat_logprobs.extend(lp)
                self._observe(c, len(delta.token_ids))
                c.add(delta)
                yield c, delta, lp
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
                    raise APIError(499, "client disconnected")
        except EngineDead as e:
            raise APIError(503, str(e)) from None
        finally:
            if not task.done():
                task.cancel()
            self.abort()

    def chunk(self, choice: dict) -> str:
        """One streamed event for one choice (``usage`` null until the last, if asked for)."""
        payload = {**self.head, "choices": [choice]}
        if self.include_usage:
            payload["usage"] = None
        return sse(payload)

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
        except Exception as e:
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


def run_server(
    model: str,
    engine_args: dict,
    config: ServerConfig,
    host: str,
    port: int,
    shutdown_timeout: float,
) -> int:
    """Load the engine, serve until SIGINT/SIGTERM, then shut down gracefully: uvicorn stops
    accepting, in-flight requests get ``shutdown_timeout`` seconds to finish (those still
    running half a second before are failed with a 503 body or an error event), and the
    engine and its workers stop."""
    import uvicorn

    from shardlm.engine.llm_engine import LLMEngine

    engine = AsyncEngine(LLMEngine(model, **engine_args))
    app = build_app(engine, config)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:  # the first signal: requests still running just before
                # uvicorn's deadline are failed by the engine, so they get a proper answer.
                engine.stop_after(shutdown_timeout - 0.5)
            super().handle_exit(sig, frame)

    server = Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            timeout_graceful_shutdown=shutdown_timeout,
            log_level="warning",
        )
    )
    logger.info("serving %s on http://%s:%d", config.model_name, host, port)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again for whatever
    # handler was installed before it: make that one a no-op, so a requested stop exits 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
