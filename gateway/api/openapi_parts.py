"""Building blocks of the OpenAPI document's pieces (schemas, responses, security)."""

from __future__ import annotations

from typing import Any

__all__ = ["ADMIN", "JSON", "STR", "TIME", "errors", "json_body", "obj", "ref"]

JSON = "application/json"
STR: dict[str, Any] = {"type": "string"}
TIME: dict[str, Any] = {"type": "string", "format": "date-time"}
ADMIN: list[dict[str, list[str]]] = [{"adminToken": []}]


def ref(name: str) -> dict[str, Any]:
    """A reference to the schema ``name``."""
    return {"$ref": f"#/components/schemas/{name}"}


def obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    """A closed object schema; every property required unless ``required`` says."""
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": props,
        "required": list(props) if required is None else required,
    }


def json_body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    """A JSON response (or request body) of ``schema``."""
    return {"description": description, "content": {JSON: {"schema": schema}}}


def errors(*statuses: int) -> dict[str, Any]:
    """The error responses of ``statuses``."""
    return {str(s): {"$ref": "#/components/responses/Error"} for s in statuses}
