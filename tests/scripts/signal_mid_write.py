"""Run one ``alps-ds`` command and signal this process in the middle of writing its output.

usage: python tests/scripts/signal_mid_write.py SIGNAL MODULE:FUNCTION N ARGS...

After the N-th call of MODULE.FUNCTION (``os:fsync``, ``safetensors.torch:save_file``) has
returned, the process sends itself SIGNAL (INT or TERM), as a user's Ctrl-C or a scheduler's
SIGTERM would, and the command goes on as it would in real life. Exits with the CLI's code.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys

from alps_ds.cli import main


def arm(signum: int, target: str, n: int) -> None:
    module_name, _, name = target.partition(":")
    module = importlib.import_module(module_name)
    real = getattr(module, name)
    calls = [0]

    @functools.wraps(real)
    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signum)
        return out

    setattr(module, name, wrapped)


if __name__ == "__main__":
    sig, target, count, *argv = sys.argv[1:]
    arm(getattr(signal, f"SIG{sig}"), target, int(count))
    sys.exit(main(argv))
