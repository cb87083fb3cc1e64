"""The API key check and the per-response counter, as one pure ASGI middleware: it never
buffers a body, so streamed responses pass through untouched."""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shardlm.entrypoints.openai.metrics import ServerMetrics
from shardlm.entrypoints.openai.protocol import APIError

KNOWN_PATHS = frozenset(
    {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/health",
        "/metrics",
        "/tokenize",
        "/detokenize",
        "/tokenizer_info",
    }
)


def endpoint_label(path: str) -> str:
    """The metrics label of a path: unknown paths share one, so clients cannot grow /metrics."""
    return path if path in KNOWN_PATHS else "other"


class CountAndAuthorize:
    """Checks the API key on /v1 routes and counts every response by endpoint and status."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, api_key: str | None) -> None:
        self.app = app
        self.metrics = metrics
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = endpoint_label(path)
        if self.expected is not None and path.startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                why = "wrong API key" if given else "missing API key (Authorization: Bearer ...)"
                error = APIError(401, why, code="invalid_api_key")
                response = JSONResponse(error.body(), status_code=401)
                self.metrics.requests.labels(endpoint, "401").inc()
                await response(scope, receive, send)
                return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
