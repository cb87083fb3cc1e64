"""/v1/chat/completions: the messages rendered by the model's chat template, n choices,
streamed (a role chunk first, as OpenAI does) or not."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from shardlm.engine.sampling_params import SamplingParams
from shardlm.entrypoints.openai.protocol import ChatCompletionRequest
from shardlm.entrypoints.openai.responses import envelope, vllm_prompt_logprobs
from shardlm.entrypoints.openai.run import Prompt, Run, stream_events
from shardlm.entrypoints.openai.serving import OpenAIServing, read_body
from shardlm.entrypoints.openai.validation import (
    chat_fields,
    check_context,
    check_model,
    render_chat,
    sampling_params,
)


class ChatServing(OpenAIServing):
    async def create(self, request: Request) -> Response:
        arrival = time.perf_counter()
        body = await read_body(request, ChatCompletionRequest)
        prompt, params = await self.validate(body)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await self.start(rid, [prompt], [params], chat_fields(body.max_tokens_field))
        kind = "chat.completion.chunk" if body.stream else "chat.completion"
        head = envelope(kind, rid, self.model_name)
        run = Run(
            [prompt],
            streams,
            n=body.num_choices,
            logprobs_k=body.logprobs_k,
            kind="chat",
            include_usage=body.include_usage,
            head=head,
            metrics=self.metrics,
            arrival=arrival,
        )
        if body.stream:
            events = stream_events(run, self._chunks(run))
            return StreamingResponse(events, media_type="text/event-stream")
        await run.collect(request)
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": {"content": c.chat_logprobs} if body.logprobs_k is not None else None,
                "finish_reason": c.finish_reason,
            }
            for c in run.choices
        ]
        answer = {**head, "choices": choices, "usage": run.usage()}
        if body.prompt_logprobs is not None:  # vLLM's field, at the top level for chat
            answer["prompt_logprobs"] = vllm_prompt_logprobs(run.prompt_logprobs[0] or [])
        return JSONResponse(answer)

    async def validate(self, body: ChatCompletionRequest) -> tuple[Prompt, SamplingParams]:
        """The rendered prompt as (text, token ids) that fits the context, and its parameters."""
        check_model(body.model, self.model_name)
        body.refuse_unsupported()
        fields = chat_fields(body.max_tokens_field)
        text = render_chat(self.tokenizer, body)
        ids = await self.encode(text, fields, add_special_tokens=False)
        check_context(len(ids), body.requested_max_tokens, self.max_model_len, fields)
        params = sampling_params(
            body, body.requested_max_tokens, body.logprobs_k, fields, body.prompt_logprobs
        )
        await self.compile_grammar(params, body.structured_param)
        return (text, ids), params

    @staticmethod
    async def _chunks(run: Run) -> AsyncIterator[str]:
        def chunk(index: int, delta: dict, logprobs: dict | None, reason: str | None) -> str:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            return run.chunk(choice)

        for i in range(run.n):
            yield chunk(i, {"role": "assistant", "content": ""}, None, None)
        async for c, delta, lp in run.deltas():
            content = {"content": delta.text} if delta.text or delta.token_ids else {}
            logprobs = {"content": lp} if lp is not None else None
            yield chunk(c.index, content, logprobs, delta.finish_reason)
