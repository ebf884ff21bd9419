"""`alps-ds demo --quick` end to end: real pre-training, task model, localize and five 2-rank DeepSpeed arms.

One demo run (module fixture, ~1-2 min on 2 cores) feeds every assertion: the printed table,
the element and byte accounting against ZeRO-2 partitioning, frozen rows bit-identical in the
ALPS arm's merged model, the heatmap and the TensorBoard events.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dist import REPO, rank_env

ARM_LABELS = ("ALPS 10 %", "random 10 %", "layer-consistent 10 %", "all heads", "no heads (Q/K/V frozen)")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    argv = [sys.executable, "-m", "alps_ds", "demo", "--quick", "--out", str(out), "--device", "cpu"]
    proc = subprocess.run(argv, cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    results = json.loads((out / "results.json").read_text())
    return out, proc.stdout, results


def _arm(results, name):
    (row,) = [r for r in results["arms"] if r["arm"] == name]
    return row


def test_table_has_every_arm_with_numbers(demo):
    out, stdout, _ = demo
    table = (out / "table.txt").read_text()
    assert table in stdout.replace("\r", "") or table.strip() in stdout
    for label in ARM_LABELS:
        (line,) = [ln for ln in table.splitlines() if ln.startswith(label + " ")]
        numbers = re.findall(r"\d[\d,]*\.?\d*", line[len(label) :])
        loss, acc = float(numbers[-2]), float(numbers[-1])
        assert math.isfinite(loss) and loss > 0
        assert 0 <= acc <= 1
    assert re.search(r"ALPS (won among the same-size arms|did NOT win at this scale)", table)


def test_trainable_elements_order(demo):
    _, _, results = demo
    n = {a: _arm(results, a)["trainable_elements"] for a in ("none", "alps", "random", "layer-consistent", "all")}
    assert n["none"] == 0
    assert n["alps"] == n["random"] == n["layer-consistent"] > 0
    assert n["alps"] < n["all"]
    cfg = results["config"]
    hidden, layers, heads = cfg["hidden"], cfg["layers"], cfg["heads"]
    head_dim = hidden // heads
    assert n["all"] == layers * 3 * hidden * hidden  # Q, K, V of every layer (plain multi-head attention)
    assert n["alps"] == len(_arm(results, "alps")["heads"]) * 3 * head_dim * hidden


def test_optimizer_bytes_are_partitioned_master_plus_adam(demo):
    _, _, results = demo
    world = results["world_size"]
    assert world == 2
    for arm in ("alps", "random", "layer-consistent", "all"):
        row = _arm(results, arm)
        per_rank = row["optimizer_bytes_per_rank"]
        assert len(per_rank) == world
        # fp32 master + two fp32 Adam moments = 12 bytes per trained element, split over the ranks by ZeRO-2
        # (plus a few bytes of step counters and padding).
        expected = 12 * row["trainable_elements"] / world
        assert all(expected <= b <= expected * 1.01 + 64 for b in per_rank), (arm, per_rank, expected)
    alps, full = _arm(results, "alps"), _arm(results, "all")
    assert max(alps["optimizer_bytes_per_rank"]) < 0.2 * min(full["optimizer_bytes_per_rank"])
    assert _arm(results, "none")["optimizer_bytes_per_rank"] == []


def test_alps_arm_trains_the_localized_heads_only(demo):
    """The merged ALPS model differs from the base only in the localized heads' Q/K/V rows."""
    from safetensors.numpy import load_file

    out, _, results = demo
    localized = json.loads((out / "localize" / "heads.json").read_text())["heads"]
    alps = _arm(results, "alps")
    assert alps["heads"] == localized == results["alps_heads"]
    base = load_file(str(next((out / "runs" / "pretrain" / "merged").glob("*.safetensors"))))
    tuned = load_file(str(next((out / "runs" / "alps-seed0" / "merged").glob("*.safetensors"))))
    hd = results["config"]["hidden"] // results["config"]["heads"]
    changed_heads = set()
    for name, w in base.items():
        diff = np.any(tuned[name] != w, axis=tuple(range(1, w.ndim)))
        if ".self_attn." in name and name.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj"):
            layer = int(name.split(".layers.")[1].split(".")[0])
            changed_heads |= {(layer, int(row) // hd) for row in np.flatnonzero(diff)}
        else:
            assert not diff.any(), f"{name} changed but only Q/K/V head rows train"
    assert changed_heads == {tuple(h) for h in localized}


def test_training_moved_the_held_out_loss(demo):
    _, _, results = demo
    assert _arm(results, "all")["eval"]["loss"] < _arm(results, "none")["eval"]["loss"]
    for arm in ("alps", "random", "layer-consistent", "all"):
        row = _arm(results, arm)
        assert row["steps"] == results["config"]["arm_steps"]


def test_heatmap_and_tensorboard_written(demo):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = demo
    assert (out / "localize" / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for run in ("pretrain", "task-model", "alps-seed0", "random-seed0", "layer-consistent-seed0", "all-seed0"):
        acc = EventAccumulator(str(out / "runs" / run / "tensorboard"))
        acc.Reload()
        tags = acc.Tags()["scalars"]
        assert "train/loss" in tags, (run, tags)
    acc = EventAccumulator(str(out / "runs" / "none-seed0" / "tensorboard"))
    acc.Reload()
    assert "heldout/accuracy" in acc.Tags()["scalars"]


def test_recorded_paths_name_out(demo):
    """The demo is built beside OUT and swapped in at the end: what it recorded must still name real files."""
    out, _, results = demo
    for key in ("base", "task", "heatmap"):
        assert results[key].startswith(str(out)) and Path(results[key]).exists(), (key, results[key])
    for arm in results["arms"]:
        assert Path(arm["run"]).is_dir(), arm["run"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no temporary folder left beside it


def test_refuses_a_folder_that_is_not_a_previous_demo(tmp_path, capsys):
    from alps_ds.cli import main

    keep = tmp_path / "mine.txt"
    keep.write_text("precious")
    assert main(["demo", "--out", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alps-ds: error: --out") and "was not written by alps-ds demo" in err and "\n" not in err
    assert keep.read_text() == "precious"


def test_unknown_task_is_one_line_error(tmp_path, capsys):
    from alps_ds.cli import main

    assert main(["demo", "--task", "juggle", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--task 'juggle' is unknown" in err and "reverse" in err
    assert not (tmp_path / "x").exists()
