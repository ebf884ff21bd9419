"""Attributes a package loads on first use (its ``_LAZY`` table), so importing it stays cheap (no torch)."""

from __future__ import annotations

import importlib
from typing import Any


def lazy_attribute(package: str, table: dict[str, str], namespace: dict[str, Any], name: str) -> Any:
    """``name`` from the module ``table`` maps it to, cached in the package's ``namespace``."""
    if name not in table:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(table[name]), name)
    namespace[name] = value
    return value
