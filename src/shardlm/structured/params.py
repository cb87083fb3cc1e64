"""What a request asks its output to be (shaped like vLLM's ``StructuredOutputsParams``).

Only the combination is checked here, at construction, with no grammar library: whether a
schema, regex or grammar is itself valid is the compiler's to say (``compiler.py``), when the
engine takes the request.
"""

from __future__ import annotations

import json as _json
from dataclasses import dataclass, fields
from typing import Any

from shardlm.errors import ParamError

PARAM = "structured_outputs"
KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputs:
    """Exactly one of: ``json`` (a JSON schema, as a dict or a JSON string), ``regex``,
    ``choice`` (the output is one of these strings), ``grammar`` (EBNF / GBNF text, as
    xgrammar reads it) or ``json_object=True`` (any JSON object)."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            got = ", ".join(given) if given else "none"
            raise ParamError(PARAM, f"{PARAM} takes exactly one of {', '.join(KINDS)}; got {got}")
        kind = given[0]
        value = getattr(self, kind)
        if kind == "json":
            if isinstance(value, str):
                try:
                    value = _json.loads(value)
                except ValueError as e:
                    raise ParamError(PARAM, f"{PARAM}.json is not valid JSON: {e}") from None
            if not isinstance(value, (dict, bool)):
                raise ParamError(
                    PARAM, f"{PARAM}.json must be a JSON schema object, got {type(value).__name__}"
                )
            try:
                _json.dumps(value)
            except (TypeError, ValueError) as e:
                raise ParamError(PARAM, f"{PARAM}.json is not JSON: {e}") from None
        elif kind == "choice":
            if (
                not isinstance(value, (list, tuple))
                or not value
                or not all(isinstance(c, str) and c for c in value)
            ):
                raise ParamError(
                    PARAM, f"{PARAM}.choice must be a non-empty list of non-empty strings"
                )
            self.choice = list(value)
        elif kind == "json_object":
            if value is not True:
                raise ParamError(PARAM, f"{PARAM}.json_object must be true, got {value!r}")
        elif not isinstance(value, str) or not value:
            raise ParamError(PARAM, f"{PARAM}.{kind} must be a non-empty string")

    @classmethod
    def coerce(cls, value: StructuredOutputs | dict[str, Any]) -> StructuredOutputs:
        """A StructuredOutputs from itself or from a dict of its fields (the server's body)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ParamError(
                PARAM, f"{PARAM} must be a StructuredOutputs or a dict, got {type(value).__name__}"
            )
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise ParamError(
                PARAM, f"{PARAM}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(KINDS)}"
            )
        return cls(**value)

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, str]:
        """What makes two specs the same grammar (the compile cache's key)."""
        value = getattr(self, self.kind)
        if self.kind == "json" and isinstance(value, str):
            value = _json.loads(value)
        if not isinstance(value, str):
            value = _json.dumps(value, sort_keys=True, ensure_ascii=False)
        return self.kind, value
