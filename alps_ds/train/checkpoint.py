"""Checkpoints of a run: save under a new tag, point latest.json (and DeepSpeed's ``latest``) at it, prune old
tags, keep per-rank RNG state.

Checkpoints hold only trainable tensors (``exclude_frozen_parameters``); frozen weights come back
from the base model on resume. Beside DeepSpeed's partitioned files each tag holds the same slices
in a layout no partitioning shapes (:mod:`alps_ds.train.elastic`), so a run can resume on another
number of ranks or another ZeRO stage.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alps_ds.errors import AlpsError
from alps_ds.fsutil import atomic_file, atomic_write_text
from alps_ds.train import elastic
from alps_ds.train.distributed import barrier

LATEST = "latest.json"
DS_LATEST = "latest"  # DeepSpeed's own tag pointer: zero_to_fp32 and load_checkpoint(tag=None) read it


def read_latest(ckpt_dir: Path) -> dict[str, Any] | None:
    """The pointer to the last complete checkpoint (tag, step, and the world size, ZeRO stage and global batch that
    wrote it, None where an older pointer lacks them, and the base it trained, see :mod:`alps_ds.digest`), or None."""
    path = ckpt_dir / LATEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        out = {"tag": str(data["tag"]), "step": int(data["step"])}
        for key in ("world_size", "zero_stage", "batch"):
            value = data.get(key)
            out[key] = None if value is None else int(value)
        base = data.get("base")
        if base is not None and not isinstance(base, dict):
            raise TypeError("'base' is not an object")
        out["base"] = base
        return out
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise AlpsError(f"{path}: unreadable checkpoint pointer ({e}); delete it to start over") from e


def written_tp(tag_dir: Path) -> int:
    """TP size a DeepSpeed checkpoint was written with: one ``mp_rank_NN`` model-states file per TP rank."""
    ranks = {p.name.split("mp_rank_")[1][:2] for p in tag_dir.glob("*mp_rank_*_model_states.pt")}
    return max(1, len(ranks))


def needs_elastic(ckpt_dir: Path, latest: dict[str, Any], world: int, stage: int, tp: int) -> bool:
    """Whether this run partitions differently from the one that wrote ``latest`` (DeepSpeed's own files then do
    not fit and the slices come from the elastic state): another world size, ZeRO stage or ``parallel.tp``."""
    return (
        latest["world_size"] not in (None, world)
        or latest["zero_stage"] not in (None, stage)
        or written_tp(ckpt_dir / latest["tag"]) != tp
    )


def check_resume(ckpt_dir: Path, latest: dict[str, Any], world: int, stage: int, batch: int, tp: int = 1) -> None:
    """Refuse, in one line on every rank (they all read the same pointer), a resume that cannot continue the run."""
    if latest["batch"] not in (None, batch):
        raise AlpsError(
            f"{ckpt_dir / LATEST}: checkpoint {latest['tag']} was written with train.batch {latest['batch']}, this "
            f"run has {batch}; resume with --set train.batch={latest['batch']} (the data position and the LR "
            "schedule count steps of that batch)"
        )
    tag_dir = ckpt_dir / latest["tag"]
    if needs_elastic(ckpt_dir, latest, world, stage, tp) and not elastic.exists(tag_dir):
        stage_was = "the same ZeRO stage" if latest["zero_stage"] is None else f"ZeRO-{latest['zero_stage']}"
        raise AlpsError(
            f"{tag_dir}: this checkpoint has no {elastic.META} (written without ZeRO or by an older alps-ds), so it "
            f"resumes only on {latest['world_size']} ranks with {stage_was} and parallel.tp {written_tp(tag_dir)}"
        )


def check_base(ckpt_dir: Path, latest: dict[str, Any], base: dict[str, Any]) -> None:
    """The slices in a checkpoint are rows of the base it trained: resuming them on another model of
    the same shape would train a mix. ``base`` is this run's :func:`alps_ds.digest.base_record`."""
    from alps_ds import digest

    digest.check_base(
        latest["base"],
        base["path"],
        owner=f"{ckpt_dir / LATEST} (checkpoint {latest['tag']})",
        fix="set model.path back to the model it was trained on, or choose another output.dir",
        found=base["qkv_digest"],
    )


def rng_state() -> dict[str, Any]:
    """This rank's Python, NumPy, torch (and its GPU's) RNG state, saved beside each checkpoint."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # dropout on a GPU draws from the GPU's generator, not torch's CPU one
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state_file: Path) -> None:
    """Restore this rank's RNG state from the ``alps_rank{r}.pt`` file :func:`save_checkpoint` wrote (alps-ds's own
    file beside DeepSpeed's, which unpickles that folder itself: a NumPy RNG state is not a weights-only load)."""
    set_rng_state(torch.load(state_file, weights_only=False)["rng"])


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    engine, ckpt_dir: Path, step: int, rank: int, world: int, keep: int, base: dict[str, Any] | None = None
) -> str:
    """Save under a new tag, then (after every rank finished) point ``latest.json`` and ``latest`` at it
    (``latest.json`` records ``base``, the digest record of the model trained, which a resume compares).

    A crash at any moment leaves both naming a complete checkpoint (or none yet). Collective.
    """
    tag = f"step-{step:08d}"
    engine.save_checkpoint(
        str(ckpt_dir), tag=tag, client_state={"alps_step": step}, save_latest=False, exclude_frozen_parameters=True
    )
    if engine.zero_optimization():
        elastic.save(engine, ckpt_dir / tag, step, rank, world)
    with atomic_file(ckpt_dir / tag / f"alps_rank{rank}.pt", "wb") as f:
        torch.save({"step": step, "rng": rng_state()}, f)
    barrier()
    if rank == 0:
        pointer = {
            "tag": tag,
            "step": step,
            "world_size": world,
            "zero_stage": engine.zero_optimization_stage(),
            "batch": engine.train_batch_size(),
            "base": base,
        }
        atomic_write_text(ckpt_dir / LATEST, json.dumps(pointer) + "\n")
        atomic_write_text(ckpt_dir / DS_LATEST, tag)
        prune_checkpoints(ckpt_dir, keep, newest=step)
    barrier()
    return tag


def load_checkpoint(engine, ckpt_dir: Path, latest: dict[str, Any], rank: int, keep: int, tp: int) -> int:
    """Resume ``engine`` (and this rank's RNG state) from the tag ``latest`` names; returns its step.

    The same world size, ZeRO stage and ``parallel.tp`` load DeepSpeed's own files; another loads the elastic
    state.
    Rank 0 then deletes tags past it, left half-written by the crash that ended the previous run.
    """
    tag_dir = ckpt_dir / latest["tag"]
    import torch.distributed as dist

    if needs_elastic(ckpt_dir, latest, dist.get_world_size(), engine.zero_optimization_stage(), tp):
        elastic.load(engine, tag_dir)
    else:
        load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=latest["tag"], load_module_strict=False)
        if load_path is None:
            raise AlpsError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
    step = latest["step"]
    state_file = tag_dir / f"alps_rank{rank}.pt"
    if state_file.exists():  # a rank the writing run did not have keeps the run seed's RNG stream
        restore_rng_state(state_file)
    if rank == 0:
        prune_checkpoints(ckpt_dir, keep, newest=step)
    return step


def prune_checkpoints(ckpt_dir: Path, keep: int, newest: int) -> None:
    """Delete old tags beyond ``keep`` and any tag newer than ``newest`` (left half-written by a crash)."""
    tags = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())
    steps = {p: int(p.name.removeprefix("step-")) for p in tags if p.name.removeprefix("step-").isdigit()}
    done = [p for p, s in steps.items() if s <= newest]
    for p in done[:-keep] + [p for p, s in steps.items() if s > newest]:
        shutil.rmtree(p, ignore_errors=True)
