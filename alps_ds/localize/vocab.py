"""The localize vocabulary: head representations, metrics and scoring dtypes, by name.

Defined here once, without torch, so the scorer, ``alps-ds localize``'s options and the run
config's ``selection.*`` keys share one list (and ``alps-ds --help`` does not load torch).
"""

from __future__ import annotations

HEAD_REPRS: tuple[str, ...] = ("product", "qkv-concat")  # paper eq. 5 / the qkv-concat ablation
METRICS: tuple[str, ...] = ("w1", "w1-index", "kl", "js", "cosine", "euclidean")  # w1: the paper's s_PAD
SCORE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16", "float64")  # weights are cast to it
DEFAULT_HEAD_REPR, DEFAULT_METRIC, DEFAULT_DTYPE = "product", "w1", "float32"
