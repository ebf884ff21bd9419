"""Tensor parallelism inside ``alps-ds train`` (``parallel.tp``): DeepSpeed AutoTP training under ZeRO.

world = tp x dp. DeepSpeed's mesh is (dp, tp): a TP group is ``tp`` consecutive ranks. The ranks of
a TP group read the same batches (the step plan runs over DP ranks; DeepSpeed checks it on the
first forward) and ZeRO partitions each TP rank's slices over its DP group. The hook is
:mod:`alps_ds.parallel.autotp` (shard, then re-parametrize each rank's local rows). The export
gathers every rank's trained rows (fp32 masters) to rank 0 and writes ``merged/`` and ``adapter/`` in
the ordinary HF layout. With ``tp`` 1 each function is the plain data-parallel path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alps_ds.errors import AlpsError
from alps_ds.train.config import RunConfig


@dataclass(frozen=True)
class Grid:
    """This rank's place in the tp x dp grid."""

    tp: int
    dp: int
    tp_rank: int
    dp_rank: int

    @property
    def mpu(self):
        """``deepspeed.initialize``'s mpu: DeepSpeed's own groups, so batch sizes count DP ranks (None: tp 1)."""
        if self.tp == 1:
            return None
        from deepspeed.utils import groups

        return groups

    def facts(self, engine) -> dict[str, int]:
        """Where this rank sits and how many slice elements it trains before ZeRO partitioning."""
        local = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
        return {"tp_rank": self.tp_rank, "dp_rank": self.dp_rank, "slice_elements": int(local)}

    def tokens(self, count: int) -> int:
        """This rank's share of a token count summed over all ranks: a TP group's batch counts once."""
        return count if self.tp_rank == 0 else 0


def grid(cfg: RunConfig, rank: int, world: int) -> Grid:
    """The grid of this run (call after the process group is up; sets up DeepSpeed's TP groups)."""
    tp = cfg.parallel.tp
    if world % tp:
        raise AlpsError(
            f"{cfg.source}: parallel.tp: {world} ranks are not divisible by tp {tp}; "
            f"launch a multiple of {tp} ranks or change parallel.tp"
        )
    if tp == 1:
        return Grid(1, world, 0, rank)
    from deepspeed.utils import groups

    groups._init_tp_mesh_device(tensor_model_parallel_size=tp)
    return Grid(tp, world // tp, groups.get_tensor_model_parallel_rank(), groups.get_data_parallel_rank())


def hook_model(model, selection, cfg: RunConfig, spec, stage: int, apply=None):
    """Hook ``model`` for ``selection`` (AutoTP-sharded first when tp > 1); returns the trainable report of
    the whole model (a TP rank's own elements summed over its TP group, the size of the unsharded model).
    ``apply`` replaces :func:`alps_ds.apply` at tp 1 (the demo's LoRA arm). Under ZeRO-3 every TP rank
    wraps the same modules (``autotp.pad_modules``)."""
    from alps_ds.sparse import apply as sparse_apply
    from alps_ds.sparse import trainable_report

    tp = cfg.parallel.tp
    if tp == 1:
        (apply or sparse_apply)(model, selection, kv=cfg.kv, train_others=tuple(cfg.train_others), spec=spec)
        return trainable_report(model)
    if apply is not None:
        raise AlpsError(f"{cfg.source}: parallel.tp: {tp} trains with the AutoTP head hook only; use parallel.tp 1")
    import torch.distributed as dist
    from deepspeed.utils import groups

    from alps_ds.parallel import autotp

    total = trainable_report(model).total
    autotp.shard(model, tp, spec, selection=selection, kv=cfg.kv)
    autotp.apply(model, selection, kv=cfg.kv, train_others=tuple(cfg.train_others), spec=spec)
    if stage == 3:
        autotp.pad_modules(model, selection, kv=cfg.kv, spec=spec)
    local = trainable_report(model)
    counts = torch.tensor([local.trainable, *local.per_kind.values()], dtype=torch.int64)
    dist.all_reduce(counts, group=groups.get_tensor_model_parallel_group())
    per_kind = dict(zip(local.per_kind, counts[1:].tolist()))
    return dataclasses.replace(local, trainable=int(counts[0]), total=total, per_kind=per_kind)


def load_model_stage(stage: int, cfg: RunConfig) -> int:
    """The ZeRO stage the base model is loaded for: AutoTP shards a whole model, so never zero.Init under TP."""
    return stage if cfg.parallel.tp == 1 else 0


def export(cfg: RunConfig, engine, selection, model_dir: Path, out: Path, rank: int):
    """OUT/merged and OUT/adapter (collective); under TP from the rows gathered off every TP rank."""
    from alps_ds.train import export as plain

    if cfg.parallel.tp == 1:
        return plain.export(cfg, engine, selection, model_dir, out, rank)
    from alps_ds.arch import AttentionSpec
    from alps_ds.hooked import hooked_modules
    from alps_ds.train.distributed import barrier, on_rank0

    spec = AttentionSpec.from_pretrained(model_dir)
    dtype = next(mod for _, mod in hooked_modules(engine.module)).head_weight.dtype  # every rank trains rows
    rows = gather_rows(engine)  # rank 0: checkpoint key -> (global rows, fp32 values)
    merged_dir = out / "merged" if cfg.output.merged else None
    adapter_dir = out / "adapter" if cfg.output.adapter else None

    def write() -> None:
        check_rows(rows, spec, selection, cfg.kv)
        if merged_dir is not None:
            plain.write_merged(model_dir, merged_dir, rows)
        if adapter_dir is not None:
            write_full_adapter(adapter_dir, rows, spec, selection, cfg.kv, dtype, model_dir)

    on_rank0(write, rank)
    barrier()
    return merged_dir, adapter_dir


def gather_rows(engine) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Base checkpoint key (``...q_proj.weight`` / ``.bias``) -> (global row indices, fp32 trained rows), on rank 0.

    Collective. Each TP rank's hooked shards hold local rows; AutoTP gives a rank one contiguous block
    of every q/k/v weight, so a global row is the block's first row plus the local one. DP replicas of
    a TP rank hold the same values: only DP rank 0 of each TP group sends.
    """
    import torch.distributed as dist
    from deepspeed.utils import groups, safe_get_full_fp32_param

    from alps_ds.hooked import hooked_modules

    mine: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    tp_rank = groups.get_tensor_model_parallel_rank()
    for name, mod in hooked_modules(engine.module):
        if mod.hooked is None:  # a frozen placeholder (ZeRO-3): this rank trains no rows here
            continue
        start = sum(mod.partition_sizes[:tp_rank])
        idx = mod.rows.cpu() + start
        for leaf, p in (("weight", mod.head_weight), ("bias", mod.head_bias)):
            if p is None:
                continue
            value = safe_get_full_fp32_param(p)  # collective over the DP group
            value = p.detach().float() if value is None else value
            mine[f"{name}.{leaf}"] = (idx, value.detach().cpu().clone())
    sent = mine if groups.get_data_parallel_rank() == 0 else None
    parts: list[Any] = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(sent, parts, dst=0)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for part in parts or ():
        for key, (idx, value) in (part or {}).items():
            if key in out:
                idx, value = torch.cat([out[key][0], idx]), torch.cat([out[key][1], value])
            out[key] = (idx, value)
    for key, (idx, value) in out.items():
        order = torch.argsort(idx)
        out[key] = (idx[order], value[order])
    return out


def expected_rows(spec, selection, kv) -> dict[str, Any]:
    """Checkpoint key -> the selection's global rows (:func:`alps_ds.layout.trainable_rows`)."""
    from alps_ds.layout import trainable_rows

    out = {}
    for mr in trainable_rows(spec, selection.heads, kv):
        for leaf in ("weight", "bias") if spec.qkv_bias else ("weight",):
            out[f"{spec.module_path(mr.layer, mr.module)}.{leaf}"] = mr
    return out


def check_rows(rows, spec, selection, kv) -> None:
    """The gathered rows must be exactly the selection's, each once: anything else would export a wrong model."""
    want = expected_rows(spec, selection, kv)
    got = {k: v[0].tolist() for k, v in rows.items()}
    if got != {k: mr.indices() for k, mr in want.items()}:
        wrong = sorted(set(got) ^ set(want)) or sorted(k for k in got if got[k] != want[k].indices())
        raise AlpsError(
            f"export: the rows gathered from the TP ranks are not the selection's ({wrong[0]}); "
            "nothing was written (a bug: please report it with your run config)"
        )


def write_full_adapter(adapter_dir: Path, rows, spec, selection, kv, dtype: torch.dtype, model_dir: Path) -> None:
    """OUT/adapter from the gathered full rows: the same layout (and the training dtype) a tp 1 run writes."""
    from alps_ds.adapter import AdapterModule, write_adapter
    from alps_ds.digest import base_record

    entries, tensors = [], {}
    for key, mr in expected_rows(spec, selection, kv).items():
        if key.endswith(".bias"):
            continue
        module = key.removesuffix(".weight")
        entries.append(AdapterModule(module, mr.ranges, mr.rows_per_kind, spec.hidden_size, spec.qkv_bias))
        tensors[key] = rows[key][1].to(dtype).contiguous()
        if spec.qkv_bias:
            tensors[f"{module}.bias"] = rows[f"{module}.bias"][1].to(dtype).contiguous()
    write_adapter(adapter_dir, selection, kv, entries, tensors, base=base_record(model_dir))
