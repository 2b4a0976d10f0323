"""Typed ``key=value`` options for dataclass configs (task parameters, pretraining overrides)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Sequence

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


# --- option checks: cheap range / name tests a task runs on its params before it loads a model or reads data ---

def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_at_least(name: str, value: Any, minimum: float) -> None:
    """``value >= minimum`` (a finite number); ``None`` passes (an option left to a default)."""
    if value is not None and not (_number(value) and value >= minimum):
        raise UserError(f"{name} must be a number >= {minimum:g}; got {value!r}")


def check_positive(name: str, value: Any) -> None:
    """``value > 0`` and finite (temperatures, learning rates, penalties); ``None`` passes."""
    if value is not None and not (_number(value) and value > 0):
        raise UserError(f"{name} must be a finite number > 0; got {value!r}")


def check_between(name: str, value: Any, low: float, high: float, low_open: bool = False,
                  high_open: bool = False) -> None:
    """``value`` in the interval from ``low`` to ``high`` (each end closed unless ``*_open``); ``None`` passes."""
    if value is None:
        return
    above = _number(value) and (value > low if low_open else value >= low)
    below = _number(value) and (value < high if high_open else value <= high)
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise UserError(f"{name} must lie in {interval}; got {value!r}")


def check_ints_at_least(name: str, values: Sequence[Any], minimum: int, allow_empty: bool = False) -> None:
    """Every entry an integer >= ``minimum`` (k's of kNN, shots, mP@k); empty only with ``allow_empty``."""
    if not values and not allow_empty:
        raise UserError(f"{name} is empty; expected one or more integers >= {minimum}")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < minimum]
    if bad:
        raise UserError(f"{name} must be integers >= {minimum}; got {', '.join(map(str, bad))} in {tuple(values)}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """``value`` one of ``choices``."""
    if value not in choices:
        raise UserError(f"{name}={value!r}; expected one of {', '.join(map(str, choices))}")


def check_feature(name: str, text: str, pooled: bool = False) -> None:
    """A valid feature spec (``cls``, ``cls_prenorm``, ``lastN``, ``avgpool``, ``patch``, '+'-joined); ``pooled``:
    one vector per image (no ``patch`` tokens), as classifiers on (N, D) features need."""
    from .features import FeatureSpec

    try:
        spec = FeatureSpec(text)
    except UserError as error:
        raise UserError(f"{name}: {error}") from None
    if pooled and "patch" in spec.parts:
        raise UserError(f"{name}={text!r}: this task needs pooled features (N, D); expected cls, cls_prenorm, lastN "
                        "or avgpool, not patch")


def check_transform(name: str, text: str) -> None:
    """A protocol transform name (``eval_dino``, ``eval_msn``, ...)."""
    from .transforms import PROTOCOL_TRANSFORMS

    check_choice(name, text, sorted(PROTOCOL_TRANSFORMS))


def check_shot_groups(owner: str, many_shot: int, few_shot: int) -> None:
    """Long-tail group thresholds (``longtail.shot_groups``): counts >= 0 with few_shot <= many_shot."""
    check_at_least(f"{owner}.many_shot", many_shot, 0)
    check_at_least(f"{owner}.few_shot", few_shot, 0)
    if few_shot > many_shot:
        raise UserError(f"{owner}.few_shot ({few_shot}) must not exceed {owner}.many_shot ({many_shot})")
