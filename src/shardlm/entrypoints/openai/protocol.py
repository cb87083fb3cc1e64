"""Request bodies of the OpenAI API (the subset shardlm serves), and their SamplingParams.

pydantic checks types and names the field of a wrong one; ranges are checked by
SamplingParams, whose messages also name the field. Unknown fields are ignored, as OpenAI
does. Known OpenAI features shardlm does not implement (tools, suffix, ...) are
refused with a 400 rather than silently ignored, since ignoring them would change the
output the client asked for.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from shardlm.engine.sampling_params import SamplingParams
from shardlm.entrypoints.openai.structured import structured_param, structured_spec

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",  # as OpenAI: unknown model is code "model_not_found"
    405: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "invalid_request_error")
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


# OpenAI's limit is 4 stop sequences; a few more are allowed, but not unbounded work per token.
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class SamplingFields(BaseModel):
    """What both endpoints share. Defaults are OpenAI's; None means "the default"."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: StrictInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extensions, which clients of vLLM and SGLang send.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = False
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: bool | None = True
    prompt_logprobs: StrictInt | None = None
    min_tokens: StrictInt | None = None
    allowed_token_ids: list[StrictInt] | None = None
    bad_words: list[str] | None = None
    # shardlm's: false keeps this request out of speculative decoding.
    speculative: bool | None = True
    # Structured outputs: OpenAI's response_format, or vLLM's field (entrypoints/structured.py).
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None

    @property
    def num_choices(self) -> int:
        return 1 if self.n is None else self.n

    def refuse_unsupported(self) -> None:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOP_STRINGS or any(len(x) > MAX_STOP_LENGTH for x in stops):
            raise APIError(
                400,
                f"stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_LENGTH} "
                "characters",
                "stop",
            )

    def sampling_params(
        self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        """The engine's parameters (max_tokens None: up to the context limit); a ValueError
        names the field (answered as a 400)."""
        return SamplingParams(
            n=self.num_choices,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=self.seed,
            max_tokens=max_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids or [],
            ignore_eos=bool(self.ignore_eos),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens is not False,
            logit_bias=self.logit_bias,
            min_tokens=self.min_tokens or 0,
            allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words,
            structured_outputs=structured_spec(self.response_format, self.structured_outputs),
            speculative=self.speculative is not False,
        )

    @property
    def structured_param(self) -> str:
        """The field the request's structured-output spec came from, for its errors."""
        return structured_param(self.response_format)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.include_usage)


# Strict: true/false or "2" are not token ids.
PromptInput = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(SamplingFields):
    prompt: PromptInput
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.suffix:
            raise APIError(400, "suffix is not supported by shardlm", "suffix")
        if self.best_of is not None and self.best_of != self.num_choices:
            raise APIError(400, "best_of other than n is not supported by shardlm", "best_of")

    @property
    def prompt_logprobs_k(self) -> int | None:
        """How many top entries the prompt's logprobs need: ``echo`` with ``logprobs`` gives
        the prompt's tokens their logprobs (as OpenAI's legacy API and lm-eval use it);
        vLLM's ``prompt_logprobs`` asks for them on its own."""
        echoed = self.logprobs if self.echo else None
        given = [k for k in (echoed, self.prompt_logprobs) if k is not None]
        return max(given) if given else None

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt must not be empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # one prompt of token ids
        return list(p)


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None
    name: str | None = None

    def as_template_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        # "developer" is OpenAI's new name for "system"; chat templates know the old one.
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: bool | None = False
    top_logprobs: StrictInt | None = None
    add_generation_prompt: bool | None = True
    tools: list[Any] | None = None
    tool_choice: Any = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise APIError(400, "tools are not supported by shardlm", "tools")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")

    @property
    def max_tokens_field(self) -> str:
        """The name the client used, for error messages."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    @property
    def logprobs_k(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0
