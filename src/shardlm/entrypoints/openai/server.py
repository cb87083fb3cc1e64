"""The OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models,
/health and /metrics, on FastAPI + uvicorn (the ``serve`` extra; the core never imports this).

This module only wires things: routes to the serving objects (serving_completions.py,
serving_chat.py), errors to OpenAI's shape, the API key and counting middleware, and the
uvicorn process around them. Every request is validated before it reaches the engine
(validation.py) and every failure is a 4xx naming the field; an exception nobody foresaw is a
500 in the same shape, logged here, never a traceback to the client.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import signal
import socket
import sys
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.config import LOGGING_CONFIG

from shardlm.demo import BUILTIN_NAME, DEMO_NOTICE
from shardlm.entrypoints.openai.engine_client import EngineClient
from shardlm.entrypoints.openai.metrics import ServerMetrics
from shardlm.entrypoints.openai.middleware import CountAndAuthorize, endpoint_label
from shardlm.entrypoints.openai.openapi_docs import document_request_bodies
from shardlm.entrypoints.openai.protocol import APIError, ChatCompletionRequest, CompletionRequest
from shardlm.entrypoints.openai.responses import model_card
from shardlm.entrypoints.openai.server_config import API_KEY_ENV, ServerConfig
from shardlm.entrypoints.openai.serving_chat import ChatServing
from shardlm.entrypoints.openai.serving_completions import CompletionServing
from shardlm.entrypoints.openai.serving_tokenization import TokenizationServing

logger = logging.getLogger(__name__)

__all__ = ["ServerConfig", "build_app", "run_server"]


# -- errors in OpenAI's shape --
async def _api_error(_request: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


# Routes of OpenAI's API that shardlm does not serve: a 404 that says so, not "Not Found".
NOT_SERVED = (
    "/v1/embeddings",
    "/v1/responses",
    "/v1/audio",
    "/v1/images",
    "/v1/moderations",
    "/v1/files",
    "/v1/fine_tuning",
    "/v1/batches",
    "/v1/assistants",
    "/v1/threads",
    "/v1/vector_stores",
    "/v1/uploads",
    "/v1/realtime",
    "/v1/evals",
)
SERVED = (
    "/v1/completions, /v1/chat/completions, /v1/models, /tokenize, /detokenize, /tokenizer_info"
)


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    path = request.url.path
    if e.status_code == 404 and path.startswith(NOT_SERVED):
        message = (
            f"{path} is part of OpenAI's API but shardlm does not serve it (it serves {SERVED})"
        )
        body = APIError(404, message, code="unsupported_endpoint").body()
    elif e.status_code == 404:
        body = APIError(404, f"no route {path} (shardlm serves {SERVED})").body()
    else:
        body = APIError(e.status_code, str(e.detail)).body()
    return JSONResponse(body, e.status_code)


async def _unexpected(request: Request, e: Exception) -> JSONResponse:
    # Runs outside the counting middleware: count it here.
    metrics: ServerMetrics = request.app.state.metrics
    metrics.requests.labels(endpoint_label(request.url.path), "500").inc()
    logger.exception("unexpected error")
    body = APIError(500, f"internal error ({type(e).__name__}); see the server log").body()
    return JSONResponse(body, status_code=500)


# -- the app --
def build_app(engine: EngineClient, config: ServerConfig, model_name: str) -> FastAPI:
    """The routes over ``engine``, which the app shuts down when it stops. ``model_name`` is
    the name the API answers to; the API key is ``config.api_key``, else $SHARDLM_API_KEY."""
    metrics = ServerMetrics(lambda: engine.stats, lambda: engine.node_stats)
    api_key = config.api_key or os.environ.get(API_KEY_ENV) or None
    shared = dict(
        engine=engine, metrics=metrics, model_name=model_name, max_waiting=config.max_waiting
    )
    completions, chat = CompletionServing(**shared), ChatServing(**shared, config=config)
    tokenization = TokenizationServing(**shared, chat_template=chat.chat_template)
    card = model_card(model_name, engine.max_model_len)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        logger.info("shutting down: aborting what is left and stopping the engine")
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="shardlm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.metrics = metrics
    app.add_middleware(CountAndAuthorize, metrics=metrics, api_key=api_key)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)

    @app.get("/health")
    async def health() -> Response:
        completions.check_alive()
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def create_completion(request: Request) -> Response:
        return await completions.create(request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: Request) -> Response:
        return await chat.create(request)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        return await tokenization.tokenize(request)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        return await tokenization.detokenize(request)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        return tokenization.tokenizer_info()

    bodies = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}
    document_request_bodies(app, bodies)
    return app


# -- the process --
def run_server(engine_args: dict, server: ServerConfig, access_log: bool = False) -> int:
    """Start the engine in its own process (``engine_args``: LLMEngine's keyword arguments,
    the checkpoint under "model", None for the built-in one; engine_core.py) and wait until it
    has loaded the model, serve until SIGINT/SIGTERM in this process, then shut down
    gracefully: uvicorn stops accepting, in-flight requests get ``server.shutdown_timeout``
    seconds to finish (those still running half a second before are failed with a 503 body
    or an error event), and the engine process and its workers stop. ``access_log``: one INFO
    line per request on stderr."""
    args = dict(engine_args)
    model = args.get("model")
    name = server.served_model_name or str(model or BUILTIN_NAME)
    if model is None:  # EngineConfig.resolve() picks the built-in model
        print(DEMO_NOTICE, file=sys.stderr)
    engine = EngineClient(args)  # the engine's own process (engine_core.py)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again for whatever
    # handler was installed before it: make that one a no-op, so a requested stop exits 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        app = build_app(engine, server, name)
        uv = _UvicornServer(
            uvicorn.Config(
                app,
                host=server.host,
                port=server.port,
                timeout_graceful_shutdown=server.shutdown_timeout,
                log_level="warning",
                log_config=_log_config(),
                access_log=access_log,
            ),
            engine,
            name,
        )
        if access_log:  # uvicorn's access logger, alone at INFO: the rest stays at warning
            logging.getLogger("uvicorn.access").setLevel(logging.INFO)
        uv.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        # Also where uvicorn skipped its lifespan shutdown (a second Ctrl-C) or never ran.
        engine.shutdown()
    return 0


def _log_config() -> dict:
    """uvicorn's logging, with the access log on stderr too (stdout is left to the user)."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    return config


class _UvicornServer(uvicorn.Server):
    """uvicorn, saying once where it listens, and failing what cannot finish in time."""

    def __init__(self, config: uvicorn.Config, engine: EngineClient, model_name: str) -> None:
        super().__init__(config)
        self.engine = engine
        self.model_name = model_name

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(self.listening_line(), file=sys.stderr, flush=True)

    def listening_line(self) -> str:
        """Where and what this server serves (with port 0: the port the system chose)."""
        port = self.config.port
        bound = [s for srv in self.servers for s in srv.sockets or ()]
        if bound and bound[0].family in (socket.AF_INET, socket.AF_INET6):
            port = bound[0].getsockname()[1]
        host = self.config.host
        host = f"[{host}]" if ":" in host else host
        info = self.engine.info
        return (
            f"shardlm serve: listening on http://{host}:{port} (model {self.model_name}, "
            f"dtype {info.dtype}, device {info.device}, max_model_len {info.max_model_len})"
        )

    def handle_exit(self, sig: int, frame: object) -> None:
        if not self.should_exit:  # the first signal: requests still running just before
            # uvicorn's deadline are failed by the engine, so they get a proper answer.
            self.engine.stop_after(self.config.timeout_graceful_shutdown - 0.5)
        super().handle_exit(sig, frame)
