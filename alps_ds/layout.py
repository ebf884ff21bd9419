"""Which rows of which projection modules a head selection trains (unsharded HF weights).

This turns ``(layer, query head)`` pairs into per-module row ranges, using the row facts
of :class:`~alps_ds.arch.AttentionSpec`. Tensor/pipeline-parallel mappings build on it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from alps_ds.arch import AttentionSpec, Kind
from alps_ds.errors import AlpsError

KVPolicy = Literal["group", "none"]
KV_POLICIES: tuple[str, ...] = ("group", "none")


@dataclass(frozen=True)
class ModuleRows:
    """Trainable rows of one projection module: half-open ranges, sorted and merged."""

    layer: int
    module: str
    ranges: tuple[tuple[int, int], ...]
    rows_per_kind: tuple[tuple[Kind, int], ...]  # e.g. (("q", 256), ("k", 128), ("v", 128))

    @property
    def num_rows(self) -> int:
        return sum(b - a for a, b in self.ranges)

    def indices(self) -> list[int]:
        return [i for a, b in self.ranges for i in range(a, b)]


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sort and coalesce overlapping or touching half-open ranges."""
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


def trainable_rows(spec: AttentionSpec, heads: Iterable[tuple[int, int]], kv: KVPolicy = "group") -> list[ModuleRows]:
    """Per (layer, module) the rows trained for ``heads``.

    ``kv="group"`` adds the k/v rows of every kv head read by a selected query head (the
    paper's theta_h); a kv head shared by several selected query heads counts once.
    ``kv="none"`` trains the query rows only.
    """
    if kv not in KV_POLICIES:
        raise AlpsError(f"kv policy {kv!r} is unknown; use one of {', '.join(KV_POLICIES)}")
    blocks: dict[tuple[int, str], set[tuple[Kind, int, int]]] = {}
    for layer, h in heads:
        if not (0 <= layer < spec.num_layers and 0 <= h < spec.num_heads):
            raise AlpsError(f"head [{layer}, {h}] is outside the model ({spec.num_layers} x {spec.num_heads})")
        kinds = ("q", "k", "v") if kv == "group" else ("q",)
        for kind in kinds:
            index = h if kind == "q" else spec.kv_head(h)
            b = spec.rows(kind, index)
            blocks.setdefault((layer, b.module), set()).add((kind, b.start, b.stop))
    out = []
    for (layer, module), bs in sorted(blocks.items(), key=lambda kv_: (kv_[0][0], spec.modules.index(kv_[0][1]))):
        per_kind: dict[Kind, int] = {}
        for kind, a, b in bs:
            per_kind[kind] = per_kind.get(kind, 0) + (b - a)
        out.append(
            ModuleRows(
                layer=layer,
                module=module,
                ranges=merge_ranges((a, b) for _, a, b in bs),
                rows_per_kind=tuple((k, per_kind[k]) for k in ("q", "k", "v") if k in per_kind),
            )
        )
    return out


def matches_train_others(pattern: str, param_name: str) -> bool:
    """The ``train_others`` rule: ``"all"``, a dotted module component equal to ``pattern`` or ending
    in it ('norm' matches ``input_layernorm``), an fnmatch glob of one component, or a glob of the
    whole dotted parameter name. Shared by the engine hook and the memory planner."""
    if pattern == "all" or fnmatch.fnmatchcase(param_name, pattern):
        return True
    parts = param_name.split(".")[:-1]
    return any(part.endswith(pattern) or fnmatch.fnmatchcase(part, pattern) for part in parts)
