"""Settings as dataclasses whose fields can be overridden from the environment.

Each service declares one dataclass in its own `settings.py`; `from_env(Cls, "MECBENCH_SUT_")`
fills it, so `MECBENCH_SUT_MAX_WORKERS=16` sets `max_workers`. Values are converted by the
field's annotated type; a value that does not parse is an error naming the variable.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class SettingsError(ValueError):
    pass


def _convert(name: str, raw: str, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        non_none = [a for a in args if a is not type(None)]
        if raw == "" and len(non_none) < len(args):
            return None
        return _convert(name, raw, non_none[0])
    if annotation is bool:
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise SettingsError(f"{name}={raw!r}: expected a boolean (true/false)")
    if origin is tuple:
        return tuple(_convert(name, part.strip(), args[0]) for part in raw.split(",") if part.strip())
    if annotation in (int, float):
        try:
            return annotation(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r}: expected {annotation.__name__}") from None
    if annotation is Path:
        return Path(raw)
    return raw


def from_env(cls: type[T], prefix: str, environ: Mapping[str, str] | None = None, **overrides: Any) -> T:
    """Build `cls` from its defaults, then `{prefix}{FIELD}` environment variables, then overrides.

    Every problem is reported at once, in one SettingsError (one line): a value that does not
    parse, a choice outside a `Literal[...]` field's, a number outside the field's
    `metadata={"min": .., "max": ..}`."""
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    problems: list[str] = []
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    for field in fields:
        var = f"{prefix}{field.name.upper()}"
        if var in env:
            try:
                values[field.name] = _convert(var, env[var], hints[field.name])
            except SettingsError as exc:
                problems.append(str(exc))
    values.update({k: v for k, v in overrides.items() if v is not None})
    for field in fields:
        if field.name in values:
            problem = _check_value(f"{prefix}{field.name.upper()}", values[field.name], hints[field.name], field)
            if problem is not None:
                problems.append(problem)
    if problems:
        raise SettingsError("; ".join(problems))
    return cls(**values)


def _check_value(name: str, value: Any, annotation: Any, field: dataclasses.Field[Any]) -> str | None:
    """Why `value` is not one the field allows (its Literal choices, its range), or None."""
    if typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            return f"{name}={value!r}: expected one of {', '.join(str(c) for c in choices)}"
    low, high = field.metadata.get("min"), field.metadata.get("max")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if low is not None and value < low:
            return f"{name}={value!r}: must be at least {low}"
        if high is not None and value > high:
            return f"{name}={value!r}: must be at most {high}"
    return None
