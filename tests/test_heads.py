"""Selections as artifacts: ``alps-ds heads show|compare|combine|resize`` and the HeadSelection
operations behind them (set algebra, vote, resize, comparison, robust loading)."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alps_ds import selection_ops as ops
from alps_ds.arch import ModelFingerprint
from alps_ds.choose import count_for_ratio, top_k
from alps_ds.cli import main
from alps_ds.errors import AlpsError
from alps_ds.selection import HeadSelection, Provenance

L, N = 4, 6  # layers x heads of the test model
FP = ModelFingerprint("llama", L, N, 2, 8, 48)
POOL = [(layer, h) for layer in range(L) for h in range(N)]


def make(heads, scores=None, select="top-k", fp=FP, **prov) -> HeadSelection:
    if scores is not None:
        scores = tuple(tuple(float(x) for x in row) for row in np.asarray(scores))
    return HeadSelection(fp, tuple(heads), Provenance(select, **prov), scores)


# ---- strategies ----------------------------------------------------------------------------
score_values = st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0]) | st.floats(-1e3, 1e3, allow_nan=False)
score_matrices = st.lists(st.lists(score_values, min_size=N, max_size=N), min_size=L, max_size=L)
head_sets = st.sets(st.sampled_from(POOL))


@st.composite
def selections(draw, scored=None):
    with_scores = draw(st.booleans()) if scored is None else scored
    return make(draw(head_sets), draw(score_matrices) if with_scores else None)


ratios = st.floats(0.01, 1.0, allow_nan=False)
# No deadline: the machine is shared, and a slow example is not a wrong one.
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- union / intersect algebra ---------------------------------------------------------------
@PROPERTY
@given(selections(), selections(), selections())
def test_union_intersect_algebra(a, b, c):
    def U(*s):
        return set(ops.union(list(s)).heads)

    def I(*s):  # noqa: E743
        return set(ops.intersect(list(s)).heads)

    A, B = set(a.heads), set(b.heads)
    assert U(a, b) == U(b, a) == A | B  # commutative, and the set union
    assert I(a, b) == I(b, a) == A & B
    union, inter = ops.union, ops.intersect
    assert set(union([a, union([b, c])]).heads) == set(union([union([a, b]), c]).heads) == U(a, b, c)  # associative
    assert set(inter([a, inter([b, c])]).heads) == set(inter([inter([a, b]), c]).heads) == I(a, b, c)
    assert U(a, a) == A == I(a, a)  # idempotent
    assert set(union([a, inter([a, b])]).heads) == A == set(inter([a, union([a, b])]).heads)  # absorption
    assert I(a, b, c) <= U(a, b, c)
    # distributive: a & (b | c) == (a & b) | (a & c)
    assert set(inter([a, union([b, c])]).heads) == set(union([inter([a, b]), inter([a, c])]).heads)


@PROPERTY
@given(selections(), selections())
def test_combined_scores_kept_only_when_shared(a, b):
    same = make(b.heads, a.scores)
    assert ops.union([a, same]).scores == a.scores  # one localization re-cut: scores still meaningful
    if a.scores != b.scores:
        assert ops.union([a, b]).scores is None
        assert ops.intersect([a, b]).scores is None


# ---- vote ----------------------------------------------------------------------------------
@PROPERTY
@given(st.lists(selections(), min_size=1, max_size=5), st.none() | ratios, st.randoms(use_true_random=False))
def test_vote_is_independent_of_input_order(sels, ratio, rnd):
    shuffled = list(sels)
    rnd.shuffle(shuffled)
    first, second = ops.vote(sels, ratio=ratio), ops.vote(shuffled, ratio=ratio)
    assert first.to_dict() == second.to_dict()
    assert first.provenance.select == "vote" and first.provenance.ratio == ratio


@PROPERTY
@given(st.lists(selections(), min_size=1, max_size=5), ratios)
def test_vote_with_ratio_ranks_by_votes_then_mean_normalized_score(sels, ratio):
    result = ops.vote(sels, ratio=ratio)
    assert len(result) == count_for_ratio(ratio, L, N)
    counts = {h: sum(h in s.heads for s in sels) for h in POOL}
    chosen = set(result.heads)
    rest = [h for h in POOL if h not in chosen]
    if rest:
        assert min(counts[h] for h in chosen) >= max(counts[h] for h in rest)
    # Among heads with equal votes, no unchosen head has a higher mean normalized score.
    scored = [np.asarray(s.scores) for s in sels if s.scores is not None]
    norm = [(m - m.min()) / (m.max() - m.min()) if m.max() > m.min() else np.zeros_like(m) for m in scored]
    mean = sum(norm) / len(norm) if norm else np.zeros((L, N))
    for h, r in itertools.product(chosen, rest):
        if counts[h] == counts[r]:
            assert mean[h] >= mean[r] - 1e-12


@PROPERTY
@given(st.lists(selections(), min_size=1, max_size=5))
def test_vote_without_ratio_keeps_strict_majority(sels):
    heads = set(ops.vote(sels).heads)
    assert heads == {h for h in POOL if 2 * sum(h in s.heads for s in sels) > len(sels)}


def test_vote_tie_break_worked_example():
    # Three inputs; (0,0) and (1,1) each get 2 votes, (2,2) gets 1. Mean normalized score breaks
    # the 2-vote tie: input 1 scores (1,1) top, inputs 2 and 3 prefer (0,0).
    s1 = np.zeros((L, N))
    s1[1, 1], s1[0, 0] = 10.0, 5.0  # normalized: (1,1)=1.0, (0,0)=0.5
    s2 = np.zeros((L, N))
    s2[0, 0], s2[1, 1] = 4.0, 1.0  # normalized: (0,0)=1.0, (1,1)=0.25
    a = make([(0, 0), (1, 1)], s1)
    b = make([(0, 0), (2, 2)], s2)
    c = make([(1, 1)])  # no scores: votes, but does not enter the mean
    # mean normalized: (0,0) = (0.5+1.0)/2 = 0.75 > (1,1) = (1.0+0.25)/2 = 0.625
    k1 = 1 / (L * N)
    assert ops.vote([a, b, c], ratio=k1).heads == ((0, 0),)
    assert ops.vote([c, b, a], ratio=2 * k1).heads == ((0, 0), (1, 1))
    assert ops.vote([a, b, c]).heads == ((0, 0), (1, 1))  # majority: 2 of 3
    # Without any scores, equal votes fall back to (layer, head) order.
    plain = [make([(3, 5), (2, 0)]), make([(3, 5), (2, 0)])]
    assert ops.vote(plain, ratio=k1).heads == ((2, 0),)


# ---- provenance and model checks ------------------------------------------------------------
def test_provenance_records_how_a_selection_was_made():
    a = make([(0, 1)], select="top-k", metric="w1", head_repr="product", task="math-a", base="b", seed=3)
    b = make([(1, 2)], select="top-k", metric="w1", head_repr="product", task="math-b", base="b")
    u = ops.union([a, b], sources=["a/heads.json", "b/heads.json"])
    assert u.provenance.select == "union"
    assert u.provenance.inputs == ("a/heads.json", "b/heads.json")
    assert (u.provenance.metric, u.provenance.head_repr, u.provenance.base) == ("w1", "product", "b")
    assert u.provenance.task is None and u.provenance.seed is None and u.provenance.ratio is None
    v = ops.vote([a, b], ratio=0.25, sources=["x", "y"])
    assert (v.provenance.select, v.provenance.ratio, v.provenance.inputs) == ("vote", 0.25, ("x", "y"))
    assert ops.intersect([a, b]).provenance.select == "intersect"
    # Provenance survives the file round trip.
    assert HeadSelection.from_dict(json.loads(u.to_json())).provenance == u.provenance


def test_selections_of_different_models_are_refused():
    other = ModelFingerprint("llama", 8, N, 2, 8, 48)
    a, b = make([(0, 0)]), make([(5, 0)], fp=other)
    for op in (
        lambda: ops.union([a, b], sources=["math.json", "code.json"]),
        lambda: ops.intersect([a, b], sources=["math.json", "code.json"]),
        lambda: ops.vote([a, b], sources=["math.json", "code.json"]),
        lambda: ops.compare(a, b, sources=["math.json", "code.json"]),
    ):
        with pytest.raises(AlpsError) as e:
            op()
        msg = str(e.value)
        assert "math.json" in msg and "code.json" in msg and "num_layers: 4 != 8" in msg and "\n" not in msg
    with pytest.raises(AlpsError, match="selection 1 and selection 2 .*num_layers"):
        ops.union([a, b])


# ---- resize --------------------------------------------------------------------------------
@PROPERTY
@given(selections(scored=True), ratios)
def test_resize_equals_top_k_of_the_stored_scores(sel, ratio):
    resized = ops.resize(sel, ratio, source="in.json")
    assert list(resized.heads) == top_k(np.asarray(sel.scores), count_for_ratio(ratio, L, N))
    assert resized.scores == sel.scores and resized.model == sel.model
    assert (resized.provenance.select, resized.provenance.ratio, resized.provenance.inputs) == (
        "resize",
        ratio,
        ("in.json",),
    )
    # Re-cutting twice lands where one re-cut lands.
    assert ops.resize(ops.resize(sel, 0.5), ratio).heads == resized.heads


def test_resize_needs_scores_and_refuses_random_selections():
    with pytest.raises(AlpsError, match=r"x\.json: carries no scores"):
        ops.resize(make([(0, 0)]), 0.5, source="x.json")
    with pytest.raises(AlpsError, match="random selection"):
        ops.resize(make([(0, 0)], np.ones((L, N)), select="random"), 0.5)
    with pytest.raises(AlpsError, match="outside"):
        ops.resize(make([(0, 0)], np.ones((L, N))), 1.5)


# ---- comparison ----------------------------------------------------------------------------
@PROPERTY
@given(st.lists(score_values, min_size=2, max_size=40), st.data())
def test_spearman_matches_scipy_with_ties(x, data):
    y = data.draw(st.lists(score_values, min_size=len(x), max_size=len(x)))
    ours = ops.spearman(x, y)
    if len(set(x)) == 1 or len(set(y)) == 1:
        assert math.isnan(ours)
    else:
        assert ours == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-9)


def test_average_ranks_share_ties():
    assert ops.average_ranks([3.0, 1.0, 3.0, 2.0]).tolist() == [3.5, 1.0, 3.5, 2.0]


@PROPERTY
@given(selections(), selections())
def test_compare_counts(a, b):
    c = ops.compare(a, b)
    A, B = set(a.heads), set(b.heads)
    assert (c.overlap, c.union, c.size_a, c.size_b) == (len(A & B), len(A | B), len(A), len(B))
    assert c.jaccard == (len(A & B) / len(A | B) if A | B else 1.0) == ops.jaccard(a, b) == ops.jaccard(b, a)
    assert ops.overlap(a, b) == ops.overlap(b, a) == c.overlap
    assert [p.in_both for p in c.per_layer] == [sum(1 for x, _ in A & B if x == layer) for layer in range(L)]
    assert (c.spearman is None) == (a.scores is None or b.scores is None)


# ---- robust loading ------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)
valid = make([(0, 1), (3, 5)], np.arange(L * N).reshape(L, N) / 7, metric="w1").to_dict()


@st.composite
def damaged_heads_json(draw):
    """A valid heads.json dict with some values replaced by arbitrary JSON (deep validation paths)."""
    d = json.loads(json.dumps(valid))
    for key in draw(st.sets(st.sampled_from(sorted(d)))):
        d[key] = draw(json_values)
    for section in ("model", "provenance"):
        if isinstance(d[section], dict):
            for key in draw(st.sets(st.sampled_from(sorted(valid[section])))):
                d[section][key] = draw(json_values | st.integers(min_value=10**300))
    if isinstance(d["heads"], list) and draw(st.booleans()):
        d["heads"].append(draw(st.lists(st.integers(-3, 10**400), min_size=2, max_size=2) | json_values))
    rows = d["scores"]
    if isinstance(rows, list) and rows and isinstance(rows[0], list) and rows[0] and draw(st.booleans()):
        rows[0][0] = draw(json_values | st.integers(min_value=10**400))
    return d


@settings(max_examples=200, deadline=None)
@given(json_values | damaged_heads_json())
def test_from_dict_on_arbitrary_json_raises_only_alps_error(data):
    try:
        sel = HeadSelection.from_dict(data, source="h.json")
    except AlpsError as e:
        assert str(e).startswith("h.json: ") and "\n" not in str(e)
    else:
        assert HeadSelection.from_dict(json.loads(sel.to_json())) == sel  # what loads, round-trips


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=64) | damaged_heads_json().map(lambda d: json.dumps(d).encode()))
def test_load_on_arbitrary_bytes_raises_only_alps_error(tmp_path, blob):
    path = tmp_path / "heads.json"
    path.write_bytes(blob)
    try:
        HeadSelection.load(path)
    except AlpsError as e:
        assert str(path) in str(e)


def test_load_deeply_nested_json_is_a_clear_error(tmp_path):
    path = tmp_path / "heads.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AlpsError, match="not valid JSON"):
        HeadSelection.load(path)


# ---- CLI end to end ------------------------------------------------------------------------
@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    """Two scored selections of one localization-like score field, one unscored, one of another model."""
    rng = np.random.default_rng(7)
    s_math = rng.random((L, N))
    s_code = s_math + 0.3 * rng.random((L, N))
    out = {}
    for name, scores in (("math", s_math), ("code", s_code)):
        sel = make(top_k(scores, 6), scores, metric="w1", head_repr="product", ratio=0.25, task=name)
        out[name] = sel.save(tmp_path / name / "heads.json")
    out["explicit"] = make([(0, 0), (3, 5)], select="explicit").save(tmp_path / "explicit.json")
    out["other"] = make([(0, 0)], fp=ModelFingerprint("qwen2", L, N, 3, 8, 48)).save(tmp_path / "other.json")
    return out


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_show(files, capsys):
    sel = HeadSelection.load(files["math"])
    rc, out, _ = _run(capsys, "heads", "show", files["math"].parent, "--top", 3)  # a localize folder works too
    assert rc == 0
    assert f"selected  6 of {L * N} heads (25.0 %)" in out
    assert "llama: 4 layers x 6 heads, 2 kv heads, head_dim 8, hidden 48" in out
    assert "top-k, metric w1, head repr product, ratio 0.25" in out and "task      math" in out
    for layer, heads in sel.by_layer().items():
        assert f"layer {layer}  {len(heads):>3}  {', '.join(map(str, heads))}" in out
    scores = np.asarray(sel.scores)
    best = sorted(sel.heads, key=lambda h: -scores[h])[:3]
    lines = out.splitlines()
    start = lines.index("  rank  layer  head  score") + 1
    shown = [tuple(int(x) for x in line.split()[1:3]) for line in lines[start : start + 3]]
    assert shown == best
    assert f"{scores[best[0]]:.6g}" in lines[start]


def test_cli_output_into_a_closed_pipe_ends_quietly(files):
    """``alps-ds heads show ... | head`` when head has already exited: no traceback, the SIGPIPE status."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        argv = [sys.executable, "-m", "alps_ds", "heads", "show", str(files["math"])]
        proc = subprocess.run(argv, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, "")


def test_cli_show_without_scores(files, capsys):
    rc, out, _ = _run(capsys, "heads", "show", files["explicit"])
    assert rc == 0 and "scores    none" in out and "0:0, 3:5" in out


def test_cli_compare_numbers(files, capsys):
    a, b = HeadSelection.load(files["math"]), HeadSelection.load(files["code"])
    c = HeadSelection.load(files["explicit"])
    rc, out, _ = _run(capsys, "heads", "compare", files["math"], files["code"], files["explicit"], "--json")
    assert rc == 0
    report = json.loads(out)
    A, B, C = set(a.heads), set(b.heads), set(c.heads)
    first = report["pairs"][0]
    assert (first["overlap"], first["union"]) == (len(A & B), len(A | B))
    assert first["jaccard"] == pytest.approx(len(A & B) / len(A | B))
    assert first["spearman"] == pytest.approx(scipy.stats.spearmanr(np.ravel(a.scores), np.ravel(b.scores))[0])
    assert report["pairs"][1]["spearman"] is None  # the explicit list carries no scores
    assert report["in_all"] == len(A & B & C) and report["in_any"] == len(A | B | C)
    for row in report["per_layer"]:
        layer = row["layer"]
        assert row["selected"] == [sum(1 for x, _ in S if x == layer) for S in (A, B, C)]
    rc, out, _ = _run(capsys, "heads", "compare", files["math"], files["code"])
    assert rc == 0
    assert f"{len(A & B):>7}  {len(A | B):>5}  {len(A & B) / len(A | B):>7.3f}  {first['spearman']:+.3f}" in out


def test_cli_combine_and_resize_write_files(files, tmp_path, capsys):
    out = tmp_path / "lib" / "union.json"
    rc, text, _ = _run(capsys, "heads", "combine", files["math"], files["code"], "--op", "union", "--out", out)
    assert rc == 0 and str(out) in text
    u = HeadSelection.load(out)
    a, b = HeadSelection.load(files["math"]), HeadSelection.load(files["code"])
    assert set(u.heads) == set(a.heads) | set(b.heads)
    assert u.provenance.inputs == (str(files["math"]), str(files["code"]))

    vote = tmp_path / "vote.json"
    rc, *_ = _run(
        capsys, "heads", "combine", files["math"], files["code"], "--op", "vote", "--ratio", 0.5, "--out", vote
    )
    assert rc == 0 and HeadSelection.load(vote).heads == ops.vote([a, b], ratio=0.5).heads

    resized = tmp_path / "r.json"
    rc, *_ = _run(capsys, "heads", "resize", files["math"], "--ratio", 0.5, "--out", resized)
    r = HeadSelection.load(resized)
    assert rc == 0 and list(r.heads) == top_k(np.asarray(a.scores), 12)
    assert r.provenance.select == "resize" and r.provenance.inputs == (str(files["math"]),)
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["combine", "{math}", "{other}", "--op", "union"],
            "were made for different models (model_type: llama != qwen2",
        ),
        (["compare", "{math}", "{other}"], "were made for different models"),
        (["combine", "{math}", "{code}", "--op", "union", "--ratio", "0.2"], "--ratio applies to --op vote only"),
        (["combine", "{math}", "--op", "vote"], "needs at least two files"),
        (["resize", "{explicit}", "--ratio", "0.2"], "carries no scores"),
        (["resize", "{math}", "--ratio", "0"], "outside (0, 1]"),
        (["show", "{missing}"], "no such file"),
    ],
)
def test_cli_errors_are_one_line_and_write_nothing(files, tmp_path, capsys, argv, message):
    paths = {k: str(v) for k, v in files.items()} | {"missing": str(tmp_path / "nope.json")}
    argv = [a.format(**paths) for a in argv]
    if argv[0] in ("combine", "resize"):
        argv += ["--out", str(tmp_path / "result.json")]
    rc, out, err = _run(capsys, "heads", *argv)
    assert rc == 2
    assert err.startswith("alps-ds: error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "result.json").exists()


def test_cli_combine_keeps_an_existing_output_when_it_fails(files, tmp_path, capsys):
    out = tmp_path / "keep.json"
    out.write_text("previous")
    rc, *_ = _run(capsys, "heads", "combine", files["math"], files["other"], "--op", "intersect", "--out", out)
    assert rc == 2 and out.read_text() == "previous"


def _png_pixels(path: Path) -> np.ndarray:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


def test_cli_pngs_are_written_and_show_the_selection(files, tmp_path, capsys):
    show_png, cmp_png = tmp_path / "show.png", tmp_path / "img" / "cmp.png"
    rc, out, _ = _run(capsys, "heads", "show", files["math"], "--png", show_png)
    assert rc == 0 and f"wrote {show_png}" in out
    rc, *_ = _run(capsys, "heads", "compare", files["math"], files["code"], files["explicit"], "--png", cmp_png)
    assert rc == 0
    one, three = _png_pixels(show_png), _png_pixels(cmp_png)
    for img in (one, three):
        rgb = img[..., :3].reshape(-1, 3)
        assert len(np.unique(rgb.round(2), axis=0)) > 20  # a real picture, not a blank canvas
        red = (rgb[:, 0] > 0.8) & (rgb[:, 1] < 0.2) & (rgb[:, 2] < 0.2)
        assert red.sum() > 50  # selected heads are outlined in red
    assert three.shape[1] > 2 * one.shape[1]  # three panels side by side


def test_cli_show_prints_a_terminal_heatmap_marking_selected_heads(files, capsys):
    sel = HeadSelection.load(files["math"])
    _, out, _ = _run(capsys, "heads", "show", files["math"])
    rows = [line for line in out.splitlines() if line.count("|") == 2 and line.strip()[0].isdigit()]
    assert len(rows) == L
    marked = {(int(r.split("|")[0]), h) for r in rows for h, ch in enumerate(r.split("|")[1]) if ch == "#"}
    assert marked == set(sel.heads)


def test_resize_equals_a_fresh_localize_at_that_ratio(tmp_path, capsys):
    """Acceptance: re-cutting a saved selection gives exactly what localize gives at that ratio."""
    import torch

    from alps_ds.tiny import build_model, save_model, tiny_config

    config = tiny_config("llama", layers=3, hidden=32, heads=8, kv_heads=2)
    base, task = build_model(config, seed=0), build_model(config, seed=0)
    with torch.no_grad():  # a "fine-tune": every weight moved a little, some heads more than others
        for p in task.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(base, tmp_path / "base")
    save_model(task, tmp_path / "task")
    for ratio in ("0.25", "0.5"):
        argv = ["localize", "--base", tmp_path / "base", "--task", tmp_path / "task", "--quiet", "--device", "cpu"]
        assert _run(capsys, *argv, "--out", tmp_path / ratio, "--ratio", ratio)[0] == 0
    rc, *_ = _run(capsys, "heads", "resize", tmp_path / "0.25", "--ratio", "0.5", "--out", tmp_path / "re.json")
    assert rc == 0
    resized, fresh = HeadSelection.load(tmp_path / "re.json"), HeadSelection.load(tmp_path / "0.5" / "heads.json")
    assert len(fresh) == 12 and resized.heads == fresh.heads
    assert resized.scores == fresh.scores and resized.model == fresh.model
    keep = ("metric", "head_repr", "dtype", "base", "task", "ratio")
    assert [getattr(resized.provenance, k) for k in keep] == [getattr(fresh.provenance, k) for k in keep]
