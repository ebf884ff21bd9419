"""Export of a finished run: OUT/merged (the base checkpoint with trained rows written in) and OUT/adapter."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from alps_ds.errors import AlpsError
from alps_ds.fsutil import atomic_dir
from alps_ds.train.config import RunConfig
from alps_ds.train.distributed import barrier, on_rank0


def export(cfg: RunConfig, engine, selection, model_dir: Path, out: Path, rank: int):
    """OUT/merged (base checkpoint with trained rows written in) and OUT/adapter; collective."""
    trained = trained_tensors(engine)
    merged_dir = out / "merged" if cfg.output.merged else None
    adapter_dir = None
    if merged_dir is not None:  # rank 0 writes; a failure there (disk full, ...) fails every rank
        on_rank0(lambda: write_merged(model_dir, merged_dir, merged_updates(engine, trained)), rank)
    if cfg.output.adapter:
        from alps_ds.adapter import save_adapter

        # collective: every rank takes part (ZeRO-3 gathers the slices), rank 0 writes
        adapter_dir = save_adapter(engine.module, out / "adapter", selection)
    barrier()
    return merged_dir, adapter_dir


def trained_tensors(engine) -> dict[str, torch.Tensor]:
    """Full fp32 values of every trainable parameter (collective: call on all ranks; rank 0 gets the dict)."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    from alps_ds.sparse.module import gathered

    out: dict[str, torch.Tensor] = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        value = safe_get_full_fp32_param(p)
        if value is None:
            with gathered([p]):
                value = p.detach().float().clone()
        if dist.get_rank() == 0:
            out[name] = value.detach().cpu().clone()
    return out


def merged_updates(engine, trained: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor | None, torch.Tensor]]:
    """Base checkpoint key -> (row indices or None for the whole tensor, new values)."""
    from alps_ds.sparse.hook import slice_addresses
    from alps_ds.sparse.module import row_index

    addresses = slice_addresses(engine.module)
    updates: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
    for name, value in trained.items():
        key, ranges = addresses[name]
        updates[key] = (None if ranges is None else row_index(ranges), value)
    return updates


# Weight files other than safetensors: copied into merged/ they would hold the untrained base beside
# the trained shards (and from_pretrained may pick them up).
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def _is_weights(name: str) -> bool:
    """A weight file or the index of non-safetensors shards (``pytorch_model.bin.index.json``)."""
    if name == "model.safetensors.index.json":  # the shard names it maps are the ones merged/ writes
        return False
    return name.removesuffix(".index.json").endswith((".safetensors", *_OTHER_WEIGHTS))


def write_merged(model_dir: Path, target: Path, updates: dict[str, tuple[torch.Tensor | None, torch.Tensor]]) -> None:
    """Copy the base checkpoint shard by shard, writing the trained rows/tensors in (base dtype).

    Untouched tensors are copied bit for bit; memory stays near one shard.
    """
    from safetensors.torch import load_file, save_file

    from alps_ds.localize.reader import weight_shards, weights_entry

    # The files from_pretrained loaded the base from; a stale index or shards beside them are left out.
    shards = sorted({model_dir / name for name in weight_shards(model_dir).values()})
    if not shards:
        raise AlpsError(f"{model_dir}: no *.safetensors files; export needs a safetensors base checkpoint")
    entry = weights_entry(model_dir).name
    pending = dict(updates)
    with atomic_dir(target) as tmp:
        for item in model_dir.iterdir():  # config, tokenizer, generation config, the shard index
            stale_index = item.name.endswith(".safetensors.index.json") and item.name != entry
            if item.is_file() and not item.name.startswith(".") and not _is_weights(item.name) and not stale_index:
                shutil.copy2(item, tmp / item.name)
        for shard in shards:
            tensors = load_file(str(shard))
            for key in list(tensors):
                if key in pending:
                    rows, value = pending.pop(key)
                    base = tensors[key]
                    if rows is None:
                        tensors[key] = value.to(base.dtype).reshape(base.shape).contiguous()
                    else:
                        tensors[key] = base.index_copy(0, rows, value.to(base.dtype)).contiguous()
            save_file(tensors, str(tmp / shard.name), metadata={"format": "pt"})
        if pending:
            raise AlpsError(
                f"{model_dir}: trained tensor(s) {', '.join(sorted(pending)[:3])} not found in the base checkpoint; "
                "cannot export the merged model"
            )
