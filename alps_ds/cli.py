"""``alps-ds`` command line: one subcommand per module in :mod:`alps_ds.commands`.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``, and imports heavy libraries (torch, deepspeed) inside ``run`` so
``alps-ds --help`` stays fast. User errors (:class:`AlpsError`) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import signal
import sys

from alps_ds import __version__, commands
from alps_ds.errors import AlpsError


def command_modules() -> dict[str, object]:
    """Subcommand name -> module, for every module in ``alps_ds.commands``."""
    found = {}
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        found[getattr(module, "NAME", info.name.replace("_", "-"))] = module
    return found


class Parser(argparse.ArgumentParser):
    """argparse whose errors become the one ``alps-ds: error:`` line every other error is (no usage block)."""

    def error(self, message: str):
        command = self.prog.removeprefix("alps-ds").strip()
        where = f"{command}: " if command else ""
        raise AlpsError(f"{where}{message}; see '{self.prog} --help'")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="alps-ds",
        description="Head-sparse LLM alignment (ALPS) on DeepSpeed: localize heads, train only them, export.",
    )
    parser.add_argument("--version", action="version", version=f"alps-ds {__version__}")
    # The deepspeed launcher puts --local_rank=N before the subcommand; ranks come from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in command_modules().items():
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP))
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def help_markdown() -> str:
    """Every command's ``--help`` as Markdown: the source of ``docs/cli.md`` (a test keeps them equal)."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width; fix it for a stable file
    try:
        parser = build_parser()
        parts = ["# Command-line reference", "", "Generated from `--help`; do not edit by hand.", ""]
        parts += ["```", parser.format_help().rstrip(), "```", ""]
        todo = [(f"alps-ds {name}", sub) for name, sub in _subcommands(parser).items()]
        while todo:
            title, sub = todo.pop(0)
            parts += [f"## {title}", "", "```", sub.format_help().rstrip(), "```", ""]
            todo[:0] = [(f"{title} {name}", nested) for name, nested in _subcommands(sub).items()]
        return "\n".join(parts)
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        rc = int(args._run(args) or 0)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at interpreter exit
        return rc
    except AlpsError as e:
        print(f"alps-ds: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        print(
            f"alps-ds: error: interrupted ({name}); outputs being written were discarded, earlier ones are unchanged",
            file=sys.stderr,
        )
        return 128 + signum
    except BrokenPipeError:
        # The reader went away (``alps-ds heads show ... | head``): stop quietly, as Unix tools do.
        # Point stdout at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the signal


if __name__ == "__main__":
    sys.exit(main())
