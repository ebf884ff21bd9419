"""Acceptance: a two-node job and an mpirun job, both started by alps-ds launch, train the tiny config to the end.

Two "nodes" on this machine: ``alps-ds launch --hostfile hf --no-ssh --node-rank 0|1`` started twice,
rendezvousing over loopback (DeepSpeed never resolves host names in --no_ssh mode). Each node runs
one rank, so a world of 2 means the rank on node 1 joined; its checkpoint shard proves it trained.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from dist import REPO, free_port, rank_env

TIMEOUT = 600


def launch(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "alps_ds", "launch", *argv],
        cwd=REPO,
        env=rank_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(procs: list[subprocess.Popen]) -> list[str]:
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-5000:]
    return outs


def check_trained(out_dir, world: int) -> dict:
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["world_size"] == world
    assert summary["steps"] == summary["total_steps"] > 0  # ran to the end of the tiny config
    assert summary["final_loss"] < summary["first_loss"]
    assert len(summary["optimizer_bytes_per_rank"]) == world
    shards = sorted(p.name for p in (out_dir / "checkpoints").rglob("alps_rank*.pt"))
    assert {f"alps_rank{r}.pt" for r in range(world)} <= set(shards)
    return summary


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_nodes")
    hf = tmp / "hostfile"
    hf.write_text("localhost slots=1\nnode2 slots=1\n")
    port = str(free_port())
    common = ["--hostfile", str(hf), "--no-ssh", "--master-addr", "127.0.0.1", "--master-port", port]
    train = ["--", "--config", "configs/tiny.yaml", "--set", f"output.dir={tmp / 'out'}"]
    procs = [launch(*common, "--node-rank", str(r), *train) for r in (0, 1)]
    return tmp / "out", finish(procs)


def test_two_nodes_train_tiny_config_to_the_end(two_nodes):
    out_dir, (log0, log1) = two_nodes
    check_trained(out_dir, world=2)
    # Each node's DeepSpeed launcher started its own rank: rank 0 on node 0, rank 1 on node 1.
    for node, log in enumerate((log0, log1)):
        assert f"--node_rank {node}" in log  # the argv alps-ds launch ran
        assert f"node_rank={node}" in log and "exits successfully" in log
        assert "global_rank_mapping" in log and "'node2': [1]" in log


def test_mpirun_trains_tiny_config(tmp_path):
    port = str(free_port())
    (log,) = finish(
        [
            launch(
                "--mpi",
                "--nproc-per-node",
                "2",
                "--master-port",
                port,
                "--",
                "--config",
                "configs/tiny.yaml",
                "--set",
                f"output.dir={tmp_path / 'out'}",
            )
        ]
    )
    assert "mpirun -np 2" in log and "alps_ds.launcher.discover" in log
    check_trained(tmp_path / "out", world=2)
