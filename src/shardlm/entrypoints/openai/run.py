"""One HTTP request's engine requests while they run: their deltas merged as they arrive,
numbered as OpenAI numbers choices, timed for /metrics, and aborted whenever the request
ends, normally or not (a client that goes away costs no KV blocks)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Literal

from starlette.requests import Request

from shardlm.engine.outputs import CompletionOutput, RequestOutput
from shardlm.entrypoints.openai.engine_client import EngineDead, RequestStream
from shardlm.entrypoints.openai.metrics import ServerMetrics
from shardlm.entrypoints.openai.protocol import APIError
from shardlm.entrypoints.openai.responses import (
    Choice,
    chat_logprobs,
    completion_logprobs,
    echoed_prompt_logprobs,
    empty_completion_logprobs,
    sse,
    usage,
)

logger = logging.getLogger(__name__)

# How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_S = 0.25

Prompt = tuple[str, list[int]]  # (text, token ids)
# An echoed prompt whose logprobs lead the choice's: (token ids, each token's text, each
# token's width in the echoed text).
Echo = tuple[list[int], list[str], list[int]]


class Run:
    """The choices of one HTTP request (n per prompt) as their deltas arrive, with latency
    metrics. Choice index = prompt index · n + sequence index, as OpenAI numbers them."""

    def __init__(
        self,
        prompts: list[Prompt],
        streams: list[RequestStream],
        *,
        n: int,
        logprobs_k: int | None,
        kind: Literal["completion", "chat"],  # which logprobs format to build
        include_usage: bool,
        head: dict,
        metrics: ServerMetrics,
        arrival: float,
        echo: list[Echo] | None = None,
    ) -> None:
        self.n = n
        self.logprobs_k = logprobs_k
        self.kind = kind
        self.include_usage = include_usage
        self.head = head
        self.streams = streams
        self.metrics = metrics
        self.arrival = arrival
        self.prompt_tokens = sum(len(ids) for _, ids in prompts)
        self.choices = [Choice(i * n + j) for i in range(len(prompts)) for j in range(n)]
        self.echo = echo  # completions with echo and logprobs
        # Per prompt, its prompt logprobs once the engine has scored it (prompt_logprobs).
        self.prompt_logprobs: list[list | None] = [None] * len(prompts)
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
            if out.prompt_logprobs is not None:
                self.prompt_logprobs[i] = out.prompt_logprobs
            for delta in out.outputs:
                if not (delta.text or delta.token_ids or delta.finish_reason):
                    continue
                c = self.choices[i * self.n + delta.index]
                lp = None
                if self.logprobs_k is not None and self.kind == "completion":
                    lp = self._completion_logprobs(i, c, delta)
                elif self.logprobs_k is not None and delta.logprobs:
                    lp = chat_logprobs(delta, self.logprobs_k)
                    c.chat_logprobs.extend(lp)
                self._observe(c, len(delta.token_ids))
                c.add(delta)
                yield c, delta, lp
        self.metrics.prompt_tokens.inc(self.prompt_tokens)

    def _completion_logprobs(self, i: int, c: Choice, delta: CompletionOutput) -> dict | None:
        """The legacy logprobs of a delta; with echo, the first one of a choice is led by
        the echoed prompt's (the engine scored the prompt before any sample's first token),
        and generated tokens' offsets continue after the prompt tokens'."""
        parts = []
        base = 0
        if self.echo is not None:
            ids, texts, widths = self.echo[i]
            # Generated offsets run on after the prompt tokens' widths (a token that is part
            # of a UTF-8 character counts its U+FFFD, so offsets never go back).
            base = sum(widths)
            if not c.prompt_echoed:
                c.prompt_echoed = True
                scored = self.prompt_logprobs[i] or [None] * len(ids)
                parts.append(echoed_prompt_logprobs(ids, texts, widths, scored, self.logprobs_k))
        if delta.logprobs:
            parts.append(completion_logprobs(delta, self.logprobs_k, base + len(c.text)))
        if not parts:
            return None
        merged = {key: [v for p in parts for v in p[key]] for key in empty_completion_logprobs()}
        for key, values in merged.items():
            c.completion_logprobs[key].extend(values)
        return merged

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


async def stream_events(run: Run, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """An SSE body: the endpoint's chunks, a usage chunk if asked, then [DONE]. A failure
    after the headers went out can only be sent as an error event."""
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
