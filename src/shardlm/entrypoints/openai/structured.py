"""Structured outputs in the HTTP API: OpenAI's ``response_format`` (``json_object``,
``json_schema``) and vLLM's ``structured_outputs`` field ({"json"|"regex"|"choice"|"grammar"|
"json_object": …}) become the engine's StructuredOutputs. Every refusal is a ParamError naming
the field the client used, answered as a 400. Chat's tool_choice "required" or a named
function is enforced with the same machinery (``forced_call_spec``)."""

from __future__ import annotations

from typing import Any

from shardlm.entrypoints.openai.tool_definitions import named_tool_schema, required_tools_schema
from shardlm.errors import ParamError
from shardlm.structured.params import StructuredOutputs

# vLLM's StructuredOutputsParams switches shardlm has no use for: JSON is always compact
# (no free whitespace) and there is one backend, with no fallback.
IGNORED_KEYS = ("disable_any_whitespace", "disable_fallback")
FORMAT = "response_format"


def structured_spec(
    response_format: dict[str, Any] | None, structured_outputs: dict[str, Any] | None
) -> StructuredOutputs | None:
    """The request's StructuredOutputs (None: free text)."""
    from_format = _from_response_format(response_format)
    if structured_outputs is None:
        return from_format
    if from_format is not None:
        raise ParamError(
            "structured_outputs", "give response_format or structured_outputs, not both"
        )
    # vLLM's clients may send every key, the unused ones as null.
    given = {k: v for k, v in structured_outputs.items() if v is not None}
    return StructuredOutputs.coerce({k: v for k, v in given.items() if k not in IGNORED_KEYS})


def structured_param(response_format: dict[str, Any] | None) -> str:
    """The field a request's grammar came from, for its errors."""
    kind = (response_format or {}).get("type", "text")
    return "structured_outputs" if kind == "text" else FORMAT


def _from_response_format(response_format: dict[str, Any] | None) -> StructuredOutputs | None:
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputs(json_object=True)
    if kind != "json_schema":
        raise ParamError(
            FORMAT,
            f"response_format type {kind!r} is not supported; use 'text', 'json_object' or "
            "'json_schema' (or the structured_outputs field for a regex, choice or grammar)",
        )
    spec = (response_format or {}).get("json_schema")
    if not isinstance(spec, dict):
        raise ParamError(
            FORMAT, "response_format.json_schema must be an object with the schema under 'schema'"
        )
    schema = spec.get("schema")
    if schema is None:  # OpenAI lets it be left out: any JSON object then
        return StructuredOutputs(json_object=True)
    if not isinstance(schema, dict):
        raise ParamError(FORMAT, "response_format.json_schema.schema must be a JSON schema object")
    return StructuredOutputs(json=schema)


def forced_call_spec(
    tool_choice: Any, tools: list[dict], parallel_tool_calls: bool | None
) -> StructuredOutputs:
    """The grammar of tool_choice "required" (a list of calls, one unless parallel calls
    are allowed) or a named function (its arguments object): the output is always a call
    of a declared function whose arguments satisfy its schema. ``tools`` are checked
    (tool_definitions.validate_tools) before."""
    if isinstance(tool_choice, dict):
        return StructuredOutputs(json=named_tool_schema(tools, tool_choice["function"]["name"]))
    return StructuredOutputs(json=required_tools_schema(tools, parallel_tool_calls is not False))
