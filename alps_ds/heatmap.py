"""Pictures of head scores and selections: PNG heatmaps (layers x heads) and a terminal view.

A figure is a row of :class:`Panel` s side by side (one selection, or several to compare),
each drawing a score matrix (or a blank grid) with the selected heads outlined.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alps_ds.fsutil import atomic_write_bytes

Head = tuple[int, int]
_RAMP = " .:-=+*%@"  # text shades, low to high


@dataclass(frozen=True)
class Panel:
    """One heatmap: ``scores`` is a layers x heads matrix, or None to show the selection only."""

    title: str
    num_layers: int
    num_heads: int
    scores: np.ndarray | None = None
    heads: Sequence[Head] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.scores is not None:
            s = np.asarray(self.scores, dtype=np.float64)
            if s.shape != (self.num_layers, self.num_heads):
                raise ValueError(f"panel {self.title!r}: scores {s.shape} != ({self.num_layers}, {self.num_heads})")
            object.__setattr__(self, "scores", s)


def render_heatmap(panels: Sequence[Panel], *, dpi: int = 110) -> bytes:
    """PNG bytes of ``panels`` side by side (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if not panels:
        raise ValueError("render_heatmap needs at least one panel")
    width = sum(min(12.0, 2.0 + 0.18 * p.num_heads) for p in panels)
    height = min(14.0, 2.0 + 0.16 * max(p.num_layers for p in panels))
    fig, axes = plt.subplots(1, len(panels), figsize=(width, height), squeeze=False)
    try:
        for ax, panel in zip(axes[0], panels):
            L, n = panel.num_layers, panel.num_heads
            if panel.scores is not None:
                im = ax.imshow(panel.scores, aspect="auto", cmap="viridis", interpolation="nearest")
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="score")
            else:
                ax.imshow(np.zeros((L, n)), aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
            # Outline selected cells; with many heads the outline is thinner so cells stay visible.
            lw = 1.2 if L * n <= 1024 else 0.6
            for layer, h in panel.heads:
                ax.add_patch(Rectangle((h - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=lw))
            ax.set_title(f"{panel.title}\n{len(panel.heads)} of {L * n} heads selected", fontsize=9)
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_xlim(-0.5, n - 0.5)
            ax.set_ylim(L - 0.5, -0.5)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buf.getvalue()


def save_heatmap(path: str | os.PathLike, panels: Sequence[Panel]) -> Path:
    """Render ``panels`` and write the PNG atomically."""
    path = Path(path)
    atomic_write_bytes(path, render_heatmap(panels))
    return path


def text_heatmap(scores_or_mask: np.ndarray | Sequence[Sequence[float]], heads: Sequence[Head] = ()) -> str:
    """A terminal view, one line per layer and one cell per head.

    Scores are shaded by rank within the matrix (`` .:-=+*%@`` low to high); a boolean mask
    draws ``.`` for False. Selected ``heads`` are drawn as ``#``.
    """
    s = np.asarray(scores_or_mask)
    if s.ndim != 2:
        raise ValueError("text_heatmap needs a layers x heads matrix")
    L, n = s.shape
    if s.dtype == bool:
        cells = np.where(s, "#", ".")
    else:
        v = s.astype(np.float64)
        ranks = v.reshape(-1).argsort(kind="stable").argsort(kind="stable").reshape(L, n)
        levels = (ranks * len(_RAMP)) // max(1, L * n)
        cells = np.array(list(_RAMP))[levels]
    cells = cells.astype(object)
    for layer, h in heads:
        cells[layer, h] = "#"
    width = len(str(L - 1))
    ruler = "".join(str(h // 10 % 10) if h % 10 == 0 else " " for h in range(n))
    lines = [f"{'':>{width}}  {ruler}".rstrip()]
    lines += [f"{layer:>{width}} |{''.join(cells[layer])}|" for layer in range(L)]
    legend = "# selected" if s.dtype == bool else f"# selected; shade by score rank '{_RAMP}' (low to high)"
    lines.append(f"{'':>{width}}  {legend}")
    return "\n".join(lines)
