"""Launcher argv lists: the DeepSpeed launcher, torchrun per node, and mpirun.

Every builder returns :class:`NodeCommand` objects holding an argv list (never a shell
string), so host names and paths reach the launcher verbatim. ``node_rank=None`` means "run
once, on the node you launch from" (the launcher fans out itself); otherwise the command is
meant for that node only (``--no_ssh``, torchrun, SLURM ``srun`` steps).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from alps_ds.errors import AlpsError
from alps_ds.launcher.hosts import Host

DS_LAUNCHERS = ("pdsh", "openmpi", "mpich", "slurm")
MPI_FLAVORS = ("mpich", "openmpi")
STARTERS = ("deepspeed", "torchrun")  # what starts the ranks of each node (mpirun is --mpi)


@dataclass(frozen=True)
class Entry:
    """What every rank runs: ``python -m MODULE ARGS`` or ``python SCRIPT ARGS``."""

    args: tuple[str, ...]
    module: str | None = "alps_ds"
    script: str | None = None

    @classmethod
    def train(cls, train_args: Sequence[str]) -> Entry:
        """``alps-ds train <train_args>`` on every rank."""
        return cls(("train", *train_args), module="alps_ds")

    @classmethod
    def of_script(cls, script: str, args: Sequence[str]) -> Entry:
        """``python SCRIPT <args>`` on every rank (``alps-ds launch --script``)."""
        return cls(tuple(args), module=None, script=str(script))

    def python_argv(self) -> list[str]:
        """Arguments after the interpreter: ``-m MODULE ARGS`` or ``SCRIPT ARGS``."""
        head = ["-m", self.module] if self.module else [self.script]
        return [*head, *self.args]

    def deepspeed_argv(self) -> list[str]:
        """The same for the deepspeed launcher: ``--module MODULE ARGS`` or ``SCRIPT ARGS``."""
        head = ["--module", self.module] if self.module else [self.script]
        return [*head, *self.args]


@dataclass(frozen=True)
class NodeCommand:
    """One launcher argv and where it runs: ``node_rank`` None runs once (it fans out itself)."""

    node_rank: int | None
    host: str | None
    argv: tuple[str, ...]


def _tool(name: str) -> str:
    """A launcher next to this interpreter (the venv's), else on PATH, else the bare name."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name) or name


def world_size(hosts: Sequence[Host]) -> int:
    """Ranks over all hosts."""
    return sum(h.slots for h in hosts)


def include_spec(hosts: Sequence[Host]) -> str:
    """DeepSpeed ``--include`` value selecting exactly ``slots`` devices on each host: ``a:0,1@b:0,1``."""
    return "@".join(f"{h.name}:{','.join(str(i) for i in range(h.slots))}" for h in hosts)


def deepspeed_commands(
    hosts: Sequence[Host],
    hostfile: str,
    entry: Entry,
    *,
    master_addr: str,
    master_port: int,
    launcher: str = "pdsh",
    no_ssh: bool = False,
    include: str | None = None,
) -> list[NodeCommand]:
    """The ``deepspeed`` launcher: one command fanned out by ``launcher``, or with ``no_ssh`` one per node."""
    if launcher not in DS_LAUNCHERS:
        raise AlpsError(f"--launcher {launcher!r} is unknown; use one of {', '.join(DS_LAUNCHERS)}")
    # --no_local_rank: LOCAL_RANK comes through the environment; the default "--local_rank=N"
    # argument would land before the entry's own arguments (``-m alps_ds --local_rank=0 train``).
    base = [_tool("deepspeed"), "--hostfile", hostfile, "--master_addr", master_addr, "--master_port", str(master_port)]
    base.append("--no_local_rank")
    if include:
        base += ["--include", include]
    tail = entry.deepspeed_argv()
    if no_ssh:
        return [
            NodeCommand(i, h.name, tuple([*base, "--no_ssh", "--node_rank", str(i), *tail]))
            for i, h in enumerate(hosts)
        ]
    return [NodeCommand(None, hosts[0].name, tuple([*base, "--launcher", launcher, *tail]))]


def torchrun_commands(hosts: Sequence[Host], entry: Entry, *, master_addr: str, master_port: int) -> list[NodeCommand]:
    """``torchrun`` started on each node with its ``--node_rank`` (static rendezvous)."""
    slots = {h.slots for h in hosts}
    if len(slots) != 1:
        raise AlpsError(
            f"torchrun needs the same number of ranks on every node (hosts have {sorted(slots)}); "
            "use the deepspeed launcher or equal slots"
        )
    return [
        NodeCommand(
            i,
            h.name,
            (
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                str(len(hosts)),
                "--node_rank",
                str(i),
                "--nproc_per_node",
                str(h.slots),
                "--master_addr",
                master_addr,
                "--master_port",
                str(master_port),
                *entry.python_argv(),
            ),
        )
        for i, h in enumerate(hosts)
    ]


def mpi_flavor(mpirun: str | None = None) -> str:
    """``mpich`` (Hydra) or ``openmpi``, from ``mpirun --version``."""
    mpirun = mpirun or _tool("mpirun")
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise AlpsError(
            f"cannot run {mpirun} --version ({type(e).__name__}); install an MPI (pip install mpich)"
        ) from e
    if "Open MPI" in out or "OpenRTE" in out:
        return "openmpi"
    if "HYDRA" in out or "MPICH" in out.upper():
        return "mpich"
    raise AlpsError(f"{mpirun}: not MPICH or Open MPI (see --version); pass --mpi-flavor mpich|openmpi")


def mpirun_command(
    hosts: Sequence[Host] | None,
    entry: Entry,
    *,
    nproc: int,
    master_addr: str | None,
    master_port: int,
    flavor: str = "mpich",
) -> NodeCommand:
    """One ``mpirun`` starting ``nproc`` ranks; each runs :mod:`alps_ds.launcher.discover`, which sets
    RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* and then runs ``entry``. ``hosts=None`` runs locally."""
    if flavor not in MPI_FLAVORS:
        raise AlpsError(f"--mpi-flavor {flavor!r} is unknown; use one of {', '.join(MPI_FLAVORS)}")
    argv = [_tool("mpirun"), "-np", str(nproc)]
    if hosts:
        spec = ",".join(f"{h.name}:{h.slots}" for h in hosts)
        argv += ["-hosts", spec] if flavor == "mpich" else ["--host", spec]
    env = {"MASTER_PORT": str(master_port)}
    if master_addr:
        env["MASTER_ADDR"] = master_addr
    for key, value in env.items():
        argv += ["-genv", key, value] if flavor == "mpich" else ["-x", f"{key}={value}"]
    argv += [sys.executable, "-m", "alps_ds.launcher.discover", *entry.python_argv()]
    return NodeCommand(None, hosts[0].name if hosts else None, tuple(argv))


def deepspeed_local_argv(nproc: int, entry: Entry, *, master_addr: str, master_port: int) -> list[str]:
    """The deepspeed launcher on this machine only (no hostfile): ``--num_gpus N``."""
    return [
        _tool("deepspeed"),
        "--num_gpus",
        str(nproc),
        "--master_addr",
        master_addr,
        "--master_port",
        str(master_port),
        "--no_local_rank",
        *entry.deepspeed_argv(),
    ]
