"""Ways to choose heads (paper Algorithm 1 and its baselines), pure functions on shapes and scores.

Every chooser returns a sorted list of 0-based ``(layer, head)`` pairs. All ``L * n`` query
heads compete in one pool.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from alps_ds.errors import AlpsError, check_choice

Head = tuple[int, int]
# How heads are chosen; recorded as provenance.select. top-k needs scores; all and none ignore the ratio.
METHODS: tuple[str, ...] = ("top-k", "random", "layer-consistent", "all", "none")
RATIO_METHODS: tuple[str, ...] = ("top-k", "random", "layer-consistent")
SEEDED_METHODS: tuple[str, ...] = ("random", "layer-consistent")


def check_ratio(ratio: float, source: str = "ratio") -> None:
    """One AlpsError naming ``source`` (a flag, key or argument) unless ``ratio`` is in (0, 1]."""
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not (0 < ratio <= 1):  # NaN fails too
        raise AlpsError(f"{source} {ratio!r} is outside (0, 1]; use e.g. 0.1 for 10 % of heads")


def count_for_ratio(ratio: float, num_layers: int, num_heads: int, *, name: str = "ratio") -> int:
    """K = ceil(r * L * n), with r in (0, 1]; a ratio too small to keep one head is refused, never 0 heads.

    ``name`` is the flag, key or argument the ratio came from, for the error message.
    """
    check_ratio(ratio, name)
    # round() first: 0.1 * 80 * 64 is 512.0000000000001 in binary floating point.
    k = math.ceil(round(ratio * num_layers * num_heads, 9))
    if k == 0:
        total = num_layers * num_heads
        raise AlpsError(
            f"{name} {ratio!r} keeps 0 of {total} heads ({num_layers} layers x {num_heads}); "
            f"use at least {name} {1 / total:.3g} for one head"
        )
    return k


def top_k(scores: Sequence[Sequence[float]] | np.ndarray, k: int) -> list[Head]:
    """The k highest-scoring heads; ties broken by (layer, head) ascending."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError("scores must be a layers x heads matrix")
    if not np.isfinite(s).all():
        raise AlpsError("scores contain NaN or inf; check the checkpoints for non-finite weights")
    L, n = s.shape
    flat = s.reshape(-1)
    # lexsort sorts by the last key first: primary -score, then the flat index (= layer, head).
    order = np.lexsort((np.arange(L * n), -flat))[:k]
    return sorted((int(i) // n, int(i) % n) for i in order)


def random_heads(num_layers: int, num_heads: int, k: int, seed: int) -> list[Head]:
    """k heads drawn uniformly from the whole pool, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(num_layers * num_heads, size=k, replace=False)
    return sorted((int(i) // num_heads, int(i) % num_heads) for i in picks)


def layer_consistent(num_layers: int, num_heads: int, k: int, seed: int) -> list[Head]:
    """The same number of random heads in every layer; the remainder k mod L goes to
    evenly spaced layers (one extra head each)."""
    rng = np.random.default_rng(seed)
    base, extra = divmod(k, num_layers)
    extra_layers = {(i * num_layers) // extra for i in range(extra)} if extra else set()
    heads: list[Head] = []
    for layer in range(num_layers):
        count = base + (layer in extra_layers)
        heads += [(layer, int(h)) for h in rng.choice(num_heads, size=count, replace=False)]
    return sorted(heads)


def all_heads(num_layers: int, num_heads: int) -> list[Head]:
    """Every query head ("w/ full" in the paper)."""
    return [(layer, h) for layer in range(num_layers) for h in range(num_heads)]


def parse_heads(
    text: str, num_layers: int | None = None, num_heads: int | None = None, *, source: str = "heads"
) -> list[Head]:
    """Parse an explicit list such as ``"3:5,7:0"`` (layer:head, 0-based); errors name ``source``."""
    heads: list[Head] = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        parts = item.split(":")
        # isdecimal, not isdigit: int() rejects digits such as '²' that isdigit accepts.
        if len(parts) != 2 or not all(p.strip().isdecimal() for p in parts):
            raise AlpsError(f"{source}: {item!r} is not LAYER:HEAD; write e.g. 3:5,7:0 (0-based)")
        layer, h = int(parts[0]), int(parts[1])
        if num_layers is not None and num_heads is not None and not (layer < num_layers and h < num_heads):
            raise AlpsError(f"{source}: {item} is outside the model ({num_layers} layers x {num_heads} heads, 0-based)")
        heads.append((layer, h))
    if not heads:
        none = "--select none" if source.startswith("--") else "method none"
        raise AlpsError(f"{source}: no head listed; write e.g. 3:5,7:0 (0-based), or use {none} for no heads")
    if len(set(heads)) != len(heads):
        raise AlpsError(f"{source}: a head is listed twice; list each LAYER:HEAD once")
    return sorted(heads)


def choose(
    method: str,
    *,
    num_layers: int,
    num_heads: int,
    ratio: float,
    seed: int = 0,
    scores: np.ndarray | None = None,
    ratio_name: str = "ratio",
) -> list[Head]:
    """Dispatch on the method name used by the CLI and recorded in heads.json (``ratio_name``: where the ratio
    came from, for errors)."""
    check_choice("method", method, METHODS)
    if method == "all":
        return all_heads(num_layers, num_heads)
    if method == "none":
        return []
    k = count_for_ratio(ratio, num_layers, num_heads, name=ratio_name)
    if method == "top-k":
        if scores is None:
            raise AlpsError("method top-k needs scores; localize a base/task pair first (alps_ds.localize)")
        return top_k(scores, k)
    if method == "random":
        return random_heads(num_layers, num_heads, k, seed)
    return layer_consistent(num_layers, num_heads, k, seed)
