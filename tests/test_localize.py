"""`alps-ds localize` against independent per-head numpy/scipy versions of every score.

Models are tiny random ``transformers`` models of every supported family, written with
``save_pretrained``; the task model is the base with noise added to its Q/K/V weights.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.spatial.distance import cosine as scipy_cosine
from scipy.spatial.distance import jensenshannon
from scipy.stats import wasserstein_distance

from alps_ds.arch import AttentionSpec
from alps_ds.choose import count_for_ratio, random_heads, top_k
from alps_ds.cli import main
from alps_ds.localize import localize_scores
from alps_ds.localize.score import DTYPES, METRICS
from alps_ds.selection import HeadSelection
from alps_ds.tiny import build_model, save_model, tiny_config

# name -> (model_type, tiny_config kwargs, checkpoint dtype)
CASES = {
    "llama-gqa": ("llama", dict(heads=4, kv_heads=2, head_dim=12), torch.float32),
    "llama-mha-bias": ("llama", dict(heads=4, kv_heads=None, bias=True), torch.float32),
    "llama-bf16": ("llama", dict(heads=4, kv_heads=2), torch.bfloat16),
    "mistral": ("mistral", dict(heads=4, kv_heads=1), torch.float32),
    "qwen2": ("qwen2", dict(heads=4, kv_heads=2), torch.float32),
    "qwen3": ("qwen3", dict(heads=4, kv_heads=2, bias=True), torch.float32),
    "gemma": ("gemma", dict(heads=4, kv_heads=1), torch.float32),
    "gemma2": ("gemma2", dict(heads=4, kv_heads=2), torch.float32),
    "phi3": ("phi3", dict(heads=4, kv_heads=2), torch.float32),
    "gpt_neox": ("gpt_neox", dict(heads=4, kv_heads=None), torch.float32),
}
LAYERS = 3  # > 2 so the reader's two rotating buffer sets are each reused


def _attention_params(model, spec: AttentionSpec):
    for layer in range(spec.num_layers):
        for name in spec.tensor_names(layer):
            yield model.get_parameter(name)


def _make_pair(root: Path, name: str):
    model_type, kw, dtype = CASES[name]
    cfg = tiny_config(model_type, layers=LAYERS, hidden=32, **kw)
    spec = AttentionSpec.from_config(cfg)
    model = build_model(cfg, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        # Init std 0.02 makes every head matrix ~0 and every softmax ~uniform; larger weights
        # give distributions that differ, so the comparisons below are not trivially 0 == 0.
        for p in _attention_params(model, spec):
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    model = model.to(dtype)
    base = save_model(model, root / f"{name}-base")
    with torch.no_grad():
        for p in _attention_params(model, spec):
            rows = p.shape[0]
            scale = 0.02 + 0.1 * torch.rand(rows, generator=g)  # heads move by different amounts
            noise = torch.randn(p.shape, generator=g) * (scale if p.dim() == 1 else scale[:, None])
            p.add_(noise.to(dtype))
    task = save_model(model, root / f"{name}-task")
    return spec, base, task


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return {name: _make_pair(root, name) for name in CASES}


def _weights64(path: Path, spec: AttentionSpec, dtype: str) -> dict[str, np.ndarray]:
    """All Q/K/V weights, rounded to --dtype, as float64 numpy (read with the safetensors library)."""
    files = sorted(path.glob("*.safetensors"))
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    out = {}
    for layer in range(spec.num_layers):
        for m in spec.modules:
            name = f"{spec.module_path(layer, m)}.weight"
            out[name] = tensors[name].to(DTYPES[dtype]).double().numpy()
    return out


def _head_vector(w: dict[str, np.ndarray], spec: AttentionSpec, layer: int, h: int, head_repr: str) -> np.ndarray:
    def block(kind, index):
        r = spec.rows(kind, index)
        return w[f"{spec.module_path(layer, r.module)}.weight"][r.start : r.stop]

    j = h * spec.num_kv_heads // spec.num_heads  # the kv head query head h reads
    q, k, v = block("q", h), block("k", j), block("v", j)
    if head_repr == "product":
        return (q.T @ (k @ v.T)).reshape(-1)  # paper eq. 5, [d, hd] row-major
    return np.concatenate([q.reshape(-1), k.reshape(-1), v.reshape(-1)])


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _reference(pb: np.ndarray, pt: np.ndarray, metric: str) -> float:
    n = pb.size
    if metric == "w1":
        x = np.linspace(0.0, 1.0, n)
        return wasserstein_distance(x, x, pb, pt)
    if metric == "w1-index":
        x = np.arange(n, dtype=np.float64)
        return wasserstein_distance(x, x, pb, pt)
    if metric == "kl":
        p, q = pt + 1e-8, pb + 1e-8
        p, q = p / p.sum(), q / q.sum()
        return float(np.sum(p * np.log(p / q)))
    if metric == "js":
        return jensenshannon(pb, pt) ** 2
    if metric == "cosine":
        return scipy_cosine(pb, pt)
    if metric == "euclidean":
        return float(np.linalg.norm(pb - pt))
    raise AssertionError(metric)


def reference_scores(spec, base, task, *, head_repr="product", metric="w1", dtype="float32") -> np.ndarray:
    wb, wt = _weights64(base, spec, dtype), _weights64(task, spec, dtype)
    out = np.zeros((spec.num_layers, spec.num_heads))
    for layer in range(spec.num_layers):
        for h in range(spec.num_heads):
            pb = _softmax(_head_vector(wb, spec, layer, h, head_repr))
            pt = _softmax(_head_vector(wt, spec, layer, h, head_repr))
            out[layer, h] = _reference(pb, pt, metric)
    return out


def _scores(base, task, **kw) -> np.ndarray:
    return localize_scores(str(base), str(task), progress=False, device="cpu", **kw).scores


# ---- scores vs the per-head reference ---------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("head_repr", ["product", "qkv-concat"])
def test_w1_matches_scipy_every_architecture(pairs, name, head_repr):
    spec, base, task = pairs[name]
    got = _scores(base, task, head_repr=head_repr)
    want = reference_scores(spec, base, task, head_repr=head_repr)
    assert got.shape == (spec.num_layers, spec.num_heads)
    assert (want > 0).all() and np.ptp(want) > 0  # heads really differ
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=0)


@pytest.mark.parametrize("name", ["llama-gqa", "gpt_neox"])
@pytest.mark.parametrize("head_repr", ["product", "qkv-concat"])
@pytest.mark.parametrize("metric", METRICS)
def test_every_metric_matches_numpy(pairs, name, head_repr, metric):
    spec, base, task = pairs[name]
    got = _scores(base, task, head_repr=head_repr, metric=metric)
    want = reference_scores(spec, base, task, head_repr=head_repr, metric=metric)
    # cosine is 1 - cos of two nearly parallel vectors: it carries fewer significant digits.
    np.testing.assert_allclose(got, want, rtol=2e-4 if metric == "cosine" else 2e-5, atol=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
def test_dtype_rounds_weights_before_scoring(pairs, dtype):
    spec, base, task = pairs["llama-gqa"]
    got = _scores(base, task, dtype=dtype)
    want = reference_scores(spec, base, task, dtype=dtype)
    np.testing.assert_allclose(got, want, rtol=1e-9 if dtype == "float64" else 2e-5, atol=0)
    if dtype != "float64":  # rounding really changed the scores
        assert not np.allclose(got, reference_scores(spec, base, task), rtol=1e-4, atol=0)


def test_chunking_and_sharding_do_not_change_scores(pairs, tmp_path):
    spec, base, task = pairs["qwen2"]
    whole = _scores(base, task)
    # one head per chunk
    np.testing.assert_array_equal(_scores(base, task, max_elements=1), whole)
    # the same weights as many small shards with model.safetensors.index.json
    sharded = tmp_path / "sharded"
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(task)
    save_model(model, sharded, max_shard_size="8KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 3
    np.testing.assert_array_equal(_scores(base, sharded), whole)


def test_reads_only_qkv_weights(pairs):
    spec, base, task = pairs["qwen2"]
    result = localize_scores(str(base), str(task), progress=False, device="cpu")
    qkv = sum(spec.module_rows(m) * spec.hidden_size * 4 for m in spec.modules) * spec.num_layers
    assert result.bytes_read == 2 * qkv  # biases, MLP, embeddings untouched
    assert (base / "model.safetensors").stat().st_size > 5 * qkv


def test_identical_models_score_zero(pairs):
    _, base, _ = pairs["phi3"]
    assert not _scores(base, base).any()


# ---- the command line -------------------------------------------------------------------


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["localize", "--quiet", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_writes_selection_scores_and_heatmap(pairs, tmp_path, capsys):
    spec, base, task = pairs["llama-gqa"]
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, "--base", base, "--task", task, "--out", out, "--ratio", "0.25")
    assert code == 0
    scores = _scores(base, task)
    sel = HeadSelection.load(out / "heads.json", spec=spec)
    k = count_for_ratio(0.25, spec.num_layers, spec.num_heads)
    assert len(sel) == k == math.ceil(0.25 * spec.num_layers * spec.num_heads)
    assert list(sel.heads) == top_k(scores, k)
    np.testing.assert_array_equal(np.array(sel.scores), scores)
    p = sel.provenance
    assert (p.select, p.metric, p.head_repr, p.ratio, p.dtype) == ("top-k", "w1", "product", 0.25, "float32")
    assert (p.base, p.task) == (str(base), str(task))
    rows = (out / "scores.csv").read_text().splitlines()
    assert rows[0] == "layer,head,score" and len(rows) == 1 + spec.total_heads
    csv = {(int(a), int(b)): float(c) for a, b, c in (r.split(",") for r in rows[1:])}
    assert all(csv[(layer, h)] == scores[layer, h] for layer in range(spec.num_layers) for h in range(4))
    from matplotlib.image import imread

    img = imread(out / "heatmap.png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    best = np.unravel_index(np.argmax(scores), scores.shape)
    assert f"{best[0]}:{best[1]}" in stdout and "top heads" in stdout


def test_cli_select_methods_and_explicit_heads(pairs, tmp_path, capsys):
    spec, base, task = pairs["mistral"]
    out = tmp_path / "o"
    argv = ["--base", base, "--task", task, "--out", out, "--ratio", "0.5"]
    assert _run(capsys, *argv, "--select", "random", "--seed", "7")[0] == 0
    sel = HeadSelection.load(out / "heads.json")
    assert sel.provenance.select == "random" and sel.provenance.seed == 7 and sel.scores is not None
    # the heads are the seed-7 draw of ceil(0.5 x 12) heads, not only labelled with it
    drawn = {seed: tuple(sorted(random_heads(LAYERS, 4, 6, seed=seed))) for seed in (7, 0)}
    assert sel.heads == drawn[7] != drawn[0]
    assert _run(capsys, "--base", base, "--task", task, "--out", out, "--heads", "2:3,0:1")[0] == 0
    sel = HeadSelection.load(out / "heads.json")
    assert sel.heads == ((0, 1), (2, 3)) and sel.provenance.select == "explicit" and sel.provenance.ratio is None
    assert _run(capsys, "--base", base, "--task", task, "--out", out, "--select", "none")[0] == 0
    assert len(HeadSelection.load(out / "heads.json")) == 0


def _broken_checkpoints(pairs, root: Path) -> dict[str, tuple[Path, Path, str]]:
    """name -> (base, task, words the error must contain)."""
    spec, base, task = pairs["llama-gqa"]
    cases = {}
    q1 = f"{spec.module_path(1, 'q_proj')}.weight"

    def variant(name: str, edit) -> Path:
        d = root / name
        shutil.copytree(task, d)
        tensors = load_file(d / "model.safetensors")
        edit(tensors)
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        return d

    cases["nan"] = (base, variant("nan", lambda t: t[q1].view(-1).__setitem__(5, float("nan"))), "NaN")
    cases["missing"] = (base, variant("missing", lambda t: t.pop(q1)), "missing")
    cases["shape"] = (base, variant("shape", lambda t: t.__setitem__(q1, t[q1][:-12].clone())), "shape")
    split = root / "missing-shard"  # two shards with an index; the second one is gone
    split.mkdir()
    shutil.copy(task / "config.json", split)
    tensors, weight_map = load_file(task / "model.safetensors"), {}
    names = sorted(tensors)
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, split / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (split / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (split / "model-00002-of-00002.safetensors").unlink()
    cases["missing-shard"] = (base, split, "shard file is missing")
    not_names = root / "index-not-names"  # an index whose shard file names are not strings
    shutil.copytree(split, not_names)
    index = json.loads((not_names / "model.safetensors.index.json").read_text())
    index["weight_map"][q1] = 5
    (not_names / "model.safetensors.index.json").write_text(json.dumps(index))
    cases["index-not-names"] = (base, not_names, "unreadable shard index")
    deep = root / "deep-index"  # JSON nested past Python's recursion limit
    shutil.copytree(split, deep)
    (deep / "model.safetensors.index.json").write_text("[" * 100_000)
    cases["deep-index"] = (base, deep, "unreadable shard index")
    deep_header = root / "deep-header"
    shutil.copytree(task, deep_header)
    (deep_header / "model.safetensors").write_bytes(struct.pack("<Q", 100_000) + b"[" * 100_000)
    cases["deep-header"] = (base, deep_header, "unreadable safetensors shard")
    cases["int8"] = (base, variant("int8", lambda t: t.__setitem__(q1, t[q1].to(torch.int8))), "dtype I8")
    trunc = root / "trunc"
    shutil.copytree(task, trunc)
    with open(trunc / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    cases["truncated"] = (base, trunc, "truncated")
    pickle_only = root / "pickle"
    pickle_only.mkdir()
    shutil.copy(task / "config.json", pickle_only)
    (pickle_only / "pytorch_model.bin").write_bytes(b"\x80\x02")
    cases["pickle"] = (base, pickle_only, "pickle")
    cases["architecture"] = (base, pairs["qwen2"][1], "different architectures")
    cases["no-folder"] = (base, root / "nowhere", "no such model folder")
    cases["hub-offline"] = (base, "no-such-org/no-such-model", "hub download failed")
    return cases


def test_cli_errors_are_one_line_and_leave_outputs_untouched(pairs, tmp_path, capsys):
    spec, base, task = pairs["llama-gqa"]
    out = tmp_path / "out"
    assert _run(capsys, "--base", base, "--task", task, "--out", out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"heads.json", "scores.csv", "heatmap.png", ".alps-localize"}
    ok = ["--base", base, "--task", task, "--out", out]
    flag_cases = {
        "ratio-0": (ok + ["--ratio", "0"], "--ratio"),
        "ratio-big": (ok + ["--ratio", "1.5"], "--ratio"),
        "metric": (ok + ["--metric", "hamming"], "--metric"),
        "head-repr": (ok + ["--head-repr", "qk"], "--head-repr"),
        "select": (ok + ["--select", "best"], "--select"),
        "heads-range": (ok + ["--heads", "9:0"], "outside the model"),
        "dtype": (ok + ["--dtype", "int8"], "--dtype"),
        "device": (ok + ["--device", "tpu"], "--device"),
    }
    if not torch.cuda.is_available():
        flag_cases["no-cuda"] = (ok + ["--device", "cuda"], "CUDA is not available")
    else:
        flag_cases["cuda-index"] = (ok + ["--device", f"cuda:{torch.cuda.device_count()}"], "CUDA device(s)")
    for name, (b, t, words) in _broken_checkpoints(pairs, tmp_path).items():
        flag_cases[name] = (["--base", b, "--task", t, "--out", out], words)
    for name, (argv, words) in flag_cases.items():
        code, stdout, stderr = _run(capsys, *argv)
        assert code == 2, name
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("alps-ds: error: "), (name, stderr)
        assert words in lines[0], (name, lines[0])
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before, name


def test_cli_unwritable_out_is_one_line(pairs, tmp_path, capsys):
    from alps_ds.fsutil import claim_dir

    _, base, task = pairs["llama-gqa"]
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    taken = tmp_path / "taken"
    (taken / "heads.json").mkdir(parents=True)  # a file cannot be renamed over a folder
    claim_dir(taken, "localize")  # an earlier localize output: the write is tried, and fails
    for out, words in ((blocker / "sub", "a-file is a file, not a folder"), (taken, "cannot write")):
        code, _, stderr = _run(capsys, "--base", base, "--task", task, "--out", out)
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("alps-ds: error: --out"), stderr
        assert words in lines[0], lines[0]
    assert blocker.read_text() == "not a folder"
    assert sorted(p.name for p in taken.iterdir()) == [".alps-localize", "heads.json"]
    assert (taken / "heads.json").is_dir()


def test_cli_progress_bar_over_layers(pairs, tmp_path, capsys):
    _, base, task = pairs["gemma"]
    out = tmp_path / "bar"
    assert main(["localize", "--base", str(base), "--task", str(task), "--out", str(out), "--ratio", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "localize" in err and f"{LAYERS}/{LAYERS}" in err
    data = json.loads((out / "heads.json").read_text())
    assert data["num_heads_selected"] == 6 and len(data["scores"]) == LAYERS


# ---- heatmaps -------------------------------------------------------------------------------


def test_text_heatmap_marks_selected_heads_and_shades_by_rank():
    from alps_ds.heatmap import text_heatmap

    scores = np.arange(12.0).reshape(3, 4)
    text = text_heatmap(scores, [(0, 1), (2, 2)])
    rows = [line.split("|")[1] for line in text.splitlines() if "|" in line]
    assert len(rows) == 3 and all(len(r) == 4 for r in rows)
    assert rows[0][1] == "#" and rows[2][2] == "#" and text.count("#") == 3  # two cells + the legend
    assert rows[2][3] == "@" and rows[0][0] == " "  # highest and lowest score
    mask = text_heatmap(np.array([[True, False], [False, False]]))
    assert [line.split("|")[1] for line in mask.splitlines() if "|" in line] == ["#.", ".."]


def test_png_heatmap_panels_side_by_side(tmp_path):
    from matplotlib.image import imread

    from alps_ds.heatmap import Panel, save_heatmap

    scores = np.random.default_rng(0).random((6, 8))
    one = imread(save_heatmap(tmp_path / "one.png", [Panel("a", 6, 8, scores, [(1, 2)])]))
    two = imread(
        save_heatmap(tmp_path / "two.png", [Panel("a", 6, 8, scores, [(1, 2)]), Panel("b", 6, 8, None, [(0, 0)])])
    )
    assert two.shape[0] == one.shape[0] and two.shape[1] > 1.6 * one.shape[1]
    # the selected cell is outlined in red
    assert ((one[..., 0] > 0.9) & (one[..., 1] < 0.2) & (one[..., 2] < 0.2)).sum() > 20
    with pytest.raises(ValueError):
        Panel("bad", 6, 8, np.zeros((5, 8)))
