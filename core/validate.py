"""Validation helpers shared by every config dataclass in `core`.

Every config is a frozen dataclass that checks itself in `__post_init__`; a bad value raises
`ConfigError` naming the class, the field, the value and what was expected, before any work.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable


class ConfigError(ValueError):
    """A config field holds a value outside its allowed range."""


def fail(obj: Any, field: str, expected: str) -> None:
    value = getattr(obj, field)
    raise ConfigError(f"{type(obj).__name__}.{field} = {value!r}: expected {expected}")


def positive_int(obj: Any, *fields: str) -> None:
    for f in fields:
        v = getattr(obj, f)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            fail(obj, f, "a positive integer")


def non_negative_int(obj: Any, *fields: str) -> None:
    for f in fields:
        v = getattr(obj, f)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            fail(obj, f, "an integer >= 0")


def in_range(obj: Any, field: str, lo: float | None = None, hi: float | None = None,
             lo_open: bool = False, hi_open: bool = False) -> None:
    v = getattr(obj, field)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        fail(obj, field, "a real number")
    ok = True
    if lo is not None:
        ok &= v > lo if lo_open else v >= lo
    if hi is not None:
        ok &= v < hi if hi_open else v <= hi
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        fail(obj, field, f"a value in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}")


def one_of(obj: Any, field: str, allowed: Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if getattr(obj, field) not in allowed:
        fail(obj, field, f"one of {allowed}")


def int_tuple(obj: Any, field: str, length: int | None = None, positive: bool = True) -> None:
    v = getattr(obj, field)
    ok = isinstance(v, tuple) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
    ok = ok and (length is None or len(v) == length) and (not positive or all(x > 0 for x in v))
    if not ok:
        n = f"{length} " if length is not None else ""
        fail(obj, field, f"a tuple of {n}{'positive ' if positive else ''}integers")


def to_dict(cfg: Any) -> dict:
    """A JSON-ready dict of a (nested) config dataclass, tuples as lists."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict) -> Any:
    """Build `cls` from `to_dict` output; unknown keys are an error naming them.

    Nested dataclass fields and tuple fields are rebuilt from their annotations' defaults.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        default = _default_of(fields[name])
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = from_dict(type(default), value)
        elif isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[name] = value
    return cls(**kwargs)


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return None
