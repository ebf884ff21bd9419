"""The engine hook: re-parametrize Q/K/V projections so only the selected heads' rows train.

See ``docs/engine-hook.md``. Public API: :func:`apply`, :func:`merge`, :func:`trainable_report`,
:func:`reparametrize` and :class:`HeadRowsLinear`.
"""

from alps_ds.hooked import HookedRows, HookReport
from alps_ds.sparse.hook import apply, hooked_modules, merge
from alps_ds.sparse.module import HeadRowsLinear, reparametrize
from alps_ds.sparse.report import ModuleEntry, TrainableReport, trainable_report

__all__ = [
    "HeadRowsLinear",
    "HookReport",
    "HookedRows",
    "ModuleEntry",
    "TrainableReport",
    "apply",
    "hooked_modules",
    "merge",
    "reparametrize",
    "trainable_report",
]
