"""Request validation as pure functions: no HTTP, no engine, so each rule is unit-tested
on its own (tests/test_server_validation.py).

Each check raises an APIError naming the offending field as this endpoint's client spelt it.
The engine's and SamplingParams' errors (ParamError) name the field as the Python API calls
it; ``Fields`` renames it for the endpoint (chat's ``max_tokens`` may be
``max_completion_tokens``, its prompt is ``messages``). The prompt checks are the engine's own
(shardlm/engine/prompts.py), so the server and the engine refuse the same prompts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from shardlm.engine import prompts
from shardlm.engine.sampling_params import SamplingParams
from shardlm.entrypoints.openai.chat_output import ToolMode
from shardlm.entrypoints.openai.protocol import APIError, ChatCompletionRequest, SamplingFields
from shardlm.entrypoints.openai.tool_definitions import ToolError, validate_tools
from shardlm.errors import ShardlmError

Model = TypeVar("Model", bound=BaseModel)

# pydantic names the member of a union it tried (prompt.str, ...): not a field the client knows.
_TYPE_TAGS = ("str", "int", "float", "bool", "list", "dict", "function", "union")


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> str: ...


# -- field names --
@dataclass(frozen=True)
class Fields:
    """How one endpoint's client names the Python API's fields, for errors."""

    rename: Mapping[str, str] = field(default_factory=dict)

    def __call__(self, name: str) -> str:
        return self.rename.get(name, name)

    @property
    def prompt(self) -> str:
        return self("prompt")

    @property
    def max_tokens(self) -> str:
        return self("max_tokens")


COMPLETION_FIELDS = Fields({"prompt_token_ids": "prompt"})


def chat_fields(max_tokens_field: str = "max_tokens") -> Fields:
    """Chat's names: ``max_tokens_field`` is the one the request used (max_completion_tokens
    or the older max_tokens)."""
    return Fields(
        {
            "max_tokens": max_tokens_field,
            "prompt": "messages",
            "prompt_token_ids": "messages",
            "logprobs": "top_logprobs",
        }
    )


def api_error(e: ValueError, fields: Fields) -> APIError:
    """A 400 for a refused value: the field is the error's ``param`` (a ParamError) renamed
    for this endpoint, none for a plain ValueError. A message that starts with the Python
    name gets the client's name instead."""
    message = str(e)
    param = getattr(e, "param", None)
    if not isinstance(param, str):
        return APIError(400, message)
    name = fields(param)
    if name != param and message.startswith(param + " "):
        message = name + message[len(param) :]
    return APIError(400, message, name)


@contextmanager
def refused_as_400(fields: Fields) -> Iterator[None]:
    """Turn a ValueError raised inside into ``api_error`` (for the engine's own checks)."""
    try:
        yield
    except ValueError as e:
        raise api_error(e, fields) from None


# -- the body --
def field_of(loc: tuple) -> str:
    """A pydantic error location as the client's field path (``messages.0.role``)."""
    parts = [str(p) for p in loc if str(p).split("[")[0].split("-")[0] not in _TYPE_TAGS]
    return ".".join(parts) or "body"


def first_bad_string(value: object, where: str = "") -> str | None:
    """The field holding a string that is not valid Unicode (a lone surrogate), if any."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
    elif isinstance(value, dict):
        for k, v in value.items():
            bad = first_bad_string(v, f"{where}.{k}" if where else str(k))
            if bad:
                return bad
    elif isinstance(value, list):
        for i, v in enumerate(value):
            bad = first_bad_string(v, f"{where}.{i}")
            if bad:
                return bad
    return None


def parse_request(raw: bytes, model: type[Model]) -> Model:
    """The body as ``model``; a 400 naming the first bad field otherwise."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, huge ints, depth
        raise APIError(400, f"request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}")
    bad = first_bad_string(data)
    if bad:
        raise APIError(400, f"{bad}: the string is not valid Unicode (a lone surrogate)", bad)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = field_of(first["loc"])
        got = first.get("input")
        shown = "an object" if isinstance(got, dict) else json.dumps(got)[:80]
        raise APIError(400, f"{where}: {first['msg']} (got {shown})", where) from None


def check_model(requested: str | None, served: str) -> None:
    """A request may omit the model; if it names one, it must be the one served."""
    if requested is not None and requested != served:
        raise APIError(
            404,
            f"the model {requested!r} does not exist; this server serves {served!r}",
            "model",
            "model_not_found",
        )


# -- the prompt --
def token_ids(ids: list, vocab_size: int, fields: Fields = COMPLETION_FIELDS) -> list[int]:
    """A prompt given as token ids, checked against the vocabulary (the engine's check)."""
    with refused_as_400(fields):
        return prompts.check_token_ids(ids, vocab_size, fields.prompt)


def encode_text(
    tokenizer: Tokenizer | None, text: str, fields: Fields = COMPLETION_FIELDS, **kwargs: Any
) -> list[int]:
    """A text prompt's token ids (``kwargs`` go to ``tokenizer.encode``)."""
    if tokenizer is None:
        raise APIError(400, "this server has no tokenizer: send token ids", fields.prompt)
    try:
        return tokenizer.encode(text, **kwargs)
    except (TypeError, ValueError) as e:
        raise APIError(400, f"the prompt could not be tokenized: {e}", fields.prompt) from None


# Template variables a request's chat_template_kwargs may not set: the server's own.
RESERVED_TEMPLATE_VARIABLES = (
    "messages",
    "tools",
    "documents",
    "add_generation_prompt",
    "chat_template",
    "tokenize",
)


def render_chat(
    tokenizer: Tokenizer | None, body: ChatCompletionRequest, chat_template: str | None = None
) -> str:
    """The messages (and tools) through the model's chat template, or ``chat_template``
    (--chat-template), with the request's chat_template_kwargs as extra variables."""
    if tokenizer is None:
        raise APIError(400, "this server has no tokenizer, so it cannot render chats")
    messages = body.template_messages()
    extra: dict[str, Any] = dict(body.chat_template_kwargs or {})
    reserved = sorted(set(extra) & set(RESERVED_TEMPLATE_VARIABLES))
    if reserved:
        raise APIError(
            400,
            f"chat_template_kwargs may not set {', '.join(reserved)} (the server sets "
            f"{', '.join(RESERVED_TEMPLATE_VARIABLES)})",
            "chat_template_kwargs",
        )
    if body.tools:
        extra["tools"] = body.tools
    if chat_template is not None:
        extra["chat_template"] = chat_template
    try:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=body.add_generation_prompt is not False, **extra
        )
    except ShardlmError as e:
        raise APIError(400, str(e), "messages") from None


# -- tools --
def _dotted(path: str) -> str:
    """tools[1].function.name → tools.1.function.name, as the other fields are named."""
    return re.sub(r"\[(\d+)\]", r".\1", path)


def check_tools(body: ChatCompletionRequest) -> None:
    """Malformed tools, tool_choice or parallel_tool_calls: a 400 naming the field."""
    try:
        validate_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
    except ToolError as e:
        param = _dotted(e.param)
        raise APIError(400, param + str(e)[len(e.param) :], param) from None


def tool_mode(body: ChatCompletionRequest, auto_enabled: bool, tool_parser: str | None) -> ToolMode:
    """How the request's tools shape its output; malformed tools (``check_tools``) and
    choices the server is not set up for are 400s naming the field. Without tool_choice,
    tools mean "auto" (OpenAI's default), which, as in vLLM, needs --enable-auto-tool-choice
    and --tool-call-parser. A legacy functions request (served as tools) has its errors
    name function_call."""
    check_tools(body)
    choice = body.tool_choice
    if not body.tools or choice == "none":
        return "none"
    if body.legacy_functions:
        field, given, instead = "function_call", "functions", '"none" or {"name": ...}'
    else:
        field, given, instead = "tool_choice", "tools", '"none", "required" or a named function'
    if choice in (None, "auto"):
        if not (auto_enabled and tool_parser):
            raise APIError(
                400,
                f'{field} "auto" (the default when {given} are given) needs the server '
                "started with --enable-auto-tool-choice and --tool-call-parser NAME; "
                f"send {field} {instead} otherwise",
                field,
            )
        return "auto"
    if body.response_format is not None or body.structured_outputs is not None:
        spec = "response_format" if body.response_format is not None else "structured_outputs"
        raise APIError(
            400,
            f"{field} {'required' if choice == 'required' else 'naming a function'} "
            f"constrains the output to a call; it cannot be combined with {spec}",
            field,
        )
    return "required" if choice == "required" else "named"


def check_context(
    num_tokens: int, max_tokens: int | None, max_model_len: int, fields: Fields
) -> None:
    """The prompt leaves room, and prompt + max_tokens fits the context (the engine's check,
    which names the endpoint's fields in its message)."""
    with refused_as_400(fields):
        prompts.check_context(
            num_tokens, max_tokens, max_model_len, fields.prompt, fields.max_tokens
        )


# -- admission and sampling --
def check_capacity(sequences: int, waiting: int, max_waiting: int) -> None:
    """A request that can never fit is a 400 on ``n``; one that cannot fit now is a 429."""
    if sequences > max_waiting:
        raise APIError(
            400,
            f"this request asks for {sequences} sequences (prompts × n); this server "
            f"takes at most {max_waiting} at once",
            "n",
        )
    if waiting + sequences > max_waiting:
        raise APIError(
            429,
            f"the server is busy: {waiting} sequences are waiting to start (limit "
            f"{max_waiting}); retry shortly",
            headers={"Retry-After": "1"},
        )


def sampling_params(
    body: SamplingFields,
    max_tokens: int | None,
    logprobs: int | None,
    fields: Fields,
    prompt_logprobs: int | None = None,
    structured_outputs: Any = None,
) -> SamplingParams:
    """The engine's parameters; SamplingParams' range checks answered as 400s.
    ``structured_outputs``: a grammar that replaces the request's own (a forced tool call)."""
    with refused_as_400(fields):
        return body.sampling_params(max_tokens, logprobs, prompt_logprobs, structured_outputs)
