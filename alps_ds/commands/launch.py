"""``alps-ds launch``: start ``alps-ds train`` on many nodes (hostfile, SLURM or mpirun), after pre-flight checks."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

from alps_ds.argtypes import integer
from alps_ds.errors import AlpsError

HELP = "launch training on several nodes (hostfile, SLURM, mpirun) after pre-flight checks; --dry-run prints argv"
DESCRIPTION = (
    "Build and run the launcher command for 'alps-ds train <train arguments>' (everything after '--'). "
    "--hostfile: the DeepSpeed launcher (pdsh/openmpi/mpich/slurm fan-out, or --no-ssh with one command per "
    "node and --node-rank) or torchrun per node. --slurm: hosts from SLURM_JOB_NODELIST (scontrol when "
    "present), GPUs from SLURM_GPUS_ON_NODE/SLURM_GPUS_PER_NODE/CUDA_VISIBLE_DEVICES, this node from "
    "SLURM_NODEID; writes the hostfile it uses. --mpi: one mpirun; ranks find RANK/WORLD_SIZE/LOCAL_RANK/"
    "MASTER_ADDR through alps_ds.launcher.discover. Pre-flight checks run first; any failure stops the launch. "
    "See docs/launch.md."
)
DEFAULT_PORT = 29500


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from alps_ds.launcher.build import DS_LAUNCHERS, MPI_FLAVORS, STARTERS
    from alps_ds.launcher.preflight import add_check_arguments

    src = parser.add_mutually_exclusive_group()
    src.add_argument("--hostfile", metavar="FILE", help="'HOST slots=N' per line (see launch/hostfile.example)")
    src.add_argument("--slurm", action="store_true", help="take hosts, GPUs and node rank from the SLURM job")
    parser.add_argument("--mpi", action="store_true", help="start ranks with one mpirun (hosts from --hostfile)")
    parser.add_argument(
        "--nproc-per-node", type=integer(1), metavar="N", help="ranks per node (default: slots / GPUs / 1)"
    )
    parser.add_argument("--master-addr", metavar="A", help="rendezvous host (default: the first host)")
    parser.add_argument(
        "--master-port", type=integer(1, 65535), default=DEFAULT_PORT, metavar="P", help="rendezvous port"
    )
    parser.add_argument("--starter", choices=STARTERS, default=STARTERS[0], help="what starts ranks on each node")
    parser.add_argument(
        "--launcher",
        choices=DS_LAUNCHERS,
        default="pdsh",
        help="how the deepspeed launcher reaches the other nodes (without --no-ssh)",
    )
    parser.add_argument("--no-ssh", action="store_true", help="one deepspeed command per node (run each on its node)")
    parser.add_argument("--node-rank", type=integer(0), help="with per-node commands: which node this is")
    parser.add_argument("--include", help="deepspeed --include, e.g. 'node1:0,1@node2:0' (default: all slots)")
    parser.add_argument("--mpi-flavor", choices=("auto", *MPI_FLAVORS), default="auto")
    parser.add_argument("--hostfile-out", metavar="FILE", help="--slurm: where to write the hostfile")
    parser.add_argument(
        "--script", metavar="FILE", help="run this Python script on every rank instead of alps-ds train"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the exact argv per node and exit")
    parser.add_argument("--skip-check", action="store_true", help="do not run the pre-flight checks")
    add_check_arguments(parser)
    parser.add_argument("train_args", nargs=argparse.REMAINDER, metavar="-- TRAIN_ARGS", help="alps-ds train arguments")


def _train_args(args: argparse.Namespace) -> list[str]:
    """What every rank passes to ``alps-ds train`` (or ``--script``): the arguments after ``--``."""
    train_args = list(args.train_args)
    return train_args[1:] if train_args[:1] == ["--"] else train_args


def _run_config(train_args: list[str]):
    """The run config ``alps-ds train <train_args>`` will load (its ``--config`` and ``--set``, read with
    train's own options), or None when neither is given."""
    from alps_ds.commands import train
    from alps_ds.commands.check import load_run

    parser = argparse.ArgumentParser(prog="alps-ds train", add_help=False, exit_on_error=False)
    train.add_arguments(parser)
    try:
        known, _ = parser.parse_known_args(train_args)
    except argparse.ArgumentError as e:
        raise AlpsError(f"train arguments after '--': {e}") from None
    if known.config is None and not known.overrides:
        return None
    return load_run(known.config, known.overrides)


def _hostfile_out(name: str):
    """Where --slurm writes its hostfile: never over a file that is not a hostfile (a run YAML, say)."""
    from alps_ds.fsutil import check_output_file
    from alps_ds.launcher.hosts import read_hostfile

    def is_hostfile(path) -> bool:
        try:
            return bool(read_hostfile(path))
        except AlpsError:
            return False

    return check_output_file(
        name, flag="--hostfile-out", default_name="hostfile", is_own=is_hostfile, what="a hostfile"
    )


def plan_commands(args: argparse.Namespace, env=os.environ):
    """(commands, hosts, this node's rank or None, world size, master addr, notes) for ``args``."""
    from alps_ds.launcher import build

    train_args = _train_args(args)
    entry = build.Entry.of_script(args.script, train_args) if args.script else build.Entry.train(train_args)
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise AlpsError("--nproc-per-node must be at least 1")
    notes: list[str] = []
    hosts, hostfile, node_rank = _hosts(args, env, notes)
    multi = len(hosts) > 1
    master_addr = args.master_addr or (hosts[0].name if multi else "127.0.0.1")
    port = args.master_port
    world = build.world_size(hosts)
    if args.mpi:
        flavor = build.mpi_flavor() if args.mpi_flavor == "auto" else args.mpi_flavor
        cmds = [
            build.mpirun_command(
                hosts if multi or args.hostfile else None,
                entry,
                nproc=world,
                master_addr=args.master_addr or (None if multi else "127.0.0.1"),
                master_port=port,
                flavor=flavor,
            )
        ]
    elif args.starter == "torchrun":
        cmds = build.torchrun_commands(hosts, entry, master_addr=master_addr, master_port=port)
    else:
        cmds = _deepspeed_commands(args, hosts, hostfile, entry, master_addr)
    return cmds, hosts, node_rank, world, master_addr, notes


def _hosts(args: argparse.Namespace, env, notes: list[str]):
    """(hosts, hostfile or None, node rank or None): from the SLURM allocation, --hostfile, or this machine."""
    from alps_ds.launcher import hosts as hostmod

    node_rank = args.node_rank
    if args.slurm:
        if args.mpi:
            raise AlpsError("--slurm with --mpi: under SLURM use srun or plain --slurm (the deepspeed launcher)")
        job = hostmod.slurm_job(env, args.nproc_per_node)
        hosts = list(job.hosts)
        node_rank = job.node_rank if node_rank is None else node_rank
        hostfile = str(_hostfile_out(args.hostfile_out or os.path.join(".alps-ds", f"hostfile.{job.job_id}")))
        notes.append(f"hostfile {hostfile}: {len(hosts)} nodes x {hosts[0].slots} GPUs (SLURM)")
    elif args.hostfile:
        hosts = hostmod.read_hostfile(args.hostfile)
        if args.nproc_per_node:
            hosts = [hostmod.Host(h.name, args.nproc_per_node) for h in hosts]
        hostfile = args.hostfile
    else:
        hosts, hostfile = [hostmod.Host("localhost", args.nproc_per_node or 1)], None
    if node_rank is not None and not 0 <= node_rank < len(hosts):  # every mode, --dry-run included
        raise AlpsError(
            f"--node-rank {node_rank} is outside the {len(hosts)} host(s) of this job; use 0..{len(hosts) - 1}"
        )
    if args.slurm and not args.dry_run:
        hostmod.write_hostfile(hostfile, hosts)
    return hosts, hostfile, node_rank


def _deepspeed_commands(args: argparse.Namespace, hosts, hostfile, entry, master_addr: str):
    """The deepspeed launcher's command(s): one local one without a hostfile, else per node or over ssh."""
    from alps_ds.launcher import build

    port = args.master_port
    if hostfile is None:
        argv = build.deepspeed_local_argv(hosts[0].slots, entry, master_addr=master_addr, master_port=port)
        return [build.NodeCommand(None, "localhost", tuple(argv))]
    per_node = args.no_ssh or (args.slurm and args.launcher != "slurm")
    include = args.include or (build.include_spec(hosts) if args.nproc_per_node and hostfile else None)
    return build.deepspeed_commands(
        hosts,
        hostfile,
        entry,
        master_addr=master_addr,
        master_port=port,
        launcher=args.launcher,
        no_ssh=per_node,
        include=include,
    )


def _mine(cmds, node_rank):
    """The command this node runs (None: nothing to run here)."""
    if len(cmds) == 1 and cmds[0].node_rank is None:
        return cmds[0] if not node_rank else None
    if node_rank is None:
        if len(cmds) == 1:
            return cmds[0]
        raise AlpsError(
            f"{len(cmds)} nodes, one command each: pass --node-rank 0..{len(cmds) - 1} on each node "
            "(or --slurm under srun), or --dry-run to see them all"
        )
    if not 0 <= node_rank < len(cmds):
        raise AlpsError(f"--node-rank {node_rank} is outside the {len(cmds)} hosts (0..{len(cmds) - 1})")
    return cmds[node_rank]


def run(args: argparse.Namespace) -> int:
    from alps_ds.commands.check import report
    from alps_ds.launcher.preflight import inputs_from_args, run_checks

    cmds, hosts, node_rank, world, master_addr, notes = plan_commands(args)
    for note in notes:
        print(f"NOTE {note}")
    if args.dry_run:
        for c in cmds:
            where = "launching node" if c.node_rank is None else f"node {c.node_rank}"
            print(f"# {where} ({c.host or 'this machine'})")
            print(shlex.join(c.argv))
        return 0
    mine = _mine(cmds, node_rank)
    if not args.skip_check:
        # Only the master node binds the rendezvous port; other nodes would see it taken.
        master_here = node_rank in (None, 0)
        inp = inputs_from_args(
            args,
            world_size=world,
            master_addr=master_addr,
            master_port=args.master_port if master_here and not args.mpi else None,
            run=None if args.script else _run_config(_train_args(args)),
        )
        if not report(run_checks(inp), inp.notes):
            print("alps-ds: error: pre-flight checks failed; nothing was launched", file=sys.stderr)
            return 1
    if mine is None:
        print(f"NOTE node {node_rank}: the launcher on node 0 starts this node's ranks; nothing to run here")
        return 0
    print(f"alps-ds launch: {shlex.join(mine.argv)}", flush=True)
    return subprocess.run(list(mine.argv)).returncode
