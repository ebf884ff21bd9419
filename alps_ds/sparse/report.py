"""What a hooked model trains: elements and bytes per module and per kind, and the optimizer memory to expect."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from alps_ds.hooked import KIND_ORDER, HeadRows
from alps_ds.sparse.module import full_numel

# Bytes per trained element held by the optimizer side: an fp32 master copy when the model
# trains in 16-bit, and AdamW's two fp32 moments.
ADAM_BYTES = 8
MASTER_BYTES = 4


@dataclass(frozen=True)
class ModuleEntry:
    """Trainable part of one module: ``kind`` is q, k, v, qkv (fused) or others."""

    name: str
    kind: str
    elements: int
    dtype: str
    bytes: int


@dataclass(frozen=True)
class TrainableReport:
    """Per-module and per-kind trainable elements of a model and the training memory they cost."""

    modules: tuple[ModuleEntry, ...]
    per_kind: dict[str, int]  # elements of q, k, v, others (fused projections split by row counts)
    trainable: int
    total: int
    param_bytes: int  # trainable parameters in the model's dtype
    grad_bytes: int  # one gradient per trainable parameter, model dtype
    master_bytes: int  # fp32 master copies (0 when the trainable parameters are fp32 already)
    adam_bytes: int  # exp_avg + exp_avg_sq, fp32

    @property
    def optimizer_bytes(self) -> int:
        """fp32 master + Adam state: what ZeRO partitions across data-parallel ranks."""
        return self.master_bytes + self.adam_bytes

    @property
    def training_bytes(self) -> int:
        """Parameter + gradient + master + Adam bytes of everything trainable (unpartitioned)."""
        return self.param_bytes + self.grad_bytes + self.master_bytes + self.adam_bytes

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def format(self, *, max_modules: int = 12) -> str:
        """A plain-text table for logs: per kind, then the largest modules, then memory."""
        lines = [f"{'kind':<8}{'elements':>14}{'share':>9}"]
        for kind in KIND_ORDER:
            n = self.per_kind.get(kind, 0)
            lines.append(f"{kind:<8}{n:>14,}{(n / self.trainable if self.trainable else 0):>9.1%}")
        lines.append(f"{'total':<8}{self.trainable:>14,}  of {self.total:,} ({self.fraction:.3%} of the model)")
        if self.modules:
            lines.append("")
            lines.append(f"{'module':<52}{'kind':>7}{'elements':>12}{'bytes':>12}")
            biggest = sorted(self.modules, key=lambda m: -m.elements)[:max_modules]
            for m in biggest:
                lines.append(f"{m.name[-52:]:<52}{m.kind:>7}{m.elements:>12,}{m.bytes:>12,}")
            if len(self.modules) > max_modules:
                lines.append(f"... {len(self.modules) - max_modules} more modules")
        lines.append("")
        for label, value in (
            ("parameters", self.param_bytes),
            ("gradients", self.grad_bytes),
            ("fp32 master", self.master_bytes),
            ("Adam moments", self.adam_bytes),
            ("total", self.training_bytes),
        ):
            lines.append(f"{label:<14}{_human(value):>12}")
        return "\n".join(lines)


def _human(n: int) -> str:
    """``n`` bytes as a short human-readable size (B up to TiB) for the report table."""
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:,.1f} {unit}"
        size /= 1024
    return f"{size:,.1f} TiB"


def trainable_report(model: nn.Module) -> TrainableReport:
    """Count what ``model`` trains (``requires_grad`` parameters; full sizes also under ZeRO-3)."""
    entries: list[ModuleEntry] = []
    per_kind = dict.fromkeys(KIND_ORDER, 0)
    param_bytes = grad_bytes = master_bytes = 0
    total = 0
    seen: set[int] = set()
    for mname, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        for _, p in own:
            seen.add(id(p))
        # The slice parameters duplicate rows of the frozen weight: count the model's size without them.
        hooked = isinstance(module, HeadRows)
        total += sum(full_numel(p) for n, p in own if not (hooked and n.startswith("head_")))
        trained = [p for _, p in own if p.requires_grad]
        if not trained:
            continue
        elements = sum(full_numel(p) for p in trained)
        nbytes = sum(full_numel(p) * p.element_size() for p in trained)
        param_bytes += nbytes
        grad_bytes += nbytes
        master_bytes += sum(full_numel(p) * MASTER_BYTES for p in trained if p.dtype != torch.float32)
        if hooked:
            kinds = dict(module.kinds)
            per_row = elements // module.num_rows
            for kind, rows in kinds.items():
                per_kind[kind] += rows * per_row
            if sum(kinds.values()) != module.num_rows:  # rows of unknown kind (reparametrize without kinds)
                per_kind["others"] += (module.num_rows - sum(kinds.values())) * per_row
            kind = next(iter(kinds)) if len(kinds) == 1 else "qkv"
        else:
            per_kind["others"] += elements
            kind = "others"
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in trained})
        entries.append(ModuleEntry(mname, kind, elements, "/".join(dtypes), nbytes))
    trainable = sum(e.elements for e in entries)
    return TrainableReport(
        modules=tuple(entries),
        per_kind=per_kind,
        trainable=trainable,
        total=total,
        param_bytes=param_bytes,
        grad_bytes=grad_bytes,
        master_bytes=master_bytes,
        adam_bytes=trainable * ADAM_BYTES,
    )
