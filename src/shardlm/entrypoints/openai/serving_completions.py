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
from shardlm.entrypoints.openai.responses import Choice, envelope, vllm_prompt_logprobs
from shardlm.entrypoints.openai.run import Prompt, Run, stream_events
from shardlm.entrypoints.openai.serving import OpenAIServing, read_body
from shardlm.entrypoints.openai.validation import (
    COMPLETION_FIELDS,
    check_context,
    check_model,
    sampling_params,
    token_ids,
)
from shardlm.tokenizer import IncrementalDetokenizer


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
        echoed = None
        if body.echo and body.logprobs is not None:
            given_ids = [not isinstance(p, str) for p in body.prompts()]
            echoed = [
                (ids, *self.token_texts(ids, specials))
                for (_, ids), specials in zip(prompts, given_ids, strict=True)
            ]
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
            echo=echoed,
        )
        echo = [text if body.echo else "" for text, _ in prompts]
        if body.stream:
            chunks = self._chunks(run, echo, body.prompt_logprobs is not None)
            events = stream_events(run, chunks)
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
        if body.prompt_logprobs is not None:  # vLLM's field, beside each choice
            for c, choice in zip(run.choices, choices, strict=True):
                choice["prompt_logprobs"] = vllm_prompt_logprobs(
                    run.prompt_logprobs[c.index // run.n] or []
                )
        return JSONResponse({**head, "choices": choices, "usage": run.usage()})

    async def validate(self, body: CompletionRequest) -> tuple[list[Prompt], list[SamplingParams]]:
        """Every prompt as (text, token ids) that fits the context, and its parameters."""
        check_model(body.model, self.model_name)
        body.refuse_unsupported()
        prompts = [await self.prompt(p) for p in body.prompts()]
        for _, ids in prompts:
            check_context(len(ids), body.max_tokens, self.max_model_len, COMPLETION_FIELDS)
        params = [
            sampling_params(
                body, body.max_tokens, body.logprobs, COMPLETION_FIELDS, body.prompt_logprobs_k
            )
            for _ in prompts
        ]
        await self.compile_grammar(params[0], body.structured_param)  # one spec for all
        return prompts, params

    async def prompt(self, prompt: str | list[int]) -> Prompt:
        if isinstance(prompt, str):
            return prompt, await self.encode(prompt, COMPLETION_FIELDS)
        ids = token_ids(prompt, self.vocab_size, COMPLETION_FIELDS)
        text = self.tokenizer.decode(ids, skip_special_tokens=False) if self.tokenizer else ""
        return text, ids

    def token_texts(self, ids: list[int], specials_in_text: bool) -> tuple[list[str], list[int]]:
        """Each token's own text (what echoed logprobs list as ``tokens``) and its width in
        the echoed text: a text prompt is echoed as given, without the special tokens (BOS)
        the tokenizer added, which then have width 0; token ids are echoed decoded with them."""
        if self.tokenizer is None:
            return ["" for _ in ids], [0 for _ in ids]
        texts = [self.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
        # Widths from an incremental decode: a token that is part of a UTF-8 character has
        # width 0 and the one completing it carries the character, so offsets index the text.
        detok = IncrementalDetokenizer(self.tokenizer, (), skip_special_tokens=not specials_in_text)
        widths = [len(detok.add(t)) for t in ids]
        if widths:
            widths[-1] += len(detok.flush())
        return texts, widths

    @staticmethod
    async def _chunks(run: Run, echo: list[str], prompt_logprobs: bool) -> AsyncIterator[str]:
        """Each choice's first chunk carries the echoed prompt (and, when asked, vLLM's
        prompt_logprobs: the engine has scored the prompt before any first token)."""
        async for c, delta, lp in run.deltas():
            text = delta.text
            choice = choice_json(c, text, lp, c.finish_reason)
            if run.first_output(c):
                choice["text"] = echo[c.index // run.n] + text
                if prompt_logprobs:
                    scored = run.prompt_logprobs[c.index // run.n] or []
                    choice["prompt_logprobs"] = vllm_prompt_logprobs(scored)
            yield run.chunk(choice)
