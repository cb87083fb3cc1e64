"""Request bodies of the OpenAI API (the subset shardlm serves), and their SamplingParams.

pydantic checks types and names the field of a wrong one; ranges are checked by
SamplingParams, whose messages also name the field. Unknown fields are ignored, as OpenAI
does. Known OpenAI features shardlm does not implement (suffix, audio output, non-text
content parts, ...) are refused with a 400 naming the field rather than silently ignored,
since ignoring them would change the output the client asked for. The legacy functions API
is served as the tools it stands for (legacy_functions.py).
Integers may be written as integral floats (``"n": 2.0``): JSON Schema, and so OpenAI's
published spec, counts 2.0 as an integer.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    model_validator,
)

from shardlm.engine.sampling_params import SamplingParams
from shardlm.entrypoints.openai.legacy_functions import as_tools
from shardlm.entrypoints.openai.structured import structured_param, structured_spec
from shardlm.entrypoints.openai.tool_definitions import ToolError

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


def _whole(value: Any) -> Any:
    """2.0 → 2: an integral float is an integer in JSON Schema (bools and strings stay
    refused, as StrictInt refuses them)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# An integer as OpenAI takes one: 2 or 2.0, not 2.5, "2" or true.
WholeInt = Annotated[StrictInt, BeforeValidator(_whole)]

# OpenAI's top_p 0 means "only the most likely token"; the sampler's nucleus needs a positive
# mass, and any mass below the top token's probability keeps exactly that token.
SMALLEST_TOP_P = 1e-9


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class SamplingFields(BaseModel):
    """What both endpoints share. Defaults are OpenAI's; None means "the default"."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: WholeInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: WholeInt | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extensions, which clients of vLLM and SGLang send.
    top_k: WholeInt | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = False
    stop_token_ids: list[WholeInt] | None = None
    skip_special_tokens: bool | None = True
    prompt_logprobs: WholeInt | None = None
    min_tokens: WholeInt | None = None
    allowed_token_ids: list[WholeInt] | None = None
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

    def structured(self):
        """The request's StructuredOutputs (None: free text); chat's tool_choice may set
        its own instead."""
        return structured_spec(self.response_format, self.structured_outputs)

    def sampling_params(
        self,
        max_tokens: int | None,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
        structured_outputs: Any = None,
    ) -> SamplingParams:
        """The engine's parameters (max_tokens None: up to the context limit); a ValueError
        names the field (answered as a 400). ``structured_outputs``: a spec that replaces the
        request's own (tool_choice required or named)."""
        top_p = 1.0 if self.top_p is None else self.top_p
        seed = self.seed
        if seed is not None and seed < 0:  # OpenAI's seeds are any int64, the engine's >= 0
            seed %= 2**63
        return SamplingParams(
            n=self.num_choices,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=SMALLEST_TOP_P if top_p == 0 else top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=seed,
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
            structured_outputs=structured_outputs or self.structured(),
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
PromptInput = StrictStr | list[StrictStr] | list[WholeInt] | list[list[WholeInt]]


class CompletionRequest(SamplingFields):
    # Required; null (OpenAI's default, "<|endoftext|>"): as from the start of a document.
    prompt: PromptInput | None
    max_tokens: WholeInt | None = 16
    logprobs: WholeInt | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: WholeInt | None = None

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
        if p is None:
            return [""]  # the tokenizer's BOS, if it adds one: the start of a document
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt must not be empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # one prompt of token ids
        return list(p)


# -- chat messages --
# Content parts OpenAI defines that carry no text: shardlm serves text-only models.
MEDIA_PARTS = ("image_url", "input_audio", "file")
ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class ContentPart(BaseModel):
    """One part of a message's content; its type is checked by ``ChatMessage`` so that a
    refused one is named (messages.i.content.j.type) rather than failing a union."""

    model_config = ConfigDict(extra="allow")

    type: StrictStr
    text: StrictStr | None = None
    refusal: StrictStr | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: StrictStr
    # OpenAI's is a JSON string; Hugging Face's documented form, which some clients send, a dict.
    arguments: StrictStr | dict[str, Any]


class MessageToolCall(BaseModel):
    """A call in an assistant message of the history."""

    model_config = ConfigDict(extra="ignore")

    id: StrictStr | None = None
    type: StrictStr = "function"
    function: FunctionCall | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    function_call: FunctionCall | None = None  # legacy: an assistant's one call
    tool_call_id: StrictStr | None = None
    # vLLM's: an earlier answer's reasoning, which templates such as Qwen3's read.
    reasoning_content: StrictStr | None = None

    def as_template_dict(self, index: int = 0) -> dict[str, Any]:
        """The message as chat templates take it (transformers' form): "developer" as
        "system" and the legacy "function" result as a "tool" one, the names templates know;
        text parts joined; an assistant's legacy ``function_call`` as a call; a call's
        arguments as a dict when they are a JSON object, as Hugging Face templates expect
        (most write them with ``| tojson``). A refused part is a 400 naming it
        (``messages.{index}...``)."""
        where = f"messages.{index}"
        role = {"developer": "system", "function": "tool"}.get(self.role, self.role)
        out: dict[str, Any] = {"role": role, "content": self._text(where)}
        if self.name is not None:
            out["name"] = self.name
        if self.role == "tool":
            if self.tool_call_id is None:
                raise APIError(
                    400, f"{where}.tool_call_id: a tool message needs one", f"{where}.tool_call_id"
                )
            out["tool_call_id"] = self.tool_call_id
        calls = list(self.tool_calls or [])
        if self.function_call is not None:  # the legacy form of one call
            calls.append(MessageToolCall(type="function", function=self.function_call))
        if calls and self.role == "assistant":
            out["tool_calls"] = [
                _template_call(c, f"{where}.tool_calls.{j}") for j, c in enumerate(calls)
            ]
        if self.reasoning_content is not None and self.role == "assistant":
            out["reasoning_content"] = self.reasoning_content
        return out

    def _text(self, where: str) -> str:
        content = self.content
        if content is None:
            return ""  # an assistant message with only tool_calls
        if isinstance(content, str):
            return content
        texts = []
        for j, part in enumerate(content):
            at = f"{where}.content.{j}"
            if part.type in MEDIA_PARTS:
                raise APIError(
                    400,
                    f"{at}.type: {part.type!r} content parts are not supported by shardlm, "
                    "which serves text-only models; send 'text' parts",
                    f"{at}.type",
                )
            allowed = ("text", "refusal") if self.role == "assistant" else ("text",)
            if part.type not in allowed:
                raise APIError(
                    400,
                    f"{at}.type: {part.type!r} is not a content part type for a {self.role} "
                    f"message; use {' or '.join(repr(a) for a in allowed)}",
                    f"{at}.type",
                )
            text = part.text if part.type == "text" else part.refusal
            if text is None:
                field = "text" if part.type == "text" else "refusal"
                raise APIError(400, f"{at}.{field}: a {part.type} part needs one", f"{at}.{field}")
            texts.append(text)
        return "".join(texts)


def _template_call(call: MessageToolCall, where: str) -> dict[str, Any]:
    if call.type != "function" or call.function is None:
        raise APIError(
            400,
            f"{where}.type: only 'function' tool calls are supported by shardlm "
            f"(got {call.type!r}{'' if call.function else ' without a function'})",
            f"{where}.type",
        )
    arguments: Any = call.function.arguments
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            arguments = parsed
    out: dict[str, Any] = {
        "type": "function",
        "function": {"name": call.function.name, "arguments": arguments},
    }
    if call.id is not None:
        out["id"] = call.id
    return out


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: WholeInt | None = None
    max_completion_tokens: WholeInt | None = None
    logprobs: bool | None = False
    top_logprobs: WholeInt | None = None
    add_generation_prompt: bool | None = True
    # Tools (entrypoints/openai/tool_parsers.py); checked by validation.check_tools.
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    # vLLM's: extra variables for the chat template (enable_thinking, ...).
    chat_template_kwargs: dict[str, Any] | None = None
    # The legacy functions API: served as tools (legacy_functions.py).
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
    # Refused by name: audio output.
    audio: Any = None
    modalities: list[Any] | None = None

    @model_validator(mode="after")
    def _functions_as_tools(self) -> ChatCompletionRequest:
        """functions / function_call as the tools / tool_choice they stand for, so that
        everything reading the tools (the template, tool_mode, the forcing grammar) serves
        them as tools; at most one call (the legacy answer has room for one). A malformed
        or conflicting legacy field is a 400 naming it (``functions.0.name``)."""
        if self.functions is None and self.function_call is None:
            return self
        if self.parallel_tool_calls:
            raise APIError(
                400,
                "parallel_tool_calls: the legacy functions API answers one call; send tools "
                "for parallel calls",
                "parallel_tool_calls",
            )
        try:
            self.tools, self.tool_choice = as_tools(
                self.functions, self.function_call, self.tools, self.tool_choice
            )
        except ToolError as e:
            raise APIError(400, str(e), e.param) from None
        self.parallel_tool_calls = False
        return self

    @property
    def legacy_functions(self) -> bool:
        """Whether the request came in the legacy functions API (and is answered in it)."""
        return self.functions is not None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.audio is not None or any(m != "text" for m in self.modalities or []):
            field = "audio" if self.audio is not None else "modalities"
            raise APIError(
                400, f"{field}: shardlm generates text only (modalities ['text'])", field
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")

    def template_messages(self) -> list[dict[str, Any]]:
        """The messages as the chat template takes them (a 400 names a refused part)."""
        return [m.as_template_dict(i) for i, m in enumerate(self.messages)]

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
