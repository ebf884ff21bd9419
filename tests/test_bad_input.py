"""Bad input across every command: one clear line, a non-zero exit, and nothing on disk changed.

Each case runs the real CLI (``alps_ds.cli.main``) against a folder of real files (tiny
checkpoints written by transformers, a heads.json, an adapter, outputs of earlier runs).
Every file under that folder, and the working directory, is hashed before and after: a
failed command must not create, change or delete anything. The message must be ONE line
``alps-ds: error: ...`` naming the file, flag or key at fault and what to do.

Cases that fail only once ``alps-ds train`` is running (DeepSpeed, a process group, the model,
the data) run in one helper process (tests/scripts/cli_cases.py) to pay the imports once.
Command-specific error tests live beside each command (test_localize, test_heads,
test_train_config, test_launch, test_hosts, test_adapter); this suite covers the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from dist import REPO, rank_env

from alps_ds.cli import main


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # "{root}" stands for the fixture folder
    words: tuple[str, ...]  # all must appear in the error line: the culprit, and the fix


def C(cid: str, argv: str, *words: str) -> Case:
    return Case(cid, tuple(argv.split()), words)


# ---- cases that fail before any heavy work: run in-process ---------------------------------------------------------

FAST = [
    # localize (flags and broken checkpoints of test_localize are not repeated here)
    C(
        "localize-out-is-a-file",
        "localize --base {root}/base --task {root}/task --out {root}/heads.json",
        "--out",
        "heads.json",
        "not a folder",
        "choose another --out",
    ),
    C(
        "localize-heads-and-select",
        "localize --base {root}/base --task {root}/task --out {root}/prev --heads 0:1 --select all",
        "--heads and --select",
        "use one",
    ),
    C(
        "localize-no-config",
        "localize --base {root}/empty --task {root}/task --out {root}/prev",
        "empty",
        "no config.json",
        "Hugging Face model folder",
    ),
    C("localize-unsupported-arch", "localize --base {root}/bert --task {root}/bert --out {root}/prev", "bert", "llama"),
    C(
        "localize-broken-index",
        "localize --base {root}/base --task {root}/bad_index --out {root}/prev",
        "model.safetensors.index.json",
        "unreadable shard index",
        "re-save",
    ),
    C(
        "localize-missing-shard",
        "localize --base {root}/sharded --task {root}/lost_shard --out {root}/prev",
        "lost_shard",
        "missing",
        "complete checkpoint",
    ),
    # layout
    C(
        "layout-heads-for-another-model",
        "layout --heads {root}/other_heads.json --model {root}/base --tp 2",
        "other_heads.json",
        "made for another model",
        "localize again",
    ),
    C(
        "layout-tp-does-not-divide-heads",
        "layout --heads {root}/heads.json --model {root}/base --tp 3",
        "tp 3",
        "pick a TP size",
    ),
    C(
        "layout-rebalance-without-scores",
        "layout --heads {root}/heads.json --model {root}/base --tp 2 --rebalance --out {root}/rebalanced.json",
        "heads.json",
        "scores",
        "localize with --select top-k",
    ),
    C(
        "layout-more-stages-than-layers",
        "layout --heads {root}/heads.json --model {root}/base --pp 4",
        "4 pipeline stages",
        "pick sizes",
    ),
    C("layout-zero-vpp", "layout --heads {root}/heads.json --model {root}/base --vpp 0", "--vpp", "at least 1, got 0"),
    C(
        "layout-negative-stage-layers",
        "layout --heads {root}/heads.json --model {root}/base --pp 2 --first-stage-layers -1",
        "--first-stage-layers",
        "at least 0, got -1",
    ),
    C(
        "layout-negative-rebalance-cap",
        "layout --heads {root}/heads.json --model {root}/base --rebalance -1",
        "--rebalance",
        "at least 1, got -1",
    ),
    C(
        "layout-not-a-heads-file",
        "layout --heads {root}/base/config.json --model {root}/base",
        "config.json",
        "not a heads.json",
    ),
    C(
        "layout-truncated-heads",
        "layout --heads {root}/truncated_heads.json --model {root}/base",
        "truncated_heads.json",
        "not valid JSON",
        "localize again",
    ),
    # plan
    C("plan-no-model", "plan --model {root}/nowhere", "nowhere", "no config.json"),
    C(
        "plan-heads-for-another-model",
        "plan --model {root}/base --heads {root}/other_heads.json",
        "other_heads.json",
        "made for another model",
    ),
    C("plan-gpus-not-divisible", "plan --model {root}/base --tp 3", "tp*pp = 3", "--dp"),
    C("plan-headroom", "plan --model {root}/base --headroom 1", "--headroom", "[0, 1)"),
    C("plan-offload-without-zero", "plan --model {root}/base --zero 0 --offload", "--offload", "--zero 1, 2 or 3"),
    C("plan-zero-tp", "plan --model {root}/base --tp 0", "--tp", "at least 1, got 0"),
    C("plan-more-stages-than-layers", "plan --model {root}/base --pp 4 --dp 1", "--pp 4", "2 layers"),
    C("plan-train-others-unknown", "plan --model {root}/base --train-others nope", "--train-others 'nope'", "mlp"),
    C("plan-ratio-out-of-range", "plan --model {root}/base --ratio 2", "--ratio", "2 is outside (0, 1]"),
    # merge (every case targets an existing output that must survive)
    C(
        "merge-not-an-adapter",
        "merge --base {root}/base --adapter {root}/heads.json --out {root}/prev_merged",
        "heads.json",
        "not an alps-ds adapter",
    ),
    C(
        "merge-out-is-base",
        "merge --base {root}/base --adapter {root}/adapter --out {root}/base",
        "--out",
        "is the input",
        "choose a new --out",
    ),
    C(
        "merge-adapter-for-another-model",
        "merge --base {root}/other --adapter {root}/adapter --out {root}/prev_merged",
        "adapter",
        "made for another model",
    ),
    C(
        "merge-corrupt-adapter-json",
        "merge --base {root}/base --adapter {root}/bad_adapter --out {root}/prev_merged",
        "adapter.json",
        "not valid JSON",
        "save the adapter again",
    ),
    # launch / check
    C(
        "launch-missing-hostfile",
        "launch --hostfile {root}/nohosts --dry-run -- --config {root}/run.yaml",
        "nohosts",
        "cannot read the hostfile",
        "existing text file",
    ),
    C("launch-slurm-outside-a-job", "launch --slurm -- --config {root}/run.yaml", "SLURM_JOB_NODELIST", "sbatch"),
    C("launch-slurm-with-mpi", "launch --slurm --mpi -- --config {root}/run.yaml", "--slurm with --mpi", "srun"),
    C(
        "launch-zero-ranks",
        "launch --nproc-per-node 0 --dry-run -- --config {root}/run.yaml",
        "--nproc-per-node",
        "at least 1",
    ),
    C("check-yaml-syntax", "check --world-size 2 --config {root}/broken.yaml", "broken.yaml", "line", "fix the syntax"),
    # heads
    C("heads-show-truncated", "heads show {root}/truncated_heads.json", "truncated_heads.json", "not valid JSON"),
    # train: the run config is checked before anything starts
    C("train-no-config-file", "train --config {root}/nope.yaml", "nope.yaml", "no such file", "--config"),
    C("train-unknown-key", "train --config {root}/typo.yaml", "typo.yaml", "train.lrr", "unknown key", "lr"),
    C("train-set-without-equals", "train --config {root}/run.yaml --set train.lr", "--set", "KEY=VALUE"),
    C(
        "train-set-wrong-type",
        "train --config {root}/run.yaml --set train.micro_batch=two",
        "train.micro_batch",
        "an integer",
        "'two'",
    ),
    C(
        "train-top-k-without-task",
        "train --config {root}/run.yaml --set selection.heads=null --set selection.method=top-k",
        "selection.task",
        "heads.json",
    ),
]

# ---- cases that fail inside a started training run: one helper process ---------------------------------------------

RUNTIME = [
    C(
        "train-model-path-missing",
        "train --config {root}/run.yaml --set model.path={root}/nowhere --set output.dir={root}/runs/a",
        "model.path",
        "nowhere",
        "does not exist",
    ),
    C(
        "train-model-without-config",
        "train --config {root}/run.yaml --set model.path={root}/empty --set output.dir={root}/runs/b",
        "model.path",
        "config.json",
    ),
    C(
        "train-data-file-missing",
        "train --config {root}/run.yaml --set data.datasets=[{root}/missing.jsonl] --set output.dir={root}/runs/c",
        "missing.jsonl",
        "no such data file",
    ),
    C(
        "train-bad-data-row",
        "train --config {root}/run.yaml --set data.datasets=[{root}/bad_row.jsonl] --set output.dir={root}/runs/d",
        "bad_row.jsonl",
        "3",
        "instruction",
    ),
    C(
        "train-heads-for-another-model",
        "train --config {root}/run.yaml --set selection.heads={root}/other_heads.json --set output.dir={root}/runs/e",
        "other_heads.json",
        "made for another model",
    ),
    C(
        "train-output-holds-checkpoints",
        "train --config {root}/run.yaml --set output.dir={root}/prev_run",
        "prev_run",
        "already holds checkpoints",
        "--resume",
    ),
    C(
        "train-deepspeed-json-conflict",
        "train --config {root}/run.yaml --set deepspeed={root}/ds_conflict.json --set output.dir={root}/runs/f",
        "ds_conflict.json",
        "train_batch_size",
        "remove the key",
    ),
    C(
        "train-batch-not-divisible",
        "train --config {root}/run.yaml --set train.batch=6 --set train.micro_batch=4 --set output.dir={root}/runs/g",
        "train.batch",
        "not a multiple",
        "divisible",
    ),
    C(
        "train-resume-corrupt-pointer",
        "train --config {root}/run.yaml --set output.dir={root}/corrupt_run --resume",
        "latest.json",
        "unreadable checkpoint pointer",
        "delete it",
    ),
]


def test_enough_cases_across_commands():
    cases = FAST + RUNTIME
    assert len(cases) >= 25 and len({c.id for c in cases}) == len(cases)
    commands = {c.argv[0] for c in cases}
    assert {"localize", "train", "layout", "launch", "check", "merge", "plan", "heads"} <= commands


# ---- the fixture folder -------------------------------------------------------------------------------------------


def digest(*roots: Path) -> dict[str, str]:
    """Relative path -> sha256 (or 'dir') of everything under ``roots``: any change shows up."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for d in dirnames:
                out[str(Path(dirpath, d))] = "dir"
            for f in filenames:
                p = Path(dirpath, f)
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Real files for the bad inputs to point at, and outputs of earlier runs that must survive."""
    from safetensors.torch import load_file

    from alps_ds.adapter import merge_adapter_into_checkpoint, save_adapter
    from alps_ds.arch import AttentionSpec
    from alps_ds.fsutil import claim_dir
    from alps_ds.selection import HeadSelection, Provenance
    from alps_ds.sparse import apply
    from alps_ds.tiny import build_model, save_model, tiny_config
    from alps_ds.train.tokenizer import BYTE_VOCAB, save_byte_tokenizer

    root = tmp_path_factory.mktemp("bad_input")
    cfg = tiny_config("llama", vocab=BYTE_VOCAB, hidden=32, max_positions=256)
    spec = AttentionSpec.from_config(cfg)
    save_model(build_model(cfg, seed=0), root / "base")
    save_byte_tokenizer(root / "base")
    save_model(build_model(cfg, seed=1), root / "task")
    save_model(build_model(cfg, seed=0), root / "sharded", max_shard_size="20KB")
    other_cfg = tiny_config("qwen2", layers=3, hidden=32, heads=4, kv_heads=2)
    save_model(build_model(other_cfg, seed=0), root / "other")
    sel = HeadSelection(spec.fingerprint, ((0, 1), (1, 2)), Provenance("explicit"))
    sel.save(root / "heads.json")
    other_spec = AttentionSpec.from_config(other_cfg)
    HeadSelection(other_spec.fingerprint, ((0, 1),), Provenance("explicit")).save(root / "other_heads.json")
    text = (root / "heads.json").read_text()
    (root / "truncated_heads.json").write_text(text[: len(text) // 2])
    (root / "empty").mkdir()
    (root / "bert").mkdir()
    (root / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 2}))

    shutil.copytree(root / "sharded", root / "bad_index")  # sharded: beside model.safetensors an index is unused
    index = root / "bad_index" / "model.safetensors.index.json"
    index.write_text('{"weight_map": ')  # cut off mid-write
    shutil.copytree(root / "sharded", root / "lost_shard")
    weight_map = json.loads((root / "lost_shard" / "model.safetensors.index.json").read_text())["weight_map"]
    q0 = f"{spec.module_path(0, 'q_proj')}.weight"
    (root / "lost_shard" / weight_map[q0]).unlink()

    model = build_model(cfg, seed=0)
    apply(model, sel)
    save_adapter(model, root / "adapter")
    shutil.copytree(root / "adapter", root / "bad_adapter")
    (root / "bad_adapter" / "adapter.json").write_text("{ not json")
    assert load_file(str(root / "adapter" / "adapter.safetensors"))  # a real, non-empty adapter

    # Earlier outputs a failing command must leave as they are (each with its command's marker).
    (root / "prev").mkdir()
    for name in ("heads.json", "scores.csv", "heatmap.png"):
        (root / "prev" / name).write_bytes(b"earlier localize output: " + name.encode())
    claim_dir(root / "prev", "localize")
    merge_adapter_into_checkpoint(root / "base", root / "adapter", root / "prev_merged", progress=False)
    prev_run = claim_dir(root / "prev_run", "train")
    (prev_run / "checkpoints" / "step-00000006").mkdir(parents=True)
    (prev_run / "checkpoints" / "latest.json").write_text('{"tag": "step-00000006", "step": 6}\n')
    (prev_run / "run_config.json").write_text('{"earlier": "run"}\n')
    (prev_run / "summary.partial.json").write_text('{"steps": 6}\n')
    shutil.copytree(prev_run, root / "corrupt_run")
    (root / "corrupt_run" / "checkpoints" / "latest.json").write_text('{"tag": ')

    rows = [{"instruction": "Repeat the word.", "input": w, "output": w} for w in ("cat", "dog", "owl", "elk")]
    good = "".join(json.dumps(r) + "\n" for r in rows * 4)
    (root / "good.jsonl").write_text(good)
    bad = rows[:2] + [{"instruction": 7, "input": "x", "output": "y"}] + rows
    (root / "bad_row.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    (root / "ds_conflict.json").write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_batch_size": 999}))
    run = {
        "model": str(root / "base"),
        "selection": str(root / "heads.json"),
        "data": {"datasets": [str(root / "good.jsonl")], "max_length": 64, "system": ""},
        "train": {"micro_batch": 2, "batch": 4, "max_steps": 2},
        "deepspeed": {"zero_optimization": {"stage": 1}},
        "output": {"dir": str(root / "runs" / "default")},
        "logging": {"progress": False, "tensorboard": False},
    }
    (root / "run.yaml").write_text(json.dumps(run))  # JSON is YAML
    (root / "typo.yaml").write_text("model: tiny:llama\ntrain:\n  lrr: 1e-4\n")
    (root / "broken.yaml").write_text("model: tiny:llama\ntrain: [unclosed\n")
    return root


def expand(case: Case, root: Path) -> list[str]:
    return [a.replace("{root}", str(root)) for a in case.argv]


def assert_clean_error(case: Case, rc: int, stderr: str, root: Path) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert rc not in (0, None), f"{case.id}: exit {rc}, stderr {stderr!r}"
    assert "Traceback" not in stderr, f"{case.id}: traceback:\n{stderr}"
    assert len(lines) == 1 and lines[0].startswith("alps-ds: error: "), f"{case.id}: not one error line: {stderr!r}"
    line = lines[0].replace(str(root) + "/", "")
    for word in case.words:
        assert word in line, f"{case.id}: {word!r} not in {line!r}"


@pytest.mark.parametrize("case", FAST, ids=[c.id for c in FAST])
def test_fast_bad_input(case, world, capsys, monkeypatch):
    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    cwd = world / "cwd"
    cwd.mkdir(exist_ok=True)
    monkeypatch.chdir(cwd)  # a command writing beside the user (e.g. .alps-ds/hostfile.*) shows up too
    before = digest(world)
    capsys.readouterr()
    try:
        rc = main(expand(case, world))
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert_clean_error(case, rc, err, world)
    assert digest(world) == before, f"{case.id}: files changed on disk"


@pytest.fixture(scope="module")
def runtime_results(world, tmp_path_factory) -> dict[str, dict]:
    """Run every RUNTIME case through the CLI in one process; record each one's digest before and after."""
    work = tmp_path_factory.mktemp("cli_cases")
    before = digest(world)
    cases = [{"id": c.id, "argv": expand(c, world)} for c in RUNTIME]
    (work / "cases.json").write_text(json.dumps(cases))
    env = rank_env()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "scripts" / "cli_cases.py"),
            str(work / "cases.json"),
            str(work / "results.json"),
        ],
        cwd=world / "cwd" if (world / "cwd").exists() else world,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = json.loads((work / "results.json").read_text())
    results["_changed"] = sorted(set(digest(world).items()) ^ set(before.items()))
    return results


@pytest.mark.parametrize("case", RUNTIME, ids=[c.id for c in RUNTIME])
def test_training_bad_input(case, world, runtime_results):
    r = runtime_results[case.id]
    assert r["traceback"] is None, f"{case.id}: an exception escaped the CLI:\n{r['traceback']}"
    assert_clean_error(case, r["rc"], r["stderr"], world)


def test_failed_training_runs_left_disk_untouched(world, runtime_results):
    changed = sorted({path for path, _ in runtime_results["_changed"]})
    assert not changed, f"failed runs created or changed: {changed}"
