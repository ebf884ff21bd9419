"""The run's head selection: a given heads.json, a baseline (random, layer-consistent, all, none) or top-k."""

from __future__ import annotations

from pathlib import Path

from alps_ds.train.config import RunConfig
from alps_ds.train.distributed import on_rank0


def resolve_selection(cfg: RunConfig, spec, model_dir: Path, out: Path, rank: int, resume: bool):
    """The run's HeadSelection (a resumed run reuses OUT/heads.json; the loop saves it once training can start)."""
    from alps_ds.choose import choose, count_for_ratio
    from alps_ds.selection import HeadSelection, Provenance

    saved = out / "heads.json"
    sel_cfg = cfg.selection
    if resume and saved.exists():
        return HeadSelection.load(saved, spec=spec)
    if not sel_cfg.heads and sel_cfg.method not in ("all", "none"):  # before localizing: never 0 heads
        name = f"{cfg.where('selection.ratio')}: selection.ratio"
        count_for_ratio(sel_cfg.ratio, spec.num_layers, spec.num_heads, name=name)
    if sel_cfg.heads:
        selection = HeadSelection.load(sel_cfg.heads, spec=spec)
    elif sel_cfg.method == "top-k":
        selection = on_rank0(lambda: localize_selection(cfg, model_dir, spec), rank)
    else:
        heads = choose(
            sel_cfg.method,
            num_layers=spec.num_layers,
            num_heads=spec.num_heads,
            ratio=sel_cfg.ratio,
            seed=sel_cfg.seed,
        )
        ratio = None if sel_cfg.method in ("all", "none") else sel_cfg.ratio
        provenance = Provenance(select=sel_cfg.method, ratio=ratio, seed=sel_cfg.seed, base=cfg.model.path)
        selection = HeadSelection(spec.fingerprint, tuple(heads), provenance)
    return selection


def localize_selection(cfg: RunConfig, model_dir: Path, spec):
    """Top-k heads of base (the model) vs task by alps_ds.localize (rank 0 only)."""
    from alps_ds.choose import choose
    from alps_ds.localize import localize_scores
    from alps_ds.localize.score import HEAD_REPRS, METRICS
    from alps_ds.selection import HeadSelection, Provenance

    s = cfg.selection
    metric, head_repr = s.metric or METRICS[0], s.head_repr or HEAD_REPRS[0]  # unset: localize's defaults
    result = localize_scores(str(model_dir), s.task, metric=metric, head_repr=head_repr, progress=cfg.logging.progress)
    heads = choose("top-k", num_layers=spec.num_layers, num_heads=spec.num_heads, ratio=s.ratio, scores=result.scores)
    provenance = Provenance(
        select="top-k", metric=metric, head_repr=head_repr, ratio=s.ratio, base=cfg.model.path, task=s.task
    )
    scores = tuple(tuple(float(x) for x in row) for row in result.scores)
    return HeadSelection(spec.fingerprint, tuple(heads), provenance, scores)
