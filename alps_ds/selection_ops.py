"""Operations on head selections: union, intersection, vote, re-cut (resize) and comparison.

A selection is a reusable artifact (heads found for one dataset transfer to other datasets of
the same task), so users keep libraries of them and need to combine and compare them. Every
operation here is pure: it returns a new :class:`HeadSelection` whose provenance records how
it was made, and it refuses selections made for different models.

Definitions (see docs/selections.md):

- ``union`` / ``intersect``: set algebra on the selected ``(layer, head)`` pairs.
- ``vote``: a head's votes are the number of inputs that selected it. Without a ratio the
  result keeps the heads selected by a strict majority of the inputs (votes > N / 2). With a
  ratio it keeps exactly K = ceil(r * L * n) heads ranked by votes, then by mean normalized
  score, then by ``(layer, head)``. Normalized score: each input's score matrix min-max scaled
  to [0, 1] over all L * n heads (a constant matrix scales to 0); the mean is over the inputs
  that carry scores (0 when none do).
- ``resize``: the top-K heads of the stored scores with K = ceil(r * L * n), cut with
  :func:`alps_ds.choose.top_k` exactly as ``alps-ds localize`` cuts, so it equals a fresh
  localize at that ratio.
- A combined selection keeps the score matrix only when every input carries the identical
  matrix (e.g. re-cuts of one localization); otherwise the scores measure different things
  and the result carries none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from alps_ds import __version__
from alps_ds.choose import count_for_ratio, top_k
from alps_ds.errors import AlpsError
from alps_ds.selection import Head, HeadSelection, Provenance

OPS = ("union", "intersect", "vote")
# Provenance fields a combined selection inherits when all inputs agree on them.
_SHARED_FIELDS = ("metric", "head_repr", "dtype", "base", "task")


def _names(selections: Sequence[HeadSelection], sources: Sequence[str] | None) -> list[str]:
    if sources is None:
        return [f"selection {i + 1}" for i in range(len(selections))]
    if len(sources) != len(selections):
        raise ValueError(f"{len(sources)} sources for {len(selections)} selections")
    return [str(s) for s in sources]


def check_same_model(selections: Sequence[HeadSelection], sources: Sequence[str] | None = None) -> list[str]:
    """Fail with one line naming both files and the differing fields unless all share one model.

    Returns the display names of the inputs (``sources`` or ``selection 1``, ``selection 2``...).
    """
    if not selections:
        raise AlpsError("no selections given; pass at least one heads.json")
    names = _names(selections, sources)
    first = selections[0]
    for sel, name in zip(selections[1:], names[1:]):
        diff = first.model.diff(sel.model)
        if diff:
            raise AlpsError(
                f"{names[0]} and {name} were made for different models ({'; '.join(diff)}); "
                "only selections of the same model can be combined or compared"
            )
    return names


def _shared_scores(selections: Sequence[HeadSelection]) -> tuple[tuple[float, ...], ...] | None:
    first = selections[0].scores
    return first if first is not None and all(s.scores == first for s in selections[1:]) else None


def _combined_provenance(
    op: str, selections: Sequence[HeadSelection], sources: Sequence[str] | None, ratio: float | None
) -> Provenance:
    shared = {}
    for key in _SHARED_FIELDS:
        values = {getattr(s.provenance, key) for s in selections}
        shared[key] = values.pop() if len(values) == 1 else None
    return Provenance(
        select=op,
        ratio=ratio,
        inputs=None if sources is None else tuple(str(s) for s in sources),
        alps_ds_version=__version__,
        **shared,
    )


def _combined(
    op: str,
    selections: Sequence[HeadSelection],
    heads: list[Head] | set[Head],
    sources: Sequence[str] | None,
    ratio: float | None = None,
) -> HeadSelection:
    return HeadSelection(
        model=selections[0].model,
        heads=tuple(heads),
        provenance=_combined_provenance(op, selections, sources, ratio),
        scores=_shared_scores(selections),
    )


def union(selections: Sequence[HeadSelection], *, sources: Sequence[str] | None = None) -> HeadSelection:
    """Heads selected by any input."""
    check_same_model(selections, sources)
    return _combined("union", selections, set().union(*(s.heads for s in selections)), sources)


def intersect(selections: Sequence[HeadSelection], *, sources: Sequence[str] | None = None) -> HeadSelection:
    """Heads selected by every input."""
    check_same_model(selections, sources)
    common = set(selections[0].heads).intersection(*(s.heads for s in selections[1:]))
    return _combined("intersect", selections, common, sources)


def normalized_scores(selection: HeadSelection) -> np.ndarray | None:
    """The score matrix min-max scaled to [0, 1] over all heads; zeros when constant; None without scores."""
    if selection.scores is None:
        return None
    s = np.asarray(selection.scores, dtype=np.float64)
    span = s.max() - s.min()
    return (s - s.min()) / span if span > 0 else np.zeros_like(s)


def votes(selections: Sequence[HeadSelection]) -> np.ndarray:
    """``layers x heads`` matrix: how many inputs selected each head."""
    L, n = selections[0].model.num_layers, selections[0].model.num_heads
    counts = np.zeros((L, n), dtype=np.int64)
    for sel in selections:
        for layer, h in sel.heads:
            counts[layer, h] += 1
    return counts


def mean_normalized_score(selections: Sequence[HeadSelection]) -> np.ndarray:
    """Per-head mean of :func:`normalized_scores` over the inputs that carry scores (zeros if none).

    The per-head values are sorted before summing so the floating-point result, and hence
    every tie-break, does not depend on the order of the inputs.
    """
    L, n = selections[0].model.num_layers, selections[0].model.num_heads
    scored = [m for m in map(normalized_scores, selections) if m is not None]
    if not scored:
        return np.zeros((L, n), dtype=np.float64)
    return np.sort(np.stack(scored), axis=0).sum(axis=0) / len(scored)


def vote(
    selections: Sequence[HeadSelection], *, ratio: float | None = None, sources: Sequence[str] | None = None
) -> HeadSelection:
    """Heads most inputs agree on: a strict majority without ``ratio``; with it, the top K by
    (votes, mean normalized score), ties by ``(layer, head)``."""
    check_same_model(selections, sources)
    counts = votes(selections)
    if ratio is None:
        heads = [(int(layer), int(h)) for layer, h in zip(*np.nonzero(2 * counts > len(selections)))]
    else:
        L, n = counts.shape
        k = count_for_ratio(ratio, L, n)
        mean = mean_normalized_score(selections).reshape(-1)
        # lexsort sorts by the last key first: most votes, then highest mean score, then flat index.
        order = np.lexsort((np.arange(L * n), -mean, -counts.reshape(-1)))[:k]
        heads = [(int(i) // n, int(i) % n) for i in order]
    return _combined("vote", selections, heads, sources, ratio)


def resize(selection: HeadSelection, ratio: float, *, source: str | None = None) -> HeadSelection:
    """Re-cut a scored selection to ``ratio``: the top-K heads of its scores, as localize cuts them."""
    name = source or "selection"
    if selection.scores is None:
        raise AlpsError(
            f"{name}: carries no scores, so it cannot be re-cut; run 'alps-ds localize --ratio {ratio}' again "
            "(combined selections keep scores only when all inputs share them)"
        )
    if selection.provenance.select in ("random", "layer-consistent"):
        raise AlpsError(
            f"{name}: is a {selection.provenance.select} selection; re-cutting it by score would silently turn it "
            f"into top-k; run 'alps-ds localize --select {selection.provenance.select} --ratio {ratio}' instead"
        )
    model = selection.model
    heads = top_k(selection.scores, count_for_ratio(ratio, model.num_layers, model.num_heads))
    provenance = replace(
        selection.provenance,
        select="resize",
        ratio=ratio,
        seed=None,
        inputs=None if source is None else (str(source),),
        alps_ds_version=__version__,
    )
    return selection.with_heads(heads, provenance)


# ---- comparison ----------------------------------------------------------------------------
def average_ranks(values: np.ndarray | Sequence[float]) -> np.ndarray:
    """1-based ranks of a flattened array; tied values share the mean of their ranks."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts_group = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.r_[starts[1:], len(x)]  # exclusive
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = ((starts + ends - 1) / 2.0 + 1.0)[group]
    return ranks


def spearman(a: np.ndarray | Sequence[float], b: np.ndarray | Sequence[float]) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN when either side is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    if ra.shape != rb.shape:
        raise ValueError("spearman needs two arrays of one size")
    ra -= ra.mean()
    rb -= rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def overlap(a: HeadSelection, b: HeadSelection) -> int:
    """Number of heads selected by both."""
    return len(set(a.heads) & set(b.heads))


def jaccard(a: HeadSelection, b: HeadSelection) -> float:
    """|A & B| / |A | B|; 1.0 when both are empty (equal sets)."""
    sa, sb = set(a.heads), set(b.heads)
    both = sa | sb
    return len(sa & sb) / len(both) if both else 1.0


@dataclass(frozen=True)
class LayerOverlap:
    """Selected heads of one layer in selection a, in b, and in both."""

    layer: int
    in_a: int
    in_b: int
    in_both: int


@dataclass(frozen=True)
class Comparison:
    """How two selections of one model relate."""

    a: str
    b: str
    size_a: int
    size_b: int
    overlap: int  # heads in both
    union: int  # heads in either
    jaccard: float
    spearman: float | None  # rank correlation of all L*n scores; None unless both carry scores
    per_layer: tuple[LayerOverlap, ...]

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("a", "b", "size_a", "size_b", "overlap", "union", "jaccard")}
        d["spearman"] = None if self.spearman is None or np.isnan(self.spearman) else self.spearman
        d["per_layer"] = [vars(p) for p in self.per_layer]
        return d


def compare(a: HeadSelection, b: HeadSelection, *, sources: Sequence[str] | None = None) -> Comparison:
    """Overlap, Jaccard, per-layer overlap and (with scores on both) Spearman of two selections."""
    name_a, name_b = check_same_model([a, b], sources)
    sa, sb = set(a.heads), set(b.heads)
    per_layer = tuple(
        LayerOverlap(
            layer,
            sum(1 for la, _ in sa if la == layer),
            sum(1 for lb, _ in sb if lb == layer),
            sum(1 for lx, _ in sa & sb if lx == layer),
        )
        for layer in range(a.model.num_layers)
    )
    rho = None if a.scores is None or b.scores is None else spearman(a.scores, b.scores)
    return Comparison(
        a=name_a,
        b=name_b,
        size_a=len(sa),
        size_b=len(sb),
        overlap=overlap(a, b),
        union=len(sa | sb),
        jaccard=jaccard(a, b),
        spearman=rho,
        per_layer=per_layer,
    )
