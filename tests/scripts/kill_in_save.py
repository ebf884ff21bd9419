"""Run ``alps-ds ARGS`` and die by SIGKILL halfway through writing the first file of checkpoint tag $ALPS_KILL_IN.

A crash at the worst moment, made deterministic: the file is left half-written on disk (as a
kill or power loss would leave it) and the process is killed, not allowed to clean up.

usage: ALPS_KILL_IN=step-00000004 python tests/scripts/kill_in_save.py train --config ...
"""

from __future__ import annotations

import os
import signal
import sys

import torch

TAG = os.environ["ALPS_KILL_IN"]
_real_save = torch.save


def _save(obj, f, *args, **kwargs):
    if TAG in str(f):  # a path, or an open file whose repr names its path
        with open(f if isinstance(f, (str, os.PathLike)) else f.name, "wb") as out:
            out.write(b"PK\x03\x04 half-written checkpoint")
            out.flush()
            os.fsync(out.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return _real_save(obj, f, *args, **kwargs)


torch.save = _save  # DeepSpeed's checkpoint engine and alps-ds both call torch.save by attribute

from alps_ds.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
