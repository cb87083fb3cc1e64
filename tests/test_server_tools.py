"""Tools, reasoning and OpenAI's message forms in /v1/chat/completions (issue 21).

- Rendering: a tool conversation in the published Qwen2.5/Hermes template format (written
  here) renders through the server's path exactly as transformers' apply_chat_template
  renders it; chat_template_kwargs and --chat-template reach the template.
- Requests: every refusal is a 400 naming the field; OpenAI's integer-valued floats pass.
- Output: streamed deltas join to the non-streamed message (reasoning, content, calls), for
  every way of cutting the text; in-process over a scripted engine, and over a real socket.
- The built-in model under tool_choice "required" / a named function: 100 of 100 sampled
  calls valid against their schema (the engine directly, with the server's SamplingParams).
- A round trip with the official openai client: call → tool message → answer.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random

import httpx
import jsonschema
import pytest

from shardlm.byte_tokenizer import build_byte_level_tokenizer
from shardlm.engine.outputs import CompletionOutput, RequestOutput
from shardlm.engine.sampling_params import SamplingParams
from shardlm.entrypoints.openai.chat_output import ChatOutput
from shardlm.entrypoints.openai.engine_client import RequestStream
from shardlm.entrypoints.openai.protocol import APIError, ChatCompletionRequest, CompletionRequest
from shardlm.entrypoints.openai.reasoning import REASONING_PARSERS
from shardlm.entrypoints.openai.server import build_app
from shardlm.entrypoints.openai.server_config import (
    REASONING_PARSERS as REASONING_CHOICES,
)
from shardlm.entrypoints.openai.server_config import TOOL_CALL_PARSERS, ServerConfig
from shardlm.entrypoints.openai.serving_chat import chat_params
from shardlm.entrypoints.openai.tool_parsers import TOOL_PARSERS, seeded_call_ids
from shardlm.entrypoints.openai.validation import parse_request, render_chat
from shardlm.tokenizer import Tokenizer
from tests.test_server_serving import FakeEngine

# The published Qwen2.5 / Hermes tool format: tools as JSON lines in <tools>, calls as
# <tool_call>{"name", "arguments"}</tool_call>, results as <tool_response> in a user turn.
# `enable_thinking` false writes an empty think block after the generation prompt (Qwen3's).
TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query."
    "\\n\\nYou are provided with function signatures within <tools></tools> XML tags:"
    "\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": '
    '<function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n\' }}'
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for call in message.tool_calls %}"
    "{%- if call.function is defined %}{%- set call = call.function %}{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + call.name + \'", "arguments": \' }}'
    "{{- call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["c", "f"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {
            "type": "object",
            "properties": {
                "flag": {"type": "boolean"},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
            },
            "required": ["flag"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, LOOKUP]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
}
CONVERSATION = [
    {"role": "developer", "content": "Be brief."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}],
    },
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "sunny"}]},
    {"role": "assistant", "content": "It is 18 degrees and sunny."},
    {"role": "user", "content": "Thanks"},
    # The legacy forms: an assistant's function_call, a "function" result.
    {"role": "assistant", "content": None, "function_call": {"name": "lookup", "arguments": "{}"}},
    {"role": "function", "name": "lookup", "content": "found"},
]
AUTO = ServerConfig(
    enable_auto_tool_choice=True, tool_call_parser="hermes", reasoning_parser="qwen3"
)


def chat(**fields) -> ChatCompletionRequest:
    fields.setdefault("messages", [{"role": "user", "content": "hi"}])
    return ChatCompletionRequest.model_validate(fields)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tool-template")
    build_byte_level_tokenizer(path, chat_template=TEMPLATE)
    return path


# -- rendering --
def test_tool_conversation_renders_as_transformers_renders_it(tokenizer_dir):
    from transformers import AutoTokenizer

    body = chat(messages=CONVERSATION, tools=TOOLS)
    ours = render_chat(Tokenizer.from_pretrained(tokenizer_dir), body)
    hf = AutoTokenizer.from_pretrained(tokenizer_dir).apply_chat_template(
        body.template_messages(), tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert ours == hf
    # The OpenAI arguments string reaches the template as the dict HF templates expect:
    # written once by tojson, not as a JSON string inside JSON.
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}' in ours
    assert "<tool_response>\n18 degrees\n</tool_response>\n<tool_response>\nsunny" in ours
    assert ours.startswith("<|im_start|>system\nBe brief.\n\n# Tools")  # developer → system
    assert json.dumps(WEATHER) in ours and "Weather in Paris?" in ours
    assert '{"name": "lookup", "arguments": {}}' in ours
    assert "<tool_response>\nfound\n</tool_response>" in ours
    assert ours.endswith("<|im_start|>assistant\n")


def test_chat_template_kwargs_and_override_reach_the_template(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = Tokenizer.from_pretrained(tokenizer_dir)
    body = chat(chat_template_kwargs={"enable_thinking": False})
    ours = render_chat(tok, body)
    hf = AutoTokenizer.from_pretrained(tokenizer_dir).apply_chat_template(
        body.template_messages(), tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert ours == hf and ours.endswith("<think>\n\n</think>\n\n")
    assert not render_chat(tok, chat()).endswith("</think>\n\n")
    with pytest.raises(APIError) as e:
        render_chat(tok, chat(chat_template_kwargs={"tools": []}))
    assert e.value.param == "chat_template_kwargs"
    # --chat-template: a file that replaces the checkpoint's template.
    file = tmp_path / "t.jinja"
    file.write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    override = ServerConfig(chat_template=str(file)).chat_template_text()
    assert render_chat(tok, chat(), override) == "[user]hi"
    # A template's own operations on a request's variables fail as the request's fault.
    file.write_text('{{ "Today: " + date_string }}')
    concat = ServerConfig(chat_template=str(file)).chat_template_text()
    with pytest.raises(APIError) as e:
        render_chat(tok, chat(chat_template_kwargs={"date_string": 5}), concat)
    assert e.value.status == 400 and "TypeError" in e.value.message
    # A file that is not UTF-8 is refused before the server starts.
    file.write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(ValueError, match="chat_template"):
        ServerConfig(chat_template=str(file))


# -- requests --
BAD = [
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        },
        "messages.0.content.0.type",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "input_audio"}],
                },
            ]
        },
        "messages.1.content.1.type",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "file", "file": {}}]}]},
        "messages.0.content.0.type",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}]},
        "messages.0.content.0.type",
    ),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0.text"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
    (
        {
            "messages": [
                {"role": "assistant", "tool_calls": [{"id": "c", "type": "custom", "custom": {}}]}
            ]
        },
        "messages.0.tool_calls.0.type",
    ),
    # The legacy functions API is served as tools (tests/test_server_legacy_functions.py).
    ({"functions": [{"name": "bad name"}]}, "functions.0.name"),
    ({"functions": [{"name": "f"}]}, "function_call"),  # auto, without the flags
    ({"function_call": "auto"}, "function_call"),  # without functions
    ({"audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"tools": []}, "tools"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools.0.type"),
    (
        {"tools": [WEATHER, {"type": "function", "function": {"name": "bad name"}}]},
        "tools.1.function.name",
    ),
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice.function.name",
    ),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS}, "tool_choice"),  # auto, without --enable-auto-tool-choice
    (
        {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
        "tool_choice",
    ),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"n": 2.5}, "n"),
    ({"n": True}, "n"),
    ({"max_tokens": "16"}, "max_tokens"),
]


@pytest.mark.parametrize("fields,param", BAD)
def test_refusals_are_400s_naming_the_field(tokenizer_dir, fields, param):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    with pytest.raises(APIError) as info:
        body = parse_request(
            json.dumps({"messages": [{"role": "user", "content": "x"}], **fields}).encode(),
            ChatCompletionRequest,
        )
        body.refuse_unsupported()
        chat_params(body, ServerConfig())
        render_chat(tok, body)
    assert info.value.status == 400 and info.value.param == param, info.value.message
    assert info.value.message.startswith(param) or param in (
        "audio",
        "modalities",
        "tool_choice",
    )


def test_auto_refusal_names_the_flags():
    with pytest.raises(APIError) as info:
        chat_params(chat(tools=TOOLS, tool_choice="auto"), ServerConfig())
    assert "--enable-auto-tool-choice" in info.value.message
    assert "--tool-call-parser" in info.value.message
    params, output = chat_params(chat(tools=TOOLS), AUTO)
    assert output.mode == "auto" and params.structured_outputs is None


def test_integer_valued_floats_are_integers():
    body = chat(n=2.0, max_tokens=16.0, seed=3.0, top_logprobs=2.0, logprobs=True)
    params, _ = chat_params(body, ServerConfig())
    assert (params.n, params.max_tokens, params.seed, params.logprobs) == (2, 16, 3, 2)
    assert type(params.n) is int and type(params.max_tokens) is int
    completion = CompletionRequest.model_validate({"prompt": [1.0, 2.0], "max_tokens": 4.0})
    assert completion.prompts() == [[1, 2]] and completion.max_tokens == 4
    assert CompletionRequest.model_validate({"prompt": None}).prompts() == [""]


def test_top_p_zero_keeps_only_the_most_likely_token():
    params, _ = chat_params(chat(top_p=0), ServerConfig())
    assert 0 < params.top_p < 1e-6


def test_forced_choices_set_the_grammar():
    params, output = chat_params(
        chat(tools=TOOLS, tool_choice="required", parallel_tool_calls=False), ServerConfig()
    )
    schema = params.structured_outputs.json
    assert output.mode == "required" and schema["maxItems"] == 1
    named = {"type": "function", "function": {"name": "lookup"}}
    params, output = chat_params(chat(tools=TOOLS, tool_choice=named), ServerConfig())
    assert output.mode == "named" and params.structured_outputs.json == SCHEMAS["lookup"]
    params, output = chat_params(chat(tools=TOOLS, tool_choice="none"), ServerConfig())
    assert output.mode == "none" and params.structured_outputs is None


def test_parser_names_match_the_server_options():
    assert set(TOOL_CALL_PARSERS) == set(TOOL_PARSERS)
    assert set(REASONING_CHOICES) == set(REASONING_PARSERS)


# -- output: streamed deltas join to the message --
def join(deltas: list[dict]) -> dict:
    """The message a client rebuilds from streamed deltas."""
    content = reasoning = None
    calls: dict[int, dict] = {}
    for d in deltas:
        if "content" in d:
            content = (content or "") + d["content"]
        if "reasoning_content" in d:
            reasoning = (reasoning or "") + d["reasoning_content"]
        for piece in d.get("tool_calls", []):
            call = calls.setdefault(piece["index"], {"function": {"arguments": ""}})
            if "id" in piece:
                call.update(id=piece["id"], type=piece["type"])
                call["function"]["name"] = piece["function"]["name"]
            call["function"]["arguments"] += piece["function"]["arguments"]
    return {"content": content, "reasoning_content": reasoning, "tool_calls": list(calls.values())}


def streamed(output: ChatOutput, text: str, cuts: list[int], reason: str) -> tuple[dict, str]:
    stream = output.stream()
    deltas = stream.start()
    bounds = [0, *cuts, len(text)]
    for a, b in itertools.pairwise(bounds):
        deltas += stream.feed(text[a:b])
    tail, final = stream.finish(reason)
    return join(deltas + tail), final


OUTPUTS = [
    (
        AUTO,
        "auto",
        None,
        "<think>\nplan it\n</think>\n\nLet me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "lookup", "arguments": {"flag": true}}\n</tool_call>',
        "stop",
    ),
    (AUTO, "auto", None, "<think>hm</think>No call here <tool_call> {broken", "stop"),
    (AUTO, "auto", None, "plain answer", "length"),
    (
        ServerConfig(),
        "named",
        {"type": "function", "function": {"name": "lookup"}},
        '{"flag": false, "tags": ["a"]}',
        "stop",
    ),
    (
        ServerConfig(),
        "named",
        {"type": "function", "function": {"name": "get_weather"}},
        '{"city": "Pa',
        "length",
    ),
    (
        ServerConfig(),
        "required",
        "required",
        '[{"name": "lookup", "parameters": {"flag": true}}, '
        '{"name": "get_weather", "parameters": {"city": "Ró", "unit": "f"}}]',
        "stop",
    ),
    (ServerConfig(), "required", "required", '[{"name": "lookup", "par', "length"),
    # Cut by a stop string: the partial call is no call, so no "tool_calls" either.
    (
        ServerConfig(),
        "named",
        {"type": "function", "function": {"name": "get_weather"}},
        '{"city": "Par',
        "stop",
    ),
]


def complete_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def seeded_output(config: ServerConfig, mode, choice, legacy: bool = False) -> ChatOutput:
    """How a choice of that mode is read, with ids seeded so two readings agree."""
    return ChatOutput(
        mode=mode,
        tools=tuple(TOOLS),
        tool_choice=choice,
        tool_parser=config.tool_call_parser,
        reasoning_parser=config.reasoning_parser,
        new_id=seeded_call_ids(7),
        legacy=legacy,
    )


@pytest.mark.parametrize("config,mode,choice,text,reason", OUTPUTS)
def test_streamed_deltas_join_to_the_message(config, mode, choice, text, reason):
    def output() -> ChatOutput:
        return seeded_output(config, mode, choice)

    message, final = output().message(text, reason)
    assert message["refusal"] is None and message["role"] == "assistant"
    calls = message.get("tool_calls", [])
    whole = all(complete_json(c["function"]["arguments"]) for c in calls)
    assert final == ("tool_calls" if calls and whole and reason == "stop" else reason)
    rng = random.Random(0)
    for cuts in [
        [],
        list(range(1, len(text))),
        *(sorted(rng.sample(range(1, len(text)), 5)) for _ in range(20)),
    ]:
        joined, streamed_final = streamed(output(), text, cuts, reason)
        assert streamed_final == final
        assert joined["tool_calls"] == calls
        assert (joined["content"] or "") == (message["content"] or "")
        assert joined["reasoning_content"] == message.get("reasoning_content")


def test_auto_reads_calls_and_reasoning():
    text = OUTPUTS[0][3]
    message, final = ChatOutput("auto", tuple(TOOLS), None, "hermes", "qwen3").message(text, "stop")
    assert final == "tool_calls" and message["reasoning_content"] == "plan it"
    assert message["content"] == "Let me check."
    args = [json.loads(c["function"]["arguments"]) for c in message["tool_calls"]]
    assert args == [{"city": "Paris", "unit": "c"}, {"flag": True}]
    assert all(
        c["id"].startswith("call_") and c["type"] == "function" for c in message["tool_calls"]
    )
    # Not a call: all content, finish_reason unchanged.
    message, final = ChatOutput("auto", tuple(TOOLS), None, "hermes").message(
        "x <tool_call>{", "stop"
    )
    assert (message["content"], final, "tool_calls" in message) == ("x <tool_call>{", "stop", False)


# -- in-process: the server's wiring over a scripted engine --
class ToolTokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode(errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True, **extra) -> str:
        return json.dumps([messages, sorted(extra)])


class ScriptedEngine(FakeEngine):
    """Every sequence generates ``pieces``, one delta each."""

    def __init__(self, pieces: list[str]) -> None:
        super().__init__()
        self.tokenizer = ToolTokenizer()
        self.max_model_len = 4096
        self.pieces = pieces

    async def add(self, request_id: str, prompt: dict, params: SamplingParams) -> RequestStream:
        self.added.append((request_id, prompt, params))
        outputs: asyncio.Queue = asyncio.Queue()
        for step, piece in enumerate(self.pieces):
            last = step == len(self.pieces) - 1
            ids = list(piece.encode())
            deltas = [
                CompletionOutput(j, piece, ids, "stop" if last else None) for j in range(params.n)
            ]
            outputs.put_nowait(
                RequestOutput(
                    request_id, prompt["prompt"], prompt["prompt_token_ids"], deltas, last
                )
            )
        return RequestStream(self, request_id, outputs)


def post(app, body: dict) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post("/v1/chat/completions", json=body)

    return asyncio.run(go())


def test_app_streams_reasoning_and_calls_as_its_answer_reads_them(monkeypatch):
    monkeypatch.delenv("SHARDLM_API_KEY", raising=False)
    text = OUTPUTS[0][3]
    pieces = [text[i : i + 7] for i in range(0, len(text), 7)]
    app = build_app(ScriptedEngine(pieces), AUTO, "fake")
    body = {"messages": CONVERSATION, "tools": TOOLS, "n": 2}
    r = post(app, body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["finish_reason"] for c in choices] == ["tool_calls", "tool_calls"]
    message = choices[0]["message"]
    assert message["reasoning_content"] == "plan it" and message["content"] == "Let me check."
    r = post(app, {**body, "stream": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    for index in (0, 1):
        deltas = [e["choices"][0]["delta"] for e in events if e["choices"][0]["index"] == index]
        assert deltas[0] == {"role": "assistant", "content": ""}
        joined = join(deltas[1:])
        assert [c["function"] for c in joined["tool_calls"]] == [
            c["function"] for c in message["tool_calls"]
        ]
        assert (joined["content"], joined["reasoning_content"]) == ("Let me check.", "plan it")
        reasons = [
            e["choices"][0]["finish_reason"] for e in events if e["choices"][0]["index"] == index
        ]
        assert reasons[-1] == "tool_calls" and set(reasons[:-1]) == {None}
    # Without the flags, tools (auto by default) are a 400 naming tool_choice.
    r = post(build_app(ScriptedEngine(pieces), ServerConfig(), "fake"), body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


def test_a_parser_marker_that_is_a_special_token_survives_decoding(tmp_path, monkeypatch):
    """Mistral's [TOOL_CALLS] is a special token of its tokenizer: decoded with
    skip_special_tokens (the API's default) it vanishes and every call would come back as
    content. The server decodes requests that parser reads with special tokens kept (as vLLM
    does), and only those."""
    monkeypatch.delenv("SHARDLM_API_KEY", raising=False)
    build_byte_level_tokenizer(tmp_path, chat_template=TEMPLATE)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "additional_special_tokens": ["[TOOL_CALLS]"]}))
    tok = Tokenizer.from_pretrained(tmp_path)
    think_dir = tmp_path / "think"  # a tokenizer with <think> and </think> special instead
    build_byte_level_tokenizer(think_dir, chat_template=TEMPLATE)
    config_file = think_dir / "tokenizer_config.json"
    specials = {"additional_special_tokens": ["<think>", "</think>"]}
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **specials}))
    think_tok = Tokenizer.from_pretrained(think_dir)
    ids = tok.encode('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}]', False)
    parser = TOOL_PARSERS["mistral"](TOOLS)
    assert parser.parse(tok.decode(ids)).tool_calls == []  # the marker is gone
    kept = parser.parse(tok.decode(ids, skip_special_tokens=False)).tool_calls
    assert [(c.name, json.loads(c.arguments)) for c in kept] == [("get_weather", {"city": "Oslo"})]
    named = {"type": "function", "function": {"name": "get_weather"}}
    cases = [  # (tokenizer, parser, tool_choice, reasoning parser, skip_special_tokens sent)
        (tok, "mistral", "auto", None, False),
        (tok, "mistral", "none", None, True),  # nothing parses calls
        (tok, "mistral", "required", None, True),  # the grammar's JSON, not the parser's
        (tok, "mistral", named, None, True),
        (tok, "hermes", "auto", None, True),  # <tool_call> is plain text in this tokenizer
        (tok, "hermes", "auto", "qwen3", True),  # so are <think> and </think>
        (think_tok, "hermes", "auto", "qwen3", False),  # not in this one
        (think_tok, "hermes", "none", "qwen3", False),  # reasoning is read without tools too
        (think_tok, "hermes", "required", "qwen3", True),  # a forced call has no reasoning
        (think_tok, "hermes", "auto", None, True),
    ]

    async def compiled(spec) -> None:  # FakeEngine has no grammar compiler; none is needed
        return None

    for tokenizer, name, choice, reasoning, skip in cases:
        engine = FakeEngine()
        engine.tokenizer, engine.max_model_len = tokenizer, 4096  # the tools render long
        engine.compile = compiled
        served = ServerConfig(
            enable_auto_tool_choice=True, tool_call_parser=name, reasoning_parser=reasoning
        )
        body = {"messages": CONVERSATION, "tools": TOOLS, "tool_choice": choice}
        r = post(build_app(engine, served, "fake"), body)
        assert r.status_code == 200, r.text
        assert engine.added[-1][2].skip_special_tokens is skip, (name, choice, reasoning)
    # Without a tokenizer (skip_tokenizer_init) the app still starts; chat is a 400 then.
    engine = FakeEngine()
    engine.tokenizer = None
    served = ServerConfig(enable_auto_tool_choice=True, tool_call_parser="mistral")
    r = post(build_app(engine, served, "fake"), {"messages": CONVERSATION})
    assert r.status_code == 400, r.text


# -- the built-in model, sampled, under a forced choice --
@pytest.fixture(scope="module")
def builtin():
    from shardlm import LLM

    with LLM(device="cpu") as llm:
        yield llm


def test_forced_calls_from_the_builtin_model_are_always_valid(builtin):
    named = {"type": "function", "function": {"name": "get_weather"}}
    requests = [
        chat(tools=TOOLS, tool_choice=named, temperature=1, n=100, seed=1, max_tokens=96),
        chat(
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=1,
            n=100,
            seed=2,
            max_tokens=96,
        ),
    ]
    built = [chat_params(body, ServerConfig()) for body in requests]
    prompts = [render_chat(builtin.tokenizer, body) for body in requests]
    results = builtin.generate(prompts, [params for params, _ in built])
    for (_, output), result in zip(built, results, strict=True):
        assert len(result.outputs) == 100
        for sample in result.outputs:
            message, reason = output.message(sample.text, sample.finish_reason)
            assert reason == "tool_calls", sample.text
            for call in message["tool_calls"]:
                name = call["function"]["name"]
                assert output.mode == "required" or name == "get_weather"
                jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])


# -- a real socket and the official client: call → tool message → answer --
@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    from tests.conftest import make_checkpoint
    from tests.test_server import Server

    path = tmp_path_factory.mktemp("tools-serve")
    make_checkpoint(path, "llama", {"max_position_embeddings": 2048})
    template = path / "tools.jinja"
    template.write_text(TEMPLATE)
    flags = ["--chat-template", str(template), "--enable-auto-tool-choice"]
    server = Server(path, *flags, "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3")
    yield server
    assert server.stop() == 0


def test_openai_client_round_trip(tool_server):
    client = tool_server.client()
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    greedy = dict(model="tiny", tools=TOOLS, temperature=0, max_tokens=160)
    r = client.chat.completions.create(messages=messages, tool_choice=named, **greedy)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.refusal is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["get_weather"])
    # Streamed: the same call, its name first, then its arguments.
    pieces = [
        c.choices[0].delta
        for c in client.chat.completions.create(
            messages=messages, tool_choice=named, stream=True, **greedy
        )
    ]
    calls = [p.tool_calls[0] for p in pieces if p.tool_calls]
    assert calls[0].function.name == "get_weather" and calls[0].id
    assert "".join(c.function.arguments for c in calls) == call.function.arguments
    # The call and its result go back; the model answers in text.
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"},
    ]
    answer = client.chat.completions.create(messages=messages, tool_choice="none", **greedy)
    assert isinstance(answer.choices[0].message.content, str)
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.prompt_tokens > r.usage.prompt_tokens  # the history was rendered


def test_tokenize_renders_messages_as_chat_completions_does(tool_server):
    """/tokenize with messages goes through --chat-template, tools and chat_template_kwargs,
    as /v1/chat/completions does: the same prompt tokens."""
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    body = {"messages": messages, "tools": TOOLS, "chat_template_kwargs": {"x": 1}}
    counted = tool_server.post("/tokenize", body).json()["count"]
    chat = {**body, "model": "tiny", "max_tokens": 1, "tool_choice": "none"}
    r = tool_server.post("/v1/chat/completions", chat)
    assert r.status_code == 200, r.text
    assert counted == r.json()["usage"]["prompt_tokens"]
    plain = tool_server.post("/tokenize", {"messages": messages}).json()["count"]
    assert plain < counted  # the tools were rendered
    bad = tool_server.post("/tokenize", {"messages": [{"role": "user", "content": 3}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("messages")
    bad = tool_server.post("/tokenize", {"messages": messages, "tools": [{"type": "function"}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tools.0.function"


def test_openapi_json_documents_the_request_bodies(monkeypatch):
    monkeypatch.delenv("SHARDLM_API_KEY", raising=False)
    app = build_app(ScriptedEngine(["x"]), ServerConfig(), "fake")

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/openapi.json")

    spec = asyncio.run(go()).json()
    schemas = spec["components"]["schemas"]
    for path, name in [
        ("/v1/chat/completions", "ChatCompletionRequest"),
        ("/v1/completions", "CompletionRequest"),
    ]:
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"] == {"$ref": f"#/components/schemas/{name}"}
    chat_body = schemas["ChatCompletionRequest"]
    assert {"messages", "tools", "tool_choice", "chat_template_kwargs"} <= set(
        chat_body["properties"]
    )
    assert "ChatMessage" in schemas and "prompt" in schemas["CompletionRequest"]["required"]
    # Validation is still the server's: a bad body is a 400 naming the field, not a 422.
    r = post(app, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content.0.type"
