"""Typed config sections: one pydantic base, field helpers that state their rule, and one converter
from pydantic's errors to the one-line `UserError` every section raises.

A field's rule is written once, as its `description` (the helpers below derive it from the bounds
they enforce), and the converter phrases every type or range error as `<key> must be <rule>, got
<value>`. Literal choices and registry names fail as `unknown <key> <value>; choose from [...]`,
unknown keys as `unknown <section> key(s) [...]; valid keys: [...]`, and a validator's own
ValueError is passed through as written.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from segsearch.errors import UserError
from segsearch.registry import Registry

#: The field every union of sections is discriminated on (the loss section's `kind`).
DISCRIMINATOR = "kind"
_NOT_A_MAPPING = ("model_type", "model_attributes_type", "dict_type")


class Section(BaseModel):
    """A frozen config section; a key it does not declare is an error.

    Strict: a bool is not a number, a float not an int, a string neither (YAML reads `1e-3`
    as a string). A field that takes a JSON list as a tuple says `strict=False` itself.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _no_lookalike(value: Any) -> Any:
    """Literal choices compare with ==, so True would pass as 1 and 8.0 as 8: refuse both."""
    if isinstance(value, bool | float):
        raise PydanticCustomError("literal_error", "Input should be one of the choices")
    return value


#: Put on a Literal of ints: `Annotated[Literal[4, 8], Exact]`.
Exact = BeforeValidator(_no_lookalike)


def _size_from_text(value: Any) -> Any:
    """A size written as text, "HEIGHTxWIDTH", as [height, width]: a search space's `choice`
    values are scalars, so a searched size is text; anything else is left to the field's rule."""
    if isinstance(value, str):
        height, sep, width = value.lower().partition("x")
        if sep and height.strip().isdigit() and width.strip().isdigit():
            return [int(height), int(width)]
    return value


#: Put on a [height, width] field so that it also takes "HEIGHTxWIDTH".
SizeText = BeforeValidator(_size_from_text)


def integer(default: int, *, low: int, high: int | None = None, rule: str | None = None) -> Any:
    """An int field within [low, high]."""
    if rule is None:
        rule = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
    return Field(default, ge=low, le=high, description=rule)


def number(
    default: float,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    rule: str | None = None,
) -> Any:
    """A finite float field (an int is taken as a float) within the given bounds."""
    if rule is None:
        rule = "a number" + _bounds_text(ge, gt, le, lt)
    return Field(default, allow_inf_nan=False, ge=ge, gt=gt, le=le, lt=lt, description=rule)


def _bounds_text(ge: float | None, gt: float | None, le: float | None, lt: float | None) -> str:
    low = (f"[{ge}", ge) if ge is not None else (f"({gt}", gt) if gt is not None else None
    high = (f"{le}]", le) if le is not None else (f"{lt})", lt) if lt is not None else None
    if low and high:
        return f" in {low[0]}, {high[0]}"
    if low:
        return f" {'>=' if ge is not None else '>'} {low[1]}"
    if high:
        return f" {'<=' if le is not None else '<'} {high[1]}"
    return ""


def registered(registry: Registry[Any]) -> BeforeValidator:
    """A name that must be in `registry`; an unknown one fails with the registry's own message."""

    def check(name: Any) -> Any:
        try:
            registry.get(name)
        except UserError as err:
            raise ValueError(str(err)) from None
        return name

    return BeforeValidator(check)


def validate(schema: Any, data: Any, *, section: str, prefix: str | None = None) -> Any:
    """`data` (a mapping, or an instance already typed) as `schema`, else a one-line UserError.

    `schema` is a Section class or a union of them. Keys in messages are `prefix.key` (`prefix`
    defaults to `section`; give "" for the top level); `section` names the whole in messages.
    """
    try:
        return TypeAdapter(schema).validate_python(data)
    except ValidationError as err:
        raise UserError(one_line(err, schema, data, section=section, prefix=prefix)) from None


def one_line(
    err: ValidationError, schema: Any, data: Any, *, section: str, prefix: str | None = None
) -> str:
    """The first error of `err` as one line naming the key and the rule it breaks."""
    errors = err.errors(include_url=False)
    first = errors[0]
    path, field, value, models = _locate(schema, first["loc"], data)
    parts = [section if prefix is None else prefix, *path]
    key = ".".join(p for p in parts if p) or section
    kind = first["type"]
    if kind == "extra_forbidden":
        parent = first["loc"][:-1]
        unknown = sorted(
            str(e["loc"][-1]) for e in errors if e["type"] == kind and e["loc"][:-1] == parent
        )
        valid = sorted(models[0].model_fields, key=lambda name: (name != DISCRIMINATOR, name))
        tag = models[0].model_fields.get(DISCRIMINATOR)
        for_kind = f" for {DISCRIMINATOR} {tag.default}" if tag is not None else ""
        return f"unknown {key} key(s) {unknown}{for_kind}; valid keys: {valid}"
    if kind in ("value_error", "assertion_error"):
        return str(first["ctx"]["error"])
    if kind == "literal_error" and field is not None:
        return f"unknown {key} {value!r}; choose from {list(get_args(field.annotation))}"
    if field is not None and field.description:
        return f"{key} must be {field.description}, got {value!r}"
    if kind in _NOT_A_MAPPING:
        return f"{key} must be a mapping, got {type(value).__name__}"
    return f"{key}: {first['msg']}, got {value!r}"


def _locate(
    schema: Any, loc: tuple[int | str, ...], data: Any
) -> tuple[list[str], FieldInfo | None, Any, list[type[BaseModel]]]:
    """Follow an error's `loc` through the schema: the field path, the last field, its raw value
    in `data`, and the section classes that hold the rest of `loc`.

    A union's tag in `loc` selects the member; an index into a list or tuple ends the walk, so the
    value shown is the whole field, as the user wrote it.
    """
    models = _sections(schema)
    path: list[str] = []
    field, value = None, data
    for part in loc:
        if len(models) > 1:
            models = [m for m in models if _tag(m) == part]
            continue
        if not models or part not in models[0].model_fields:
            break
        field = models[0].model_fields[part]
        path.append(str(part))
        value = value.get(part) if isinstance(value, Mapping) else getattr(value, part, None)
        models = _sections(field.annotation)
    return path, field, value, models


def _tag(model: type[BaseModel]) -> Any:
    field = model.model_fields.get(DISCRIMINATOR)
    return None if field is None else field.default


def _sections(annotation: Any) -> list[type[BaseModel]]:
    """The Section classes a field's annotation allows (through Annotated, unions and None)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = get_origin(annotation)
    if origin is Annotated:
        return _sections(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [m for arg in get_args(annotation) for m in _sections(arg)]
    return []
