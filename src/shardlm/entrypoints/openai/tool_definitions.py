"""What a request's tools are: their checks, and the schemas that force a call.

Pure (stdlib only). ``validate_tools`` refuses malformed tools / tool_choice /
parallel_tool_calls with a ``ToolError`` whose ``param`` is the field's path
(``tools[1].function.name``, ``tool_choice``). tool_choice "required" or a named function is
served by constraining the output with a JSON schema: ``named_tool_schema`` (the output is
the arguments object) or ``required_tools_schema`` (a list of {"name", "parameters"});
tool_parsers.parse_forced reads the result back.
"""

from __future__ import annotations

import copy
import re
from typing import Any


# -- request checks --
class ToolError(ValueError):
    """A refused tools / tool_choice value; ``param`` is the field's path (tools[1].type)
    and the message begins with it, as validation.api_error expects."""

    def __init__(self, param: str, problem: str) -> None:
        super().__init__(f"{param} {problem}")
        self.param = param


NAME_PATTERN = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def _check_tool(i: int, tool: Any) -> str:
    """The tool's name, once its definition is well-formed."""
    where = f"tools[{i}]"
    if not isinstance(tool, dict):
        raise ToolError(where, "must be an object")
    if tool.get("type") != "function":
        raise ToolError(f"{where}.type", f"must be 'function', got {tool.get('type')!r}")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise ToolError(f"{where}.function", "is required: an object with a name")
    name = function.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ToolError(
            f"{where}.function.name",
            f"must be 1 to 64 letters, digits, '_' or '-', got {name!r}",
        )
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise ToolError(f"{where}.function.description", "must be a string")
    parameters = function.get("parameters")
    if parameters is not None and (
        not isinstance(parameters, dict) or parameters.get("type", "object") != "object"
    ):
        raise ToolError(f"{where}.function.parameters", "must be a JSON schema of an object")
    return name


def validate_tools(
    tools: Any, tool_choice: Any, parallel_tool_calls: Any, noun: str = "tools"
) -> None:
    """Refuse malformed tools / tool_choice / parallel_tool_calls with a ToolError. ``noun``:
    what the messages call the tools (the legacy API's "functions")."""
    if tools is not None:
        if not isinstance(tools, list) or not tools:
            raise ToolError("tools", f"must be a non-empty list of {noun}")
        seen: set[str] = set()
        for i, tool in enumerate(tools):
            name = _check_tool(i, tool)
            if name in seen:
                raise ToolError(f"tools[{i}].function.name", f"{name!r} is defined twice")
            seen.add(name)
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise ToolError("parallel_tool_calls", "must be a boolean")
    if tool_choice is None or tool_choice in ("none", "auto"):
        return
    if tool_choice == "required":
        named = None
    elif (
        isinstance(tool_choice, dict)
        and tool_choice.get("type") == "function"
        and isinstance(tool_choice.get("function"), dict)
        and isinstance(tool_choice["function"].get("name"), str)
    ):
        named = tool_choice["function"]["name"]
    else:
        raise ToolError(
            "tool_choice",
            'must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
        )
    if not tools:
        raise ToolError("tool_choice", f"{tool_choice!r} needs {noun}")
    if named is not None and named not in {t["function"]["name"] for t in tools}:
        raise ToolError("tool_choice.function.name", f"{named!r} is not one of the {noun}")


# -- forced calls --
def tool_function(tools: list[dict], name: str) -> dict:
    """The function definition named ``name`` (ValueError if none)."""
    for t in tools:
        if t["function"]["name"] == name:
            return t["function"]
    raise ValueError(f"no tool named {name!r}")


def _parameters(function: dict) -> dict:
    """The function's parameters as an object schema (absent means no arguments)."""
    schema = copy.deepcopy(function.get("parameters") or {"properties": {}})
    schema.setdefault("type", "object")
    return schema


def named_tool_schema(tools: list[dict], name: str) -> dict:
    """The schema for tool_choice {"function": {"name": name}}: the output is the
    arguments object itself."""
    return _parameters(tool_function(tools, name))


def _hoist_definitions(schema: dict, prefix: str, into: dict) -> None:
    """Move the schema's own $defs / definitions to ``into`` as "<prefix>.<key>" and point
    its refs there, so the schema keeps working below the root of another."""
    local: dict[str, Any] = {}
    for key in ("$defs", "definitions"):
        for name, sub in (schema.pop(key, None) or {}).items():
            local[f"#/{key}/{name}"] = (f"{prefix}.{name}", sub)

    def rewrite(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                for old, (new, _) in local.items():
                    if ref == old or ref.startswith(old + "/"):
                        node["$ref"] = "#/$defs/" + new + ref[len(old) :]
                        break
            for v in node.values():
                rewrite(v)
        elif isinstance(node, list):
            for v in node:
                rewrite(v)

    rewrite(schema)
    for new, sub in local.values():
        rewrite(sub)
        into[new] = sub


def required_tools_schema(tools: list[dict], parallel: bool) -> dict:
    """The schema for tool_choice "required": a list of one (or, ``parallel``, more) calls
    [{"name": <a tool>, "parameters": {...that tool's arguments}}]."""
    definitions: dict[str, Any] = {}
    variants = []
    for t in tools:
        name = t["function"]["name"]
        parameters = _parameters(t["function"])
        _hoist_definitions(parameters, name, definitions)
        variants.append(
            {
                "type": "object",
                "properties": {"name": {"type": "string", "const": name}, "parameters": parameters},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": variants}}
    if not parallel:
        schema["maxItems"] = 1
    if definitions:
        schema["$defs"] = definitions
    return schema
