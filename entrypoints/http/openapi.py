"""Request bodies in the published OpenAPI schema, described from the wire types the handlers structure themselves.

The handlers read and structure their bodies with the wire converter, so Litestar cannot infer the request body;
each POST handler gets an ``operation_class`` that publishes the schema of the wire type, written here from its
attrs fields (Litestar's public spec types only), inlined, with the ranges the fields enforce.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
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

from domain.options import OPTION_NAMES, Kind, Option, option

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
    """The inlined JSON schema of the wire type ``kind``: its fields, their types, the ranges they enforce.

    Written from the attrs classes the handlers structure bodies into, with Litestar's public spec types only.
    """
    return _type_schema(kind, frozenset())


_SCALARS = {
    str: OpenAPIType.STRING,
    int: OpenAPIType.INTEGER,
    float: OpenAPIType.NUMBER,
    bool: OpenAPIType.BOOLEAN,
    type(None): OpenAPIType.NULL,
}


def _type_schema(annotation: Any, outer: frozenset[type[Any]]) -> Schema:  # noqa: ANN401, PLR0911  one per kind
    """The schema of one annotation; ``outer`` holds the attrs classes being described (a cycle is left open)."""
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if annotation in _SCALARS:
        return Schema(type=_SCALARS[annotation])
    if origin in (typing.Union, types.UnionType):
        return Schema(one_of=[_type_schema(arm, outer) for arm in arguments])
    if origin is typing.Literal:
        kinds = {_SCALARS[type(value)] for value in arguments}
        return Schema(type=kinds.pop() if len(kinds) == 1 else None, enum=list(arguments))
    if origin is list:
        return Schema(type=OpenAPIType.ARRAY, items=_type_schema(arguments[0], outer))
    if origin is dict:
        return Schema(type=OpenAPIType.OBJECT, additional_properties=_type_schema(arguments[1], outer))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return Schema(type=OpenAPIType.STRING, enum=[member.value for member in annotation])
    if attrs.has(annotation) and annotation not in outer:
        return _object_schema(annotation, outer | {annotation})
    return Schema()  # Any, or a class already being described


def _object_schema(kind: type[Any], outer: frozenset[type[Any]]) -> Schema:
    """An attrs class as an object: a property per field, the fields without a default required."""
    hints = typing.get_type_hints(kind)
    properties: dict[str, Schema | Reference] = {}
    required = []
    for field in attrs.fields(kind):
        schema = _type_schema(hints[field.name], outer)
        row = field.metadata.get("option")
        limits = field.metadata.get("schema") or (_limits(row) if row is not None else None)
        if limits:
            _constrain(schema, limits)
        properties[field.name] = schema
        if field.default is attrs.NOTHING:
            required.append(field.name)
    if getattr(kind, "reads_options", False):
        named = {name: option(name) for name in sorted(OPTION_NAMES) if name not in properties}
        properties |= {name: _option_schema(row) for name, row in named.items()}
    return Schema(type=OpenAPIType.OBJECT, properties=properties, required=required or None, title=kind.__name__)


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
