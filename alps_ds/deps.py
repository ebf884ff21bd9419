"""The oldest engine versions alps-ds works with (pyproject.toml pins the same), checked where first used.

An older DeepSpeed would fail deep inside the AutoTP hook (``AutoTPMeta`` first appears in 0.19.7)
with an ImportError; this says which version is installed and which one is needed, in one line.
"""

from __future__ import annotations

from alps_ds.errors import AlpsError

DEEPSPEED_MIN = "0.19.7"


def require_deepspeed() -> None:
    """One AlpsError line when the installed DeepSpeed is older than :data:`DEEPSPEED_MIN`."""
    import deepspeed
    from packaging.version import InvalidVersion, Version

    have = str(getattr(deepspeed, "__version__", "0"))
    try:
        too_old = Version(have.split("+")[0]) < Version(DEEPSPEED_MIN)
    except InvalidVersion:
        too_old = False  # a local build with an odd version string: let it run
    if too_old:
        raise AlpsError(
            f"deepspeed {have} is installed; alps-ds needs deepspeed >= {DEEPSPEED_MIN}: "
            f"pip install 'deepspeed>={DEEPSPEED_MIN}'"
        )
