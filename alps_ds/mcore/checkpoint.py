"""Checkpoints of engine megatron: ``megatron.core.dist_checkpointing`` of the slices and their optimizer state.

Only trainable tensors are saved (frozen weights come back from the base model); each slice is a
global tensor of its layer's selected rows that TP ranks hold in uneven runs
(:meth:`~alps_ds.parallel.megatron.MegatronHeadRows.slice_sharded_state_dict`), so a checkpoint
written at one TP size loads at another. ``latest.json`` is written last, as for DeepSpeed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from alps_ds.errors import AlpsError
from alps_ds.fsutil import atomic_file, atomic_write_text
from alps_ds.train import checkpoint as common
from alps_ds.train.distributed import barrier

ENGINE = "megatron"


def read_latest(ckpt_dir: Path) -> dict[str, Any] | None:
    """The pointer to the last complete checkpoint, refused when another engine wrote it."""
    latest = common.read_latest(ckpt_dir)
    if latest is not None:
        engine = json.loads((ckpt_dir / common.LATEST).read_text()).get("engine", "deepspeed")
        if engine != ENGINE:
            raise AlpsError(
                f"{ckpt_dir / common.LATEST}: checkpoint {latest['tag']} was written by engine {engine}; "
                f"resume it with --set engine={engine}"
            )
    return latest


def sharded_state(model, optimizer, *, is_loading: bool = False) -> dict[str, Any]:
    """The slices' ShardedTensors and the optimizer's state mapped onto them (collective over TP)."""
    from alps_ds.parallel.megatron import MegatronHeadRows

    model_sd: dict[str, Any] = {}
    for name, module in model.named_modules():
        if isinstance(module, MegatronHeadRows):
            model_sd.update(module.slice_sharded_state_dict(f"{name}."))
    return {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading)}


def save(model, optimizer, ckpt_dir: Path, step: int, rank: int, world: int, tp: int, keep: int) -> str:
    """Save under a new tag, then (after every rank finished) point ``latest.json`` at it."""
    from megatron.core import dist_checkpointing

    tag = f"step-{step:08d}"
    path = ckpt_dir / tag
    if rank == 0:  # dist_checkpointing writes into an empty folder; a half-written one of a crash goes
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    barrier()
    dist_checkpointing.save(sharded_state(model, optimizer), str(path))
    with atomic_file(path / f"alps_rank{rank}.pt", "wb") as f:
        torch.save({"step": step, "rng": common.rng_state()}, f)
    barrier()
    if rank == 0:
        pointer = {"tag": tag, "step": step, "world_size": world, "engine": ENGINE, "tp": tp}
        atomic_write_text(ckpt_dir / common.LATEST, json.dumps(pointer) + "\n")
        common.prune_checkpoints(ckpt_dir, keep, newest=step)
    barrier()
    return tag


def load(model, optimizer, ckpt_dir: Path, latest: dict[str, Any], rank: int, keep: int) -> int:
    """Load the slices and optimizer state of ``latest`` (any TP size); returns its step."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    state = sharded_state(model, optimizer, is_loading=True)
    loaded = dist_checkpointing.load(state, str(ckpt_dir / latest["tag"]))
    with torch.no_grad():
        for key, sh in state["model"].items():
            sh.data.copy_(loaded["model"][key])
    optimizer.load_state_dict(loaded["optimizer"])
    state_file = ckpt_dir / latest["tag"] / f"alps_rank{rank}.pt"
    if latest["world_size"] == dist.get_world_size() and state_file.exists():  # same ranks: same RNG streams
        common.restore_rng_state(state_file)
    if rank == 0:
        common.prune_checkpoints(ckpt_dir, keep, newest=latest["step"])
    return latest["step"]
