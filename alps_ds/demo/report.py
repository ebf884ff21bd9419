"""The demo's tables (mean ± std over seeds) and one honest line per claim of the paper, from ``results.json``.

A claim is printed as held only when the difference is larger than the seeds' spread (the sum of
both arms' standard deviations); with one seed no claim can be told apart from noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alps_ds.demo.config import ARMS, LORA, SETTINGS, TRANSFER_ARMS

LABELS = {
    "alps": "ALPS {pct}",
    "random": "random {pct}",
    "layer-consistent": "layer-consistent {pct}",
    "all": "all heads",
    "none": "no heads",
    LORA: "PEFT LoRA r={rank} (q/k/v)",
}
SETTING_LABELS = {"paper": "paper (+ rest)", "heads-only": "heads only", LORA: "LoRA", "transfer": "transfer"}

MeanStd = tuple[float, float]


@dataclass(frozen=True)
class ArmStats:
    setting: str  # paper, heads-only, lora, or transfer (paper setting on the transfer dataset)
    arm: str
    label: str
    heads: int
    trainable: int
    optimizer_bytes: int  # per rank (max over ranks): the same every seed
    loss: MeanStd  # mean, std over seeds, on the arm's held-out set
    accuracy: MeanStd
    retained: MeanStd  # mean accuracy over the other tasks' held-out sets
    seconds: float  # mean train seconds
    seeds: int


def _mean_std(values: list[float]) -> MeanStd:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def retained(entry_eval: dict, target: str) -> float:
    """Mean accuracy on every task but the target: what fine-tuning left of the base's other abilities."""
    return float(np.mean([a for t, a in entry_eval["per_task"].items() if t != target]))


def _stats(setting: str, arm: str, rows: list[dict], target: str, pct: str) -> ArmStats:
    rank = rows[0].get("lora_rank")
    return ArmStats(
        setting=setting,
        arm=arm,
        label=LABELS[arm].format(pct=pct, rank=rank),
        heads=len(rows[0]["heads"]),
        trainable=max(r["trainable_elements"] for r in rows),
        optimizer_bytes=max((max(r["optimizer_bytes_per_rank"], default=0) for r in rows), default=0),
        loss=_mean_std([r["eval"]["loss"] for r in rows]),
        accuracy=_mean_std([r["eval"]["accuracy"] for r in rows]),
        retained=_mean_std([retained(r["eval"], target) for r in rows]),
        seconds=float(np.mean([r["train_seconds"] for r in rows])),
        seeds=len(rows),
    )


def summarize(results: dict) -> list[ArmStats]:
    """One ArmStats per (setting, arm) that ran, in table order."""
    pct = f"{100 * results['config']['ratio']:g} %"
    target = results["config"]["target"]
    order = [(s, a, "target") for s in SETTINGS for a in ARMS] + [(LORA, LORA, "target")]
    order += [("paper", a, "transfer") for a in TRANSFER_ARMS]
    out = []
    for setting, arm, dataset in order:
        rows = [
            r for r in results["arms"] if (r.get("setting"), r.get("arm"), r.get("dataset")) == (setting, arm, dataset)
        ]
        if rows:
            out.append(_stats("transfer" if dataset == "transfer" else setting, arm, rows, target, pct))
    return out


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}"
    raise AssertionError("unreachable")


def _pm(value: MeanStd, seeds: int, fmt: str) -> str:
    return f"{value[0]:{fmt}} ± {value[1]:{fmt}}" if seeds > 1 else f"{value[0]:{fmt}}"


def render_table(stats: list[ArmStats], base_retained: float | None = None) -> str:
    header = ("setting", "arm", "heads", "trainable", "optimizer/rank", "loss", "accuracy", "other tasks", "train s")
    rows = [
        (
            SETTING_LABELS[s.setting],
            s.label,
            str(s.heads) if s.arm != LORA else "-",
            f"{s.trainable:,}",
            _bytes(s.optimizer_bytes),
            _pm(s.loss, s.seeds, ".4f"),
            _pm(s.accuracy, s.seeds, ".3f"),
            _pm(s.retained, s.seeds, ".3f"),
            f"{s.seconds:.1f}",
        )
        for s in stats
    ]
    if base_retained is not None:
        rows.append(("base", "(no fine-tuning)", "-", "0", "0 B", "", "", f"{base_retained:.3f}", ""))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    left = {0, 1}

    def line(cells) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def compare(a: MeanStd, b: MeanStd, seeds: int) -> int | None:
    """+1: a is higher beyond the seeds' spread, -1: lower beyond it, 0: within it, None: one seed."""
    if seeds < 2:
        return None
    gap, spread = a[0] - b[0], a[1] + b[1]
    return 1 if gap > spread else -1 if -gap > spread else 0


def _claim(name: str, alps: ArmStats, peers: list[ArmStats], field: str, what: str) -> str:
    """``name: held|did not hold|not shown`` for ALPS above every peer in ``field``, with the numbers."""
    mine = getattr(alps, field)
    numbers = ", ".join(f"{p.label} {getattr(p, field)[0]:.3f}" for p in peers)
    verdicts = [compare(mine, getattr(p, field), min(alps.seeds, p.seeds)) for p in peers]
    if any(v is None for v in verdicts):
        verdict = "cannot tell from one seed (run with --seeds 3)"
    elif all(v == 1 for v in verdicts):
        verdict = "HELD"
    elif any(v == -1 for v in verdicts):
        verdict = "did NOT hold"
    else:
        verdict = "not shown (within the seeds' spread)"
    return f"{name}: {verdict}. {what}: ALPS {mine[0]:.3f} vs {numbers}."


def claims(stats: list[ArmStats]) -> str:
    """One line per claim of the paper, decided from the numbers (see :func:`compare`)."""
    by = {(s.setting, s.arm): s for s in stats}

    def arms(setting: str, names) -> list[ArmStats]:
        return [by[(setting, a)] for a in names if (setting, a) in by]

    lines = []
    if ("paper", "alps") in by:
        peers = arms("paper", [a for a in ARMS if a != "alps"])
        lines.append(
            _claim("Claim 1, task score", by[("paper", "alps")], peers, "accuracy", "target accuracy, paper setting")
        )
    if ("transfer", "alps") in by:
        moved = by[("transfer", "alps")]
        lines.append(_claim("Claim 2, transfer", moved, arms("transfer", ["random"]), "accuracy", "shifted dataset"))
    if ("paper", "alps") in by and ("paper", "all") in by:
        lines.append(
            _claim("Claim 3, less forgetting", by[("paper", "alps")], arms("paper", ["all"]), "retained", "other tasks")
        )
    if ("heads-only", "alps") in by:
        peers = arms("heads-only", ["random", "layer-consistent"]) + arms(LORA, [LORA])
        lines.append(
            _claim("Heads only (memory-lean)", by[("heads-only", "alps")], peers, "accuracy", "target accuracy")
        )
    return "\n".join(lines) if lines else "No ALPS arm ran; no claims."
