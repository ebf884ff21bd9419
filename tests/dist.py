"""Run a script on several real ranks (torchrun, the deepspeed launcher or mpirun) from a test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    env.update(extra or {})
    return env


def launcher_argv(launcher: str, nproc: int, port: int) -> list[str]:
    """The argv prefix that starts ``nproc`` local ranks with ``launcher``."""
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
        ]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port)]
    if launcher == "mpirun":
        return [
            str(BIN / "mpirun"),
            "-np",
            str(nproc),
            "-env",
            "MASTER_ADDR",
            "127.0.0.1",
            "-env",
            "MASTER_PORT",
            str(port),
            sys.executable,
        ]
    raise ValueError(launcher)


def run_ranks(
    script: str | Path,
    *args: str,
    nproc: int = 2,
    launcher: str = "torchrun",
    timeout: float = 900,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``script args`` on ``nproc`` ranks; fail the test with the output tail on error."""
    argv = launcher_argv(launcher, nproc, free_port()) + [str(script), *map(str, args)]
    proc = subprocess.run(argv, cwd=REPO, env=rank_env(env), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        out = (proc.stdout + "\n" + proc.stderr)[-6000:]
        raise AssertionError(f"{launcher} exited {proc.returncode}:\n{out}")
    return proc
