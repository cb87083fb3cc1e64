"""Tool-call parsers on hand-written outputs of each format, the streamed deltas equal to the
whole parse for every cut of the text, the forced-call schemas, and the request checks."""

from __future__ import annotations

import json
import random
import re

import pytest

from shardlm.entrypoints.openai.tool_parsers import (
    TOOL_PARSERS,
    ContentDelta,
    ToolCallDelta,
    ToolError,
    named_tool_schema,
    parse_forced,
    random_call_id,
    required_tools_schema,
    seeded_call_ids,
    validate_tools,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters
F = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
TOOLS = [WEATHER, TIME, F]

PARIS = '{"city": "Paris"}'
CALL_PARIS = '{"name": "get_weather", "arguments": {"city": "Paris"}}'

# (text, expected content, expected [(name, arguments)]); None as calls: all content.
HERMES = [
    (f"<tool_call>\n{CALL_PARIS}\n</tool_call>", None, [("get_weather", PARIS)]),
    (
        f'<tool_call>\n{CALL_PARIS}\n</tool_call>\n<tool_call>\n{{"name": "get_time", '
        '"arguments": {}}\n</tool_call>',
        None,
        [("get_weather", PARIS), ("get_time", "{}")],
    ),
    (
        f"Let me check.\n\n<tool_call>\n{CALL_PARIS}\n</tool_call>\n",
        "Let me check.",
        [("get_weather", PARIS)],
    ),
    (
        '<tool_call>{"name":"get_weather","arguments":{"city":"\\u00e9vian 東京",'
        '"unit":"celsius"}}</tool_call>',
        None,
        [("get_weather", '{"city": "évian 東京", "unit": "celsius"}')],
    ),
    ('<tool_call>\n{"name": "get_time"}\n</tool_call>', None, [("get_time", "{}")]),
    ("Just text, no call.  \n", "Just text, no call.  \n", None),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>', ..., None),
    ('<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>', ..., None),
    ('<tool_call>\n{"name": "get_weather", "arguments": "Paris"}\n</tool_call>', ..., None),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"t": NaN}}\n</tool_call>', ..., None),
    (
        '<tool_call>\n{"name": "get_weather", "arguments": {"c": "\\ud800"}}\n</tool_call>',
        ...,
        None,
    ),
    (f"Sure.\n<tool_call>\n{CALL_PARIS}\n", ..., None),  # cut off: no </tool_call>
    (f"<tool_call>\n{CALL_PARIS}\n</tool_call>\nDone.", ..., None),
    (f"<tool_call>{CALL_PARIS}</tool_call><tool_call>{{bad</tool_call>", ..., None),
    ("I like <tool_calls> and <tool", ..., None),
]

LLAMA3 = [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", PARIS)]),
    (
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Zürich"}}; '
        '{"name": "get_time", "parameters": {}}',
        None,
        [("get_weather", '{"city": "Zürich"}'), ("get_time", "{}")],
    ),
    (
        '\n {"name": "get_weather", "arguments": {"city": "Paris"}}\n',
        None,
        [("get_weather", PARIS)],
    ),
    ('Hello {"name": "get_weather", "parameters": {}}', ..., None),
    ('{"name": "get_weather", "parameters": {"city": "Paris"}} and more', ..., None),
    ('{"name": "nope", "parameters": {}}', ..., None),
    ('{"name": "get_weather", "parameters": ["Paris"]}', ..., None),
    ('{"name": "get_weather", "parameters": {"city": "Par', ..., None),
    ("<|python_tag|>print('hi')", ..., None),
    ("{}", ..., None),
]

MISTRAL = [
    (f"[TOOL_CALLS][{CALL_PARIS}]", None, [("get_weather", PARIS)]),
    (
        f'Sure. [TOOL_CALLS] [{CALL_PARIS}, {{"name": "get_time", "arguments": {{}}}}]',
        "Sure.",
        [("get_weather", PARIS), ("get_time", "{}")],
    ),
    (f"[TOOL_CALLS] {CALL_PARIS}", ..., None),  # an object, not a list
    ("[TOOL_CALLS] []", ..., None),
    (f"[TOOL_CALLS] [{CALL_PARIS}", ..., None),
    ("A [TOOL list", ..., None),
    # v11+ tokenizers: [TOOL_CALLS]name[ARGS]{...}, optionally [CALL_ID]id, or no [ARGS]
    (f"[TOOL_CALLS]get_weather[ARGS]{PARIS}", None, [("get_weather", PARIS)]),
    (
        f"[TOOL_CALLS]get_weather[ARGS]{PARIS}[TOOL_CALLS]get_time[ARGS]{{}}",
        None,
        [("get_weather", PARIS), ("get_time", "{}")],
    ),
    (
        f"[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{PARIS}\n"
        "[TOOL_CALLS]f[CALL_ID]Z9y8X7w6V[ARGS]{}",
        None,
        [("get_weather", PARIS), ("f", "{}")],
    ),
    (
        'Let me look.\n[TOOL_CALLS]get_weather{"city":"Zürich"}[TOOL_CALLS]get_time{}\n',
        "Let me look.",
        [("get_weather", '{"city": "Zürich"}'), ("get_time", "{}")],
    ),
    (f"[TOOL_CALLS]nope[ARGS]{PARIS}", ..., None),
    (f"[TOOL_CALLS]get_weather[ARGS]{PARIS}[TOOL_CALLS]nope[ARGS]{{}}", ..., None),
    ("[TOOL_CALLS]get_weather[ARGS]", ..., None),
    ("[TOOL_CALLS]get_weather", ..., None),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Par', ..., None),
    ('[TOOL_CALLS]get_weather[ARGS]"Paris"', ..., None),
    ('[TOOL_CALLS]get_weather[ARGS]["Paris"]', ..., None),
    (f"[TOOL_CALLS][ARGS]{PARIS}", ..., None),
    (f"[TOOL_CALLS]get_weather[CALL_ID]abc[ARGS]{PARIS}", ..., None),
    (f"[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e5[ARGS]{PARIS}", ..., None),
    (f"[TOOL_CALLS]get_weather[CALL_ID]a1B2c3-4e[ARGS]{PARIS}", ..., None),
    (f"[TOOL_CALLS]get_weather[ARGS]{PARIS} Done.", ..., None),
    (f"[TOOL_CALLS]get_weather[ARGS]{PARIS}[TOOL_CALLS]", ..., None),
    (f"[TOOL_CALLS]get_weather[ARGS]{PARIS}[TOOL_CALLS][{CALL_PARIS}]", ..., None),
]

PYTHONIC = [
    ('[get_weather(city="Paris")]', None, [("get_weather", PARIS)]),
    (
        '[get_weather(city="Paris", unit="celsius"), get_time()]',
        None,
        [("get_weather", '{"city": "Paris", "unit": "celsius"}'), ("get_time", "{}")],
    ),
    (
        "[f(a=1, b=-2.5, c=True, d=None, e=[1, 'x'], g={'k': (1, 2)}, h=true, i=null)]",
        None,
        [
            (
                "f",
                '{"a": 1, "b": -2.5, "c": true, "d": null, "e": [1, "x"], '
                '"g": {"k": [1, 2]}, "h": true, "i": null}',
            )
        ],
    ),
    (
        '<|python_start|>[get_weather(city="Zürich")]<|python_end|>',
        None,
        [("get_weather", '{"city": "Zürich"}')],
    ),
    ('  [get_weather(city="Paris")]\n', None, [("get_weather", PARIS)]),
    ('[get_weather(city=__import__("os").system("true"))]', ..., None),
    ('[get_weather("Paris")]', ..., None),
    ('[get_weather(**{"city": "Paris"})]', ..., None),
    ('[get_weather(city="a", city="b")]', ..., None),
    ('get_weather(city="Paris")', ..., None),
    ('[os.system(cmd="ls")]', ..., None),
    ("[get_weather(city=1+2j)]", ..., None),
    ("[get_weather(city=x)]", ..., None),
    ("[f(x=1e999)]", ..., None),
    ("[f(x={1: 2})]", ..., None),
    ("[unknown(x=1)]", ..., None),
    ("[]", ..., None),
    ("[1] A footnote.", ..., None),
    ('Call [get_weather(city="Paris")]', ..., None),
]

CASES = [
    (name, text, content, calls)
    for name, table in (
        ("hermes", HERMES),
        ("llama3_json", LLAMA3),
        ("mistral", MISTRAL),
        ("pythonic", PYTHONIC),
    )
    for text, content, calls in table
]


def expected_content(text, content, calls):
    return text if calls is None else content  # ... means: all of the text


@pytest.mark.parametrize("name, text, content, calls", CASES)
def test_parse(name, text, content, calls):
    parsed = TOOL_PARSERS[name](TOOLS, seeded_call_ids(1)).parse(text)
    assert parsed.content == expected_content(text, content, calls)
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == (calls or [])
    for c in parsed.tool_calls:
        assert isinstance(json.loads(c.arguments), dict)


def stream(name: str, pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """The joined content and each call's (name, joined arguments), checking the shape of
    OpenAI's call deltas on the way."""
    s = TOOL_PARSERS[name](TOOLS).streamer()
    deltas = [d for p in pieces for d in s.feed(p)] + s.finish()
    content, calls, args = "", [], []
    for d in deltas:
        if isinstance(d, ContentDelta):
            assert d.text
            content += d.text
        else:
            assert isinstance(d, ToolCallDelta)
            if d.index == len(calls):  # the first delta of a call
                assert d.id and d.name
                calls.append(d.name)
                args.append(d.arguments)
            else:
                assert d.index == len(calls) - 1 and d.id is None and d.name is None
                args[d.index] += d.arguments
    return content, list(zip(calls, args, strict=True))


@pytest.mark.parametrize("name, text, content, calls", CASES)
def test_every_cut_streams_the_parse(name, text, content, calls):
    want = (expected_content(text, content, calls) or "", calls or [])
    assert stream(name, [text]) == want
    assert stream(name, list(text)) == want
    for i in range(len(text) + 1):
        assert stream(name, [text[:i], text[i:]]) == want, i
    rng = random.Random(text)
    for _ in range(30):
        cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(2, 10)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert stream(name, pieces) == want, pieces


def test_content_is_sent_before_the_call_and_a_maybe_marker_is_held():
    s = TOOL_PARSERS["hermes"](TOOLS).streamer()
    assert s.feed("Hello <tool") == [ContentDelta("Hello")]
    assert s.feed("s are fun") == [ContentDelta(" <tools are fun")]
    assert s.feed(".\n\n<tool_") == [ContentDelta(".")]
    assert s.feed("call>\n" + CALL_PARIS) == []
    assert s.feed("\n</tool_call>") == []
    deltas = s.finish()
    assert [type(d) for d in deltas] == [ToolCallDelta, ToolCallDelta]
    first, rest = deltas
    assert (first.index, first.name, first.arguments, first.type) == (
        0,
        "get_weather",
        "",
        "function",
    )
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", first.id)
    assert (rest.index, rest.id, rest.name, rest.arguments) == (0, None, None, PARIS)

    s = TOOL_PARSERS["mistral"](TOOLS).streamer()
    assert s.feed("Sure [TOOL") == [ContentDelta("Sure")]
    assert s.feed("_CALLS] [") == []

    s = TOOL_PARSERS["llama3_json"](TOOLS).streamer()
    assert s.feed("  <|python") == []
    assert s.feed("_ta") == []
    s = TOOL_PARSERS["pythonic"](TOOLS).streamer()
    assert s.feed("\n") == []
    assert s.feed("Hi [") == [ContentDelta("\nHi [")]  # not a leading call: content at once


def test_no_tools_means_every_call_is_content():
    text = f"<tool_call>\n{CALL_PARIS}\n</tool_call>"
    parsed = TOOL_PARSERS["hermes"](None).parse(text)
    assert (parsed.content, parsed.tool_calls) == (text, [])


def test_ids():
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", random_call_id())
    assert random_call_id() != random_call_id()
    assert seeded_call_ids(7)() == seeded_call_ids(7)()
    ids = seeded_call_ids(7)
    assert ids() != ids()
    text = f"[TOOL_CALLS][{CALL_PARIS}]"
    (call,) = TOOL_PARSERS["mistral"](TOOLS).parse(text).tool_calls
    assert re.fullmatch(r"[A-Za-z0-9]{9}", call.id)  # Mistral's templates take nothing else
    (call,) = TOOL_PARSERS["mistral"](TOOLS, seeded_call_ids(3)).parse(text).tool_calls
    assert call.id == seeded_call_ids(3)()


def test_mistral_call_ids_come_from_the_text():
    text = f"[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{PARIS}[TOOL_CALLS]get_time[ARGS]{{}}"
    first, second = TOOL_PARSERS["mistral"](TOOLS, seeded_call_ids(3)).parse(text).tool_calls
    assert first.id == "a1B2c3D4e"
    assert second.id == seeded_call_ids(3)()  # no [CALL_ID]: a new one
    s = TOOL_PARSERS["mistral"](TOOLS, seeded_call_ids(3)).streamer()
    deltas = [d for c in text for d in s.feed(c)] + s.finish()
    assert [d.id for d in deltas if isinstance(d, ToolCallDelta) and d.id] == [
        first.id,
        second.id,
    ]
    assert TOOL_PARSERS["mistral"].markers == ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]")
    # v0.3's list form carries ids as its template writes them; other "id"s are ignored.
    listed = (
        f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {PARIS}, "id": "Qw3rTy9Z0"}}, '
        '{"name": "get_time", "arguments": {}, "id": "too-long-an-id"}]'
    )
    first, second = TOOL_PARSERS["mistral"](TOOLS, seeded_call_ids(3)).parse(listed).tool_calls
    assert (first.id, second.id) == ("Qw3rTy9Z0", seeded_call_ids(3)())
    # The same id twice: the repeat gets a fresh one, so results can be told apart.
    twice = f"[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{PARIS}" * 2
    first, second = TOOL_PARSERS["mistral"](TOOLS, seeded_call_ids(3)).parse(twice).tool_calls
    assert (first.id, second.id) == ("a1B2c3D4e", seeded_call_ids(3)())


def test_registry_names():
    assert sorted(TOOL_PARSERS) == ["hermes", "llama3_json", "mistral", "pythonic"]
    assert all(p.name == n for n, p in TOOL_PARSERS.items())


# -- forced calls --
jsonschema = pytest.importorskip("jsonschema")

NAMED = {"type": "function", "function": {"name": "get_weather"}}
WHERE = {
    "type": "function",
    "function": {
        "name": "where",
        "parameters": {
            "type": "object",
            "properties": {"loc": {"$ref": "#/$defs/Loc"}},
            "required": ["loc"],
            "$defs": {
                "Loc": {
                    "type": "object",
                    "properties": {"lat": {"type": "number"}, "near": {"$ref": "#/$defs/Loc"}},
                    "required": ["lat"],
                }
            },
        },
    },
}


def valid(schema: dict, value) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(value)


def test_named_tool_schema_is_the_functions_parameters():
    schema = named_tool_schema(TOOLS, "get_weather")
    assert schema == WEATHER["function"]["parameters"]
    schema["properties"].clear()
    assert WEATHER["function"]["parameters"]["properties"]  # a copy
    assert named_tool_schema(TOOLS, "get_time") == {"type": "object", "properties": {}}
    assert valid(named_tool_schema(TOOLS, "get_time"), {})
    assert not valid(named_tool_schema(TOOLS, "get_time"), "x")
    assert valid(named_tool_schema(TOOLS, "get_weather"), {"city": "Paris"})
    assert not valid(named_tool_schema(TOOLS, "get_weather"), {"unit": "celsius"})
    with pytest.raises(ValueError):
        named_tool_schema(TOOLS, "nope")


@pytest.mark.parametrize(
    "value, one, many",
    [
        ([{"name": "get_weather", "parameters": {"city": "Paris"}}], True, True),
        ([{"name": "get_time", "parameters": {}}], True, True),
        (
            [
                {"name": "get_weather", "parameters": {"city": "Paris"}},
                {"name": "get_time", "parameters": {}},
            ],
            False,
            True,
        ),
        ([], False, False),
        ({"name": "get_time", "parameters": {}}, False, False),
        ([{"name": "nope", "parameters": {}}], False, False),
        ([{"name": "get_weather", "parameters": {"city": 3}}], False, False),
        ([{"name": "get_weather", "parameters": {"unit": "celsius"}}], False, False),
        ([{"name": "get_time"}], False, False),
        ([{"name": "get_time", "parameters": {}, "extra": 1}], False, False),
    ],
)
def test_required_tools_schema(value, one, many):
    assert valid(required_tools_schema(TOOLS, parallel=False), value) is one
    assert valid(required_tools_schema(TOOLS, parallel=True), value) is many


def test_required_schema_keeps_a_tools_own_definitions_working():
    schema = required_tools_schema([WEATHER, WHERE], parallel=True)
    where = schema["items"]["anyOf"][1]["properties"]["parameters"]
    assert where["properties"]["loc"] == {"$ref": "#/$defs/where.Loc"}
    assert schema["$defs"]["where.Loc"]["properties"]["near"] == {"$ref": "#/$defs/where.Loc"}
    assert "$defs" not in where and "$defs" in WHERE["function"]["parameters"]  # not mutated
    good = {"name": "where", "parameters": {"loc": {"lat": 1.5, "near": {"lat": 2}}}}
    bad = {"name": "where", "parameters": {"loc": {"lat": 1.5, "near": {"lat": "x"}}}}
    assert valid(schema, [good])
    assert not valid(schema, [bad])


def test_the_schemas_compile_to_grammars():
    xgr = pytest.importorskip("xgrammar")
    for schema in (
        named_tool_schema(TOOLS, "get_weather"),
        required_tools_schema([*TOOLS, WHERE], parallel=False),
        required_tools_schema([*TOOLS, WHERE], parallel=True),
    ):
        xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)


def test_parse_forced():
    ids = seeded_call_ids(0)
    (call,) = parse_forced('{"city": "Zürich"}', TOOLS, NAMED, ids)
    assert (call.name, call.arguments) == ("get_weather", '{"city": "Zürich"}')
    assert call.id == seeded_call_ids(0)()
    text = (
        '[{"name": "get_weather", "parameters": {"city": "Paris"}}, '
        '{"name": "get_time", "parameters": {}}]'
    )
    calls = parse_forced(text, TOOLS, "required")
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", PARIS), ("get_time", "{}")]
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", c.id) for c in calls)
    for text, choice in [
        ('{"city": "Pa', NAMED),  # cut off by max_tokens
        ('["Paris"]', NAMED),
        ("[]", "required"),
        ('[{"name": "nope", "parameters": {}}]', "required"),
        ('[{"name": "get_time", "parameters": []}]', "required"),
        ('[{"name": "get_time", "parameters": {}}]', "auto"),
        ("{}", {"type": "function", "function": {"name": "nope"}}),
    ]:
        with pytest.raises(ValueError):
            parse_forced(text, TOOLS, choice)


# -- request checks --
def tool(name="g", **function):
    return {"type": "function", "function": {"name": name, **function}}


@pytest.mark.parametrize(
    "tools, choice, parallel, param",
    [
        ("get_weather", None, None, "tools"),
        ([], None, None, "tools"),
        ([WEATHER, "x"], None, None, "tools[1]"),
        ([WEATHER, {"type": "retrieval", "function": {"name": "g"}}], None, None, "tools[1].type"),
        ([WEATHER, {"function": {"name": "g"}}], None, None, "tools[1].type"),
        ([WEATHER, {"type": "function"}], None, None, "tools[1].function"),
        ([WEATHER, {"type": "function", "function": {}}], None, None, "tools[1].function.name"),
        ([WEATHER, tool("get weather")], None, None, "tools[1].function.name"),
        ([WEATHER, tool("x" * 65)], None, None, "tools[1].function.name"),
        ([WEATHER, tool("")], None, None, "tools[1].function.name"),
        ([WEATHER, tool(3)], None, None, "tools[1].function.name"),
        ([WEATHER, tool(description=3)], None, None, "tools[1].function.description"),
        ([WEATHER, tool(parameters="x")], None, None, "tools[1].function.parameters"),
        (
            [WEATHER, tool(parameters={"type": "string"})],
            None,
            None,
            "tools[1].function.parameters",
        ),
        ([WEATHER, TIME, WEATHER], None, None, "tools[2].function.name"),
        (TOOLS, "always", None, "tool_choice"),
        (TOOLS, {"type": "function"}, None, "tool_choice"),
        (
            TOOLS,
            {"type": "function", "function": {"name": "nope"}},
            None,
            "tool_choice.function.name",
        ),
        (None, "required", None, "tool_choice"),
        (None, NAMED, None, "tool_choice"),
        (TOOLS, "auto", "yes", "parallel_tool_calls"),
    ],
)
def test_validate_tools_names_the_field(tools, choice, parallel, param):
    with pytest.raises(ToolError) as info:
        validate_tools(tools, choice, parallel)
    assert info.value.param == param
    assert str(info.value).startswith(param + " ")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "tools, choice, parallel",
    [
        (None, None, None),
        (None, "auto", None),
        (None, "none", False),
        (TOOLS, None, None),
        (TOOLS, "required", False),
        (TOOLS, NAMED, True),
        ([tool("a-b_C9" + "x" * 58, description="d", parameters={"properties": {}})], "auto", None),
    ],
)
def test_validate_tools_accepts(tools, choice, parallel):
    validate_tools(tools, choice, parallel)


def test_a_tool_error_becomes_a_400_naming_the_field():
    from shardlm.entrypoints.openai.validation import api_error, chat_fields

    with pytest.raises(ToolError) as info:
        validate_tools([WEATHER, tool("bad name")], "auto", None)
    error = api_error(info.value, chat_fields())
    assert (error.status, error.param) == (400, "tools[1].function.name")
    assert error.message.startswith("tools[1].function.name must be")
