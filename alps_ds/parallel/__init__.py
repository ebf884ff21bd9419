"""Tensor/pipeline-parallel head mapping (:mod:`.mapping`, pure math) and the engine hooks
that use it (:mod:`.autotp` for DeepSpeed AutoTP, :mod:`.megatron` for megatron-core)."""

from alps_ds.arch import TP_LAYOUTS
from alps_ds.parallel.mapping import (
    ParallelPlan,
    PipelineSplit,
    RankRows,
    TensorParallel,
    local_rows,
    plan,
    rebalance,
)

__all__ = [
    "TP_LAYOUTS",
    "ParallelPlan",
    "PipelineSplit",
    "RankRows",
    "TensorParallel",
    "local_rows",
    "plan",
    "rebalance",
]
