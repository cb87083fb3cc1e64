"""What the generation endpoints share: reading the body, tokenizing off the event loop when a
prompt is long, and queueing a request's prompts all at once under the waiting limit."""

from __future__ import annotations

import asyncio

from starlette.requests import ClientDisconnect, Request

from shardlm.engine.sampling_params import SamplingParams
from shardlm.entrypoints.openai.engine_client import EngineClient, EngineDead, RequestStream
from shardlm.entrypoints.openai.metrics import ServerMetrics
from shardlm.entrypoints.openai.protocol import APIError
from shardlm.entrypoints.openai.run import Prompt
from shardlm.entrypoints.openai.validation import (
    Fields,
    Model,
    api_error,
    check_capacity,
    encode_text,
    parse_request,
)

# Prompts longer than this many characters are tokenized off the event loop.
INLINE_TOKENIZE_CHARS = 4096


async def read_body(request: Request, model: type[Model]) -> Model:
    """The request's JSON body as ``model`` (a 4xx naming the field otherwise)."""
    try:
        raw = await request.body()
    except ClientDisconnect:
        raise APIError(499, "client disconnected") from None
    return parse_request(raw, model)


class OpenAIServing:
    """The engine and the server's settings, as both generation endpoints use them."""

    def __init__(
        self, engine: EngineClient, metrics: ServerMetrics, model_name: str, max_waiting: int
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.model_name = model_name
        self.max_waiting = max_waiting
        self.tokenizer = engine.tokenizer
        self.max_model_len: int = engine.max_model_len
        self.vocab_size: int = engine.vocab_size

    async def encode(self, text: str, fields: Fields, **kwargs) -> list[int]:
        """``validation.encode_text``, in a thread for long texts (the loop keeps serving)."""
        if len(text) <= INLINE_TOKENIZE_CHARS:
            return encode_text(self.tokenizer, text, fields, **kwargs)
        return await asyncio.to_thread(encode_text, self.tokenizer, text, fields, **kwargs)

    async def compile_grammar(self, params: SamplingParams, param: str) -> None:
        """Have the engine process compile the request's structured-output grammar before the
        request is queued, off its step loop, so a bad spec is a 400 naming ``param`` and the
        step that admits the request finds it compiled."""
        if params.structured_outputs is None:
            return
        try:
            await self.engine.compile(params.structured_outputs)
        except ValueError as e:
            raise APIError(400, str(e), param) from None
        except EngineDead as e:
            raise APIError(503, str(e)) from None

    def check_alive(self) -> None:
        if self.engine.dead is not None:
            raise APIError(503, f"the engine is not running: {self.engine.dead}")

    async def start(
        self,
        request_id: str,
        prompts: list[Prompt],
        params: list[SamplingParams],
        fields: Fields,
    ) -> list[RequestStream]:
        """Queue every prompt at once: all accepted, or none left running."""
        self.check_alive()
        waiting = self.engine.stats.num_waiting + self.engine.pending_sequences
        check_capacity(sum(p.n for p in params), waiting, self.max_waiting)
        adds = [
            self.engine.add(f"{request_id}-{i}", {"prompt": text, "prompt_token_ids": ids}, p)
            for i, ((text, ids), p) in enumerate(zip(prompts, params, strict=True))
        ]
        results = await asyncio.gather(*adds, return_exceptions=True)
        streams = [r for r in results if isinstance(r, RequestStream)]
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is None:
            return streams
        for s in streams:
            s.abort()
        if isinstance(failure, EngineDead):
            raise APIError(503, str(failure))
        if isinstance(failure, ValueError):
            raise api_error(failure, fields)
        raise failure
