"""Request bodies in the published OpenAPI schema, described from the wire types the handlers structure themselves.

The handlers read and structure their bodies with the wire converter, so Litestar cannot infer the request body;
each POST handler gets an ``operation_class`` that publishes the schema Litestar's own generator (the one that
describes the responses) makes for the wire type, inlined, with the ranges the fields enforce.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from typing import Any

import attrs
from litestar.openapi.spec import (
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Reference,
    RequestBody,
    Schema,
)
from litestar.plugins.attrs import AttrsSchemaPlugin
from litestar.typing import FieldDefinition

from domain.options import OPTIONS, Kind, Option
from entrypoints.http.litestar_compat import SchemaCreator

SSE = OpenAPIMediaType(
    schema=Schema(
        type=OpenAPIType.OBJECT,
        description=(
            "With `stream: true`, one event of the stream (before OpenAPI 3.2, an event stream's schema describes "
            "each event): `data: {chunk}` events (the JSON of each chunk, or of an error body), then `data: [DONE]`."
        ),
        properties={"data": Schema(type=OpenAPIType.STRING)},
        required=["data"],
    )
)


NAMED_EVENTS = OpenAPIMediaType(
    schema=Schema(
        type=OpenAPIType.OBJECT,
        description=(
            "With `stream: true`, one event of the stream: `event: {type}` and `data: {json}` whose `type` field is "
            "the event's name (the Responses API's and Anthropic's stream events), and `: ping` comments while idle."
        ),
        properties={"event": Schema(type=OpenAPIType.STRING), "data": Schema(type=OpenAPIType.STRING)},
        required=["event", "data"],
    )
)


def body_operation(kind: type[Any], *, streams: bool = False, events: OpenAPIMediaType = SSE) -> type[Operation]:
    """An ``operation_class`` whose request body is ``kind``'s JSON schema (and which may answer ``events``)."""

    @dataclasses.dataclass
    class WithRequestBody(Operation):
        def __post_init__(self) -> None:
            self.request_body = RequestBody(
                content={"application/json": OpenAPIMediaType(schema=request_schema(kind))},  # type: ignore[arg-type]
                required=True,
            )
            ok = (self.responses or {}).get("200")
            if streams and isinstance(ok, OpenAPIResponse):
                ok.content = (ok.content or {}) | {"text/event-stream": events}

    return WithRequestBody


@functools.cache
def request_schema(kind: type[Any]) -> Schema:
    """The inlined schema of ``kind`` and everything it refers to, with the ranges its fields enforce."""
    creator = SchemaCreator(plugins=[AttrsSchemaPlugin()])
    root = creator.for_field_definition(FieldDefinition.from_annotation(kind))
    schemas = creator.schema_registry.generate_components_schemas()
    for described in _attrs_classes(kind):
        schema = schemas.get(described.__name__)
        properties = (schema.properties or {}) if isinstance(schema, Schema) else {}
        for field in attrs.fields(described):
            row = field.metadata.get("option")
            limits = field.metadata.get("schema") or (_limits(row) if row is not None else None)
            if limits and isinstance(properties.get(field.name), Schema):
                _constrain(properties[field.name], limits)  # type: ignore[arg-type]
        if getattr(described, "reads_options", False) and isinstance(schema, Schema):
            schema.properties = properties | {
                name: _option_schema(row)
                for row in OPTIONS
                for name in (row.name, *row.aliases)
                if name not in properties
            }
    inlined = _inline(root, schemas)
    assert isinstance(inlined, Schema)  # noqa: S101  an attrs class always gives an object schema
    return inlined


def _inline(node: Any, schemas: dict[str, Schema]) -> Any:  # noqa: ANN401  walks the spec's dataclasses
    """``node`` with every ``$ref`` to ``schemas`` replaced by a copy of what it names."""
    if isinstance(node, Reference):
        return _inline(copy.deepcopy(schemas[node.ref.rsplit("/", 1)[-1]]), schemas)
    if isinstance(node, list):
        return [_inline(item, schemas) for item in node]
    if isinstance(node, dict):
        return {key: _inline(value, schemas) for key, value in node.items()}
    if isinstance(node, Schema):
        for field in dataclasses.fields(node):
            value = getattr(node, field.name)
            if isinstance(value, Reference | Schema | list | dict):
                setattr(node, field.name, _inline(value, schemas))
    return node


def _limits(row: Option) -> dict[str, float]:
    """An option's range as the schema's bound attributes."""
    published = row.schema()
    names = {"minimum": "minimum", "maximum": "maximum", "exclusiveMinimum": "exclusive_minimum"}
    return {names[key]: value for key, value in published.items() if key in names}  # type: ignore[misc]


def _option_schema(row: Option) -> Schema:
    """The schema of a table option the request's other fields may carry (``domain.options``)."""
    published = row.schema()
    if row.kind is Kind.TOKEN_SEQUENCES:
        ids = Schema(type=OpenAPIType.ARRAY, items=Schema(type=OpenAPIType.INTEGER, minimum=0))
        return Schema(type=OpenAPIType.ARRAY, items=ids, description=row.doc)
    if row.kind is Kind.EARLY_STOPPING:
        never = Schema(type=OpenAPIType.STRING, enum=["never"])
        return Schema(one_of=[Schema(type=OpenAPIType.BOOLEAN), never], description=row.doc)
    schema = Schema(type=OpenAPIType(published["type"]), description=row.doc)
    for name, bound in _limits(row).items():
        setattr(schema, name, bound)
    return schema


def _constrain(schema: Schema, limits: dict[str, float]) -> None:
    """Put ``limits`` on the non-null branches of a (possibly optional) property schema."""
    for branch in schema.one_of or [schema]:
        if isinstance(branch, Schema) and branch.type != OpenAPIType.NULL:
            for name, bound in limits.items():
                setattr(branch, name, bound)


def _attrs_classes(kind: type[Any]) -> list[type[Any]]:
    """``kind`` and every attrs class reachable through its fields."""
    seen: list[type[Any]] = []
    pending = [kind]
    while pending:
        current = pending.pop()
        if current in seen or not attrs.has(current):
            continue
        seen.append(current)
        for annotation in typing.get_type_hints(current).values():
            pending.extend(_types_in(annotation))
    return seen


def _types_in(annotation: Any) -> list[type[Any]]:  # noqa: ANN401
    found = [annotation] if isinstance(annotation, type) else []
    for argument in typing.get_args(annotation):
        found.extend(_types_in(argument))
    return found
