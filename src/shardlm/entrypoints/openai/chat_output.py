"""One chat choice's generated text as OpenAI's assistant message: reasoning split off
(``--reasoning-parser``), then tool calls read by the configured parser (tool_choice auto) or
from the output the structured-output grammar forced (required, or a named function).

``ChatOutput.message`` reads a whole text; ``ChatOutput.stream`` gives a ``ChoiceStream``
whose deltas, joined, are that message (tests/test_server_tools.py checks it): content and
reasoning_content as they come, a call's id and name in one delta and its arguments in the
next, as OpenAI streams them. A choice that made calls ends with finish_reason "tool_calls".
A request in the legacy functions API (``legacy``) is answered in it: its one call as the
message's ``function_call`` (streamed: name, then arguments), finish_reason "function_call".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from shardlm.entrypoints.openai.reasoning import REASONING_PARSERS, ReasoningParser
from shardlm.entrypoints.openai.tool_parsers import (
    TOOL_PARSERS,
    ContentDelta,
    IdFactory,
    ToolCall,
    ToolCallDelta,
    ToolParser,
    ToolStreamer,
    parse_forced,
    random_call_id,
)

# How a request's tools shape its output.
ToolMode = Literal["none", "auto", "required", "named"]


def call_json(call: ToolCall) -> dict:
    """A call in a message (arguments: a JSON object's text)."""
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def call_delta_json(delta: ToolCallDelta) -> dict:
    """A call's streamed piece: index, id and name first (arguments ""), then arguments."""
    if delta.name is None:
        return {"index": delta.index, "function": {"arguments": delta.arguments}}
    return {
        "index": delta.index,
        "id": delta.id,
        "type": "function",
        "function": {"name": delta.name, "arguments": delta.arguments},
    }


def function_call_delta_json(delta: ToolCallDelta) -> dict:
    """The legacy API's streamed call: name first (arguments ""), then arguments."""
    if delta.name is None:
        return {"arguments": delta.arguments}
    return {"name": delta.name, "arguments": delta.arguments}


def finish_reason(reason: str | None, has_calls: bool, legacy: bool = False) -> str | None:
    """A choice that called tools (legacy: a function) and stopped on its own says so."""
    if has_calls and reason == "stop":
        return "function_call" if legacy else "tool_calls"
    return reason


@dataclass(frozen=True)
class ChatOutput:
    """How every choice of one request is read: the tool mode, the request's tools and
    tool_choice, and the server's parsers (None: not configured). ``legacy``: the request
    came in the functions API (at most one call, answered as ``function_call``)."""

    mode: ToolMode = "none"
    tools: tuple[dict, ...] = ()
    tool_choice: Any = None
    tool_parser: str | None = None
    reasoning_parser: str | None = None
    new_id: IdFactory = random_call_id
    legacy: bool = False

    def _reasoning(self) -> ReasoningParser | None:
        # A forced call is all JSON (the grammar leaves no room for <think>).
        if self.reasoning_parser is None or self.mode in ("required", "named"):
            return None
        return REASONING_PARSERS[self.reasoning_parser]()

    def _parser(self) -> ToolParser | None:
        if self.mode != "auto" or self.tool_parser is None:
            return None
        return TOOL_PARSERS[self.tool_parser](list(self.tools), self.new_id)

    @property
    def named(self) -> str | None:
        return self.tool_choice["function"]["name"] if self.mode == "named" else None

    def message(self, text: str, reason: str | None) -> tuple[dict, str | None]:
        """The assistant message of a whole output, and the choice's finish_reason."""
        reasoning, content = None, text
        parser = self._reasoning()
        if parser is not None:
            reasoning, content = parser.split(text)
        calls: list[ToolCall] = []
        complete = True  # the calls are whole (a forced call cut short is not)
        if self.mode in ("required", "named"):
            content, calls, complete = self._forced(text)
        elif (tool_parser := self._parser()) is not None:
            parsed = tool_parser.parse(content or "")
            if parsed.tool_calls:
                content, calls = parsed.content, parsed.tool_calls
        message: dict[str, Any] = {
            "role": "assistant",
            "content": content if content is not None or calls else "",
            "refusal": None,
        }
        if calls and self.legacy:  # its one call: the first, should a parser read more
            message["function_call"] = {"name": calls[0].name, "arguments": calls[0].arguments}
        elif calls:
            message["tool_calls"] = [call_json(c) for c in calls]
        if self.reasoning_parser is not None:
            message["reasoning_content"] = reasoning
        return message, finish_reason(reason, bool(calls) and complete, self.legacy)

    def _forced(self, text: str) -> tuple[str | None, list[ToolCall], bool]:
        """(content, calls, complete) of an output the grammar forced. One cut short
        (max_tokens, a stop string) is no complete call: a named function keeps the partial
        arguments, as OpenAI's do when cut; "required" returns the text as content. Only
        complete calls finish with "tool_calls"."""
        try:
            calls = parse_forced(text, list(self.tools), self.tool_choice, self.new_id)
            return None, calls, True
        except ValueError:
            if self.named is None:
                return text, [], False
            return None, [ToolCall(self.new_id(), self.named, text)], False

    def stream(self) -> ChoiceStream:
        return ChoiceStream(self)


class ChoiceStream:
    """One choice's streamed deltas ({"content"}, {"reasoning_content"}, {"tool_calls"} or,
    legacy, {"function_call"})."""

    def __init__(self, output: ChatOutput) -> None:
        self.output = output
        self.reasoning = output._reasoning()
        self.split = self.reasoning.streamer() if self.reasoning is not None else None
        parser = output._parser()
        self.tools: ToolStreamer | None = parser.streamer() if parser is not None else None
        self.forced_text = ""
        self.named_id: str | None = None
        self.has_calls = False

    def start(self) -> list[dict]:
        """Deltas before any token: a named function's call is known from the start."""
        name = self.output.named
        if name is None:
            return []
        self.named_id = self.output.new_id()
        self.has_calls = True
        return self._call(ToolCallDelta(0, self.named_id, name, ""))

    def feed(self, text: str) -> list[dict]:
        if not text:
            return []
        if self.output.mode in ("required", "named"):
            self.forced_text += text  # read whole at the end: the arguments are canonical JSON
            return []
        if self.split is None:
            return self._content(text)
        reasoning, content = self.split.feed(text)
        return self._reasoning(reasoning) + self._content(content)

    def finish(self, reason: str | None) -> tuple[list[dict], str | None]:
        """The deltas still held, and the choice's finish_reason."""
        out: list[dict] = []
        if self.output.mode in ("required", "named"):
            out = self._finish_forced()
        else:
            if self.split is not None:
                reasoning, content = self.split.finish()
                out = self._reasoning(reasoning) + self._content(content)
            if self.tools is not None:
                out += self._tool_deltas(self.tools.finish())
        return out, finish_reason(reason, self.has_calls, self.output.legacy)

    def _finish_forced(self) -> list[dict]:
        content, calls, complete = self.output._forced(self.forced_text)
        self.has_calls = complete
        if self.named_id is not None:  # the call went out at the start: its arguments now
            return self._call(ToolCallDelta(0, None, None, calls[0].arguments))
        if not calls:
            return [{"content": content}] if content else []
        deltas = []
        for i, call in enumerate(calls):
            deltas.append(ToolCallDelta(i, call.id, call.name, ""))
            deltas.append(ToolCallDelta(i, None, None, call.arguments))
        return [piece for d in deltas for piece in self._call(d)]

    def _reasoning(self, text: str | None) -> list[dict]:
        return [{"reasoning_content": text}] if text else []

    def _content(self, text: str | None) -> list[dict]:
        if not text:
            return []
        if self.tools is None:
            return [{"content": text}]
        return self._tool_deltas(self.tools.feed(text))

    def _tool_deltas(self, deltas: list) -> list[dict]:
        out = []
        for d in deltas:
            if isinstance(d, ContentDelta):
                out.append({"content": d.text})
            else:
                self.has_calls = True
                out += self._call(d)
        return out

    def _call(self, delta: ToolCallDelta) -> list[dict]:
        """A call's piece as a delta; legacy: as function_call, the first call only (as
        ``ChatOutput.message`` answers)."""
        if not self.output.legacy:
            return [{"tool_calls": [call_delta_json(delta)]}]
        return [{"function_call": function_call_delta_json(delta)}] if delta.index == 0 else []
