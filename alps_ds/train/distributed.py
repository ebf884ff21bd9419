"""The process group and per-rank logging for a training run.

Runs the same under the deepspeed launcher, torchrun, mpirun (ranks from mpi4py) and as one
plain process; rank 0 keeps warnings, other ranks stay quiet.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from alps_ds.errors import AlpsError

MPI_ENV = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


def init_distributed() -> tuple[int, int]:
    """Join (or, alone, create) the process group; returns (rank, world size).

    torchrun and the deepspeed launcher export RANK/WORLD_SIZE; under mpirun DeepSpeed reads them
    from mpi4py; a plain process becomes a group of one on a free local port.
    """
    import deepspeed
    import torch.distributed as dist

    from alps_ds.deps import require_deepspeed

    require_deepspeed()
    if "RANK" not in os.environ and not any(k in os.environ for k in MPI_ENV):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    port = int(os.environ.get("MASTER_PORT", 29500))
    deepspeed.init_distributed(auto_mpi_discovery=True, distributed_port=port, verbose=False)
    from deepspeed.accelerator import get_accelerator

    # Before the first collective: NCCL object collectives (broadcast_object_list) use the current
    # GPU, which would otherwise be GPU 0 on every rank of a node (a no-op on CPU).
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def quiet_logs(rank: int, progress: bool = True) -> None:
    """Rank 0 keeps warnings; other ranks print errors only and draw no progress bars (nor rank 0 without
    ``progress``: transformers' weight-loading bar would stand beside an error line)."""
    import warnings

    import datasets
    import transformers
    from deepspeed.utils import logger as ds_logger

    # DeepSpeed still calls collectives torch renamed; the warning repeats every step on every rank.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    level = logging.WARNING if rank == 0 else logging.ERROR
    ds_logger.setLevel(level)
    transformers.logging.set_verbosity(level)
    datasets.logging.set_verbosity(level)
    if rank != 0 or not progress:
        transformers.logging.disable_progress_bar()
        datasets.disable_progress_bars()


def barrier() -> None:
    """Wait for every rank."""
    import torch.distributed as dist

    dist.barrier()


def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (any picklable object)."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_rank0(fn: Callable[[], Any], rank: int) -> Any:
    """``fn()`` run by rank 0 alone, its result handed to every rank; if it fails, every rank fails.

    Rank 0 raises its own exception; the others raise it as an AlpsError instead of waiting in the
    next collective for a rank that is gone (a hang until the collective's timeout on other nodes).
    """
    result = error = failure = None
    if rank == 0:
        try:
            result = fn()
        except Exception as e:
            failure = e
            error = str(e) if isinstance(e, AlpsError) else f"rank 0 failed: {type(e).__name__}: {e}"
    result, error = broadcast((result, error))
    if failure is not None:
        raise failure
    if error is not None:
        raise AlpsError(error)
    return result


def shutdown(*, wait: bool = True) -> None:
    """Leave the process group before the interpreter exits: left to exit-time teardown, gloo's
    threads can abort a finished rank ("terminate called without an active exception", SIGABRT)
    and turn a good run into a failed launch. ``wait``: first wait for every rank (a normal end;
    after an error other ranks may never arrive, so a failing rank leaves without waiting)."""
    import torch.distributed as dist

    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
