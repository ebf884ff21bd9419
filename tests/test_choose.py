"""Head choosers: K = ceil(r * L * n), ties, seeded random, layer-consistent spread, explicit lists."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alps_ds.choose import all_heads, choose, count_for_ratio, layer_consistent, parse_heads, random_heads, top_k
from alps_ds.errors import AlpsError


@pytest.mark.parametrize(
    ("ratio", "L", "n", "k"),
    [(0.1, 16, 32, 52), (0.1, 80, 64, 512), (0.3, 3, 3, 3), (1 / 3, 3, 3, 3), (0.01, 2, 4, 1), (1.0, 5, 7, 35)],
)
def test_count_is_ceil(ratio, L, n, k):
    assert count_for_ratio(ratio, L, n) == k
    assert k >= ratio * L * n - 1e-9 and k - 1 < ratio * L * n


@pytest.mark.parametrize("ratio", [0, -0.1, 1.0001, float("nan"), "0.1"])
def test_ratio_outside_range(ratio):
    with pytest.raises(AlpsError, match="outside \\(0, 1\\]"):
        count_for_ratio(ratio, 4, 4)


def test_top_k_picks_highest_and_breaks_ties_by_position():
    s = np.array([[0.5, 0.9, 0.1], [0.9, 0.2, 0.9]])
    assert top_k(s, 1) == [(0, 1)]
    assert top_k(s, 2) == [(0, 1), (1, 0)]  # three-way tie at 0.9: earliest (layer, head) first
    assert top_k(s, 3) == [(0, 1), (1, 0), (1, 2)]
    assert top_k(s, 4) == [(0, 0), (0, 1), (1, 0), (1, 2)]
    assert top_k(np.zeros((2, 3)), 2) == [(0, 0), (0, 1)]
    with pytest.raises(AlpsError, match="NaN or inf"):
        top_k(np.array([[1.0, np.nan]]), 1)


def test_random_is_seeded_and_uniform():
    a = random_heads(8, 16, 20, seed=3)
    assert a == random_heads(8, 16, 20, seed=3) and a != random_heads(8, 16, 20, seed=4)
    assert len(set(a)) == 20 and all(0 <= layer < 8 and 0 <= h < 16 for layer, h in a)
    counts = np.zeros((8, 16))
    for seed in range(400):
        for layer, h in random_heads(8, 16, 20, seed=seed):
            counts[layer, h] += 1
    # every head is drawn with probability 20/128: 62.5 of 400 on average
    assert abs(counts.mean() - 62.5) < 1e-9 and counts.min() > 30 and counts.max() < 100


@pytest.mark.parametrize(("L", "n", "k"), [(8, 16, 13), (6, 4, 6), (5, 8, 1), (4, 4, 16), (7, 3, 20)])
def test_layer_consistent_spreads_evenly(L, n, k):
    heads = layer_consistent(L, n, k, seed=0)
    assert len(heads) == len(set(heads)) == k
    per_layer = np.bincount([layer for layer, _ in heads], minlength=L)
    assert per_layer.max() - per_layer.min() <= 1 and per_layer.sum() == k
    extra = [layer for layer in range(L) if per_layer[layer] > k // L]
    if extra and len(extra) > 1:  # the extra heads are spread, not bunched at the start
        gaps = np.diff(extra)
        assert gaps.min() >= math.floor(L / len(extra)) - 1
    assert heads == layer_consistent(L, n, k, seed=0) != layer_consistent(L, n, k, seed=1) or k == L * n


def test_choose_dispatch():
    s = np.arange(12.0).reshape(3, 4)
    assert choose("top-k", num_layers=3, num_heads=4, ratio=0.25, scores=s) == [(2, 1), (2, 2), (2, 3)]
    assert choose("all", num_layers=2, num_heads=2, ratio=0.1) == all_heads(2, 2) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert choose("none", num_layers=2, num_heads=2, ratio=0.1) == []
    assert choose("random", num_layers=3, num_heads=4, ratio=0.5, seed=1) == random_heads(3, 4, 6, 1)
    assert choose("layer-consistent", num_layers=3, num_heads=4, ratio=0.5, seed=1) == layer_consistent(3, 4, 6, 1)
    with pytest.raises(AlpsError, match="needs scores"):
        choose("top-k", num_layers=3, num_heads=4, ratio=0.25)
    with pytest.raises(AlpsError, match="unknown; choose one of top-k, random"):
        choose("best", num_layers=3, num_heads=4, ratio=0.25)


def test_parse_heads():
    assert parse_heads("3:5, 0:1,") == [(0, 1), (3, 5)]
    assert parse_heads("1:2", 2, 3) == [(1, 2)]
    for bad in ("3-5", "a:1", "1:2:3", "-1:2", "1:²"):
        with pytest.raises(AlpsError, match="not LAYER:HEAD"):
            parse_heads(bad)
    with pytest.raises(AlpsError, match="outside the model"):
        parse_heads("2:0", 2, 3)
    with pytest.raises(AlpsError, match="listed twice"):
        parse_heads("1:1,1:1")


@pytest.mark.parametrize("method", ["top-k", "random", "layer-consistent", "all", "none", "explicit"])
def test_provenance_records_only_what_applies(method):
    """choose_selection, behind localize and train alike: seed only for seeded methods, ratio only for
    ratio methods, metric/head_repr/dtype only with scores, the alps-ds version always."""
    from alps_ds import __version__
    from alps_ds.arch import ModelFingerprint
    from alps_ds.localize import choose_selection

    fp = ModelFingerprint("llama", 3, 4, 2, 8, 32)
    scores = np.arange(12.0).reshape(3, 4) if method == "top-k" else None
    heads = [(1, 2)] if method == "explicit" else None
    sel = choose_selection(fp, method, ratio=0.25, seed=7, heads=heads, scores=scores, metric="w1", dtype="float32")
    p = sel.provenance
    assert p.select == method and p.alps_ds_version == __version__
    assert p.seed == (7 if method in ("random", "layer-consistent") else None)
    assert p.ratio == (0.25 if method in ("top-k", "random", "layer-consistent") else None)
    assert (p.metric, p.dtype) == (("w1", "float32") if scores is not None else (None, None))
    assert (sel.scores is None) == (scores is None)
    expected = choose(method, num_layers=3, num_heads=4, ratio=0.25, seed=7, scores=scores) if heads is None else heads
    assert list(sel.heads) == expected
    with pytest.raises(AlpsError, match="method 'best' is unknown"):
        choose_selection(fp, "best")
