"""Tensor- and pipeline-parallel head mapping: which rank trains which local rows.

A head selection names global ``(layer, query head)`` pairs. On a sharded job every rank
holds a slice of each Q/K/V weight (tensor parallel, TP) of some layers (pipeline parallel,
PP), so the engine hook needs the *local* row indices of each rank. This module is pure
math on :class:`~alps_ds.arch.AttentionSpec`; the hooks in :mod:`alps_ds.parallel.autotp`
and :mod:`alps_ds.parallel.megatron` and ``alps-ds layout`` all use it.

Weight layouts (rows of the unsharded ``[out, in]`` weight, ``m = n / g`` query heads per
kv group). Every row fact below is computed in :mod:`alps_ds.arch` (``AttentionSpec.rows``,
``tp_segments``, ``tp_check``); this module only intersects and places them:

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
from dataclasses import dataclass

from alps_ds.arch import TP_LAYOUTS, AttentionSpec, Range, TPLayout
from alps_ds.errors import AlpsError
from alps_ds.layout import KVPolicy, ModuleRows, merge_ranges, trainable_rows


@dataclass(frozen=True)
class TensorParallel:
    """How one layout's Q/K/V weights are split over ``tp`` ranks (row facts from :mod:`alps_ds.arch`)."""

    spec: AttentionSpec
    layout: TPLayout
    tp: int

    def __post_init__(self) -> None:
        self.spec.tp_check(self.layout, self.tp)

    @property
    def view(self) -> AttentionSpec:
        """The model's geometry in this layout's row layout (module names and rows)."""
        return self.spec.in_layout(TP_LAYOUTS[self.layout])

    @property
    def modules(self) -> tuple[str, ...]:
        return self.view.modules

    def module_rows(self, module: str) -> int:
        """Output rows of the unsharded ``module``."""
        return self.view.module_rows(module)

    def shard_sizes(self, module: str) -> list[int]:
        """Local rows of ``module`` on each TP rank."""
        return [sum(b - a for a, b in self.segments(module, t)) for t in range(self.tp)]

    def segments(self, module: str, rank: int) -> tuple[Range, ...]:
        """Global rows of ``module`` held by TP rank ``rank``, in local order."""
        if module not in self.modules:
            raise AlpsError(f"module {module!r} is not part of layout {self.layout} ({', '.join(self.modules)})")
        if not 0 <= rank < self.tp:
            raise AlpsError(f"tp rank {rank} outside [0, {self.tp})")
        return self.spec.tp_segments(self.layout, module, self.tp, rank)

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

    def globalize(self, module: str, rank: int, local: Iterable[Range]) -> tuple[Range, ...]:
        """The inverse of :meth:`localize`: ``rank``'s local row ``local`` ranges -> global rows."""
        out: list[Range] = []
        offset = 0
        local = tuple(local)
        for seg_a, seg_b in self.segments(module, rank):
            for a, b in local:
                lo, hi = max(a, offset), min(b, offset + seg_b - seg_a)
                if lo < hi:
                    out.append((seg_a + lo - offset, seg_a + hi - offset))
            offset += seg_b - seg_a
        return merge_ranges(out)

    def global_rows(self, heads: Iterable[tuple[int, int]], kv: KVPolicy = "group") -> list[ModuleRows]:
        """Per (layer, module) the global rows trained for ``heads`` in this layout."""
        return trainable_rows(self.view, heads, kv)


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
        for name, v in (("pp", pp), ("vpp", vpp)):
            if not isinstance(v, int) or v < 1:
                raise AlpsError(f"{name} {v!r} must be a positive integer")
        fixed = {0: first, pp - 1: last} if pp > 1 else {}
        fixed = {p: c for p, c in fixed.items() if c is not None}
        if any(c < 0 for c in fixed.values()):
            raise AlpsError(f"first {first} / last {last}: pipeline stage layer counts must be >= 0")
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
                f"stage layer counts {counts} do not split into vpp {vpp} virtual stages; "
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
    tensor = TensorParallel(spec, layout or spec.native_tp_layout, tp)
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
        raise AlpsError(f"rebalance: cap {cap} must be >= 1 (or None: the smallest that fits)")
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
            f"rebalance: cap {cap} fits only {len(chosen)} of {len(heads)} heads on this TP/PP grid; raise the cap"
        )
    before = sum(scores[layer][h] for layer, h in heads)
    after = sum(scores[layer][h] for layer, h in chosen)
    return Rebalanced(tuple(sorted(chosen)), c, before, after)
