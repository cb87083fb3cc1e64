"""/v1/completions: one or more prompts (text or token ids), n choices each, streamed or not,
with the prompt echoed before each choice when asked."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from shardlm.engine.sampling_params import SamplingParams
from shardlm.entrypoints.openai.protocol import CompletionRequest
from shardlm.entrypoints.openai.responses import Choice, envelope
from shardlm.entrypoints.openai.run import Prompt, Run, stream_events
from shardlm.entrypoints.openai.serving import OpenAIServing, read_body
from shardlm.entrypoints.openai.validation import (
    COMPLETION_FIELDS,
    check_context,
    check_model,
    sampling_params,
    token_ids,
)


def choice_json(c: Choice, text: str, logprobs: dict | None, reason: str | None) -> dict:
    return {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": reason}


class CompletionServing(OpenAIServing):
    async def create(self, request: Request) -> Response:
        arrival = time.perf_counter()
        body = await read_body(request, CompletionRequest)
        prompts, params = await self.validate(body)
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = await self.start(rid, prompts, params, COMPLETION_FIELDS)
        head = envelope("text_completion", rid, self.model_name)
        run = Run(
            prompts,
            streams,
            n=body.num_choices,
            logprobs_k=body.logprobs,
            kind="completion",
            include_usage=body.include_usage,
            head=head,
            metrics=self.metrics,
            arrival=arrival,
        )
        echo = [text if body.echo else "" for text, _ in prompts]
        if body.stream:
            events = stream_events(run, self._chunks(run, echo))
            return StreamingResponse(events, media_type="text/event-stream")
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

    async def validate(self, body: CompletionRequest) -> tuple[list[Prompt], list[SamplingParams]]:
        """Every prompt as (text, token ids) that fits the context, and its parameters."""
        check_model(body.model, self.model_name)
        body.refuse_unsupported()
        prompts = [await self.prompt(p) for p in body.prompts()]
        for _, ids in prompts:
            check_context(len(ids), body.max_tokens, self.max_model_len, COMPLETION_FIELDS)
        params = [
            sampling_params(body, body.max_tokens, body.logprobs, COMPLETION_FIELDS)
            for _ in prompts
        ]
        return prompts, params

    async def prompt(self, prompt: str | list[int]) -> Prompt:
        if isinstance(prompt, str):
            return prompt, await self.encode(prompt, COMPLETION_FIELDS)
        ids = token_ids(prompt, self.vocab_size, COMPLETION_FIELDS)
        text = self.tokenizer.decode(ids, skip_special_tokens=False) if self.tokenizer else ""
        return text, ids

    @staticmethod
    async def _chunks(run: Run, echo: list[str]) -> AsyncIterator[str]:
        async for c, delta, lp in run.deltas():
            text = delta.text
            if run.first_output(c):
                text = echo[c.index // run.n] + text
            yield run.chunk(choice_json(c, text, lp, c.finish_reason))
