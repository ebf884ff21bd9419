"""The run's head selection: a given heads.json, a baseline (random, layer-consistent, all, none) or top-k.

Top-k and the baselines are made by :mod:`alps_ds.localize.make`, the functions ``alps-ds localize``
uses, so OUT/heads.json records the same provenance as a heads.json written by that command.
"""

from __future__ import annotations

from pathlib import Path

from alps_ds.train.config import RunConfig
from alps_ds.train.distributed import on_rank0


def resolve_selection(cfg: RunConfig, spec, model_dir: Path, out: Path, rank: int, resume: bool):
    """The run's HeadSelection (a resumed run reuses OUT/heads.json; the loop saves it once training can start)."""
    from alps_ds.choose import count_for_ratio
    from alps_ds.localize.make import choose_selection
    from alps_ds.selection import HeadSelection

    saved = out / "heads.json"
    s = cfg.selection
    if resume and saved.exists():
        return HeadSelection.load(saved, spec=spec)
    if not s.heads and s.method not in ("all", "none"):  # before localizing: never 0 heads
        where = f"{cfg.where('selection.ratio')}: selection.ratio"
        count_for_ratio(s.ratio, spec.num_layers, spec.num_heads, name=where)
    if s.heads:
        selection = HeadSelection.load(s.heads, spec=spec)
    elif s.method == "top-k":
        selection = on_rank0(lambda: localize_selection(cfg, model_dir), rank)
    else:
        selection = choose_selection(spec.fingerprint, s.method, ratio=s.ratio, seed=s.seed, base=cfg.model.path)
    return selection


def localize_selection(cfg: RunConfig, model_dir: Path):
    """Top-k heads of base (the model, read from ``model_dir``) vs task, as ``alps-ds localize`` makes them
    (rank 0 only)."""
    from alps_ds.localize.make import make_selection

    s = cfg.selection
    made = make_selection(
        model_dir,
        s.task,
        method="top-k",
        ratio=s.ratio,
        metric=s.metric,
        head_repr=s.head_repr,
        dtype=s.dtype,
        progress=cfg.logging.progress,
        base_label=cfg.model.path,
    )
    return made.selection
