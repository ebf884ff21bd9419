"""Elastic training state: every trained slice with its fp32 master and optimizer moments, in a layout no
partitioning shapes, so a checkpoint resumes on another number of ranks, ZeRO stage or TP size.

DeepSpeed's own checkpoint files are partitioned per rank (and laid out differently per ZeRO stage and per TP
rank); an ALPS run trains only small slices, so each checkpoint tag also holds them, keyed by what they are:

- ``alps_elastic.json``: format, step, optimizer step, LR scheduler state, the writing run's world size,
  ZeRO stage, TP size and global batch, the optimizer state keys, and per record its HF checkpoint key
  (``model.layers.0.self_attn.q_proj.weight``), GLOBAL row ranges of that tensor (null: all of it), shape and
  file. Without TP a record is a whole slice named by its key; under AutoTP each TP rank writes its own rows
  of a tensor as the record ``KEY/tpR`` (local rows translated through the mapping).
- ``alps_slices-RRRRR-of-WWWWW.safetensors``: one file per writing rank (DP rank d of a TP rank's DP group
  holds every dp-th of its slices, so no rank keeps them all), tensors ``NAME/fp32`` and ``NAME/<state key>``
  (``exp_avg``, ``exp_avg_sq``).

A reader on any TP size takes each of its slices' global rows from the records of that tensor.
Values go through DeepSpeed's tensor-fragment API (``safe_get_full_fp32_param``,
``safe_set_full_optimizer_state``, ...), which works the same on ZeRO 1, 2 and 3.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from alps_ds.errors import AlpsError
from alps_ds.fsutil import atomic_file, atomic_write_text

META = "alps_elastic.json"
FORMAT = "alps-elastic/1"


def exists(tag_dir: Path) -> bool:
    return (tag_dir / META).exists()


def shard_name(rank: int, world: int) -> str:
    return f"alps_slices-{rank:05d}-of-{world:05d}.safetensors"


def _inner(engine):
    """The torch optimizer DeepSpeed's ZeRO optimizer drives (its parameters are the flat fp32 partitions)."""
    return engine.optimizer.optimizer


def _state_keys(engine) -> list[str]:
    """Per-element optimizer state (Adam: exp_avg, exp_avg_sq); empty before the first step."""
    states = list(_inner(engine).state.values())
    if not states:
        return []
    return sorted(k for k, v in states[0].items() if torch.is_tensor(v) and v.dim() > 0)


def _optimizer_step(engine) -> int:
    steps = [st["step"] for st in _inner(engine).state.values() if "step" in st]
    return int(float(steps[0])) if steps else 0


def _trained(engine) -> list[tuple[torch.nn.Parameter, str, Any]]:
    """(parameter, HF key, GLOBAL row ranges or None) of every trainable parameter, in module order. Under
    AutoTP a hooked shard's local rows are translated through the mapping (``tp_segments``)."""
    from alps_ds.hooked import hooked_modules
    from alps_ds.parallel.mapping import TensorParallel
    from alps_ds.sparse.hook import model_spec, slice_addresses

    params = dict(engine.module.named_parameters())
    hooked = dict(hooked_modules(engine.module))
    out = []
    for name, (key, ranges) in slice_addresses(engine.module).items():
        info = getattr(hooked.get(name.rpartition(".")[0]), "hooked", None)
        if info is not None and info.tp_size > 1:
            tensor = TensorParallel(model_spec(engine.module, None), "autotp", info.tp_size)
            ranges = tensor.globalize(info.module, info.tp_rank, ranges)
        out.append((params[name], key, ranges))
    return out


def _run_slices(engine, trained) -> list[tuple[None, str, Any]]:
    """Every slice the whole run trains, (None, key, global ranges) merged per key over the TP ranks. Collective."""
    import torch.distributed as dist

    from alps_ds.layout import merge_ranges

    mine = [(key, None if ranges is None else [tuple(r) for r in ranges]) for _, key, ranges in trained]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    merged: dict[str, Any] = {}
    for key, ranges in (item for part in parts for item in part):
        merged[key] = None if ranges is None else merge_ranges([*(merged.get(key) or ()), *ranges])
    return [(None, key, ranges) for key, ranges in merged.items()]


def _tp_rank() -> int:
    from deepspeed.utils import groups

    return groups.get_tensor_model_parallel_rank()


def save(engine, tag_dir: Path, step: int, rank: int, world: int) -> None:
    """Write this rank's share of the slices (global rows; DP rank d of each TP rank's DP group holds every dp-th
    of that TP rank's slices); rank 0 also writes the metadata. Collective (every rank of a DP group gathers
    every slice of its TP rank, in the same order)."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import save

    from alps_ds.sparse.module import full_shape

    keys = _state_keys(engine)
    dp, dp_rank = engine.dp_world_size, dist.get_rank(group=engine.data_parallel_group)
    tp = max(1, engine.autotp_size())
    suffix = "" if tp == 1 else f"/tp{_tp_rank()}"  # TP ranks hold other rows of the same tensor
    mine: dict[str, torch.Tensor] = {}
    slices: dict[str, Any] = {}
    for i, (p, key, ranges) in enumerate(_trained(engine)):
        values = {"fp32": safe_get_full_fp32_param(p)}
        values.update({k: safe_get_full_optimizer_state(p, k) for k in keys})
        if dp_rank != i % dp:
            continue
        name = key + suffix
        rows = None if ranges is None else [list(r) for r in ranges]
        slices[name] = {"key": key, "rows": rows, "shape": list(full_shape(p)), "file": shard_name(rank, world)}
        mine.update({f"{name}/{k}": v.detach().float().cpu().reshape(full_shape(p)) for k, v in values.items()})
    with atomic_file(tag_dir / shard_name(rank, world), "wb") as f:
        f.write(save(mine, metadata={"format": FORMAT}))
    parts: list[Any] = [None] * world if rank == 0 else None
    dist.gather_object(slices, parts, dst=0)
    if rank == 0:
        meta = {
            "format": FORMAT,
            "step": step,
            "optimizer_step": _optimizer_step(engine),
            "scheduler": engine.lr_scheduler.state_dict(),
            "world_size": world,
            "zero_stage": engine.zero_optimization_stage(),
            "tp": tp,
            "batch": engine.train_batch_size(),
            "state_keys": keys,
            "slices": {name: entry for part in parts for name, entry in part.items()},
        }
        atomic_write_text(tag_dir / META, json.dumps(meta, indent=1) + "\n")


def read_meta(tag_dir: Path) -> dict[str, Any]:
    path = tag_dir / META
    try:
        meta = json.loads(path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        missing = [k for k in ("step", "optimizer_step", "scheduler", "batch", "state_keys", "slices") if k not in meta]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        return meta
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise AlpsError(f"{path}: unreadable elastic checkpoint state ({e}); resume on the run's own ranks") from e


def _records(meta: dict[str, Any]) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """HF key -> its saved records (name in the files, entry): one per key at tp 1, one per TP rank under TP."""
    out: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for name, entry in meta["slices"].items():
        out.setdefault(entry.get("key", name), []).append((name, entry))
    return out


def check_slices(tag_dir: Path, meta: dict[str, Any], trained) -> None:
    """The checkpoint holds exactly the slices this run trains (same tensors, same global rows)."""
    from alps_ds.layout import merge_ranges

    def rows(ranges):
        return None if ranges is None else [list(r) for r in merge_ranges(map(tuple, ranges))]

    have = {key: rows(ranges) for _, key, ranges in trained}
    saved = {}
    for key, records in _records(meta).items():
        parts = [entry["rows"] for _, entry in records]
        saved[key] = None if None in parts else rows([r for part in parts for r in part])
    if have != saved:
        diff = sorted(k for k in have.keys() | saved.keys() if have.get(k, "-") != saved.get(k, "-"))
        raise AlpsError(
            f"{tag_dir / META}: the checkpoint's trained slices differ from this run's ({', '.join(diff[:3])}); "
            "resume with the run's own heads.json, kv and train_others"
        )


def _pick(records, tensor, ranges, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """This slice's rows (global ``ranges``; None: the whole tensor) of each of ``names``, taken from the
    records of its key that hold them (a slice of a tp 1 run may come from several TP ranks' records)."""
    if ranges is None:
        name, entry = records[0]
        return {k: tensor(entry["file"], f"{name}/{k}") for k in names}
    held: list[int] = []
    values: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    for name, entry in records:
        held.extend(r for a, b in entry["rows"] for r in range(a, b))
        for k in names:
            values[k].append(tensor(entry["file"], f"{name}/{k}"))
    where = {r: i for i, r in enumerate(held)}
    idx = torch.tensor([where[r] for a, b in ranges for r in range(a, b)], dtype=torch.long)
    return {k: torch.cat(v).index_select(0, idx) for k, v in values.items()}


def _materialize_state(engine) -> None:
    """Create the optimizer state (torch creates it lazily, at the first step) through one optimizer step of
    zero gradients at lr 0 taken by the engine itself, so every ZeRO stage lays it out its own way; the values,
    the step counts and the schedule are all overwritten right after."""
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0
    ids = torch.zeros((1, 2), dtype=torch.long, device=engine.device)
    for _ in range(engine.gradient_accumulation_steps()):
        engine.backward(engine(input_ids=ids).logits.float().sum() * 0.0)
        engine.step()


def load(engine, tag_dir: Path) -> None:
    """Load the slices, their optimizer state and step, the LR schedule and DeepSpeed's step counters into
    ``engine`` (any world size, ZeRO stage 1-3). Collective."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from safetensors import safe_open

    from alps_ds.sparse.module import gathered

    meta = read_meta(tag_dir)
    trained = _trained(engine)
    check_slices(tag_dir, meta, _run_slices(engine, trained))
    _materialize_state(engine)
    keys = meta["state_keys"]
    if keys and keys != _state_keys(engine):
        raise AlpsError(
            f"{tag_dir / META}: optimizer state {keys} does not fit this run's optimizer ({_state_keys(engine)}); "
            "resume with the optimizer that wrote it"
        )
    records = _records(meta)
    with contextlib.ExitStack() as stack:
        opened: dict[str, Any] = {}

        def tensor(file: str, name: str) -> torch.Tensor:
            try:
                if file not in opened:
                    opened[file] = stack.enter_context(safe_open(str(tag_dir / file), "pt"))
                return opened[file].get_tensor(name)
            except Exception as e:  # safetensors raises its own error types for a missing or damaged file
                raise AlpsError(f"{tag_dir / file}: cannot read slice {name} ({type(e).__name__}: {e})") from e

        for p, key, ranges in trained:
            values = _pick(records[key], tensor, ranges, ("fp32", *keys))
            with torch.no_grad(), gathered([p], modify=True):  # the module's copy the forward uses
                p.data.copy_(values["fp32"].reshape(p.shape).to(p.dtype))
            safe_set_full_fp32_param(p, values["fp32"])
            for k in keys:
                safe_set_full_optimizer_state(p, values[k], k)
    for st in _inner(engine).state.values():
        if "step" in st:
            n = meta["optimizer_step"]
            st["step"] = torch.full_like(st["step"], n) if torch.is_tensor(st["step"]) else n
    scheduler = engine.lr_scheduler
    scheduler.load_state_dict(meta["scheduler"])
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr  # load_state_dict restores the schedule's position, not the lr it last set
    engine.global_steps = meta["step"]
    engine.global_samples = meta["step"] * meta["batch"]
