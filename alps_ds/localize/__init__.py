"""Head localization: stream base/task checkpoints and score every attention head (ALPS stage 1)."""

from alps_ds.localize.run import LocalizeResult, localize_scores, open_pair
from alps_ds.localize.score import HEAD_REPRS, METRICS, LayerScorer

__all__ = ["HEAD_REPRS", "METRICS", "LayerScorer", "LocalizeResult", "localize_scores", "open_pair"]
