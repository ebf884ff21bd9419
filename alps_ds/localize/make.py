"""One way to make a head selection: localize a base/task pair, choose heads, record provenance.

``alps-ds localize``, ``alps-ds train``'s top-k path and the demo call :func:`make_selection`, so a
heads.json records the same provenance whichever of them made it. :func:`choose_selection` is the
choose + provenance step alone (train's baselines, which read no task model, use it directly).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alps_ds import __version__
from alps_ds.arch import ModelFingerprint
from alps_ds.choose import METHODS, RATIO_METHODS, SEEDED_METHODS, Head, check_ratio, choose
from alps_ds.errors import AlpsError, check_choice
from alps_ds.localize.run import LocalizeResult, localize_scores
from alps_ds.localize.vocab import DEFAULT_DTYPE, DEFAULT_HEAD_REPR, DEFAULT_METRIC, HEAD_REPRS, METRICS, SCORE_DTYPES
from alps_ds.selection import HeadSelection, Provenance

EXPLICIT = "explicit"  # provenance.select of a selection given head by head


@dataclass(frozen=True)
class Localized:
    """A selection made from scores, and the localization behind it (spec, scores, time, bytes read, device)."""

    selection: HeadSelection
    result: LocalizeResult


def choose_selection(
    model: ModelFingerprint,
    method: str,
    *,
    ratio: float = 0.1,
    seed: int = 0,
    heads: Sequence[Head] | None = None,
    scores: np.ndarray | None = None,
    metric: str | None = None,
    head_repr: str | None = None,
    dtype: str | None = None,
    base: str | None = None,
    task: str | None = None,
) -> HeadSelection:
    """Heads chosen by ``method`` (or the given ``heads`` with method ``explicit``) with their provenance.

    Provenance records ratio only for ratio methods, seed only for seeded ones, and metric, head_repr
    and dtype only when ``scores`` were computed (they describe the scores).
    """
    check_choice("method", method, (*METHODS, EXPLICIT))
    if (method == EXPLICIT) != (heads is not None):
        raise AlpsError("heads: pass heads exactly when method is 'explicit'")
    if heads is not None:
        chosen = list(heads)
    else:
        L, n = model.num_layers, model.num_heads
        chosen = choose(method, num_layers=L, num_heads=n, ratio=ratio, seed=seed, scores=scores)
    scored = scores is not None
    provenance = Provenance(
        select=method,
        metric=metric if scored else None,
        head_repr=head_repr if scored else None,
        ratio=ratio if method in RATIO_METHODS else None,
        seed=seed if method in SEEDED_METHODS else None,
        dtype=dtype if scored else None,
        base=base,
        task=task,
        alps_ds_version=__version__,
    )
    table = None if scores is None else tuple(tuple(float(x) for x in row) for row in scores)
    return HeadSelection(model, tuple(chosen), provenance, table)


def make_selection(
    base: str | os.PathLike,
    task: str | os.PathLike,
    *,
    method: str = "top-k",
    ratio: float = 0.1,
    seed: int = 0,
    heads: Sequence[Head] | None = None,
    metric: str = DEFAULT_METRIC,
    head_repr: str = DEFAULT_HEAD_REPR,
    dtype: str = DEFAULT_DTYPE,
    device: str = "auto",
    progress: bool = True,
    allow_pickle: bool = False,
    base_label: str | None = None,
    task_label: str | None = None,
) -> Localized:
    """Score every head of ``task`` against ``base`` and choose heads: the whole of ALPS stage 1.

    Arguments are checked before any weight is read. ``base_label``/``task_label`` go into provenance
    instead of the paths read (e.g. the hub id or ``tiny:llama`` a folder was made from).
    """
    check_choice("method", method, (*METHODS, EXPLICIT))
    if method in RATIO_METHODS:
        check_ratio(ratio)
    check_choice("metric", metric, METRICS)
    check_choice("head_repr", head_repr, HEAD_REPRS)
    check_choice("dtype", dtype, SCORE_DTYPES)
    result = localize_scores(
        str(base),
        str(task),
        head_repr=head_repr,
        metric=metric,
        dtype=dtype,
        device=device,
        progress=progress,
        allow_pickle=allow_pickle,
    )
    selection = choose_selection(
        result.spec.fingerprint,
        method,
        ratio=ratio,
        seed=seed,
        heads=heads,
        scores=result.scores,
        metric=metric,
        head_repr=head_repr,
        dtype=dtype,
        base=base_label or str(base),
        task=task_label or str(task),
    )
    return Localized(selection, result)


def scores_csv(scores: np.ndarray) -> str:
    """``layer,head,score`` rows of every head, scores written exactly (repr of the float)."""
    buf = io.StringIO()
    buf.write("layer,head,score\n")
    for layer, row in enumerate(scores):
        for h, s in enumerate(row):
            buf.write(f"{layer},{h},{float(s)!r}\n")
    return buf.getvalue()


def write_outputs(made: Localized, out: str | os.PathLike, *, source: str = "out") -> Path:
    """Write OUT/heads.json, OUT/scores.csv and OUT/heatmap.png; errors name ``source`` (e.g. ``--out``).

    Everything is rendered in memory first and the three files replace the old ones in one swap (with
    localize's marker): a failure or an interrupt leaves the old ones. Other files in ``out`` are left alone.
    """
    from alps_ds.fsutil import atomic_files
    from alps_ds.heatmap import Panel, render_heatmap

    out = Path(out)
    sel, scores, p = made.selection, made.result.scores, made.selection.provenance
    L, n = scores.shape
    title = f"{Path(str(p.task)).name} vs {Path(str(p.base)).name}: {p.metric}, {p.head_repr}"
    files = {
        "heads.json": sel.to_json(),
        "scores.csv": scores_csv(scores),
        "heatmap.png": render_heatmap([Panel(title, L, n, scores, sel.heads)]),
    }
    try:
        with atomic_files(out, command="localize") as put:
            for name, content in files.items():
                put(name, content)
    except OSError as e:  # read-only, full disk
        raise AlpsError(f"{source} {out}: cannot write ({e.strerror or e}); pick a writable folder") from e
    return out
