"""``alps-ds check``: pre-flight checks of a job before it burns GPU hours."""

from __future__ import annotations

import argparse
import sys

from alps_ds.argtypes import integer

HELP = "pre-flight checks: selection vs model, world size vs TP x PP, TP rules, balance, memory, output, port"
DESCRIPTION = (
    "Check a job before launching it: the selection was made for the model; the world size is divisible by "
    "tp x pp; the head counts split over TP; per-rank trainable balance; the memory plan fits the GPUs; the "
    "output folder is writable; the master port is free. One line per check; exit 1 when any fails. "
    "'alps-ds launch' runs the same checks first."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="RUN.yaml", help="train run config to take model/heads/output from")
    parser.add_argument("--world-size", type=integer(1), required=True, help="total ranks (GPUs) of the job")
    parser.add_argument("--master-addr", help="rendezvous host (the port is checked only when it is this host)")
    parser.add_argument("--master-port", type=integer(1, 65535), help="rendezvous port to check")
    from alps_ds.launcher.preflight import add_check_arguments

    add_check_arguments(parser)


def load_run(path: str | None, overrides: list[str] | tuple[str, ...] = ()):
    """The train run config at ``path`` with ``--set`` ``overrides`` applied; None when neither is given."""
    if not path and not overrides:
        return None
    from alps_ds.train.config import load_config

    return load_config(path, overrides)


def report(findings, notes=()) -> bool:
    """Print one line per finding (failures to stderr); True when none failed."""
    from alps_ds.launcher.preflight import failed

    for note in notes:
        print(f"NOTE {note}")
    for f in findings:
        print(f.line(), file=sys.stderr if f.status == "fail" else sys.stdout)
    return not failed(findings)


def run(args: argparse.Namespace) -> int:
    from alps_ds.launcher.preflight import inputs_from_args, run_checks

    inp = inputs_from_args(
        args,
        world_size=args.world_size,
        master_addr=args.master_addr,
        master_port=args.master_port,
        run=load_run(args.config),
    )
    return 0 if report(run_checks(inp), inp.notes) else 1
