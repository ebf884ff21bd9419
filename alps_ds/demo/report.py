"""The demo's one table (mean ± std over seeds) and an honest verdict line, from ``results.json``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alps_ds.demo.config import ARMS

LABELS = {
    "alps": "ALPS {pct}",
    "random": "random {pct}",
    "layer-consistent": "layer-consistent {pct}",
    "all": "all heads",
    "none": "no heads (Q/K/V frozen)",
}


@dataclass(frozen=True)
class ArmStats:
    arm: str
    label: str
    heads: int
    trainable: int
    optimizer_bytes: int  # per rank (max over ranks), one seed: the same every seed
    loss: tuple[float, float]  # mean, std over seeds
    accuracy: tuple[float, float]
    seeds: int


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarize(results: dict) -> list[ArmStats]:
    ratio = results["config"]["ratio"]
    pct = f"{100 * ratio:g} %"
    out = []
    for arm in ARMS:
        rows = [r for r in results["arms"] if r.get("arm") == arm]
        if not rows:
            continue
        out.append(
            ArmStats(
                arm=arm,
                label=LABELS[arm].format(pct=pct),
                heads=len(rows[0]["heads"]),
                trainable=max(r["trainable_elements"] for r in rows),
                optimizer_bytes=max((max(r["optimizer_bytes_per_rank"], default=0) for r in rows), default=0),
                loss=_mean_std([r["eval"]["loss"] for r in rows]),
                accuracy=_mean_std([r["eval"]["accuracy"] for r in rows]),
                seeds=len(rows),
            )
        )
    return out


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}"
    raise AssertionError("unreachable")


def _pm(value: tuple[float, float], seeds: int, fmt: str) -> str:
    return f"{value[0]:{fmt}} ± {value[1]:{fmt}}" if seeds > 1 else f"{value[0]:{fmt}}"


def render_table(stats: list[ArmStats]) -> str:
    header = ("arm", "heads", "trainable Q/K/V", "optimizer/rank", "held-out loss", "accuracy")
    rows = [
        (
            s.label,
            str(s.heads),
            f"{s.trainable:,}",
            _bytes(s.optimizer_bytes),
            _pm(s.loss, s.seeds, ".4f"),
            _pm(s.accuracy, s.seeds, ".3f"),
        )
        for s in stats
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    left = {0}

    def line(cells) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def verdict(stats: list[ArmStats]) -> str:
    """One or two plain sentences: did ALPS beat the same-size baselines, and how it compares with all heads."""
    by = {s.arm: s for s in stats}
    alps = by.get("alps")
    if alps is None:
        return "ALPS did not run; no verdict."

    def key(s: ArmStats) -> tuple[float, float]:
        return (s.accuracy[0], -s.loss[0])  # accuracy first, loss breaks ties

    peers = [by[a] for a in ("random", "layer-consistent") if a in by]
    beaten = [p for p in peers if key(alps) > key(p)]
    lost = [p for p in peers if key(alps) <= key(p)]
    lines = []
    if peers and not lost:
        tied = any(p.accuracy[0] == alps.accuracy[0] for p in peers)
        lines.append(
            f"ALPS won among the same-size arms: accuracy {alps.accuracy[0]:.3f} vs "
            + ", ".join(f"{p.label} {p.accuracy[0]:.3f}" for p in peers)
            + f"; loss {alps.loss[0]:.4f} vs "
            + ", ".join(f"{p.loss[0]:.4f}" for p in peers)
            + (" (an accuracy tie is decided by loss)." if tied else ".")
        )
    else:
        best = max(lost, key=key)
        lines.append(
            f"ALPS did NOT win at this scale: {best.label} reached accuracy {best.accuracy[0]:.3f} "
            f"(loss {best.loss[0]:.4f}) vs ALPS {alps.accuracy[0]:.3f} (loss {alps.loss[0]:.4f})"
            + (f"; ALPS did beat {', '.join(p.label for p in beaten)}." if beaten else ".")
        )
    full = by.get("all")
    if full is not None and full.trainable:
        share = alps.trainable / full.trainable
        rel = "above" if key(alps) > key(full) else "below"
        lines.append(
            f"Against all heads ({share:.0%} of the trainable elements and "
            f"{alps.optimizer_bytes / max(1, full.optimizer_bytes):.0%} of the optimizer state): ALPS is {rel} "
            f"(accuracy {alps.accuracy[0]:.3f} vs {full.accuracy[0]:.3f})."
        )
    if any(s.seeds == 1 for s in stats):
        lines.append("One seed only: differences may be noise; --seeds 3 gives mean ± std.")
    return "\n".join(lines)
