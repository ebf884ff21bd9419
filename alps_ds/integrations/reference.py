"""``base_weights(model)``: run a hooked model as its base model, for reference log-probs (DPO) without a second copy.

Every hooked projection keeps the frozen base weight next to its trained rows, so the base model is
already in memory: inside the context each :class:`~alps_ds.hooked.HeadRows` module computes with its
frozen rows only (``base_only``), outside it trains as usual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from alps_ds.errors import AlpsError
from alps_ds.hooked import hooked_modules


@contextlib.contextmanager
def base_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, ``model`` (or the engine around it) computes exactly as the base model it was hooked from.

    Raises when ``model`` has no hooked projection or one whose type cannot switch to its frozen rows.
    """
    modules = [m for _, m in hooked_modules(model)]
    if not modules:
        raise AlpsError("base_weights: model has no hooked projections; call alps_ds.apply(model, selection) first")
    unsupported = sorted({type(m).__name__ for m in modules if not hasattr(type(m), "base_only")})
    if unsupported:
        raise AlpsError(f"base_weights: {', '.join(unsupported)} cannot run on its frozen rows only; use a ref model")
    previous = [m.base_only for m in modules]
    for m in modules:
        m.base_only = True
    try:
        yield model
    finally:
        for m, flag in zip(modules, previous):
            m.base_only = flag
