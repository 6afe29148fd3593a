"""Config sections: typed, range-checked dataclasses whose errors name the dotted key.

It sits below every layer: rollout, learner and buffer declare their sections with it, and it
imports nothing of the project. `configtypes.loading` reads YAML and overrides into it.

Every config section is a `@section` class: a real dataclass (replace, asdict, fields and
attribute assignment keep working) that pydantic validates whenever one is made, with each
field's range or choices in its annotation (`Annotated[float, Field(gt=0)]`, `Literal[...]`).
A check of one value that a range cannot say is an AfterValidator raising ValueError (its key
is put in front); rules across fields stay in `__post_init__` and raise ConfigError naming
the keys themselves. One translation turns pydantic's errors into messages with the full dotted
key ("learner.eps must be > 0, got -1"), whether the section came from YAML, an override, or code.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import annotated_types
from pydantic import BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

T = TypeVar("T")

# Unknown keys are errors, NaN and inf are no one's intended value, and a number given for a
# string (wandb.run_name: 2024) is the string.
_PYDANTIC = ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True)


def _not_a_bool(value: Any) -> Any:
    """pydantic reads true as 1; `train.steps: true` is a mistake, not a count."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    return value


_NUMBER = BeforeValidator(_not_a_bool)

# Ranges most fields share; others spell theirs out with Field(...).
AtLeast1 = Annotated[int, _NUMBER, Field(ge=1)]  # counts that cannot be zero
AtLeast0 = Annotated[int, _NUMBER, Field(ge=0)]  # counts where 0 means none or disabled; seeds
Positive = Annotated[float, _NUMBER, Field(gt=0)]  # timeouts, sizes, learning rates
NonNegative = Annotated[float, _NUMBER, Field(ge=0)]  # resource shares, shape parameters
NonEmpty = Annotated[str, Field(min_length=1)]  # names and paths


class ConfigError(ValueError):
    """A configuration the run cannot start with; the message says which key and why."""


def section(path: str = "", *, frozen: bool = False) -> Callable[[type[T]], type[T]]:
    """Make a config section of a class: validated on every construction, errors named `path.key`.

    `path` is where the section sits in the run config ("learner"), so a section built on its
    own (tests, benches, `dataclasses.replace`) reports the same keys a YAML file would.
    """

    def wrap(cls: type[T]) -> type[T]:
        cls = pydantic_dataclass(cls, config=_PYDANTIC, frozen=frozen)  # type: ignore[assignment]
        cls._section_path = path  # type: ignore[attr-defined]
        validate = cls.__init__

        @functools.wraps(validate)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            try:
                validate(self, *args, **kwargs)
            except ValidationError as err:
                raise ConfigError(describe(err, cls, path)) from None

        cls.__init__ = __init__  # type: ignore[method-assign]
        return cls

    return wrap


def build(cls: type[T], data: Any, where: str = "") -> T:
    """`cls` from untyped data (nested mappings), checked by the same rules as its constructor."""
    where = where or getattr(cls, "_section_path", "")
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    _check_keys(cls, data, where)
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as err:
        raise ConfigError(describe(err, cls, where)) from None


def derive(config: T, name: str, value: Any, source: str, why: str) -> T:
    """`config` with field `name` taking `value`, which the run derives from the key `source`.

    Unset (None), the field takes the value and is remembered as derived (in the section's
    `_derived` field), so that to_dict writes it unset again and a copy of the run with another
    `source` (dataclasses.replace, a resumed run with overrides) derives it afresh instead of
    reporting a conflict. A value the user set must agree with the derived one.
    """
    current, derived = getattr(config, name), config._derived
    if current is None or name in derived:
        if current == value:
            return config
        fills = {name: value, "_derived": tuple(sorted({*derived, name}))}
        return dataclasses.replace(config, **fills)  # type: ignore[type-var]
    if current != value:
        key = _join(getattr(config, "_section_path", ""), name)
        raise ConfigError(f"{key} ({current}) must equal {source} ({value}): {why}; leave it unset")
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """A plain (YAML-able) dict of a config, for logging and checkpoints; derived values are written unset."""
    return _plain(config)


def keys_of(cls: type) -> list[str]:
    """The keys a section takes (bookkeeping fields, named with a leading underscore, are not keys)."""
    return [f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]


def unknown_key(where: str, key: Any, names: list[str]) -> str:
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
    return f"unknown key {_join(where, key)!r}{hint}"


def describe(err: ValidationError, cls: type, where: str = "") -> str:
    """pydantic's errors as one line per problem, each naming the dotted key."""
    lines: list[str] = []
    for e in err.errors(include_url=False):
        line = _message(e, cls, where)
        if line not in lines:
            lines.append(line)
    return "; ".join(lines)


def _message(e: Any, cls: type, where: str) -> str:
    loc, kind, ctx, value = e["loc"], e["type"], e.get("ctx") or {}, e.get("input")
    key = _join(where, _loc(loc))
    got = f"got {value!r}"
    bound = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bound:
        interval = _interval(_type_at(cls, loc, unwrap=False))
        if interval:
            return f"{key} must be in {interval}, {got}"
        return f"{key} must be {bound[kind]} {next(iter(ctx.values())):g}, {got}"
    if kind == "literal_error":
        return f"{key} must be {ctx['expected']}, {got}"
    if kind in ("value_error", "assertion_error"):
        cause = ctx.get("error")
        if isinstance(cause, ConfigError):  # raised by a section's own rules: it names its keys
            return str(cause)
        return f"{key}: {cause}" if key else str(cause)
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        owner = _type_at(cls, loc[:-1])
        names = keys_of(owner) if dataclasses.is_dataclass(owner) else []
        return unknown_key(_join(where, _loc(loc[:-1])), loc[-1], names)
    if kind == "missing" and loc and isinstance(loc[-1], int):  # a fixed-length tuple came short
        parent = _join(where, _loc(loc[:-1]))
        return f"{parent}: expected {len(typing.get_args(_type_at(cls, loc[:-1])))} values, got {len(value)}"
    if kind in ("too_short", "too_long") and ctx.get("field_type") == "Tuple":
        expected = ctx.get("max_length", ctx.get("min_length"))
        return f"{key}: expected {expected} values, got {ctx['actual_length']}"
    if kind == "too_short":
        return f"{key} must hold at least {ctx['min_length']} item(s), got {ctx['actual_length']}"
    if kind in ("missing", "missing_argument"):
        return f"missing required key {key!r}"
    if kind == "string_too_short":
        return f"{key} must not be empty"
    if kind == "string_too_long":
        return f"{key} must be at most {ctx['max_length']} characters, {got}"
    if kind == "finite_number":
        return f"{key} must be a finite number, {got}"
    expected = _EXPECTED.get(kind)
    if expected:
        return f"{key}: expected {expected}, {got}"
    return f"{key}: {e['msg']}"


_EXPECTED = {
    **dict.fromkeys(("int_parsing", "int_type", "int_from_float", "int_parsing_size"), "an integer"),
    **dict.fromkeys(("float_parsing", "float_type"), "a number"),
    **dict.fromkeys(("bool_parsing", "bool_type"), "true or false"),
    "string_type": "a string",
    **dict.fromkeys(("dataclass_type", "dataclass_args_type", "dict_type", "model_type"), "a mapping"),
    **dict.fromkeys(("list_type", "tuple_type", "iterable_type"), "a list"),
}


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _check_keys(tp: Any, data: Any, where: str) -> None:
    """Unknown keys anywhere in the tree, before values: a misspelt key is the likelier mistake."""
    tp = _unwrap(tp)
    if dataclasses.is_dataclass(tp) and isinstance(data, dict):
        names, hints = keys_of(tp), _hints(tp)
        for key, value in data.items():
            if key not in names:
                raise ConfigError(unknown_key(where, key, names))
            _check_keys(hints[key], value, _join(where, key))
    elif typing.get_origin(tp) is list and isinstance(data, list):
        for i, value in enumerate(data):
            _check_keys(typing.get_args(tp)[0], value, f"{where}[{i}]")


def _type_at(tp: Any, loc: tuple, unwrap: bool = True) -> Any:
    """The declared type at an error location (for the names a section takes, a tuple's length, a range)."""
    for part in loc:
        tp = _unwrap(tp)
        args = typing.get_args(tp)
        if isinstance(part, int):
            fixed = typing.get_origin(tp) is tuple and args and args[-1] is not Ellipsis
            tp = (args[part] if part < len(args) else Any) if fixed else (args[0] if args else Any)
        elif dataclasses.is_dataclass(tp):
            tp = _hints(tp).get(part, Any)
        else:
            return Any
    return _unwrap(tp) if unwrap else tp


def _interval(tp: Any) -> str | None:
    """A two-sided range as "(0, 1]": it reads better than the one bound a value broke."""
    low = high = None
    for extra in _extras(tp):
        for bound in getattr(extra, "metadata", [extra]):
            if isinstance(bound, annotated_types.Gt):
                low = f"({bound.gt:g}"
            elif isinstance(bound, annotated_types.Ge):
                low = f"[{bound.ge:g}"
            elif isinstance(bound, annotated_types.Lt):
                high = f"{bound.lt:g})"
            elif isinstance(bound, annotated_types.Le):
                high = f"{bound.le:g}]"
    return f"{low}, {high}" if low and high else None


def _extras(tp: Any) -> list[Any]:
    """The Annotated metadata of a type, looking through X | None."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return [*typing.get_args(tp)[1:], *_extras(typing.get_args(tp)[0])]
    if origin in (typing.Union, types.UnionType):
        return [e for a in typing.get_args(tp) for e in _extras(a)]
    return []


def _unwrap(tp: Any) -> Any:
    """X from Annotated[X, ...] and from X | None."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            options = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(options) != 1:
                return tp
            tp = options[0]
        else:
            return tp


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        derived = getattr(value, "_derived", ())
        return {
            f.name: None if f.name in derived else _plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not f.name.startswith("_")
        }
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out = f"{out}[{part}]" if isinstance(part, int) else _join(out, part)
    return out


def _join(where: str, key: Any) -> str:
    if key == "":
        return where
    return f"{where}.{key}" if where else str(key)
