"""Head localization: stream base/task checkpoints, score every attention head and make a selection
(ALPS stage 1).

The vocabulary (:mod:`.vocab`) loads eagerly; the scorer and reader import torch, so they load on
first use and ``from alps_ds.localize import METRICS`` stays cheap for the CLI and run config.
"""

from alps_ds.lazy import lazy_attribute
from alps_ds.localize.vocab import HEAD_REPRS, METRICS, SCORE_DTYPES

_LAZY = {
    "LayerScorer": "alps_ds.localize.score",
    "LocalizeResult": "alps_ds.localize.run",
    "localize_scores": "alps_ds.localize.run",
    "open_pair": "alps_ds.localize.run",
    "Localized": "alps_ds.localize.make",
    "choose_selection": "alps_ds.localize.make",
    "make_selection": "alps_ds.localize.make",
    "write_outputs": "alps_ds.localize.make",
}


def __getattr__(name: str):
    return lazy_attribute(__name__, _LAZY, globals(), name)


__all__ = ["HEAD_REPRS", "METRICS", "SCORE_DTYPES", *_LAZY]
