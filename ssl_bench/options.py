"""Typed ``key=value`` options for dataclass configs (task parameters, pretraining overrides)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from .errors import UserError


def _convert(text: str, kind: Any, what: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (tuple, list):
        (inner, *_) = typing.get_args(kind) or (str,)
        values = [_convert(part.strip(), inner, what) for part in text.split(",") if part.strip()]
        return tuple(values) if origin is tuple else values
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if text.lower() in ("none", ""):
            return None
        return _convert(text, options[0], what)
    try:
        if kind is bool:
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("1", "true", "yes")
        return kind(text)
    except ValueError:
        raise UserError(f"{what}={text!r}: expected {getattr(kind, '__name__', kind)}") from None


def parse_fields(cls: type, values: dict[str, str], owner: str) -> dict[str, Any]:
    """Convert ``key=value`` strings to the dataclass's field types; unknown keys name the valid ones."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise UserError(f"{owner} has no option {', '.join(unknown)}; its options: {', '.join(names)}")
    return {k: _convert(v, hints[k], f"{owner.split()[-1]}.{k}") for k, v in values.items()}
