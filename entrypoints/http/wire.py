"""The one wire converter, which every dialect structures its requests and unstructures its responses with.

Strict JSON types (no "1" for 1, no 1 for true), enums by value, null as a field's default, and readable errors.
"""

from __future__ import annotations

import enum
import re
import types
import typing
from typing import Any, TypeVar

import attrs
import cattrs
import cattrs.gen
from cattrs.cols import list_structure_factory

from domain.errors import InvalidRequestError
from domain.messages import Role
from entrypoints.http.openai_bodies import CompletionChoice, Delta, ScoredCompletionChoice

T = TypeVar("T")

# Structuring -----------------------------------------------------------------------------------------------------


def _strict(kind: type[Any], *, accepts: tuple[type[Any], ...]) -> Any:  # noqa: ANN401  a cattrs hook
    def structure(value: object, _: object) -> object:
        if isinstance(value, bool) and kind is not bool:
            msg = f"expected {kind.__name__}, got a boolean"
            raise TypeError(msg)
        if not isinstance(value, accepts):
            msg = f"expected {kind.__name__}, got {type(value).__name__}"
            raise TypeError(msg)
        if kind is float:
            return float(value)
        return value

    return structure


def _union(converter: cattrs.Converter) -> Any:  # noqa: ANN401  a cattrs hook
    def structure(value: object, union: Any) -> object:  # noqa: ANN401
        arms = typing.get_args(union)
        if value is None and type(None) in arms:
            return None
        fitting = [arm for arm in arms if _takes_object(arm, value)]
        if len(fitting) == 1:  # the only arm for a JSON object: its own error says what is wrong inside
            return converter.structure(value, fitting[0])
        for arm in arms:
            if arm is type(None):
                continue
            try:
                return converter.structure(value, arm)
            except (TypeError, ValueError, cattrs.BaseValidationError):
                continue
        names = " or ".join("null" if arm is type(None) else _type_name(arm) for arm in arms)
        msg = f"expected {names}, got {type(value).__name__}"
        raise TypeError(msg)

    return structure


def _takes_object(kind: Any, value: object) -> bool:  # noqa: ANN401
    """Whether ``value`` is a JSON object and ``kind`` one (an attrs class or a dict)."""
    return isinstance(value, dict) and (attrs.has(kind) or typing.get_origin(kind) is dict)


def _type_name(kind: Any) -> str:  # noqa: ANN401
    origin = typing.get_origin(kind)
    if origin is list:
        return f"array of {_type_name(typing.get_args(kind)[0])}"
    if origin is typing.Literal:
        return " or ".join(repr(arg) for arg in typing.get_args(kind))
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(kind, "object")


def _list_factory(kind: Any, converter: cattrs.Converter) -> Any:  # noqa: ANN401  a cattrs hook factory
    items = list_structure_factory(kind, converter)

    def structure(value: object, kind: Any) -> object:  # noqa: ANN401
        if not isinstance(value, list):
            msg = f"expected an array, got {type(value).__name__}"
            raise TypeError(msg)
        return items(value, kind)

    return structure


def _object_factory(kind: Any, converter: cattrs.Converter) -> Any:  # noqa: ANN401  a cattrs hook factory
    key_type, value_type = typing.get_args(kind)

    def structure(value: object, _: Any) -> object:  # noqa: ANN401
        if not isinstance(value, dict):
            msg = f"expected an object, got {type(value).__name__}"
            raise TypeError(msg)
        return {converter.structure(k, key_type): converter.structure(x, value_type) for k, x in value.items()}

    return structure


def _enum(value: object, kind: type[enum.Enum]) -> enum.Enum:
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(repr(member.value) for member in kind)
        msg = f"must be one of {allowed}, got {value!r}"
        raise ValueError(msg) from None


def _is_list(kind: Any) -> bool:  # noqa: ANN401
    return typing.get_origin(kind) is list


def _is_dict(kind: Any) -> bool:  # noqa: ANN401
    return typing.get_origin(kind) is dict


def _is_union(kind: Any) -> bool:  # noqa: ANN401
    return typing.get_origin(kind) in (typing.Union, types.UnionType)


def _is_literal(kind: Any) -> bool:  # noqa: ANN401
    return typing.get_origin(kind) is typing.Literal


def _literal(value: object, kind: Any) -> object:  # noqa: ANN401  a cattrs hook
    """One of the literal's values, else a readable ``ValueError`` (which union structuring moves past)."""
    allowed = typing.get_args(kind)
    if isinstance(value, str | int | bool | None) and any(type(value) is type(a) and value == a for a in allowed):
        return value
    msg = f"must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}"
    raise ValueError(msg)


def _nulls_mean_default(kind: Any, converter: cattrs.Converter) -> Any:  # noqa: ANN401  a cattrs hook factory
    """Structure an attrs class, reading an explicit ``null`` as "unset" for fields with a default (as OpenAI does)."""
    structure_fields = cattrs.gen.make_dict_structure_fn(kind, converter)
    hints = typing.get_type_hints(kind)
    defaulted = {
        field.name
        for field in attrs.fields(kind)
        if field.default is not attrs.NOTHING and type(None) not in typing.get_args(hints[field.name])
    }

    def structure(value: Any, _: Any) -> object:  # noqa: ANN401
        if isinstance(value, dict) and defaulted:
            value = {key: item for key, item in value.items() if item is not None or key not in defaulted}
        return structure_fields(value, kind)

    return structure


def _converter() -> cattrs.Converter:
    """The wire converter: strict JSON types (no "1" for 1, no 1 for true), enums by value, null as default."""
    converter = cattrs.Converter(detailed_validation=True, forbid_extra_keys=False)
    converter.register_structure_hook_factory(attrs.has, _nulls_mean_default)
    converter.register_structure_hook_func(_is_union, _union(converter))
    converter.register_structure_hook_factory(_is_list, _list_factory)
    converter.register_structure_hook_factory(_is_dict, _object_factory)
    converter.register_structure_hook(Role, _enum)
    converter.register_unstructure_hook(
        Delta, cattrs.gen.make_dict_unstructure_fn(Delta, converter, _cattrs_omit_if_default=True)
    )
    plain_choice = cattrs.gen.make_dict_unstructure_fn(CompletionChoice, converter)
    scored_choice = cattrs.gen.make_dict_unstructure_fn(ScoredCompletionChoice, converter)
    converter.register_unstructure_hook(
        CompletionChoice, lambda c: scored_choice(c) if isinstance(c, ScoredCompletionChoice) else plain_choice(c)
    )
    converter.register_structure_hook_func(_is_literal, _literal)
    converter.register_structure_hook(int, _strict(int, accepts=(int,)))
    converter.register_structure_hook(float, _strict(float, accepts=(int, float)))
    converter.register_structure_hook(str, _strict(str, accepts=(str,)))
    converter.register_structure_hook(bool, _strict(bool, accepts=(bool,)))
    return converter


_CONVERTER = _converter()


def unstructure(value: object) -> Any:  # noqa: ANN401  JSON-ready data
    """A response object as JSON-ready data."""
    return _CONVERTER.unstructure(value)


def structure(body: object, kind: type[T]) -> tuple[T, dict[str, Any]]:
    """Structure a decoded JSON body into ``kind``; also return the fields ``kind`` does not know.

    Any failure becomes an ``InvalidRequestError`` naming the offending field, e.g. ``$.messages[0].role``.
    """
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    try:
        request = _CONVERTER.structure(body, kind)
    except InvalidRequestError:
        raise
    except Exception as error:
        message, param = _describe(error)
        raise InvalidRequestError(message, param=param) from error
    known = {field.name for field in attrs.fields(kind)}  # type: ignore[arg-type]
    return request, {key: value for key, value in body.items() if key not in known}


_VALIDATOR_MESSAGE = re.compile(r"^(?:Length of )?'(?P<name>\w+)'")
"""attrs validators name the field first: "'temperature' must be <= 2: 3"."""


def _describe(error: BaseException) -> tuple[str, str | None]:
    """One readable message and the field it concerns, from a cattrs or attrs validation failure."""
    found = _first_leaf(error, "$")
    if found is None:
        return str(error), None
    path, leaf = found
    if isinstance(leaf, InvalidRequestError):
        return leaf.message, leaf.param
    if isinstance(leaf, ValueError) and (named := _VALIDATOR_MESSAGE.match(str(leaf.args[0]) if leaf.args else "")):
        path = f"{path}.{named['name']}"
        detail = str(leaf.args[0])
    elif isinstance(leaf, KeyError):
        detail = "required field missing"
    else:
        detail = str(leaf) or type(leaf).__name__
    param = path.removeprefix("$").lstrip(".") or None
    return f"{path}: {detail}", param


def _first_leaf(error: BaseException, path: str) -> tuple[str, BaseException] | None:
    """The first non-group exception inside ``error``, with the JSON path cattrs recorded for it."""
    if not isinstance(error, BaseExceptionGroup):
        return path, error
    for sub in error.exceptions:
        step = ""
        for note in getattr(sub, "__notes__", []):
            name = getattr(note, "name", None)
            index = getattr(note, "index", None)
            if name is not None:
                step = f".{name}"
            elif index is not None:
                step = f"[{index}]"
        found = _first_leaf(sub, path + step)
        if found is not None:
            return found
    return None
