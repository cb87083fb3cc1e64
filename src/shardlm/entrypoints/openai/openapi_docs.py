"""The server's own /openapi.json with its request bodies.

The generation routes read the raw Request (so that every refusal is a 400 in OpenAI's shape
naming the field, never FastAPI's 422), which leaves FastAPI nothing to document. This adds
each route's body schema from its pydantic model; validation is unchanged.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel


def document_request_bodies(app: FastAPI, bodies: dict[str, type[BaseModel]]) -> None:
    """Document ``bodies`` (POST path → request model) in ``app.openapi()``."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, model in bodies.items():
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
            ref = {"$ref": f"#/components/schemas/{model.__name__}"}
            schema["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref}},
            }
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
