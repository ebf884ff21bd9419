"""`alps-ds demo --quick` end to end: pre-training, task model, localize, and every arm on 2 DeepSpeed ranks.

One demo run (module fixture) feeds every assertion: both settings, the LoRA arm and the transfer
arms ran and were scored on every task; the element and byte accounting against ZeRO-2
partitioning; what changed in each setting (and frozen rows bit-identical); an independent
greedy-decoding re-score of merged models; the heatmap and the TensorBoard events.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dist import REPO, rank_env

SETTINGS = ("paper", "heads-only")
ARMS = ("alps", "random", "layer-consistent", "all", "none")
QKV = ("q_proj", "k_proj", "v_proj")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    argv = [sys.executable, "-m", "alps_ds", "demo", "--quick", "--out", str(out), "--device", "cpu"]
    proc = subprocess.run(argv, cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    results = json.loads((out / "results.json").read_text())
    return out, proc.stdout, results


def _arm(results, arm, setting="heads-only", dataset="target"):
    (row,) = [r for r in results["arms"] if (r["arm"], r["setting"], r["dataset"]) == (arm, setting, dataset)]
    return row


def _weights(folder):
    from safetensors.numpy import load_file

    return load_file(str(next(Path(folder).glob("*.safetensors"))))


def test_every_setting_arm_and_lora_ran_and_was_scored_on_every_task(demo):
    out, stdout, results = demo
    from alps_ds.demo.tasks import TASKS

    ran = {(r["setting"], r["arm"], r["dataset"]) for r in results["arms"]}
    assert ran == {(s, a, "target") for s in SETTINGS for a in ARMS} | {("lora", "lora", "target")} | {
        ("paper", "alps", "transfer"),
        ("paper", "random", "transfer"),
    }
    for r in results["arms"]:
        ev = r["eval"]
        assert set(ev["per_task"]) == set(TASKS) and all(0 <= a <= 1 for a in ev["per_task"].values())
        assert math.isfinite(ev["loss"]) and ev["loss"] > 0 and 0 <= ev["accuracy"] <= 1
        assert (Path(r["model"]) / "config.json").is_file()
    table = (out / "table.txt").read_text()
    assert table.strip() in stdout.replace("\r", "")
    for label in ("paper (+ rest)", "heads only", "PEFT LoRA r=", "transfer", "base"):
        assert label in table
    for claim in ("Claim 1, task score", "Claim 2, transfer", "Claim 3, less forgetting"):
        (line,) = [ln for ln in table.splitlines() if ln.startswith(claim)]
        # one seed: nothing may be printed as held
        assert "cannot tell from one seed" in line and "HELD" not in line


def test_trainable_elements_and_lora_rank_match_alps(demo):
    _, _, results = demo
    cfg = results["config"]
    hidden, layers, heads = cfg["hidden"], cfg["layers"], cfg["heads"]
    n = {a: _arm(results, a)["trainable_elements"] for a in ARMS}
    assert n["none"] == 0 and n["alps"] == n["random"] == n["layer-consistent"] > 0
    assert n["all"] == layers * 3 * hidden * hidden  # Q, K, V of every layer (plain multi-head attention)
    assert n["alps"] == len(_arm(results, "alps")["heads"]) * 3 * (hidden // heads) * hidden
    lora = _arm(results, "lora", "lora")
    assert lora["trainable_elements"] == layers * 3 * lora["lora_rank"] * 2 * hidden  # A [r, d] and B [d, r]
    assert abs(lora["trainable_elements"] - n["alps"]) <= layers * 3 * 2 * hidden  # within one rank step
    total = sum(v.size for v in _weights(results["base"]).values())
    paper = {a: _arm(results, a, "paper")["trainable_elements"] for a in ARMS}
    assert paper["all"] == total and paper["none"] == total - n["all"]  # the rest trains in every paper arm
    assert paper["alps"] == total - n["all"] + n["alps"]


def test_optimizer_bytes_are_partitioned_master_plus_adam(demo):
    _, _, results = demo
    world = results["world_size"]
    assert world == 2
    for row in results["arms"]:
        if row["trainable_elements"] == 0:
            assert row["optimizer_bytes_per_rank"] == []
            continue
        per_rank = row["optimizer_bytes_per_rank"]
        # fp32 master + two fp32 Adam moments = 12 bytes per trained element, split over the ranks by ZeRO-2
        expected = 12 * row["trainable_elements"] / world
        assert all(expected <= b <= expected * 1.01 + 64 for b in per_rank), (row["arm"], per_rank, expected)
    assert max(_arm(results, "alps")["optimizer_bytes_per_rank"]) < 0.2 * min(
        _arm(results, "all")["optimizer_bytes_per_rank"]
    )


def test_what_changed_in_each_setting(demo):
    """Heads-only: only the ALPS heads' Q/K/V rows moved. Paper setting: the non-attention modules
    changed too, and the ALPS arm's non-selected Q/K/V rows stayed bit-identical to the base."""
    out, _, results = demo
    localized = {tuple(h) for h in json.loads((out / "localize" / "heads.json").read_text())["heads"]}
    hd = results["config"]["hidden"] // results["config"]["heads"]
    base = _weights(results["base"])
    for setting in SETTINGS:
        alps = _arm(results, "alps", setting)
        assert {tuple(h) for h in alps["heads"]} == localized
        tuned = _weights(alps["model"])
        changed_heads, rest_changed = set(), []
        for name, w in base.items():
            diff = np.any(tuned[name] != w, axis=tuple(range(1, w.ndim)))
            if name.rsplit(".", 2)[-2] in QKV:
                layer = int(name.split(".layers.")[1].split(".")[0])
                changed_heads |= {(layer, int(row) // hd) for row in np.flatnonzero(diff)}
            elif diff.any():
                rest_changed.append(name)
        assert changed_heads == localized, setting
        if setting == "heads-only":
            assert rest_changed == []
        else:
            assert any(".mlp." in n for n in rest_changed) and any("o_proj" in n for n in rest_changed)


def test_rescoring_a_merged_model_by_greedy_decoding_reproduces_its_accuracy(demo):
    """An independent scorer: regenerate a held-out set from the seed results.json records and let
    transformers' generate() decode each answer greedily; exact matches equal the recorded accuracy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alps_ds.demo.tasks import Distribution, generate

    _, _, results = demo
    for row in (_arm(results, "alps", "paper"), _arm(results, "lora", "lora")):
        held = results["heldout"]["target"]
        rows = generate([held["task"]], held["count"], held["seed"], dist=Distribution(**held["distribution"]))
        model = AutoModelForCausalLM.from_pretrained(row["model"], dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(row["model"])
        hits = 0
        for r in rows:
            prompt = tok(f"{tok.bos_token}{r['prompt']} |", add_special_tokens=False, return_tensors="pt")
            answer = tok(f"{r['completion']} {tok.eos_token}", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                got = model.generate(**prompt, max_new_tokens=len(answer), do_sample=False, pad_token_id=0)
            hits += got[0, prompt["input_ids"].shape[1] :].tolist() == answer
        assert hits / len(rows) == pytest.approx(row["eval"]["accuracy"], abs=1e-9), row["arm"]


def test_heatmap_and_tensorboard_written(demo):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, results = demo
    assert (out / "localize" / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in results["arms"]:
        if row["trainable_elements"] == 0:
            continue
        acc = EventAccumulator(str(Path(row["run"]) / "tensorboard"))
        acc.Reload()
        assert {"train/loss", "heldout/accuracy"} <= set(acc.Tags()["scalars"]), row["run"]


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
