"""The server's request validation and its options, as plain functions: no HTTP, no model.

Each check must name the field the way the endpoint's client spelt it (chat's prompt is
``messages``, its limit may be ``max_completion_tokens``, its logprobs count
``top_logprobs``), since OpenAI clients show ``error.param`` to their users.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

import pytest

from shardlm.engine.sampling_params import SamplingParams
from shardlm.entrypoints.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
)
from shardlm.entrypoints.openai.server_config import ServerConfig
from shardlm.entrypoints.openai.validation import (
    COMPLETION_FIELDS,
    api_error,
    chat_fields,
    check_capacity,
    check_context,
    check_model,
    encode_text,
    field_of,
    parse_request,
    render_chat,
    sampling_params,
    token_ids,
)
from shardlm.errors import ParamError, ShardlmError
from shardlm.options import (
    add_arguments,
    from_kwargs,
    kwargs_from,
    markdown_table,
    option_fields,
)

CHAT = chat_fields("max_completion_tokens")


def refused(fn, *args, **kwargs) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args, **kwargs)
    return info.value


class ByteTokenizer:
    """Enough of a tokenizer: one id per UTF-8 byte; remembers what it was asked."""

    def __init__(self, template_error: str | None = None) -> None:
        self.template_error = template_error
        self.calls: list[tuple] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.calls.append(("encode", text, add_special_tokens))
        if "\x00" in text:
            raise ValueError("NUL in text")
        return list(text.encode())

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        self.calls.append(("template", messages, add_generation_prompt))
        if self.template_error:
            raise ShardlmError(self.template_error)
        return "".join(f"<{m['role']}>{m['content']}" for m in messages)


# -- errors carry their field --
def test_param_error_is_renamed_for_the_endpoint_message_too():
    e = api_error(ParamError("max_tokens", "max_tokens must be an integer ≥ 1, got -2"), CHAT)
    assert (e.status, e.param) == (400, "max_completion_tokens")
    assert e.message == "max_completion_tokens must be an integer ≥ 1, got -2"
    e = api_error(ParamError("logprobs", "logprobs must be in [0, 20], got 25"), CHAT)
    assert e.param == "top_logprobs" and e.message.startswith("top_logprobs must")
    e = api_error(ParamError("prompt_token_ids", "bad ids"), COMPLETION_FIELDS)
    assert (e.param, e.message) == ("prompt", "bad ids")
    e = api_error(ParamError("temperature", "temperature must be ≥ 0"), CHAT)
    assert (e.param, e.message) == ("temperature", "temperature must be ≥ 0")


def test_a_plain_value_error_is_a_400_without_a_field():
    # The first word is a field name, but only ParamError.param counts now.
    e = api_error(ValueError("prompt has 900 tokens but the KV cache holds only 64"), CHAT)
    assert (e.status, e.param) == (400, None)
    assert e.body()["error"]["message"].startswith("prompt has 900 tokens")


# -- the body --
@pytest.mark.parametrize(
    "raw,param",
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b"{}", "prompt"),
        (b'{"prompt": "x", "temperature": "hot"}', "temperature"),
        (b'{"prompt": [1, true]}', "prompt"),
        (b'{"prompt": "\\ud800 lone"}', "prompt"),
        (b'{"prompt": "x", "stream_options": {"include_usage": "\\udfff"}}', None),
        (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", None),
        (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", None),
    ],
)
def test_a_bad_completion_body_is_a_400_naming_the_field(raw, param):
    e = refused(parse_request, raw, CompletionRequest)
    assert e.status == 400 and e.message
    if param is not None:
        assert e.param == param, e.message


def test_a_lone_surrogate_deep_inside_is_named_by_its_path():
    raw = json.dumps({"messages": [{"role": "user", "content": "ok"}, {"content": "\ud800"}]})
    e = refused(parse_request, raw.encode(), ChatCompletionRequest)
    assert e.param == "messages.1.content"


def test_a_wrong_chat_role_names_the_message_and_field():
    raw = b'{"messages": [{"role": "wizard", "content": "x"}]}'
    e = refused(parse_request, raw, ChatCompletionRequest)
    assert e.param == "messages.0.role" and "wizard" in e.message


def test_pydantic_union_tags_are_not_field_names():
    assert field_of(("prompt", "list[int]", 2)) == "prompt.2"
    assert field_of(("messages", 0, "content", "str")) == "messages.0.content"
    assert field_of(()) == "body"


def test_a_good_body_is_parsed_with_openai_defaults():
    body = parse_request(b'{"prompt": [[1, 2], [3]], "n": 2}', CompletionRequest)
    assert body.prompts() == [[1, 2], [3]] and body.num_choices == 2
    assert body.max_tokens == 16  # OpenAI's default for completions


def test_the_model_must_be_the_one_served_or_omitted():
    check_model(None, "tiny")
    check_model("tiny", "tiny")
    e = refused(check_model, "gpt-4", "tiny")
    assert (e.status, e.param, e.code) == (404, "model", "model_not_found")
    assert "'gpt-4'" in e.message and "'tiny'" in e.message


# -- the prompt: the engine's checks, the endpoint's names --
def test_token_ids_use_the_engine_vocabulary_check():
    assert token_ids([0, 5, 99], 100) == [0, 5, 99]
    for bad in ([1, 100], [-1], [True], [1.0]):
        e = refused(token_ids, bad, 100)
        assert (e.status, e.param) == (400, "prompt") and "[0, 100)" in e.message
    e = refused(token_ids, [], 100)
    assert e.param == "prompt" and "empty" in e.message
    assert refused(token_ids, [100], 100, CHAT).param == "messages"


def test_encode_text_needs_a_tokenizer_and_reports_its_failure():
    tok = ByteTokenizer()
    assert encode_text(tok, "ab", CHAT, add_special_tokens=False) == [97, 98]
    assert tok.calls == [("encode", "ab", False)]
    e = refused(encode_text, None, "ab")
    assert e.param == "prompt" and "token ids" in e.message
    e = refused(encode_text, tok, "a\x00", CHAT)
    assert e.param == "messages" and "NUL in text" in e.message


def test_render_chat_maps_developer_to_system_and_names_template_errors():
    tok = ByteTokenizer()
    body = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            ],
            "add_generation_prompt": False,
        }
    )
    assert render_chat(tok, body) == "<system>be brief<user>hi"
    assert tok.calls[0][2] is False
    e = refused(render_chat, ByteTokenizer(template_error="no chat_template"), body)
    assert (e.param, e.message) == ("messages", "no chat_template")
    assert refused(render_chat, None, body).status == 400


def test_context_check_names_prompt_or_limit_as_the_client_did():
    check_context(10, 6, 16, COMPLETION_FIELDS)  # exactly fits
    check_context(15, None, 16, COMPLETION_FIELDS)  # no limit: up to the context
    e = refused(check_context, 16, None, 16, COMPLETION_FIELDS)
    assert e.param == "prompt" and "16" in e.message
    e = refused(check_context, 20, 4, 16, CHAT)
    assert e.param == "messages" and e.message.startswith("messages has 20 tokens")
    e = refused(check_context, 10, 7, 16, COMPLETION_FIELDS)
    assert e.param == "max_tokens"
    assert all(str(n) in e.message for n in (16, 17, 10, 7)) and "lower max_tokens" in e.message
    e = refused(check_context, 10, 7, 16, CHAT)
    assert e.param == "max_completion_tokens" and "lower max_completion_tokens" in e.message
    e = refused(check_context, 10, 7, 16, chat_fields("max_tokens"))
    assert e.param == "max_tokens"


# -- admission and sampling --
def test_capacity_is_a_400_when_it_can_never_fit_and_a_429_when_busy():
    check_capacity(4, 0, 4)
    check_capacity(2, 2, 4)
    e = refused(check_capacity, 5, 0, 4)
    assert (e.status, e.param) == (400, "n") and "5 sequences" in e.message
    e = refused(check_capacity, 2, 3, 4)
    assert e.status == 429 and e.headers == {"Retry-After": "1"}
    assert e.body()["error"]["type"] == "rate_limit_error"


def test_sampling_params_errors_use_the_endpoint_names():
    body = CompletionRequest(prompt="x", temperature=-1)
    e = refused(sampling_params, body, body.max_tokens, body.logprobs, COMPLETION_FIELDS)
    assert e.param == "temperature"
    chat = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 25}
    )
    e = refused(sampling_params, chat, None, chat.logprobs_k, CHAT)
    assert e.param == "top_logprobs" and e.message.startswith("top_logprobs")
    for field in ("max_tokens", "max_completion_tokens"):
        chat = ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "x"}], field: -2}
        )
        fields = chat_fields(chat.max_tokens_field)
        e = refused(sampling_params, chat, chat.requested_max_tokens, None, fields)
        assert e.param == field and e.message.startswith(field)


def test_sampling_params_of_a_good_request():
    body = CompletionRequest(prompt="x", n=3, top_k=5, stop="!", seed=4, logprobs=2)
    p = sampling_params(body, 7, body.logprobs, COMPLETION_FIELDS)
    assert isinstance(p, SamplingParams)
    assert (p.n, p.top_k, p.stop, p.seed, p.max_tokens, p.logprobs) == (3, 5, ["!"], 4, 7, 2)
    assert p.temperature == 1.0 and p.top_p == 1.0  # OpenAI's defaults


# -- ServerConfig --
def test_server_config_defaults_and_immutability():
    c = ServerConfig()
    assert (c.host, c.port, c.served_model_name, c.api_key) == ("127.0.0.1", 8000, None, None)
    assert (c.max_waiting, c.shutdown_timeout) == (1024, 10.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.port = 1  # type: ignore[misc]
    assert [f.name for f in option_fields(ServerConfig)] == [
        "host",
        "port",
        "served_model_name",
        "api_key",
        "max_waiting",
        "shutdown_timeout",
        "tool_call_parser",
        "enable_auto_tool_choice",
        "reasoning_parser",
        "chat_template",
    ]


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"port": 65536}, "port"),
        ({"port": -1}, "port"),
        ({"port": True}, "port"),
        ({"max_waiting": 0}, "max_waiting"),
        ({"shutdown_timeout": -0.5}, "shutdown_timeout"),
        ({"shutdown_timeout": float("nan")}, "shutdown_timeout"),
        ({"host": 127}, "host"),
        ({"api_key": 5}, "api_key"),
        ({"tool_call_parser": "granite"}, "tool_call_parser"),
        ({"reasoning_parser": "o1"}, "reasoning_parser"),
        ({"chat_template": "/no/such/template.jinja"}, "chat_template"),
        ({"enable_auto_tool_choice": True}, "enable_auto_tool_choice"),  # without a parser
    ],
)
def test_server_config_refuses_bad_values_naming_the_option(kwargs, param):
    with pytest.raises(ParamError) as info:
        ServerConfig(**kwargs)
    assert info.value.param == param and param in str(info.value)


def test_server_config_from_flags_and_keywords():
    parser = argparse.ArgumentParser()
    add_arguments(parser, ServerConfig)
    argv = ["--port", "0", "--served-model-name", "m", "--max-waiting", "3"]
    args = parser.parse_args([*argv, "--shutdown-timeout", "2.5"])
    kwargs = kwargs_from(args, ServerConfig)
    assert kwargs == {
        "port": 0,
        "served_model_name": "m",
        "max_waiting": 3,
        "shutdown_timeout": 2.5,
    }
    c = from_kwargs(ServerConfig, kwargs, "shardlm serve")
    assert (c.port, c.served_model_name, c.max_waiting, c.host) == (0, "m", 3, "127.0.0.1")
    with pytest.raises(ParamError, match="did you mean max_waiting"):
        from_kwargs(ServerConfig, {"max_wating": 3}, "shardlm serve")
    with pytest.raises(ParamError, match="port must be an integer in \\[0, 65535\\]"):
        from_kwargs(
            ServerConfig, kwargs_from(parser.parse_args(["--port", "70000"]), ServerConfig), "x"
        )


def test_server_config_documents_every_option():
    table = markdown_table(ServerConfig)
    for f in option_fields(ServerConfig):
        assert f"| `{f.name}` | `{f.flag}` |" in table
    assert "$SHARDLM_API_KEY" in table


def test_server_config_imports_without_the_serve_extra():
    code = (
        "import sys\n"
        "for m in ('fastapi', 'uvicorn', 'pydantic', 'starlette', 'prometheus_client'):\n"
        "    sys.modules[m] = None\n"
        "import argparse\n"
        "from shardlm.entrypoints.openai.server_config import ServerConfig\n"
        "from shardlm.options import add_arguments, kwargs_from\n"
        "p = argparse.ArgumentParser(); add_arguments(p, ServerConfig)\n"
        "print(kwargs_from(p.parse_args(['--port', '9']), ServerConfig))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "{'port': 9}"
