"""Typed command-line values: a count, a bounded finite number, a ratio.

Used as argparse ``type=`` so every numeric flag of every command is checked the same way
before any work starts: ``--tp 0``, ``--gpu-mem nan`` or ``--seq-len -1`` is one line naming the
flag and the range it takes, never a traceback or a silently odd plan.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def integer(minimum: int | None = 1, maximum: int | None = None) -> Callable[[str], int]:
    """An integer in [minimum, maximum] (either bound may be None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {_range(minimum, maximum)}, got {value}")
        return value

    return parse


def number(
    *,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
) -> Callable[[str], float]:
    """A finite float inside the given bounds (NaN and inf are refused)."""
    bounds = [
        (b, op, ok)
        for b, op, ok in (
            (above, ">", lambda v, b: v > b),
            (at_least, ">=", lambda v, b: v >= b),
            (at_most, "<=", lambda v, b: v <= b),
            (below, "<", lambda v, b: v < b),
        )
        if b is not None
    ]

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if not all(ok(value, b) for b, _, ok in bounds):
            wanted = " and ".join(f"{op} {b:g}" for b, op, _ in bounds)
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    return parse


def ratio(text: str) -> float:
    """A fraction of heads in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text} is outside (0, 1]; use e.g. --ratio 0.1 for 10 % of heads")
    return value


def _range(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"in {minimum}..{maximum}"
    return f"at least {minimum}" if minimum is not None else f"at most {maximum}"
