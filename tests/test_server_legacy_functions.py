"""OpenAI's legacy functions API on /v1/chat/completions: ``functions`` / ``function_call``
served as the tools they stand for, answered in the legacy shape.

- Mapping: functions ≡ tools (the same rendered prompt, the same grammar and SamplingParams
  for a named call, the same modes), at most one call.
- Refusals: every malformed or conflicting legacy field is a 400 naming it.
- Output: the message's ``function_call`` and finish_reason "function_call"; streamed,
  ``delta.function_call`` (name, then arguments) joins to the message, for every way of
  cutting the text; answers valid against OpenAI's response schemas (when ../shared has
  the spec).
- The built-in model under a named function_call: every sampled call valid.
- The official openai client: functions → function_call → a "function" message → answer.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from pathlib import Path

import jsonschema
import pytest

from shardlm.entrypoints.openai.chat_output import ChatOutput
from shardlm.entrypoints.openai.protocol import APIError
from shardlm.entrypoints.openai.server import build_app
from shardlm.entrypoints.openai.server_config import ServerConfig
from shardlm.entrypoints.openai.serving_chat import chat_params
from shardlm.entrypoints.openai.validation import render_chat
from shardlm.tokenizer import Tokenizer
from tests import test_server_tools as tools_tests
from tests.test_server_tools import (
    AUTO,
    OUTPUTS,
    SCHEMAS,
    TOOLS,
    ScriptedEngine,
    chat,
    join,
    post,
    seeded_output,
)

# The fixtures of the tools tests, shared (module-scoped: one each for this module).
builtin = tools_tests.builtin
tool_server = tools_tests.tool_server
tokenizer_dir = tools_tests.tokenizer_dir

FUNCTIONS = [t["function"] for t in TOOLS]
WEATHER_FN, LOOKUP_FN = FUNCTIONS
USER = [{"role": "user", "content": "Weather in Paris?"}]
WEATHER_ARGS = '{"city": "Paris", "unit": "c"}'
SPEC = Path(__file__).resolve().parents[2] / "shared" / "openai-openapi" / "openapi.json"


class GrammarEngine(ScriptedEngine):
    """The scripted engine, taking a forced call's grammar as compiled (its text is
    scripted, not sampled)."""

    async def compile(self, spec) -> None:
        self.compiled = spec


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


# -- the mapping --
def test_functions_render_and_sample_as_the_tools_they_stand_for(tokenizer_dir):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    cases = [  # (legacy fields, tools fields, server, mode)
        ({"function_call": {"name": "lookup"}}, {"tool_choice": named("lookup")}, None, "named"),
        ({"function_call": "none"}, {"tool_choice": "none"}, None, "none"),
        ({"function_call": "auto"}, {"tool_choice": "auto"}, AUTO, "auto"),
        ({}, {}, AUTO, "auto"),  # functions without function_call: auto, as OpenAI
    ]
    for legacy_fields, tools_fields, config, mode in cases:
        config = config or ServerConfig()
        legacy = chat(messages=USER, functions=FUNCTIONS, **legacy_fields)
        tools = chat(messages=USER, tools=TOOLS, parallel_tool_calls=False, **tools_fields)
        assert legacy.legacy_functions and not tools.legacy_functions
        assert render_chat(tok, legacy) == render_chat(tok, tools)
        assert json.dumps(LOOKUP_FN) in render_chat(tok, legacy)  # the template saw them
        legacy_params, legacy_output = chat_params(legacy, config)
        tools_params, tools_output = chat_params(tools, config)
        assert dataclasses.asdict(legacy_params) == dataclasses.asdict(tools_params)
        assert legacy_output == dataclasses.replace(tools_output, legacy=True)
        assert legacy_output.mode == mode
    params, _ = chat_params(chat(functions=FUNCTIONS, function_call={"name": "lookup"}), AUTO)
    assert params.structured_outputs.json == SCHEMAS["lookup"]


# -- refusals --
BAD = [
    ({"functions": FUNCTIONS, "tools": TOOLS}, "functions"),
    ({"functions": FUNCTIONS, "function_call": "auto", "tool_choice": "auto"}, "function_call"),
    ({"function_call": "auto"}, "function_call"),
    ({"function_call": {"name": "lookup"}, "tools": TOOLS}, "function_call"),
    ({"functions": FUNCTIONS, "tool_choice": "required"}, "tool_choice"),
    ({"functions": []}, "functions"),
    ({"functions": [3]}, "functions.0"),
    ({"functions": [{"description": "no name"}]}, "functions.0.name"),
    ({"functions": [WEATHER_FN, {"name": "bad name"}]}, "functions.1.name"),
    ({"functions": [WEATHER_FN, WEATHER_FN]}, "functions.1.name"),
    ({"functions": [{"name": "f", "description": 3}]}, "functions.0.description"),
    ({"functions": [{"name": "f", "parameters": {"type": "array"}}]}, "functions.0.parameters"),
    ({"functions": FUNCTIONS, "function_call": "required"}, "function_call"),
    ({"functions": FUNCTIONS, "function_call": {"name": "nope"}}, "function_call.name"),
    ({"functions": FUNCTIONS, "function_call": {"nam": "lookup"}}, "function_call"),
    ({"functions": FUNCTIONS}, "function_call"),  # auto, without --enable-auto-tool-choice
    ({"functions": FUNCTIONS, "function_call": "auto"}, "function_call"),
    ({"functions": FUNCTIONS, "parallel_tool_calls": True}, "parallel_tool_calls"),
    (
        {
            "functions": FUNCTIONS,
            "function_call": {"name": "lookup"},
            "response_format": {"type": "json_object"},
        },
        "function_call",
    ),
]


@pytest.mark.parametrize("fields,param", BAD)
def test_refusals_are_400s_naming_the_legacy_field(monkeypatch, fields, param):
    monkeypatch.delenv("SHARDLM_API_KEY", raising=False)
    app = build_app(ScriptedEngine(["x"]), ServerConfig(), "fake")
    r = post(app, {"messages": USER, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(param), error
    assert "tools." not in error["message"] and "tool_choice." not in error["message"]


def test_refusals_quote_the_clients_names_as_written(monkeypatch):
    """The messages say "functions" where the tools' say "tools", without rewriting a
    function's own name that contains the word."""
    monkeypatch.delenv("SHARDLM_API_KEY", raising=False)
    app = build_app(ScriptedEngine(["x"]), ServerConfig(), "fake")
    twice = [{"name": "tools_x"}, {"name": "tools_x"}]
    error = post(app, {"messages": USER, "functions": twice}).json()["error"]
    assert error["message"] == "functions.1.name 'tools_x' is defined twice"
    fields = {"functions": [{"name": "f"}], "function_call": {"name": "tools"}}
    error = post(app, {"messages": USER, **fields}).json()["error"]
    assert error["message"] == "function_call.name 'tools' is not one of the functions"


def test_the_auto_refusal_names_the_flags_and_function_call():
    with pytest.raises(APIError) as info:
        chat_params(chat(functions=FUNCTIONS), ServerConfig())
    message = info.value.message
    assert message.startswith('function_call "auto"') and "--enable-auto-tool-choice" in message
    assert "--tool-call-parser" in message and "required" not in message


# -- output: the legacy shape, streamed deltas joining to the message --
def join_legacy(deltas: list[dict]) -> dict:
    """The message a legacy client rebuilds: content and reasoning as for tools, the one
    call's name from its first piece, its arguments from all of them."""
    call = None
    for d in deltas:
        assert "tool_calls" not in d
        if "function_call" in d:
            piece = d["function_call"]
            if call is None:
                call = {"name": piece["name"], "arguments": ""}
            else:
                assert "name" not in piece
            call["arguments"] += piece["arguments"]
    joined = join(deltas)
    return {
        "content": joined["content"],
        "reasoning_content": joined["reasoning_content"],
        "function_call": call,
    }


LEGACY_OUTPUTS = [  # (server, mode, tool_choice, text, engine's reason, first call's name)
    (AUTO, "auto", None, OUTPUTS[0][3], "stop", "get_weather"),  # two calls: the first
    (AUTO, "auto", None, "<think>hm</think>No call <tool_call> {broken", "stop", None),
    (ServerConfig(), "named", named("get_weather"), WEATHER_ARGS, "stop", "get_weather"),
    (ServerConfig(), "named", named("get_weather"), '{"city": "Pa', "length", "get_weather"),
    (ServerConfig(), "none", None, "plain answer", "stop", None),
]


@pytest.mark.parametrize("config,mode,choice,text,reason,name", LEGACY_OUTPUTS)
def test_streamed_deltas_join_to_the_legacy_message(config, mode, choice, text, reason, name):
    def output() -> ChatOutput:
        return seeded_output(config, mode, choice, legacy=True)

    message, final = output().message(text, reason)
    assert "tool_calls" not in message and message["refusal"] is None
    call = message.get("function_call")
    assert (call or {}).get("name") == name
    complete = call is not None and reason == "stop"
    assert final == ("function_call" if complete else reason)
    if mode == "auto" and call is not None:  # the first of the parser's calls, whole
        assert json.loads(call["arguments"]) == {"city": "Paris", "unit": "c"}
        assert message["content"] == "Let me check." and message["reasoning_content"] == "plan it"
    rng = random.Random(0)
    for cuts in [
        [],
        list(range(1, len(text))),
        *(sorted(rng.sample(range(1, len(text)), 5)) for _ in range(10)),
    ]:
        stream = output().stream()
        deltas = stream.start()
        for a, b in itertools.pairwise([0, *cuts, len(text)]):
            deltas += stream.feed(text[a:b])
        tail, streamed_final = stream.finish(reason)
        joined = join_legacy(deltas + tail)
        assert streamed_final == final
        assert joined["function_call"] == call
        assert (joined["content"] or "") == (message["content"] or "")
        assert joined["reasoning_content"] == message.get("reasoning_content")


def _nullable(node):
    """OpenAI's spec marks null as allowed with ``nullable: true`` (OpenAPI 3.0's keyword),
    which JSON Schema ignores: as an anyOf with null."""
    if isinstance(node, list):
        return [_nullable(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable(v) for k, v in node.items() if k != "nullable"}
    return {"anyOf": [out, {"type": "null"}]} if node.get("nullable") is True else out


@pytest.fixture(scope="module")
def spec_validate():
    """validate(instance, schema name) against OpenAI's spec; a no-op without ../shared."""
    if not SPEC.is_file():
        return lambda instance, name: None
    components = _nullable(json.loads(SPEC.read_text())["components"])

    def validate(instance: dict, name: str) -> None:
        schema = {"components": components, "$ref": f"#/components/schemas/{name}"}
        jsonschema.Draft202012Validator(schema).validate(instance)

    return validate


def test_app_answers_a_named_and_an_auto_call_as_function_call(monkeypatch, spec_validate):
    monkeypatch.delenv("SHARDLM_API_KEY", raising=False)
    cases = [  # (server, request fields, generated text, the message's content)
        (ServerConfig(), {"function_call": {"name": "get_weather"}}, WEATHER_ARGS, None),
        (AUTO, {}, OUTPUTS[0][3], "Let me check."),
    ]
    for config, fields, text, content in cases:
        pieces = [text[i : i + 5] for i in range(0, len(text), 5)]
        body = {"messages": USER, "functions": FUNCTIONS, "n": 2, **fields}
        r = post(build_app(GrammarEngine(pieces), config, "fake"), body)
        assert r.status_code == 200, r.text
        answer = r.json()
        spec_validate(answer, "CreateChatCompletionResponse")
        for choice in answer["choices"]:
            assert choice["finish_reason"] == "function_call"
            message = choice["message"]
            assert "tool_calls" not in message and message["content"] == content
            call = message["function_call"]
            assert call["name"] == "get_weather" and json.loads(call["arguments"]) == json.loads(
                WEATHER_ARGS
            )
        r = post(build_app(GrammarEngine(pieces), config, "fake"), {**body, "stream": True})
        events = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
        for event in events:
            spec_validate(event, "CreateChatCompletionStreamResponse")
        for index in (0, 1):
            mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == index]
            assert mine[0]["delta"] == {"role": "assistant", "content": ""}
            joined = join_legacy([c["delta"] for c in mine[1:]])
            message = answer["choices"][index]["message"]
            assert joined["function_call"] == message["function_call"]
            assert joined["content"] == content
            reasons = [c["finish_reason"] for c in mine]
            assert reasons[-1] == "function_call" and set(reasons[:-1]) == {None}


# -- the built-in model, sampled, under a named function_call --
def test_a_named_function_call_from_the_builtin_model_is_always_valid(builtin):
    body = chat(
        messages=USER,
        functions=FUNCTIONS,
        function_call={"name": "get_weather"},
        temperature=1,
        n=12,
        seed=5,
        max_tokens=96,
    )
    params, output = chat_params(body, ServerConfig())
    (result,) = builtin.generate([render_chat(builtin.tokenizer, body)], [params])
    assert len(result.outputs) == 12
    for sample in result.outputs:
        message, reason = output.message(sample.text, sample.finish_reason)
        assert reason == "function_call" and "tool_calls" not in message, sample.text
        assert message["function_call"]["name"] == "get_weather"
        arguments = json.loads(message["function_call"]["arguments"])
        jsonschema.validate(arguments, SCHEMAS["get_weather"])


# -- a real socket and the official client: function_call → "function" message → answer --
def test_openai_client_legacy_round_trip(tool_server):
    client = tool_server.client()
    greedy = dict(model="tiny", functions=FUNCTIONS, temperature=0, max_tokens=160)
    r = client.chat.completions.create(
        messages=USER, function_call={"name": "get_weather"}, **greedy
    )
    choice = r.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    call = choice.message.function_call
    assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), SCHEMAS["get_weather"])
    # Streamed: the same call, its name first, then its arguments.
    chunks = list(
        client.chat.completions.create(
            messages=USER, function_call={"name": "get_weather"}, stream=True, **greedy
        )
    )
    pieces = [c.choices[0].delta.function_call for c in chunks if c.choices[0].delta.function_call]
    assert pieces[0].name == "get_weather" and all(p.name is None for p in pieces[1:])
    assert "".join(p.arguments for p in pieces) == call.arguments
    assert chunks[-1].choices[0].finish_reason == "function_call"
    # The call and its result go back in the legacy message forms; the model answers in text.
    messages = [
        *USER,
        choice.message.model_dump(exclude_none=True),
        {"role": "function", "name": "get_weather", "content": "18 degrees"},
    ]
    answer = client.chat.completions.create(messages=messages, function_call="none", **greedy)
    assert isinstance(answer.choices[0].message.content, str)
    assert answer.choices[0].message.function_call is None
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.prompt_tokens > r.usage.prompt_tokens  # the history was rendered
