"""/v1/chat/completions: the messages (and tools) rendered by the model's chat template, n
choices, streamed (a role chunk first, as OpenAI does) or not; each choice's text read into
reasoning, content and tool calls by chat_output.py."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from shardlm.engine.sampling_params import SamplingParams
from shardlm.entrypoints.openai.chat_output import ChatOutput
from shardlm.entrypoints.openai.protocol import ChatCompletionRequest
from shardlm.entrypoints.openai.reasoning import REASONING_PARSERS
from shardlm.entrypoints.openai.responses import envelope, vllm_prompt_logprobs
from shardlm.entrypoints.openai.run import Prompt, Run, stream_events
from shardlm.entrypoints.openai.server_config import ServerConfig
from shardlm.entrypoints.openai.serving import OpenAIServing, read_body
from shardlm.entrypoints.openai.structured import forced_call_spec
from shardlm.entrypoints.openai.tool_parsers import TOOL_PARSERS
from shardlm.entrypoints.openai.validation import (
    chat_fields,
    check_context,
    check_model,
    render_chat,
    sampling_params,
    tool_mode,
)
from shardlm.tokenizer import Tokenizer


def chat_logprobs_json(content: list | None) -> dict:
    """A choice's logprobs object (refusal is always null: shardlm never refuses)."""
    return {"content": content, "refusal": None}


def dropped_by_decoding(tokenizer: Tokenizer, markers: tuple[str, ...]) -> bool:
    """Whether decoding with skip_special_tokens (the API's default) would drop one of
    ``markers``: true where the tokenizer has it as a special token, as Mistral's
    [TOOL_CALLS] is."""
    return any(
        marker not in tokenizer.decode(tokenizer.encode(marker, add_special_tokens=False))
        for marker in markers
    )


def chat_params(
    body: ChatCompletionRequest,
    config: ServerConfig,
    keep_specials_for: tuple[bool, bool] = (False, False),
) -> tuple[SamplingParams, ChatOutput]:
    """The request's SamplingParams (a forced tool call's grammar included) and how its
    choices are read; the offline tests build them here too, so they sample as the server
    does. ``keep_specials_for``: (tool parser, reasoning parser) whose markers are special
    tokens of the served tokenizer; a request those parsers read is then decoded with
    special tokens kept, whatever its skip_special_tokens says (as vLLM does for Mistral's
    parser), or its calls / reasoning would come back as plain content."""
    mode = tool_mode(body, config.enable_auto_tool_choice, config.tool_call_parser)
    forced = None
    if mode in ("required", "named"):
        forced = forced_call_spec(body.tool_choice, body.tools, body.parallel_tool_calls)
    params = sampling_params(
        body,
        body.requested_max_tokens,
        body.logprobs_k,
        chat_fields(body.max_tokens_field),
        body.prompt_logprobs,
        structured_outputs=forced,
    )
    output = ChatOutput(
        mode=mode,
        tools=tuple(body.tools or ()),
        tool_choice=body.tool_choice,
        tool_parser=config.tool_call_parser,
        reasoning_parser=config.reasoning_parser,
        legacy=body.legacy_functions,
    )
    for_tools, for_reasoning = keep_specials_for
    forced = mode in ("required", "named")  # a grammar's JSON: no parser reads the text
    if (for_tools and mode == "auto") or (for_reasoning and not forced):
        params.skip_special_tokens = False
    return params, output


class ChatServing(OpenAIServing):
    def __init__(self, *args: Any, config: ServerConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config = config or ServerConfig()
        self.chat_template = self.config.chat_template_text()
        tools = TOOL_PARSERS.get(self.config.tool_call_parser or "")
        reasoning = REASONING_PARSERS.get(self.config.reasoning_parser or "")
        tok = self.tokenizer  # None with skip_tokenizer_init: chat is then a 400 anyway
        self.keep_specials_for = (
            tok is not None and tools is not None and dropped_by_decoding(tok, tools.markers),
            tok is not None
            and reasoning is not None
            and dropped_by_decoding(tok, reasoning.markers),
        )

    async def create(self, request: Request) -> Response:
        arrival = time.perf_counter()
        body = await read_body(request, ChatCompletionRequest)
        prompt, params, output = await self.validate(body)
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
            events = stream_events(run, self._chunks(run, output))
            return StreamingResponse(events, media_type="text/event-stream")
        await run.collect(request)
        choices = []
        for c in run.choices:
            message, reason = output.message(c.text, c.finish_reason)
            logprobs = chat_logprobs_json(c.chat_logprobs) if body.logprobs_k is not None else None
            choices.append(
                {
                    "index": c.index,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": reason,
                }
            )
        answer = {**head, "choices": choices, "usage": run.usage()}
        if body.prompt_logprobs is not None:  # vLLM's field, at the top level for chat
            answer["prompt_logprobs"] = vllm_prompt_logprobs(run.prompt_logprobs[0] or [])
        return JSONResponse(answer)

    async def validate(
        self, body: ChatCompletionRequest
    ) -> tuple[Prompt, SamplingParams, ChatOutput]:
        """The rendered prompt as (text, token ids) that fits the context, its parameters,
        and how its choices' text is read."""
        check_model(body.model, self.model_name)
        body.refuse_unsupported()
        params, output = chat_params(body, self.config, self.keep_specials_for)
        text = render_chat(self.tokenizer, body, self.chat_template)
        fields = chat_fields(body.max_tokens_field)
        ids = await self.encode(text, fields, add_special_tokens=False)
        check_context(len(ids), body.requested_max_tokens, self.max_model_len, fields)
        if output.mode in ("required", "named"):
            param = "functions" if body.legacy_functions else "tools"
        else:
            param = body.structured_param
        await self.compile_grammar(params, param)
        return (text, ids), params, output

    @staticmethod
    async def _chunks(run: Run, output: ChatOutput) -> AsyncIterator[str]:
        def chunk(index: int, delta: dict, logprobs: dict | None, reason: str | None) -> str:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            return run.chunk(choice)

        streams = [output.stream() for _ in run.choices]
        for c in run.choices:
            yield chunk(c.index, {"role": "assistant", "content": ""}, None, None)
            for delta in streams[c.index].start():
                yield chunk(c.index, delta, None, None)
        async for c, delta, lp in run.deltas():
            stream = streams[c.index]
            pieces = stream.feed(delta.text)
            reason = None
            if delta.finish_reason is not None:
                tail, reason = stream.finish(delta.finish_reason)
                pieces += tail
            logprobs = chat_logprobs_json(lp) if lp is not None else None
            if not pieces and (logprobs is not None or reason is not None):
                pieces = [{}]  # logprobs of held-back text, or the end
            for k, piece in enumerate(pieces):
                last = k == len(pieces) - 1
                yield chunk(c.index, piece, logprobs if k == 0 else None, reason if last else None)
