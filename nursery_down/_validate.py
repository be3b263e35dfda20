"""The checks of what users pass: seconds, counts and async functions.

Every module that takes a number of seconds or a count from a user checks it here,
so that a NaN, an infinity, a bool or a negative number is refused the same way
everywhere, with a :class:`ConfigurationError` naming the setting.
"""

from __future__ import annotations

import inspect
import math
import os
from typing import TypeGuard

from ._exceptions import ConfigurationError


def is_finite_number(value: object) -> TypeGuard[int | float]:
    """True for an int or float that is neither infinite nor NaN (and not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def is_count(value: object) -> TypeGuard[int]:
    """True for a whole number of one or more (and not a bool): a number of workers."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def require_seconds(
    what: str, value: object, *, minimum: float = 0.0, positive: bool = False
) -> float:
    """*value* as float seconds, or :class:`ConfigurationError` naming *what*.

    It must be finite and at least *minimum*; with *positive*, also above zero.
    """
    if not is_finite_number(value) or value < minimum or (positive and value <= 0):
        bound = "> 0" if positive and minimum <= 0 else f">= {minimum:g}"
        raise ConfigurationError(f"{what} must be a finite number {bound}, got {value!r}")
    return float(value)


def require_count(what: str, value: object) -> int:
    """*value* as a whole number >= 1, or :class:`ConfigurationError` naming *what*."""
    if not is_count(value):
        raise ConfigurationError(f"{what} must be a whole number >= 1, got {value!r}")
    return value


#: Largest extension of a grace deadline in one call (a day).
MAX_GRACE_EXTENSION = 86_400.0
#: Furthest a grace deadline may be moved ahead of now (a week).
MAX_GRACE_AHEAD = 7 * 86_400.0


def require_extension(seconds: object, *, left: float) -> float:
    """*seconds* to move a grace deadline later, or :class:`ConfigurationError`.

    *left* is the time left before the latest deadline it moves. Each call may add
    at most :data:`MAX_GRACE_EXTENSION`, and no deadline may end up more than
    :data:`MAX_GRACE_AHEAD` from now, so a countdown always stays finite.
    """
    value = require_seconds("seconds", seconds)
    if value > MAX_GRACE_EXTENSION:
        raise ConfigurationError(
            f"cannot extend the grace by {value:g} s: at most {MAX_GRACE_EXTENSION:g} s "
            "(a day) per call"
        )
    if left + value > MAX_GRACE_AHEAD:
        room = max(0.0, MAX_GRACE_AHEAD - left)
        raise ConfigurationError(
            f"cannot extend the grace by {value:g} s: a deadline may end at most "
            f"{MAX_GRACE_AHEAD:g} s (a week) from now; at most {room:.0f} s more is possible"
        )
    return value


def seconds_from_environ(name: str, what: str, *, positive: bool = False) -> float | None:
    """The seconds in environment variable *name*, None when unset or empty."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ConfigurationError(
            f"{name}={text!r} is not a valid {what}: set it to a number of seconds {bound}, "
            "or unset it"
        )
    return value


def is_async_function(function: object) -> bool:
    """True for an async function, or a partial of one, or an object with async ``__call__``."""
    target = function
    while hasattr(target, "func"):
        target = target.func
    if inspect.iscoroutinefunction(target):
        return True
    call = getattr(target, "__call__", None)  # noqa: B004  # an object with async __call__
    return inspect.iscoroutinefunction(call)
