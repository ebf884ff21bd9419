"""Export of an engine-megatron run: OUT/merged (a HF model) and OUT/adapter, in HF tensor names.

The trained ``linear_qkv`` of every hooked layer is gathered over TP and split back into HF
q/k/v (:func:`alps_ds.mcore.convert.gather_hf`); every other tensor of OUT/merged is copied
from the base checkpoint byte for byte (:func:`alps_ds.train.export.write_merged`).
"""

from __future__ import annotations

from pathlib import Path

from alps_ds.train.config import RunConfig
from alps_ds.train.distributed import barrier, on_rank0


def export(cfg: RunConfig, model, spec, hf_cfg: dict, selection, model_dir: Path, out: Path, rank: int):
    """OUT/merged and OUT/adapter; collective (every rank gathers, rank 0 writes)."""
    from alps_ds.mcore.convert import gather_hf
    from alps_ds.parallel.megatron import MegatronHeadRows
    from alps_ds.train.export import write_merged

    hooked = [(name, m) for name, m in model.named_modules() if isinstance(m, MegatronHeadRows)]
    names = {f"{name}.weight" for name, _ in hooked} | {f"{name}.bias" for name, m in hooked if m.head_bias is not None}
    full = gather_hf(model, spec, bool(hf_cfg.get("tie_word_embeddings", False)), names)
    merged_dir = out / "merged" if cfg.output.merged else None
    adapter_dir = out / "adapter" if cfg.output.adapter else None
    if merged_dir is not None:
        on_rank0(lambda: write_merged(model_dir, merged_dir, {k: (None, v) for k, v in full.items()}), rank)
    if adapter_dir is not None:
        on_rank0(lambda: write_hf_adapter(adapter_dir, spec, selection, cfg.kv, full, model_dir), rank)
    barrier()
    return merged_dir, adapter_dir


def write_hf_adapter(target: Path, spec, selection, kv: str, full: dict, model_dir: Path) -> None:
    """An alps-ds adapter (HF q/k/v names and rows, as the DeepSpeed engine writes) from full q/k/v tensors."""
    from alps_ds.adapter import AdapterModule, write_adapter
    from alps_ds.digest import base_record
    from alps_ds.layout import trainable_rows
    from alps_ds.sparse.module import row_index

    entries, tensors = [], {}
    for mr in trainable_rows(spec, selection.heads, kv):
        name = spec.module_path(mr.layer, mr.module)
        idx = row_index(mr.ranges)
        tensors[f"{name}.weight"] = full[f"{name}.weight"].index_select(0, idx).contiguous()
        if spec.qkv_bias:
            tensors[f"{name}.bias"] = full[f"{name}.bias"].index_select(0, idx).contiguous()
        entries.append(AdapterModule(name, mr.ranges, mr.rows_per_kind, spec.hidden_size, spec.qkv_bias))
    write_adapter(target, selection, kv, entries, tensors, base=base_record(model_dir))
