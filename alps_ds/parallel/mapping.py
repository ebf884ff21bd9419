"""Tensor- and pipeline-parallel head mapping: which rank trains which local rows.

A head selection names global ``(layer, query head)`` pairs. On a sharded job every rank
holds a slice of each Q/K/V weight (tensor parallel, TP) of some layers (pipeline parallel,
PP), so the engine hook needs the *local* row indices of each rank. This module is pure
math on :class:`~alps_ds.arch.AttentionSpec`; the hooks in :mod:`alps_ds.parallel.autotp`
and :mod:`alps_ds.parallel.megatron` and ``alps-ds layout`` all use it.

Weight layouts (rows of the unsharded ``[out, in]`` weight, ``m = n / g`` query heads per
kv group; row facts of the HF layouts come from ``AttentionSpec.rows``):

- ``hf``: separate ``q_proj``/``k_proj``/``v_proj``, each split into T equal contiguous
  parts (HF ``tp_plan`` colwise). Needs ``n % T == 0`` and ``g % T == 0``.
- ``fused``: one ``qkv_proj`` [Q; K; V] (phi3); rank t holds [Q_t; K_t; V_t], its n/T
  query heads and g/T kv heads (vLLM's QKVParallelLinear). Needs ``n % T == 0``, ``g % T == 0``.
- ``neox``: one ``query_key_value`` of per-head [q_h; k_h; v_h] blocks (g = n), split into
  T contiguous parts (GPT-NeoX). Needs ``n % T == 0``.
- ``megatron``: megatron-core ``linear_qkv``: per kv group j the block
  [q rows of its m query heads; k_j; v_j]; rank t holds the contiguous t-th 1/T of all
  ``(n + 2g) * hd`` rows. Needs ``n % T == 0`` and (``g % T == 0`` or ``T % g == 0``).
  With g < T nothing is replicated: one head's rows can straddle two ranks.
- ``autotp``: DeepSpeed AutoTP on separate q/k/v: each weight is cut on kv-group
  boundaries, possibly unevenly; rank t gets ``g // T + (t < g % T)`` consecutive groups
  (``deepspeed.module_inject.tp_shard.get_shard_size``); ranks t >= g get no rows.

Pipeline: :class:`PipelineSplit` maps a global layer to (stage, virtual stage, local
layer) for Megatron's even split, virtual (interleaved) pipelines, uneven first/last
stages, and DeepSpeed ``PipelineModule.parts`` boundaries read at run time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from alps_ds.arch import AttentionSpec, Kind, RowBlock
from alps_ds.errors import AlpsError
from alps_ds.layout import KVPolicy, ModuleRows, merge_ranges, trainable_rows

TPLayout = Literal["hf", "fused", "neox", "megatron", "autotp"]
TP_LAYOUTS: tuple[str, ...] = ("hf", "fused", "neox", "megatron", "autotp")
Range = tuple[int, int]

# Module names and the AttentionSpec row layout each TP layout addresses.
_HF_LAYOUT = {"hf": "separate", "autotp": "separate", "fused": "fused", "neox": "neox"}
_HF_MODULES = {"separate": ("q_proj", "k_proj", "v_proj"), "fused": ("qkv_proj",), "neox": ("query_key_value",)}
MEGATRON_MODULE = "linear_qkv"


def native_layout(spec: AttentionSpec) -> TPLayout:
    """The TP layout of the model's own Hugging Face weights."""
    return {"separate": "hf", "fused": "fused", "neox": "neox"}[spec.layout]


def balanced_split(count: int, parts: int) -> list[range]:
    """``count`` items in ``parts`` consecutive runs, the first ``count % parts`` one longer: how
    AutoTP cuts kv groups over TP ranks (``get_shard_size``; ranks past ``count`` get none)."""
    base, extra = divmod(count, parts)
    bounds = [p * base + min(p, extra) for p in range(parts + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


@dataclass(frozen=True)
class _RowView:
    """The row facts of one layout, shaped like the part of AttentionSpec that
    :func:`alps_ds.layout.trainable_rows` reads, so that function serves every layout."""

    spec: AttentionSpec
    layout: TPLayout

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers

    @property
    def num_heads(self) -> int:
        return self.spec.num_heads

    @property
    def modules(self) -> tuple[str, ...]:
        if self.layout == "megatron":
            return (MEGATRON_MODULE,)
        return _HF_MODULES[_HF_LAYOUT[self.layout]]

    def kv_head(self, head: int) -> int:
        return self.spec.kv_head(head)

    def rows(self, kind: Kind, index: int) -> RowBlock:
        if self.layout != "megatron":
            hf = _HF_LAYOUT[self.layout]
            spec = self.spec if self.spec.layout == hf else replace(self.spec, layout=hf, modules=_HF_MODULES[hf])
            return spec.rows(kind, index)
        # Grouped: kv group j is the block [q of its m heads; k_j; v_j], (m + 2) * hd rows.
        m, hd = self.spec.group_size, self.spec.head_dim
        group = index // m if kind == "q" else index
        start = group * (m + 2) * hd + {"q": (index % m) * hd, "k": m * hd, "v": (m + 1) * hd}[kind]
        return RowBlock(MEGATRON_MODULE, start, start + hd)


@dataclass(frozen=True)
class TensorParallel:
    """How one layout's Q/K/V weights are split over ``tp`` ranks."""

    spec: AttentionSpec
    layout: TPLayout
    tp: int

    def __post_init__(self) -> None:
        n, g, T = self.spec.num_heads, self.spec.num_kv_heads, self.tp
        if self.layout not in TP_LAYOUTS:
            raise AlpsError(f"layout {self.layout!r} is unknown; use one of {', '.join(TP_LAYOUTS)}")
        if not isinstance(T, int) or T < 1:
            raise AlpsError(f"--tp {T!r}: tensor-parallel size must be a positive integer")
        if self.layout == "neox" and g != n:
            raise AlpsError(f"layout neox needs num_kv_heads == num_heads (model has {g} != {n}); use another layout")
        if self.layout == "autotp":
            return
        if n % T:
            raise AlpsError(
                f"layout {self.layout}: {n} query heads do not split over --tp {T} (n % T != 0); "
                f"pick a TP size dividing {n}"
            )
        if self.layout == "megatron":
            if g % T and T % g:
                raise AlpsError(
                    f"layout megatron: {g} query groups and --tp {T} need g % T == 0 or T % g == 0; "
                    "pick a TP size that divides or is a multiple of the kv head count"
                )
            if ((n + 2 * g) * self.spec.head_dim) % T:
                raise AlpsError(
                    f"layout megatron: linear_qkv rows {(n + 2 * g) * self.spec.head_dim} do not split over --tp {T}"
                )
        elif self.layout in ("hf", "fused") and g % T:
            raise AlpsError(
                f"layout {self.layout}: {g} kv heads do not split over --tp {T} (g % T != 0); "
                "use --layout autotp (uneven kv groups) or megatron, or a TP size dividing the kv head count"
            )

    @property
    def view(self) -> _RowView:
        return _RowView(self.spec, self.layout)

    @property
    def modules(self) -> tuple[str, ...]:
        return self.view.modules

    def module_rows(self, module: str) -> int:
        """Output rows of the unsharded ``module``."""
        if module == MEGATRON_MODULE:
            return (self.spec.num_heads + 2 * self.spec.num_kv_heads) * self.spec.head_dim
        return self.spec.module_rows(module)

    def shard_sizes(self, module: str) -> list[int]:
        """Local rows of ``module`` on each TP rank."""
        return [sum(b - a for a, b in self.segments(module, t)) for t in range(self.tp)]

    def segments(self, module: str, rank: int) -> tuple[Range, ...]:
        """Global rows of ``module`` held by TP rank ``rank``, in local order (concatenated
        they are the rank's local weight)."""
        if module not in self.modules:
            raise AlpsError(f"module {module!r} is not part of layout {self.layout} ({', '.join(self.modules)})")
        if not 0 <= rank < self.tp:
            raise AlpsError(f"tp rank {rank} outside [0, {self.tp})")
        T, t, total = self.tp, rank, self.module_rows(module)
        if self.layout == "autotp":
            g = self.spec.num_kv_heads
            groups = balanced_split(g, T)[t]  # every module's rows are whole kv groups
            return ((total * groups.start // g, total * groups.stop // g),)
        if self.layout == "fused":
            n, g, hd = self.spec.num_heads, self.spec.num_kv_heads, self.spec.head_dim
            q, kv = n * hd // T, g * hd // T
            return (
                (t * q, (t + 1) * q),
                (n * hd + t * kv, n * hd + (t + 1) * kv),
                ((n + g) * hd + t * kv, (n + g) * hd + (t + 1) * kv),
            )
        size = total // T  # hf, neox, megatron: the contiguous t-th 1/T
        return ((t * size, (t + 1) * size),)

    def localize(self, module: str, rank: int, ranges: Iterable[Range]) -> tuple[Range, ...]:
        """Intersect global row ``ranges`` with what ``rank`` holds; return local ranges."""
        out: list[Range] = []
        local = 0
        ranges = tuple(ranges)
        for seg_a, seg_b in self.segments(module, rank):
            for a, b in ranges:
                lo, hi = max(a, seg_a), min(b, seg_b)
                if lo < hi:
                    out.append((local + lo - seg_a, local + hi - seg_a))
            local += seg_b - seg_a
        return merge_ranges(out)

    def global_rows(self, heads: Iterable[tuple[int, int]], kv: KVPolicy = "group") -> list[ModuleRows]:
        """Per (layer, module) the global rows trained for ``heads`` in this layout."""
        return trainable_rows(self.view, heads, kv)  # type: ignore[arg-type]  # duck-typed spec


@dataclass(frozen=True)
class StagePlace:
    """Where a global layer lives in the pipeline."""

    pp_rank: int
    vpp_rank: int
    local_layer: int  # index within the model chunk (Megatron) or stage (DeepSpeed)


@dataclass(frozen=True)
class PipelineSplit:
    """Global layer -> (pipeline stage, virtual stage, local layer)."""

    places: tuple[StagePlace, ...]
    pp: int
    vpp: int = 1

    @classmethod
    def even(cls, num_layers: int, pp: int = 1, vpp: int = 1) -> PipelineSplit:
        """Megatron's default split: L / (P * V) layers per model chunk."""
        return cls.megatron(num_layers, pp, vpp)

    @classmethod
    def megatron(
        cls, num_layers: int, pp: int = 1, vpp: int = 1, *, first: int | None = None, last: int | None = None
    ) -> PipelineSplit:
        """Megatron-core's split (``get_transformer_layer_offset``): stage sizes from
        ``first``/``last`` (``num_layers_in_first/last_pipeline_stage``) with the rest even
        over the other stages; each stage's layers cut into ``vpp`` equal chunks, chunk v of
        every stage in stage order forming the v-th pass over the layers (interleaving)."""
        for name, v in (("--pp", pp), ("--vpp", vpp)):
            if not isinstance(v, int) or v < 1:
                raise AlpsError(f"{name} {v!r} must be a positive integer")
        fixed = {0: first, pp - 1: last} if pp > 1 else {}
        fixed = {p: c for p, c in fixed.items() if c is not None}
        if any(c < 0 for c in fixed.values()):
            raise AlpsError("first/last pipeline stage layer counts must be >= 0")
        middle = [p for p in range(pp) if p not in fixed]
        rest = num_layers - sum(fixed.values())
        if rest < 0 or (middle and rest % len(middle)) or (not middle and rest):
            raise AlpsError(
                f"{num_layers} layers do not split over {pp} pipeline stages"
                + (f" with first/last stages of {first}/{last} layers" if fixed else "")
                + "; pick sizes so the remaining layers divide evenly"
            )
        counts = [fixed.get(p, rest // len(middle) if middle else 0) for p in range(pp)]
        if any(c % vpp for c in counts):
            raise AlpsError(
                f"stage layer counts {counts} do not split into --vpp {vpp} virtual stages; "
                "each stage needs a multiple of vpp layers"
            )
        places: list[StagePlace] = []
        for v in range(vpp):
            for p in range(pp):
                places += [StagePlace(p, v, i) for i in range(counts[p] // vpp)]
        return cls(tuple(places), pp, vpp)

    @classmethod
    def from_boundaries(cls, parts: Sequence[int], num_layers: int, first_layer: int = 0) -> PipelineSplit:
        """From DeepSpeed ``PipelineModule.parts`` (stage p owns layer specs
        ``[parts[p], parts[p+1])``), read at run time; transformer layer i is layer spec
        ``first_layer + i`` (the embedding usually comes first)."""
        parts = list(parts)
        if len(parts) < 2 or parts != sorted(parts):
            raise AlpsError(f"pipeline boundaries {parts} must be a non-decreasing list of at least 2 indices")
        places = []
        for i in range(num_layers):
            idx = first_layer + i
            stage = next((p for p in range(len(parts) - 1) if parts[p] <= idx < parts[p + 1]), None)
            if stage is None:
                raise AlpsError(f"layer {i} (spec index {idx}) is outside the pipeline boundaries {parts}")
            places.append(StagePlace(stage, 0, idx - max(parts[stage], first_layer)))
        return cls(tuple(places), len(parts) - 1)

    @property
    def num_layers(self) -> int:
        return len(self.places)

    def place(self, layer: int) -> StagePlace:
        return self.places[layer]


@dataclass(frozen=True)
class RankRows:
    """Local trainable rows of one module on one (pp, tp) rank."""

    pp_rank: int
    vpp_rank: int
    tp_rank: int
    layer: int  # global
    local_layer: int
    module: str
    rows: tuple[Range, ...]  # local to this rank's shard, half-open, merged

    @property
    def num_rows(self) -> int:
        return sum(b - a for a, b in self.rows)

    def indices(self) -> list[int]:
        return [i for a, b in self.rows for i in range(a, b)]

    def to_dict(self) -> dict:
        return {
            "pp_rank": self.pp_rank,
            "tp_rank": self.tp_rank,
            "layer": self.layer,
            "module": self.module,
            "rows": [list(r) for r in self.rows],
            "vpp_rank": self.vpp_rank,
            "local_layer": self.local_layer,
        }


@dataclass(frozen=True)
class ParallelPlan:
    """The whole mapping of one selection on one (TP, PP) grid."""

    tensor: TensorParallel
    pipeline: PipelineSplit
    entries: tuple[RankRows, ...]

    @property
    def spec(self) -> AttentionSpec:
        return self.tensor.spec

    def for_rank(self, pp_rank: int, tp_rank: int) -> list[RankRows]:
        return [e for e in self.entries if e.pp_rank == pp_rank and e.tp_rank == tp_rank]

    def elements(self, entry: RankRows) -> int:
        """Trainable elements of one entry: rows x hidden size (+ bias rows)."""
        return entry.num_rows * (self.spec.hidden_size + (1 if self.spec.qkv_bias else 0))

    def rank_elements(self) -> dict[tuple[int, int], int]:
        """(pp_rank, tp_rank) -> trainable elements, every rank of the grid present."""
        out = {(p, t): 0 for p in range(self.pipeline.pp) for t in range(self.tensor.tp)}
        for e in self.entries:
            out[(e.pp_rank, e.tp_rank)] += self.elements(e)
        return out

    def imbalance(self) -> float | None:
        """max / mean trainable elements over all ranks; None when nothing trains."""
        values = list(self.rank_elements().values())
        mean = sum(values) / len(values)
        return None if mean == 0 else max(values) / mean


def plan(
    spec: AttentionSpec,
    heads: Iterable[tuple[int, int]],
    *,
    tp: int = 1,
    layout: TPLayout | None = None,
    pipeline: PipelineSplit | None = None,
    kv: KVPolicy = "group",
) -> ParallelPlan:
    """Map selected heads to per-(pp, tp)-rank local rows. ``layout`` defaults to the
    model's native HF layout, ``pipeline`` to a single stage."""
    tensor = TensorParallel(spec, layout or native_layout(spec), tp)
    pipeline = pipeline or PipelineSplit.even(spec.num_layers)
    if pipeline.num_layers != spec.num_layers:
        raise AlpsError(f"pipeline split covers {pipeline.num_layers} layers but the model has {spec.num_layers}")
    entries = []
    for mr in tensor.global_rows(heads, kv):
        place = pipeline.place(mr.layer)
        for t in range(tp):
            local = tensor.localize(mr.module, t, mr.ranges)
            if local:
                entries.append(
                    RankRows(place.pp_rank, place.vpp_rank, t, mr.layer, place.local_layer, mr.module, local)
                )
    entries.sort(key=lambda e: (e.pp_rank, e.tp_rank, e.layer, tensor.modules.index(e.module)))
    return ParallelPlan(tensor, pipeline, tuple(entries))


def local_rows(
    spec: AttentionSpec,
    heads: Iterable[tuple[int, int]],
    *,
    layout: TPLayout,
    tp: int,
    tp_rank: int,
    kv: KVPolicy = "group",
) -> dict[tuple[int, str], tuple[Range, ...]]:
    """(global layer, module) -> local row ranges on TP rank ``tp_rank``: what an engine
    hook needs on one rank (pipeline placement does not change the rows)."""
    p = plan(spec, heads, tp=tp, layout=layout, kv=kv)
    return {(e.layer, e.module): e.rows for e in p.entries if e.tp_rank == tp_rank}


def head_owners(tensor: TensorParallel, pipeline: PipelineSplit, layer: int, head: int) -> list[tuple[int, int]]:
    """(pp_rank, tp_rank) of every rank holding a query row of ``head`` in ``layer``."""
    b = tensor.view.rows("q", head)
    p = pipeline.place(layer).pp_rank
    return [(p, t) for t in range(tensor.tp) if tensor.localize(b.module, t, [(b.start, b.stop)])]


@dataclass(frozen=True)
class Rebalanced:
    heads: tuple[tuple[int, int], ...]
    cap: int
    score_before: float
    score_after: float

    @property
    def score_given_up(self) -> float:
        return self.score_before - self.score_after


def _owners(tensor: TensorParallel, pipeline: PipelineSplit) -> dict[tuple[int, int], list[tuple[int, int]]]:
    L, n = tensor.spec.num_layers, tensor.spec.num_heads
    return {(layer, h): head_owners(tensor, pipeline, layer, h) for layer in range(L) for h in range(n)}


def balanced_cap(num_heads: int, tensor: TensorParallel, pipeline: PipelineSplit) -> int:
    """The smallest per-rank head cap c with sum over ranks of min(c, heads the rank holds) >= K
    (ranks can hold different numbers of heads: AutoTP's uneven split, uneven pipeline stages)."""
    capacity: dict[tuple[int, int], int] = {}
    for owners in _owners(tensor, pipeline).values():
        for o in owners:
            capacity[o] = capacity.get(o, 0) + 1
    cap = 1
    while sum(min(cap, c) for c in capacity.values()) < num_heads:
        cap += 1
    return cap


def rebalance(
    scores: Sequence[Sequence[float]],
    heads: Iterable[tuple[int, int]],
    tensor: TensorParallel,
    pipeline: PipelineSplit,
    cap: int | None = None,
) -> Rebalanced:
    """Same number of heads, best total score, at most ``cap`` query heads per (pp, tp) rank.

    Greedy by score (ties by (layer, head)); a head counts on every rank holding one of its
    query rows. With one owner per head (every layout except a megatron head straddling two
    ranks) the constraint is a partition matroid, so greedy is optimal. Without ``cap`` the
    smallest cap that fits is used (raised further if straddling heads need it).
    """
    heads = sorted(set(heads))
    L, n = tensor.spec.num_layers, tensor.spec.num_heads
    if len(scores) != L or any(len(r) != n for r in scores):
        raise AlpsError(f"scores must be a {L} x {n} matrix (layers x heads)")
    if cap is not None and cap < 1:
        raise AlpsError(f"--rebalance cap {cap} must be >= 1")
    owners = _owners(tensor, pipeline)
    order = sorted(owners, key=lambda x: (-scores[x[0]][x[1]], x))

    def greedy(c: int) -> list[tuple[int, int]]:
        used: dict[tuple[int, int], int] = {}
        chosen: list[tuple[int, int]] = []
        for head in order:
            if len(chosen) == len(heads):
                break
            if all(used.get(o, 0) < c for o in owners[head]):
                chosen.append(head)
                for o in owners[head]:
                    used[o] = used.get(o, 0) + 1
        return chosen

    c = cap if cap is not None else balanced_cap(len(heads), tensor, pipeline)
    chosen = greedy(c)
    while cap is None and len(chosen) < len(heads):
        c += 1
        chosen = greedy(c)
    if len(chosen) < len(heads):
        raise AlpsError(
            f"--rebalance cap {cap} fits only {len(chosen)} of {len(heads)} heads on this TP/PP grid; raise the cap"
        )
    before = sum(scores[layer][h] for layer, h in heads)
    after = sum(scores[layer][h] for layer, h in chosen)
    return Rebalanced(tuple(sorted(chosen)), c, before, after)
