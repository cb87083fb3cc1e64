"""OpenAI's legacy functions API on chat completions: ``functions`` and ``function_call``,
deprecated in favour of ``tools`` and ``tool_choice`` but still sent by older clients
(LangChain's legacy agents, some eval harnesses). A request in that form is served as the
tools it stands for, so the template, the parsers and the forcing grammar are the tools'
own; only the field names in its errors and the shape of its answer
(chat_output.ChatOutput's ``legacy``) are the legacy API's.

Pure (no HTTP, no engine): ``as_tools`` gives the (tools, tool_choice) a legacy request stands for,
or a ToolError whose ``param`` is the client's field path (``functions.1.name``,
``function_call``).
"""

from __future__ import annotations

import re
from typing import Any

from shardlm.entrypoints.openai.tool_definitions import ToolError, validate_tools

# tools' paths, as validate_tools names them, → the legacy request's. A function is its
# tool's "function" object; function_call names a function as {"name": ...}.
_LEGACY_PATHS = [
    (re.compile(r"^tools\[(\d+)\](?:\.function)?"), r"functions.\1"),
    (re.compile(r"^tools(?=$|\.)"), "functions"),
    (re.compile(r"^tool_choice(?:\.function)?"), "function_call"),
]


def legacy_path(param: str) -> str:
    """A tools path as the legacy request names it: tools[1].function.name →
    functions.1.name, tool_choice.function.name → function_call.name."""
    for pattern, legacy in _LEGACY_PATHS:
        renamed, found = pattern.subn(legacy, param, count=1)
        if found:
            return renamed
    return param


def _tool_choice(function_call: Any) -> Any:
    """function_call as tool_choice: "none" / "auto" as they are, {"name": N} as the named
    function (None: the default, "auto" when functions are given)."""
    if function_call is None or function_call in ("none", "auto"):
        return function_call
    if isinstance(function_call, dict) and isinstance(function_call.get("name"), str):
        return {"type": "function", "function": {"name": function_call["name"]}}
    raise ToolError("function_call", 'must be "none", "auto" or {"name": ...}')


def as_tools(
    functions: list[Any] | None, function_call: Any, tools: Any, tool_choice: Any
) -> tuple[list[dict], Any]:
    """The (tools, tool_choice) of a request that sends functions or function_call. A
    ToolError names the legacy field of a malformed one, or of one that also sends the
    field's tools counterpart (which of the two is meant is not known)."""
    if functions is None:
        raise ToolError("function_call", "needs functions")
    if tools is not None:
        raise ToolError("functions", "cannot be combined with tools; send one of them")
    if tool_choice is not None and function_call is not None:
        raise ToolError("function_call", "cannot be combined with tool_choice; send one of them")
    if tool_choice is not None:
        raise ToolError("tool_choice", "goes with tools; with functions, send function_call")
    mapped = [{"type": "function", "function": f} for f in functions]
    choice = _tool_choice(function_call)
    try:
        validate_tools(mapped, choice, False, noun="functions")
    except ToolError as e:
        raise ToolError(legacy_path(e.param), str(e)[len(e.param) + 1 :]) from None
    return mapped, choice
