"""`alps-ds train` end to end on real ranks (CPU, gloo): the tiny run config under every launcher.

Launches (each reused by several tests through module-scoped fixtures):
- ``straight``: torchrun, 2 ranks, ZeRO-2, 12 steps, checkpoints every 6.
- ``half`` then ``resumed``: the same run stopped after 6 steps under the deepspeed launcher, then
  resumed to 12 under mpirun; it must equal ``straight``.
- ``on1``, ``on1z3``: ``half`` resumed by one plain process on ZeRO-2 and on ZeRO-3 (elastic checkpoints).
- ``killed``: torchrun, ZeRO-3 (zero.Init), one rank killed with SIGKILL mid-run, relaunched with --resume.
- ``plain``: one plain process on a model folder: top-k localize against a task model, bf16, chat
  template, packing, train_others=o_proj.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dist import REPO, free_port, launcher_argv, rank_env, run_ranks
from safetensors.torch import load_file

MAIN = REPO / "alps_ds" / "__main__.py"
TINY = REPO / "configs" / "tiny.yaml"
STEPS = 12

pytestmark = pytest.mark.slow


def train_args(out: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(TINY), "--set", f"output.dir={out}", "--set", "logging.progress=false", *extra]


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]


def run_plain(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``alps-ds ARGS`` as one plain process (no launcher variables: a group of one)."""
    env = rank_env()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(
        [sys.executable, str(MAIN), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 or not check, (proc.stdout + proc.stderr)[-4000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """straight (torchrun), half (deepspeed launcher) and resumed (mpirun) runs of configs/tiny.yaml, and
    the half run resumed elastically by one plain process on ZeRO-2 (on1) and on ZeRO-3 (on1z3)."""
    root = tmp_path_factory.mktemp("train")
    straight, split = root / "straight", root / "split"
    run_ranks(MAIN, *train_args(straight), launcher="torchrun")
    run_ranks(MAIN, *train_args(split, "--set", "train.stop_after=6"), launcher="deepspeed")
    out = {"straight": straight, "resumed": split}
    for name in ("half", "on1", "on1z3"):  # half keeps the stopped state for its own asserts
        subprocess.run(["cp", "-r", str(split), str(root / name)], check=True)
        out[name] = root / name
    run_ranks(MAIN, *train_args(split, "--resume"), launcher="mpirun")
    run_plain(*train_args(out["on1"], "--resume"))
    run_plain(*train_args(out["on1z3"], "--resume", "--set", "deepspeed=configs/ds_zero3.json"))
    return out


def changed_rows_expected(out: Path, base: Path | None = None) -> dict[str, set[int]]:
    """Rows each Q/K/V weight may change, from heads.json through the layout (independent of the hook)."""
    from alps_ds.arch import AttentionSpec
    from alps_ds.layout import trainable_rows
    from alps_ds.selection import HeadSelection

    spec = AttentionSpec.from_pretrained(base or out / "base")
    sel = HeadSelection.load(out / "heads.json", spec=spec)
    return {
        f"{spec.module_path(mr.layer, mr.module)}.weight": set(mr.indices())
        for mr in trainable_rows(spec, sel.heads, "group")
    }


def assert_bit_exact(out: Path, base: Path | None = None, trained_full: tuple[str, ...] = ()) -> None:
    """OUT/merged equals the base bit for bit except the selected heads' rows (and ``trained_full`` tensors)."""
    base_dir = base or out / "base"
    allowed = changed_rows_expected(out, base_dir)
    base = load_file(str(base_dir / "model.safetensors"))
    merged = load_file(str(out / "merged" / "model.safetensors"))
    assert base.keys() == merged.keys()
    assert allowed, "the selection trains no rows"
    for key, b in base.items():
        m = merged[key]
        assert m.dtype == b.dtype and m.shape == b.shape, key
        if any(p in key for p in trained_full):
            assert not torch.equal(m, b), f"{key} was meant to train but is unchanged"
            continue
        rows = allowed.get(key, set())
        frozen = [i for i in range(b.shape[0]) if i not in rows]
        assert torch.equal(m[frozen], b[frozen]), f"{key}: a frozen row changed"
        if rows:
            moved = (m[sorted(rows)] != b[sorted(rows)]).any(dim=-1)
            assert moved.all(), f"{key}: selected rows {sorted(rows)} did not all train"


# ---- the straight run ----------------------------------------------------------------------------------------------


def test_loss_falls(runs):
    log = log_of(runs["straight"])
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    first, last = log[0]["loss"], sum(r["loss"] for r in log[-3:]) / 3
    assert last < first - 0.1, f"loss did not fall: {first:.4f} -> {last:.4f}"
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in log)


def test_merged_is_bit_exact_outside_the_selection(runs):
    assert_bit_exact(runs["straight"])


def test_merged_loads_with_from_pretrained(runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = runs["straight"]
    model = AutoModelForCausalLM.from_pretrained(out / "merged")
    tok = AutoTokenizer.from_pretrained(out / "merged")
    ids = tok("### Instruction: Reverse the word.", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()


def test_adapter_merges_into_the_same_model(runs, tmp_path):
    from alps_ds.adapter import merge_adapter_into_checkpoint

    out = runs["straight"]
    merge_adapter_into_checkpoint(out / "base", out / "adapter", tmp_path / "m", progress=False)
    a = load_file(str(tmp_path / "m" / "model.safetensors"))
    b = load_file(str(out / "merged" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_summary(runs):
    s = json.loads((runs["straight"] / "summary.json").read_text())
    log = log_of(runs["straight"])
    assert s["steps"] == STEPS and s["world_size"] == 2 and s["zero_stage"] == 2 and s["zero_init"] is False
    assert s["final_loss"] == pytest.approx(log[-1]["loss"])
    rows = sum(len(r) for r in changed_rows_expected(runs["straight"]).values())
    assert s["trainable_elements"] == rows * 64  # hidden size of the tiny llama
    # ZeRO-2 splits the fp32 master and both Adam moments of the slices across the 2 ranks.
    for per_rank in s["optimizer_bytes_per_rank"]:
        assert per_rank["param_bytes"] == s["trainable_elements"] // 2 * 4
        assert per_rank["state_bytes"] >= s["trainable_elements"] // 2 * 8
    assert s["wall_seconds"] > 0


def test_tensorboard_holds_the_scalars(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["straight"] / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "model/trainable_elements"):
        assert tag in tags["scalars"], tag
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert losses == pytest.approx([r["loss"] for r in log_of(runs["straight"])], rel=1e-6)
    lrs = [e.value for e in acc.Scalars("train/lr")]
    assert max(lrs) == pytest.approx(5e-3, rel=1e-6) and lrs[0] < lrs[1]  # warmup, then decay
    assert "selection/heads" in tags["images"]


def test_checkpoints_hold_no_frozen_weights(runs):
    ckpt = runs["straight"] / "checkpoints"
    from alps_ds.digest import base_record

    pointer = {
        "tag": f"step-{STEPS:08d}",
        "step": STEPS,
        "world_size": 2,
        "zero_stage": 2,
        "batch": 16,
        "base": base_record(runs["straight"] / "base"),
    }
    assert json.loads((ckpt / "latest.json").read_text()) == pointer
    states = torch.load(next((ckpt / f"step-{STEPS:08d}").glob("mp_rank_00_model_states.pt")), weights_only=False)
    names = set(states["module"])
    assert names and all(n.endswith(("head_weight", "head_bias")) for n in names), sorted(names)[:5]


# ---- stop, resume under other launchers ------------------------------------------------------------------------------


def test_stop_after_leaves_a_resumable_checkpoint(runs):
    half = runs["half"]
    assert json.loads((half / "checkpoints" / "latest.json").read_text())["step"] == 6
    assert not (half / "summary.json").exists() and (half / "summary.partial.json").exists()
    assert not (half / "merged").exists()


def test_resume_equals_a_straight_run(runs):
    straight, resumed = log_of(runs["straight"]), log_of(runs["resumed"])
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(straight, resumed):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6), a["step"]
        assert b["lr"] == pytest.approx(a["lr"], abs=1e-12)
    s = json.loads((runs["resumed"] / "summary.json").read_text())
    assert s["resumed_from"] == 6 and s["steps"] == STEPS
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["resumed"] / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()  # the resumed run's TensorBoard still holds every step, the checkpoint's included
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == list(range(1, STEPS + 1))
    assert [e.value for e in events] == pytest.approx([r["loss"] for r in resumed], rel=1e-6)
    a = load_file(str(runs["straight"] / "merged" / "model.safetensors"))
    b = load_file(str(runs["resumed"] / "merged" / "model.safetensors"))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key


def test_resume_on_one_rank_and_another_zero_stage_equals_a_straight_run(runs):
    """The 2-rank ZeRO-2 checkpoint at step 6 resumed by one process on ZeRO-2 and on ZeRO-3 (elastic state).

    Not bit-exact: the same micro-batch gradients are summed in another order (one rank accumulates all
    four; two ranks accumulate two each, then all-reduce), so results agree to float32 rounding (1e-6).
    """
    straight = log_of(runs["straight"])
    base = load_file(str(runs["straight"] / "merged" / "model.safetensors"))
    for name, stage in (("on1", 2), ("on1z3", 3)):
        out = runs[name]
        log = log_of(out)
        assert [r["step"] for r in log] == list(range(1, STEPS + 1)), name
        assert log[:6] == straight[:6], name  # the first run's lines are kept
        for a, b in zip(straight[6:], log[6:]):
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-6), (name, a["step"])
            assert b["lr"] == pytest.approx(a["lr"], abs=1e-12), (name, a["step"])
        s = json.loads((out / "summary.json").read_text())
        assert (s["resumed_from"], s["steps"], s["world_size"], s["zero_stage"]) == (6, STEPS, 1, stage)
        assert json.loads((out / "checkpoints" / "latest.json").read_text())["world_size"] == 1
        merged = load_file(str(out / "merged" / "model.safetensors"))
        for key in base:
            assert torch.allclose(merged[key], base[key], atol=1e-6, rtol=0), (name, key)
        assert_bit_exact(out)


def test_a_damaged_elastic_shard_is_one_line(runs, tmp_path):
    out = tmp_path / "run"
    subprocess.run(["cp", "-r", str(runs["half"]), str(out)], check=True)
    shard = out / "checkpoints" / "step-00000006" / "alps_slices-00001-of-00002.safetensors"
    shard.write_bytes(b"not safetensors")
    pointer = (out / "checkpoints" / "latest.json").read_bytes()
    proc = run_plain(*train_args(out, "--resume"), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"alps-ds: error: {shard}: cannot read slice "), last
    assert (out / "checkpoints" / "latest.json").read_bytes() == pointer and not (out / "merged").exists()


def ds_fp32_slices(ckpt: Path) -> dict[str, torch.Tensor]:
    """The trained slices as DeepSpeed's own converter reads them from ``ckpt`` (it finds the tag in ``latest``)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), exclude_frozen_parameters=True)


def assert_slices_are_the_merged_rows(slices: dict[str, torch.Tensor], out: Path) -> None:
    merged = load_file(str(out / "merged" / "model.safetensors"))
    rows = changed_rows_expected(out)
    assert slices and all(name.endswith(".head_weight") for name in slices), sorted(slices)
    for name, value in slices.items():
        key = name.removesuffix(".head_weight") + ".weight"
        assert torch.equal(value, merged[key][sorted(rows[key])]), name
    assert {n.removesuffix(".head_weight") + ".weight" for n in slices} == set(rows)


def test_deepspeed_zero_to_fp32_reads_the_checkpoint(runs, tmp_path):
    """DeepSpeed's converter, as a function and as the script it copied beside the checkpoint (a fresh process),
    finds the last tag through ``latest`` and gives exactly the trained rows of merged/."""
    out = runs["straight"]
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == f"step-{STEPS:08d}"
    assert_slices_are_the_merged_rows(ds_fp32_slices(ckpt), out)
    subprocess.run(
        [sys.executable, str(ckpt / "zero_to_fp32.py"), str(ckpt), str(tmp_path), "--exclude_frozen_parameters"]
        + ["--safe_serialization"],
        check=True,
        env=rank_env(),
        capture_output=True,
    )
    assert_slices_are_the_merged_rows(load_file(str(tmp_path / "model.safetensors")), out)


# ---- kill -9 one rank, relaunch with --resume ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("killed") / "run"
    args = train_args(
        out,
        "--set",
        "deepspeed=configs/ds_zero3.json",
        "--set",
        "train.max_steps=24",
        "--set",
        "output.checkpoint_every=4",
    )
    import psutil

    argv = launcher_argv("torchrun", 2, free_port()) + [str(MAIN), *args]
    proc = subprocess.Popen(argv, cwd=REPO, env=rank_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    latest = out / "checkpoints" / "latest.json"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and json.loads(latest.read_text())["step"] >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the kill:\n" + proc.stdout.read().decode()[-3000:]
    ranks = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if str(MAIN) in " ".join(child.cmdline()):
                ranks.append(child)
        except psutil.Error:  # a short-lived helper process that exited (or is a zombie) meanwhile
            pass
    assert len(ranks) == 2
    ranks[-1].send_signal(signal.SIGKILL)
    proc.wait(timeout=300)
    killed_log = log_of(out)
    run_ranks(MAIN, *args, "--resume", launcher="torchrun")
    return {"out": out, "rc": proc.returncode, "killed_log": killed_log}


def test_kill_one_rank_then_resume_completes(killed):
    out = killed["out"]
    assert killed["rc"] != 0
    assert len(killed["killed_log"]) < 24
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 24 and s["zero_stage"] == 3 and s["zero_init"] is True
    assert 4 <= s["resumed_from"] < 24
    assert [r["step"] for r in log_of(out)] == list(range(1, 25))
    assert_bit_exact(out)
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert kept == ["step-00000020", "step-00000024"]  # keep_checkpoints: 2
    assert_slices_are_the_merged_rows(ds_fp32_slices(out / "checkpoints"), out)  # a ZeRO-3 checkpoint


# ---- one plain process ---------------------------------------------------------------------------------------------


PERTURBED = [(0, 2), (1, 0)]


def make_base_and_task(root: Path) -> tuple[Path, Path]:
    """A tiny llama with the byte tokenizer, and a 'task' copy whose PERTURBED heads' Q rows moved."""
    from alps_ds.arch import AttentionSpec
    from alps_ds.tiny import build_model, save_model, tiny_config
    from alps_ds.train.tokenizer import BYTE_VOCAB, save_byte_tokenizer

    config = tiny_config("llama", vocab=BYTE_VOCAB, max_positions=1024)
    spec = AttentionSpec.from_config(config)
    model = build_model(config, seed=3)
    base, task = root / "base", root / "task"
    save_model(model, base)
    save_byte_tokenizer(base)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer, head in PERTURBED:
            block = spec.rows("q", head)
            w = model.get_submodule(spec.module_path(layer, block.module)).weight
            w[block.start : block.stop] += torch.randn(w[block.start : block.stop].shape, generator=gen)
    save_model(model, task)
    return base, task


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> dict:
    """One plain process: a model folder, top-k localize against a task model, bf16, chat template, packing."""
    root = tmp_path_factory.mktemp("plain")
    base, task = make_base_and_task(root)
    out = root / "run"
    ds = json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}})
    args = train_args(
        out,
        "--set",
        f"model.path={base}",
        "--set",
        f"selection={{method: top-k, task: {task}, ratio: 0.25}}",
        "--set",
        f"deepspeed={ds}",
        "--set",
        "data.template=chat",
        "--set",
        "data.packing=true",
        "--set",
        "train_others=[o_proj]",
        "--set",
        "train.micro_batch=2",
    )
    run_plain(*args)
    return {"out": out, "base": base, "task": task}


def test_plain_process_localizes_then_trains_bf16_chat_packing(plain):
    out = plain["out"]
    heads = json.loads((out / "heads.json").read_text())
    assert [tuple(h) for h in heads["heads"]] == PERTURBED and heads["provenance"]["select"] == "top-k"
    assert heads["scores"] is not None
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 1 and s["dtype"] == "bfloat16" and s["steps"] == STEPS
    log = log_of(out)
    assert sum(r["loss"] for r in log[-3:]) / 3 < log[0]["loss"]
    assert_bit_exact(out, base=plain["base"], trained_full=("o_proj",))


def test_train_top_k_writes_the_heads_json_alps_ds_localize_writes(plain, tmp_path, capsys):
    """Both go through alps_ds.localize.make_selection: the same heads, scores and provenance, byte for byte."""
    from alps_ds.cli import main

    out = tmp_path / "localized"
    argv = ["localize", "--base", str(plain["base"]), "--task", str(plain["task"]), "--out", str(out)]
    assert main([*argv, "--ratio", "0.25", "--quiet"]) == 0
    by_train = json.loads((plain["out"] / "heads.json").read_text())
    by_localize = json.loads((out / "heads.json").read_text())
    assert by_train["provenance"]["dtype"] == "float32" and by_train["provenance"]["alps_ds_version"]
    assert by_train["provenance"]["seed"] is None  # top-k draws nothing at random
    assert by_train == by_localize
