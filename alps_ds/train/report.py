"""What a run reports: OUT/train_log.jsonl, the summary, TensorBoard, and measured optimizer bytes per rank."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alps_ds.fsutil import atomic_write_text
from alps_ds.train.config import RunConfig


@dataclass
class Summary:
    """The run's outcome: OUT/summary.json (summary.partial.json when stopped early); train() returns it on rank 0."""

    steps: int
    total_steps: int
    resumed_from: int | None
    final_loss: float | None
    first_loss: float | None
    trainable_elements: int
    total_elements: int
    heads_selected: int
    optimizer_bytes_per_rank: list[dict[str, int]]
    world_size: int
    grad_accum: int
    zero_stage: int
    zero_init: bool  # the model was built partitioned (ZeRO-3), never whole on one rank
    dtype: str
    examples: int
    tokens_seen: int
    wall_seconds: float
    merged: str | None
    adapter: str | None
    tensor_parallel: int = 1  # parallel.tp: world_size = tensor_parallel x data-parallel ranks


def _step_of(line: str) -> float:
    """The step of one log line; a blank or half-written line (a kill mid-write) sorts after every step."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


class TrainLog:
    """OUT/train_log.jsonl: one line per optimizer step (rank 0); a resume drops lines past the checkpoint."""

    def __init__(self, path: Path, keep_until: int | None):
        self.path = path
        lines = []
        if keep_until is not None and path.exists():
            lines = [ln for ln in path.read_text().splitlines() if _step_of(ln) <= keep_until]
        atomic_write_text(path, "".join(ln + "\n" for ln in lines))
        self.f = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def open_tensorboard(path: Path, cfg: RunConfig, selection, report, start_step: int):
    """A SummaryWriter with the run config, trainable elements and the head heatmap (rank 0)."""
    from torch.utils.tensorboard import SummaryWriter

    # A resume drops events after the checkpoint (a crashed run's steps past it), keeping the checkpoint's own step.
    writer = SummaryWriter(str(path), purge_step=start_step + 1 if start_step else None)
    writer.add_text("run/config", "```\n" + json.dumps(cfg.to_dict(), indent=1) + "\n```", start_step)
    writer.add_scalar("model/trainable_elements", report.trainable, start_step)
    writer.add_scalar("model/trainable_fraction", report.fraction, start_step)
    if cfg.logging.heatmap:
        image = heatmap_image(selection)
        if image is not None:
            writer.add_image("selection/heads", image, start_step, dataformats="HWC")
    writer.flush()
    return writer


def heatmap_image(selection) -> np.ndarray | None:
    """The selection (and scores when present) as an RGB array, via alps_ds.heatmap."""
    import io

    import matplotlib.image as mpimg

    from alps_ds.heatmap import Panel, render_heatmap

    fp = selection.model
    scores = None if selection.scores is None else np.asarray(selection.scores)
    png = render_heatmap([Panel("heads", fp.num_layers, fp.num_heads, scores, selection.heads)])
    rgba = mpimg.imread(io.BytesIO(png), format="png")
    return (rgba[..., :3] * 255).astype(np.uint8)


def optimizer_bytes(engine) -> dict[str, int]:
    """Bytes this rank's optimizer holds: its (fp32 master) parameter partitions and its state (Adam moments)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    # ZeRO keeps the fp32 master partitions in its own lists (stage 3 swaps the inner groups' tensors).
    masters = getattr(opt, "single_partition_of_fp32_groups", None)
    masters = masters if masters is not None else getattr(opt, "fp32_partitioned_groups_flat", None)
    if masters is None:
        masters = [p for g in inner.param_groups for p in g["params"]]
    params = sum(p.numel() * p.element_size() for p in masters)
    state = sum(
        t.numel() * t.element_size() for s in inner.state.values() for t in s.values() if isinstance(t, torch.Tensor)
    )
    return {"param_bytes": int(params), "state_bytes": int(state), "total_bytes": int(params + state)}
