"""Rank discovery for processes started by ``mpirun``/``srun``: rank, world size, local rank, master address.

torch.distributed reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; MPI launchers set their own variables instead (Open MPI ``OMPI_COMM_WORLD_*``,
MPICH/Hydra ``PMI_*`` and ``MPI_LOCALRANKID``, PMIx ``PMIX_RANK``, SLURM ``SLURM_PROCID``).
:func:`discover` reads those, confirms them through mpi4py when it is available (and finds the
local rank and rank 0's address there), and :func:`export_env` writes the torch names.

As a program it wraps a training entry so ``mpirun`` can start it::

    mpirun -np 16 python -m alps_ds.launcher.discover -m alps_ds train --config c.yaml
"""

from __future__ import annotations

import json
import os
import runpy
import socket
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import asdict, dataclass

from alps_ds.errors import AlpsError

DEFAULT_PORT = 29500

# (source, rank, size, local rank, local size): the first family whose rank variable is set wins.
_FAMILIES = (
    (
        "openmpi",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    ("pmix", "PMIX_RANK", None, None, None),
    ("pmi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", None),
)


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int | None
    master_addr: str
    master_port: int
    source: str  # which variables (and mpi4py) it came from
    hostname: str


def _int(env: Mapping[str, str], name: str | None) -> int | None:
    if name is None or name not in env:
        return None
    try:
        return int(env[name])
    except ValueError as e:
        raise AlpsError(f"environment variable {name}={env[name]!r} is not an integer; check the launcher") from e


def from_env(env: Mapping[str, str]) -> tuple[str, int, int | None, int | None, int | None] | None:
    """(source, rank, size, local rank, local size) from the first MPI/SLURM family present, else None."""
    for source, rank_v, size_v, local_v, lsize_v in _FAMILIES:
        rank = _int(env, rank_v)
        if rank is not None:
            return source, rank, _int(env, size_v), _int(env, local_v), _int(env, lsize_v)
    return None


def _own_address() -> str:
    """This node's address as other nodes should dial it: a non-loopback IPv4 address its hostname
    resolves to, else the hostname itself (Debian-style /etc/hosts maps it to 127.0.1.1, which would
    send every other node to itself; they resolve the name through DNS instead)."""
    name = socket.gethostname()
    try:
        addresses = [info[4][0] for info in socket.getaddrinfo(name, None, socket.AF_INET)]
    except OSError:
        addresses = []
    return next((a for a in addresses if not a.startswith("127.")), name)


def discover(env: Mapping[str, str] | None = None, *, use_mpi: bool | None = None) -> RankInfo:
    """Rank facts of this process. ``use_mpi=None`` uses mpi4py when an MPI launcher's variables are set.

    MASTER_ADDR/MASTER_PORT from the environment win (``mpirun -genv MASTER_ADDR ...``); without
    MASTER_ADDR rank 0's address is broadcast through MPI.
    """
    env = os.environ if env is None else env
    found = from_env(env)
    if use_mpi is None:
        use_mpi = found is not None and found[0] != "slurm"
    source = found[0] if found else "none"
    rank, size, local, lsize = found[1:] if found else (None, None, None, None)
    addr = env.get("MASTER_ADDR")
    if use_mpi:
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise AlpsError("mpi4py is not installed; pip install mpi4py (and an MPI such as mpich)") from e
        comm = MPI.COMM_WORLD
        if rank is not None and (rank, size or comm.Get_size()) != (comm.Get_rank(), comm.Get_size()):
            raise AlpsError(
                f"{source} variables say rank {rank} of {size} but MPI says {comm.Get_rank()} of {comm.Get_size()}; "
                "is mpi4py built against the MPI that started this job?"
            )
        rank, size = comm.Get_rank(), comm.Get_size()
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        local, lsize = node.Get_rank(), node.Get_size()
        node.Free()
        if not addr:
            addr = comm.bcast(_own_address() if rank == 0 else None, root=0)
        source += "+mpi4py"
    if rank is None:
        raise AlpsError(
            "no rank found: OMPI_COMM_WORLD_RANK, PMIX_RANK, PMI_RANK and SLURM_PROCID are unset; start this "
            "under mpirun or srun"
        )
    if size is None:
        raise AlpsError(f"{source}: rank {rank} but no world size in the environment; run under mpirun with mpi4py")
    if local is None:
        raise AlpsError(f"{source}: no local rank in the environment; install mpi4py so it can be found")
    if not 0 <= rank < size or not 0 <= local < size:
        raise AlpsError(f"{source}: rank {rank} / local rank {local} outside world size {size}; check the launcher")
    if not addr:
        raise AlpsError(f"{source}: MASTER_ADDR is unset and MPI is not in use to find rank 0; set MASTER_ADDR")
    port = _int(env, "MASTER_PORT") or DEFAULT_PORT
    return RankInfo(rank, size, local, lsize, addr, port, source, socket.gethostname())


def export_env(info: RankInfo, env: MutableMapping[str, str] | None = None) -> None:
    """Set the variables ``torch.distributed`` / ``deepspeed.init_distributed`` read (env:// rendezvous)."""
    env = os.environ if env is None else env
    env.update(
        RANK=str(info.rank),
        WORLD_SIZE=str(info.world_size),
        LOCAL_RANK=str(info.local_rank),
        MASTER_ADDR=info.master_addr,
        MASTER_PORT=str(info.master_port),
    )
    if info.local_world_size is not None:
        env["LOCAL_WORLD_SIZE"] = str(info.local_world_size)


def main(argv: list[str] | None = None) -> int:
    """``[--print] (-m MODULE | SCRIPT) [ARGS...]``: discover, export, then run the entry in this process.

    Running in-process (not exec) keeps the MPI process that mpirun started alive until the
    entry returns, so MPI finalizes normally at exit.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    show = bool(argv) and argv[0] == "--print"
    argv = argv[1:] if show else argv
    try:
        info = discover()
    except AlpsError as e:
        print(f"alps-ds: error: {e}", file=sys.stderr)
        return 2
    export_env(info)
    if show:
        print(json.dumps(asdict(info)), flush=True)
    if not argv:
        return 0
    if argv[0] == "-m":
        if len(argv) < 2:
            print("alps-ds: error: -m needs a module name", file=sys.stderr)
            return 2
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
