"""`alps-ds train --set engine=megatron` end to end (CPU, gloo, megatron-core): configs/tiny.yaml.

Launches (module-scoped, shared by every test here):
- ``llama``: tiny llama (4 heads, 2 kv heads: GQA), 2 ranks, parallel.tp=2, 12 steps, checkpoints at 6 and 12.
- ``qwen2``: tiny qwen2 (q/k/v biases), 2 ranks, parallel.tp=2.
- ``qwen2_ds``: the same config, selection, seed and data on engine deepspeed (one process: the same
  micro-batches per optimizer step as tp=2 x dp=1).
- ``resumed``: ``llama``'s state after its tp=2 step-6 checkpoint (as a crash after step 6 leaves it),
  resumed at tp=1 in one process to the end.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from dist import REPO, run_ranks
from safetensors.torch import load_file

MAIN = REPO / "alps_ds" / "__main__.py"
TINY = REPO / "configs" / "tiny.yaml"
STEPS = 12

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core not installed"),
]


def args(out: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(TINY), "--set", f"output.dir={out}", "--set", "logging.progress=false", *extra]


def megatron(out: Path, family: str, tp: int, *extra: str) -> list[str]:
    return args(
        out, "--set", f"model.path=tiny:{family}", "--set", "engine=megatron", "--set", f"parallel.tp={tp}", *extra
    )


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("megatron_engine")
    out = {name: root / name for name in ("llama", "qwen2", "qwen2_ds", "resumed")}
    run_ranks(MAIN, *megatron(out["llama"], "llama", 2))
    run_ranks(MAIN, *megatron(out["qwen2"], "qwen2", 2))
    run_ranks(MAIN, *args(out["qwen2_ds"], "--set", "model.path=tiny:qwen2"), nproc=1)
    # A crash after step 6: the step-6 checkpoint is the latest complete one, nothing exported yet.
    shutil.copytree(out["llama"], out["resumed"])
    ckpt = out["resumed"] / "checkpoints"
    shutil.rmtree(ckpt / "step-00000012")
    for name in ("merged", "adapter", "summary.json"):
        path = out["resumed"] / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    pointer = json.loads((ckpt / "latest.json").read_text())
    (ckpt / "latest.json").write_text(json.dumps({**pointer, "tag": "step-00000006", "step": 6}) + "\n")
    run_ranks(MAIN, *megatron(out["resumed"], "llama", 1, "--resume"), nproc=1)
    return out


def expected_rows(out: Path) -> dict[str, set[int]]:
    """HF tensor -> rows the selection may change (weights and biases), from heads.json through the layout."""
    from alps_ds.arch import AttentionSpec
    from alps_ds.layout import trainable_rows
    from alps_ds.selection import HeadSelection

    spec = AttentionSpec.from_pretrained(out / "base")
    sel = HeadSelection.load(out / "heads.json", spec=spec)
    rows = {}
    for mr in trainable_rows(spec, sel.heads, "group"):
        for leaf in ("weight", "bias") if spec.qkv_bias else ("weight",):
            rows[f"{spec.module_path(mr.layer, mr.module)}.{leaf}"] = set(mr.indices())
    return rows


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_loss_falls(runs, name):
    log = log_of(runs[name])
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    first, last = log[0]["loss"], sum(r["loss"] for r in log[-3:]) / 3
    assert last < first - 0.05, f"loss did not fall: {first:.4f} -> {last:.4f}"
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in log)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_merged_is_the_base_outside_the_selected_rows(runs, name):
    from transformers import AutoModelForCausalLM

    out = runs[name]
    allowed = expected_rows(out)
    base = load_file(str(out / "base" / "model.safetensors"))
    merged = load_file(str(out / "merged" / "model.safetensors"))
    assert base.keys() == merged.keys() and allowed
    assert any(k.endswith("bias") for k in allowed) == (name == "qwen2")
    for key, b in base.items():
        m = merged[key]
        assert m.dtype == b.dtype and m.shape == b.shape, key
        rows = sorted(allowed.get(key, ()))
        frozen = [i for i in range(b.shape[0]) if i not in allowed.get(key, ())]
        assert torch.equal(m[frozen], b[frozen]), f"{key}: a frozen row changed"
        if rows:
            moved = m[rows] != b[rows]
            assert (moved.any(dim=-1) if m.dim() > 1 else moved).all(), f"{key}: a selected row did not train"
    model, info = AutoModelForCausalLM.from_pretrained(out / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(
        model.state_dict()["model.layers.1.self_attn.q_proj.weight"], merged["model.layers.1.self_attn.q_proj.weight"]
    )


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_adapter_merges_into_the_same_model(runs, name, tmp_path):
    from alps_ds.adapter import merge_adapter_into_checkpoint

    out = runs[name]
    merge_adapter_into_checkpoint(out / "base", out / "adapter", tmp_path / "m", progress=False)
    a = load_file(str(tmp_path / "m" / "model.safetensors"))
    b = load_file(str(out / "merged" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_outputs_and_optimizer_hold_only_the_slices(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = runs["llama"]
    s = json.loads((out / "summary.json").read_text())
    assert s["engine"] == "megatron" and s["tp"] == 2 and s["world_size"] == 2 and s["steps"] == STEPS
    # fp32 params the optimizer steps and the DDP grad buffers: exactly the slice elements of each rank
    assert sum(r["param_bytes"] for r in s["optimizer_bytes_per_rank"]) == 4 * s["trainable_elements"]
    for r in s["optimizer_bytes_per_rank"]:
        assert r["grad_buffer_bytes"] == r["param_bytes"]
        assert 2 * r["param_bytes"] <= r["state_bytes"] <= 2 * r["param_bytes"] + 64  # Adam moments + step counters
    assert s["trainable_elements"] < s["total_elements"] / 10
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, STEPS + 1))
    assert (out / "heads.json").exists() and (out / "run_config.json").exists()


def test_deepspeed_and_megatron_train_the_same_model(runs):
    mg, ds = runs["qwen2"], runs["qwen2_ds"]
    assert json.loads((mg / "heads.json").read_text())["heads"] == json.loads((ds / "heads.json").read_text())["heads"]
    a = load_file(str(mg / "merged" / "model.safetensors"))
    b = load_file(str(ds / "merged" / "model.safetensors"))
    base = load_file(str(mg / "base" / "model.safetensors"))
    # The same math in another order (fused qkv, TP all-reduces): fp32 rounding, amplified a little by Adam.
    for key in expected_rows(mg):
        moved = (b[key] - base[key]).abs().max()
        assert (a[key] - b[key]).abs().max() <= 1e-3 * moved, key
    for m_log, d_log in zip(log_of(mg), log_of(ds)):
        assert m_log["loss"] == pytest.approx(d_log["loss"], rel=1e-5)


def test_tp2_checkpoint_resumes_at_tp1(runs):
    straight, resumed = runs["llama"], runs["resumed"]
    pointer = json.loads((resumed / "checkpoints" / "latest.json").read_text())
    assert pointer["engine"] == "megatron" and pointer["tp"] == 1 and pointer["step"] == STEPS
    s = json.loads((resumed / "summary.json").read_text())
    assert s["resumed_from"] == 6 and s["steps"] == STEPS and s["tp"] == 1
    # resharded slices and Adam state: the rest of the run is the uninterrupted tp=2 run's
    for a, b in zip(log_of(straight), log_of(resumed)):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    m1 = load_file(str(straight / "merged" / "model.safetensors"))
    m2 = load_file(str(resumed / "merged" / "model.safetensors"))
    assert all(torch.allclose(m1[k], m2[k], rtol=0, atol=1e-6) for k in m1)


def test_a_deepspeed_checkpoint_is_refused_by_engine_megatron(runs, tmp_path):
    import subprocess
    import sys

    from dist import rank_env

    out = tmp_path / "ds"
    shutil.copytree(runs["qwen2_ds"], out)
    cmd = [sys.executable, str(MAIN)]
    proc = subprocess.run(
        cmd + megatron(out, "qwen2", 1, "--resume"), cwd=REPO, env=rank_env(), capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "was written by engine deepspeed; resume it with --set engine=deepspeed" in proc.stderr
