"""Tool calls out of a model's text, whole or streamed: hermes, llama3_json, mistral, pythonic.

Pure (stdlib only), so every format is unit-tested without a server or a model.

One rule for all formats: an output is either text followed by a well-formed *calls section*
(every call names a known tool and has an object of arguments) or it is all content, exactly
as generated (``auto`` falls back to plain content). Content before the calls loses its
trailing whitespace and is None when nothing is left. Arguments are always
``json.dumps(obj, ensure_ascii=False)`` of the parsed object, whole and streamed alike.

Streaming keeps that rule for any split of the text into deltas. Content is emitted as it
arrives, except text that might begin a calls section (a partial marker, trailing
whitespace), which is held until it clearly is not one. Once a section begins, nothing more is
emitted until ``finish``: a malformed call anywhere in it turns the whole output back into
content, so no call is certain before the end. Calls then come as OpenAI streams them: a
first delta with index, id and name (arguments ""), then one with the arguments.

The forced forms (tool_choice "required" or a named function) are not parsed from free text:
the server constrains the output with ``named_tool_schema`` / ``required_tools_schema`` and
reads it with ``parse_forced``. Those schemas and ``validate_tools`` (the request's checks,
``ToolError.param`` naming the field) live in tool_definitions and are re-exported here.
"""

from __future__ import annotations

import ast
import json
import math
import random
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Union

from shardlm.entrypoints.openai.tool_definitions import (
    ToolError,
    named_tool_schema,
    required_tools_schema,
    tool_function,
    validate_tools,
)

__all__ = [  # the checks and schemas live in tool_definitions; the server imports them here
    "TOOL_PARSERS",
    "ContentDelta",
    "ParsedOutput",
    "StreamDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolError",
    "ToolParser",
    "ToolStreamer",
    "named_tool_schema",
    "parse_forced",
    "random_call_id",
    "required_tools_schema",
    "seeded_call_ids",
    "validate_tools",
]

_ALNUM = string.ascii_letters + string.digits
IdFactory = Callable[[], str]


# -- results --
@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object's text


@dataclass
class ParsedOutput:
    content: str | None
    tool_calls: list[ToolCall]


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """One chunk of a call: the first carries id and name, later ones only arguments."""

    index: int
    id: str | None
    name: str | None
    arguments: str
    type: ClassVar[str] = "function"


StreamDelta = Union[ContentDelta, ToolCallDelta]  # noqa: UP007 (a runtime alias on 3.10)


# -- ids --
def random_call_id() -> str:
    """OpenAI's shape: "call_" and 24 letters or digits."""
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


def random_mistral_id() -> str:
    """Mistral's chat templates refuse any tool-call id but 9 letters or digits."""
    return "".join(secrets.choice(_ALNUM) for _ in range(9))


def seeded_call_ids(seed: int, length: int = 24, prefix: str = "call_") -> IdFactory:
    """Reproducible ids, for tests."""
    rng = random.Random(seed)
    return lambda: prefix + "".join(rng.choice(_ALNUM) for _ in range(length))


# -- values --
class _Malformed(Exception):
    """The text is not a well-formed call: the output is content."""


def _no_constant(name: str) -> Any:
    raise _Malformed(f"{name} is not JSON")  # NaN, Infinity: json.loads accepts them


_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def _loads(text: str) -> Any:
    try:
        return _DECODER.decode(text)
    except (ValueError, RecursionError) as e:
        raise _Malformed(str(e)) from None


def dump_arguments(arguments: dict[str, Any]) -> str:
    """The one serialization of arguments; refuses what could not be sent as UTF-8 JSON."""
    text = json.dumps(arguments, ensure_ascii=False, allow_nan=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\\ud800" in the source)
        raise _Malformed("arguments hold a lone surrogate") from None
    return text


class _Found(NamedTuple):
    """A call as read from the text; ``id`` only where the format writes one."""

    name: str
    arguments: dict[str, Any]
    id: str | None = None


def _arguments(value: Any) -> dict[str, Any]:
    """``value`` when it can be a call's arguments: a JSON object."""
    if not isinstance(value, dict):
        raise _Malformed("arguments must be an object")
    return value


def _call_object(obj: Any, keys: tuple[str, ...]) -> _Found:
    """The call {"name": ..., <one of keys>: {...}}; missing arguments are {}."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise _Malformed("a call is an object with a string name")
    return _Found(obj["name"], _arguments(next((obj[k] for k in keys if k in obj), {})))


def _raw_decode(text: str, i: int) -> tuple[Any, int]:
    """The JSON value at ``text[i:]`` (after whitespace) and where it ends."""
    try:
        return _DECODER.raw_decode(text, _skip_space(text, i))
    except (ValueError, RecursionError) as e:
        raise _Malformed(str(e)) from None


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _held_marker(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that is a proper beginning of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


# -- parsers --
class ToolParser:
    """One model family's tool-call format. Subclasses say where a calls section begins
    (``_find_start``, ``_safe_length``) and read it (``_read_calls``)."""

    name: ClassVar[str] = ""
    new_id_default: ClassVar[IdFactory] = staticmethod(random_call_id)
    # The literal strings the format reads: where a tokenizer makes one a special token,
    # decoding must keep special tokens or the parser never sees it (serving_chat.py).
    markers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, tools: list[dict] | None, new_id: IdFactory | None = None) -> None:
        self.tools = list(tools or [])
        self.names = {t["function"]["name"] for t in self.tools}
        self.new_id = new_id or type(self).new_id_default

    def parse(self, text: str) -> ParsedOutput:
        """The whole output: its content and calls, or all of it as content."""
        start = self._find_start(text, 0)
        if start is None:
            return ParsedOutput(text, [])
        try:
            found = self._read_calls(text[start:])
            if not found:
                raise _Malformed("no call")
            calls, used = [], set()
            for name, arguments, given_id in found:
                if name not in self.names:
                    raise _Malformed(f"unknown function {name!r}")
                # An id the text gives twice would leave the client two calls it cannot tell
                # apart by tool_call_id: the repeat gets a fresh one.
                call_id = given_id if given_id and given_id not in used else self.new_id()
                used.add(call_id)
                calls.append(ToolCall(call_id, name, dump_arguments(arguments)))
        except _Malformed:
            return ParsedOutput(text, [])
        return ParsedOutput(text[:start].rstrip() or None, calls)

    def streamer(self) -> ToolStreamer:
        return ToolStreamer(self)

    def _find_start(self, text: str, since: int) -> int | None:
        """Where the calls section begins in ``text``, if it does; ``text[:since]`` was
        searched before (by a streamer, as a shorter text)."""
        raise NotImplementedError

    def _safe_length(self, text: str) -> int:
        """How much of ``text`` (no section begun) stays content whatever follows."""
        raise NotImplementedError

    def _read_calls(self, section: str) -> list[_Found]:
        """Each call in the section, in order; _Malformed if it is not one."""
        raise NotImplementedError


class _MarkerParser(ToolParser):
    """Calls begin at the first ``marker``; text before it is content."""

    marker: ClassVar[str] = ""

    def _find_start(self, text: str, since: int) -> int | None:
        i = text.find(self.marker, max(0, since - len(self.marker) + 1))
        return None if i < 0 else i

    def _safe_length(self, text: str) -> int:
        return len(text) - _held_marker(text, self.marker)


class _LeadingParser(ToolParser):
    """Calls only when the output begins (after whitespace) with one of ``openers``."""

    openers: ClassVar[tuple[str, ...]] = ()

    def _find_start(self, text: str, since: int) -> int | None:
        i = _skip_space(text, 0)
        return i if text.startswith(self.openers, i) else None

    def _safe_length(self, text: str) -> int:
        i = _skip_space(text, 0)
        if i == len(text) or any(
            len(text) - i < len(o) and o.startswith(text[i:]) for o in self.openers
        ):
            return 0  # undecided
        return len(text)  # not an opener: never a call


class HermesToolParser(_MarkerParser):
    """Qwen2.5 / Qwen3: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``
    blocks, separated by whitespace."""

    name = "hermes"
    marker = "<tool_call>"
    end = "</tool_call>"
    markers = (marker, end)

    def _read_calls(self, section: str) -> list[_Found]:
        calls, i = [], 0
        while (i := _skip_space(section, i)) < len(section):
            if not section.startswith(self.marker, i):
                raise _Malformed("text between tool calls")
            j = section.find(self.end, i)
            if j < 0:
                raise _Malformed("an unclosed tool call")
            body = _loads(section[i + len(self.marker) : j])
            calls.append(_call_object(body, ("arguments", "parameters")))
            i = j + len(self.end)
        return calls


class Llama3JsonToolParser(_LeadingParser):
    """Llama 3.1 / 3.2 JSON: optional ``<|python_tag|>``, then ``{"name": ...,
    "parameters": {...}}`` objects separated by ``;``."""

    name = "llama3_json"
    tag = "<|python_tag|>"
    openers = (tag, "{")
    markers = (tag,)

    def _read_calls(self, section: str) -> list[_Found]:
        i = len(self.tag) if section.startswith(self.tag) else 0
        calls = []
        while True:
            obj, i = _raw_decode(section, i)
            calls.append(_call_object(obj, ("parameters", "arguments")))
            i = _skip_space(section, i)
            if i == len(section):
                return calls
            if section[i] != ";":
                raise _Malformed("text after a call")
            i += 1


def _is_mistral_id(value: Any) -> bool:
    """A call id as Mistral writes one: 9 ASCII letters or digits."""
    return isinstance(value, str) and len(value) == 9 and value.isascii() and value.isalnum()


class MistralToolParser(_MarkerParser):
    """Mistral, both generations of its format. Tokenizers before v11 (Mistral-7B-Instruct
    v0.3): ``[TOOL_CALLS]`` and a JSON list of {"name", "arguments"}. v11 and later
    (Mistral-Small-3.1+, Ministral, Devstral, Magistral): one ``[TOOL_CALLS]name[ARGS]{...}``
    per call, where some versions write ``[CALL_ID]`` and the call's id before ``[ARGS]`` and
    some leave ``[ARGS]`` out. A ``[`` after the first marker means the list.

    Ids are 9 alphanumerics, the only ones Mistral's chat templates take back; a ``[CALL_ID]``
    in the text is the call's id, so the history sent back matches what the model wrote."""

    name = "mistral"
    marker = "[TOOL_CALLS]"
    args, call_id = "[ARGS]", "[CALL_ID]"
    markers = (marker, args, call_id)
    new_id_default = staticmethod(random_mistral_id)

    def _read_calls(self, section: str) -> list[_Found]:
        i = _skip_space(section, len(self.marker))
        if section.startswith("[", i):
            calls = _loads(section[i:])
            if not isinstance(calls, list):
                raise _Malformed("a [ after [TOOL_CALLS] begins a JSON list")
            # v0.3's template writes each call's "id" into the history; one the model writes
            # in that form is kept, as a [CALL_ID] is (any other "id" is not a call id).
            found = [_call_object(c, ("arguments",)) for c in calls]
            ids = [c.get("id") if _is_mistral_id(c.get("id")) else None for c in calls]
            return [f._replace(id=i) for f, i in zip(found, ids, strict=True)]
        calls, i = [], 0
        while (i := _skip_space(section, i)) < len(section):
            if not section.startswith(self.marker, i):
                raise _Malformed("text after a call")
            call, i = self._read_call(section, i + len(self.marker))
            calls.append(call)
        return calls

    def _read_call(self, section: str, i: int) -> tuple[_Found, int]:
        """``name([CALL_ID]id)?([ARGS])?{...}`` at ``section[i:]``, and where it ends."""
        start = i
        while i < len(section) and section[i] not in "[{":  # tool names hold neither
            i += 1
        name = section[start:i].strip()
        if not name:
            raise _Malformed("a call begins with its function's name")
        given_id = None
        if section.startswith(self.call_id, i):
            i += len(self.call_id)
            given_id = section[i : i + 9]
            if not _is_mistral_id(given_id):
                raise _Malformed("a call id is 9 letters or digits")
            i += 9
        if section.startswith(self.args, i):
            i += len(self.args)
        arguments, i = _raw_decode(section, i)
        return _Found(name, _arguments(arguments), given_id), i


_JSON_NAMES = {"true": True, "false": False, "null": None}


def _literal(node: ast.expr) -> Any:
    """A JSON value from a Python literal (JSON's true/false/null too); never evaluates."""
    if isinstance(node, ast.Constant):
        v = node.value
        if v is None or isinstance(v, (str, bool, int)):
            return v
        if isinstance(v, float) and math.isfinite(v):
            return v
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _literal(node.operand)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return -v if isinstance(node.op, ast.USub) else v
    elif isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    elif isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values, strict=True):
            key = _literal(k) if k is not None else None
            if not isinstance(key, str):
                raise _Malformed("dict keys must be strings")
            out[key] = _literal(v)
        return out
    elif isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    raise _Malformed(f"not a literal: {type(node).__name__}")


class PythonicToolParser(_LeadingParser):
    """Llama 3.2 / 4: ``[get_weather(city="Paris"), f(x=1)]``, a Python list of calls with
    keyword arguments whose values are literals (optionally in ``<|python_start|>`` …
    ``<|python_end|>``). Read with ``ast``, never evaluated."""

    name = "pythonic"
    start_tag, end_tag = "<|python_start|>", "<|python_end|>"
    openers = (start_tag, "[")

    def _read_calls(self, section: str) -> list[_Found]:
        source = section.rstrip()
        if source.startswith(self.start_tag):
            source = source[len(self.start_tag) :].removesuffix(self.end_tag)
        try:
            tree = ast.parse(source.strip(), mode="eval")
        except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
            raise _Malformed(str(e)) from None
        if not isinstance(tree.body, ast.List):
            raise _Malformed("not a list")
        return [self._call(c) for c in tree.body.elts]

    @staticmethod
    def _call(node: ast.expr) -> _Found:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)) or node.args:
            raise _Malformed("a call by name with keyword arguments only")
        arguments: dict[str, Any] = {}
        for kw in node.keywords:
            if kw.arg is None or kw.arg in arguments:
                raise _Malformed("**kwargs or a repeated keyword")
            try:
                arguments[kw.arg] = _literal(kw.value)
            except RecursionError:
                raise _Malformed("too deep") from None
        return _Found(node.func.id, arguments)


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p
    for p in (HermesToolParser, Llama3JsonToolParser, MistralToolParser, PythonicToolParser)
}


# -- streaming --
class ToolStreamer:
    """Deltas of one output, equal when joined to ``parser.parse`` of the whole text."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.emitted = 0  # content sent: text[:emitted]
        self.start: int | None = None  # where the calls section began
        self.finished = False

    def feed(self, delta_text: str) -> list[StreamDelta]:
        if self.finished:
            raise RuntimeError("feed after finish")
        searched = len(self.text)
        self.text += delta_text
        if self.start is not None:
            return []
        self.start = self.parser._find_start(self.text, searched)
        end = self.parser._safe_length(self.text) if self.start is None else self.start
        # hold trailing whitespace: content before a call loses it (text[:emitted] ends
        # in non-space, so only the unsent part needs stripping)
        return self._content(self.emitted + len(self.text[self.emitted : end].rstrip()))

    def finish(self) -> list[StreamDelta]:
        if self.finished:
            return []
        self.finished = True
        parsed = self.parser.parse(self.text)
        if not parsed.tool_calls:
            return self._content(len(self.text))
        content = parsed.content or ""
        assert content.startswith(self.text[: self.emitted]), "streamed content diverged"
        out = self._content(len(content))
        for i, call in enumerate(parsed.tool_calls):
            out.append(ToolCallDelta(i, call.id, call.name, ""))
            out.append(ToolCallDelta(i, None, None, call.arguments))
        return out

    def _content(self, upto: int) -> list[StreamDelta]:
        if upto <= self.emitted:
            return []
        piece, self.emitted = self.text[self.emitted : upto], upto
        return [ContentDelta(piece)]


def parse_forced(
    text: str, tools: list[dict], tool_choice: Any, new_id: IdFactory | None = None
) -> list[ToolCall]:
    """The calls of an output made under the forced schema; ValueError when the text is not
    that shape (an output cut off by max_tokens)."""
    new_id = new_id or random_call_id
    try:
        value = _loads(text)
        if isinstance(tool_choice, dict):
            name = tool_choice["function"]["name"]
            tool_function(tools, name)
            if not isinstance(value, dict):
                raise _Malformed("arguments must be an object")
            return [ToolCall(new_id(), name, dump_arguments(value))]
        if tool_choice != "required":
            raise ValueError(f"tool_choice {tool_choice!r} forces no call")
        if not isinstance(value, list) or not value:
            raise _Malformed("a non-empty list of calls")
        known = {t["function"]["name"] for t in tools}
        calls = []
        for obj in value:
            name, arguments, _ = _call_object(obj, ("parameters",))
            if name not in known:
                raise _Malformed(f"unknown function {name!r}")
            calls.append(ToolCall(new_id(), name, dump_arguments(arguments)))
        return calls
    except _Malformed as e:
        raise ValueError(f"not a forced tool call: {e}") from None
