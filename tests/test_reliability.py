"""Reliability by class: no command destroys a user's files, trains the wrong thing, or prints a traceback.

Each class of docs/reliability.md section 5 has a test here with several cases. A failing case must
exit non-zero, print exactly ONE line on stderr (``alps-ds: error: ...``) naming the file, flag or key
and the fix, and leave every file that existed before byte-identical (the fixture folder and the
working directory are hashed before and after), also when the command is interrupted by SIGINT or
SIGTERM in the middle of writing. Most cases need no DeepSpeed and run in-process; the few that fail
inside a started ``alps-ds train`` run in one helper process (tests/scripts/cli_cases.py), and one
real training run (with ``train_others``) is shared by the export tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist import REPO, rank_env, run_ranks

from alps_ds.cli import main


def digest(*roots: Path) -> dict[str, str]:
    """Path -> sha256 (or 'dir') of everything under ``roots``: a created, changed or deleted file shows up."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            out.update({str(Path(dirpath, d)): "dir" for d in dirnames})
            for f in filenames:
                out[str(Path(dirpath, f))] = hashlib.sha256(Path(dirpath, f).read_bytes()).hexdigest()
    return out


def plain_env() -> dict[str, str]:
    env = rank_env()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def one_error_line(case: str, rc, stderr: str, words, root: Path) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert rc not in (0, None), f"{case}: exit {rc}, stderr {stderr!r}"
    assert "Traceback" not in stderr, f"{case}: traceback:\n{stderr}"
    assert len(lines) == 1 and lines[0].startswith("alps-ds: error: "), f"{case}: not one error line: {stderr!r}"
    line = lines[0].replace(str(root) + "/", "")
    for word in words:
        assert word in line, f"{case}: {word!r} not in {line!r}"
    return line


# ---- the fixture folder: real inputs and real outputs of earlier runs --------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from alps_ds.adapter import save_adapter
    from alps_ds.arch import AttentionSpec
    from alps_ds.fsutil import atomic_dir
    from alps_ds.selection import HeadSelection, Provenance
    from alps_ds.sparse import apply
    from alps_ds.tiny import build_model, save_model, tiny_config
    from alps_ds.train.tokenizer import BYTE_VOCAB, save_byte_tokenizer

    root = tmp_path_factory.mktemp("reliability")
    cfg = tiny_config("llama", vocab=BYTE_VOCAB, hidden=32, max_positions=256)
    spec = AttentionSpec.from_config(cfg)
    save_model(build_model(cfg, seed=0), root / "base")
    save_byte_tokenizer(root / "base")
    save_model(build_model(cfg, seed=1), root / "task")
    sel = HeadSelection(spec.fingerprint, ((0, 1), (1, 2)), Provenance("explicit"))
    sel.save(root / "heads.json")
    model = build_model(cfg, seed=0)
    apply(model, sel)
    save_adapter(model, root / "adapter")

    # A model folder holding model.safetensors AND a shard index with shards of another model (a stale
    # download): from_pretrained reads model.safetensors, so every alps-ds command must too.
    shutil.copytree(root / "base", root / "both")
    save_model(build_model(cfg, seed=7), root / "stale_shards", max_shard_size="20KB")
    for f in (root / "stale_shards").glob("model*.safetensors*"):
        shutil.copy2(f, root / "both" / f.name)
    small = tiny_config("llama", vocab=100, hidden=32, max_positions=256)  # the byte tokenizer needs 259 ids
    save_model(build_model(small, seed=0), root / "small_vocab")
    save_byte_tokenizer(root / "small_vocab")
    shutil.copytree(root / "base", root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    # Earlier outputs, each written by its own command.
    assert main(["localize", "--base", str(root / "base"), "--task", str(root / "task"), "--out", str(root / "loc"),
                 "--ratio", "0.5", "--quiet"]) == 0  # fmt: skip
    assert main(["merge", "--base", str(root / "base"), "--adapter", str(root / "adapter"),
                 "--out", str(root / "merged")]) == 0  # fmt: skip
    assert main(["heads", "combine", str(root / "heads.json"), str(root / "loc"), "--op", "union",
                 "--out", str(root / "prev.json")]) == 0  # fmt: skip
    with atomic_dir(root / "demo", command="demo") as tmp:  # what a finished demo leaves
        (tmp / "table.txt").write_text("an earlier demo's table\n")
        (tmp / "runs").mkdir()
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("the user's own files")
    (root / "plain.txt").write_text("a file, not a folder")

    rows = [{"instruction": "Repeat the word.", "input": w, "output": w} for w in ("cat", "dog", "owl", "elk")]
    (root / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    (root / "empty.jsonl").write_text("")
    (root / "blank.jsonl").write_text("\n   \n\n")
    (root / "broken.jsonl").write_text(json.dumps(rows[0]) + '\n{"instruction": "x", "output": \n')
    (root / "fp16.json").write_text(json.dumps({"zero_optimization": {"stage": 1}, "fp16": {"enabled": True}}))
    (root / "dup.json").write_text('{"zero_optimization": {"stage": 1}, "zero_optimization": {"stage": 3}}')
    run = {
        "model": str(root / "base"),
        "selection": str(root / "heads.json"),
        "data": {"datasets": [str(root / "good.jsonl")], "max_length": 64, "system": ""},
        "train": {"micro_batch": 2, "batch": 4, "max_steps": 2},
        "deepspeed": {"zero_optimization": {"stage": 1}},
        "output": {"dir": str(root / "runs" / "default")},
        "logging": {"progress": False, "tensorboard": False},
    }
    (root / "run.yaml").write_text(json.dumps(run))
    (root / "dup.yaml").write_text(f"model: {root / 'base'}\ntrain:\n  lr: 1e-4\n  batch: 8\n  lr: 1e-3\n")
    (root / "dup_top.yaml").write_text(f"model: {root / 'base'}\nselection: {root / 'heads.json'}\nmodel: tiny:llama\n")
    (root / "empty_out.yaml").write_text(json.dumps({**run, "output": {"dir": ""}}))
    (root / "bad_lr.yaml").write_text(json.dumps({**run, "train": {**run["train"], "lr": -1}}))
    (root / "batch5.yaml").write_text(json.dumps({**run, "train": {**run["train"], "batch": 5}}))
    (root / "empty_data.yaml").write_text(
        json.dumps({**run, "data": {**run["data"], "datasets": [str(root / "empty.jsonl")]}})
    )
    (root / "cwd").mkdir()
    return root


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # --help, --version only: argparse errors are AlpsError lines now
        rc = e.code
    return rc, capsys.readouterr().err


def check_cases(cases, world: Path, capsys, monkeypatch) -> None:
    """Every case: one error line holding its words, and nothing under the fixture folder changed."""
    monkeypatch.chdir(world / "cwd")
    for name, argv, words in cases:
        before = digest(world)
        rc, err = run_cli([a.replace("{root}", str(world)) for a in argv.split()], capsys)
        one_error_line(name, rc, err, words, world)
        assert digest(world) == before, f"{name}: files changed on disk"


# ---- 1. output paths ------------------------------------------------------------------------------------------

MERGE = "merge --base {root}/base --adapter {root}/adapter --out"
LOCALIZE = "localize --base {root}/base --task {root}/task --quiet --out"
OUTPUT_CASES = [
    ("merge-parent-of-base", f"{MERGE} {{root}}", ["--out", "contains the input", "choose a new --out"]),
    ("merge-into-adapter", f"{MERGE} {{root}}/adapter", ["is the input adapter", "choose a new --out"]),
    ("merge-inside-base", f"{MERGE} {{root}}/base/merged", ["lies inside the input base"]),
    ("merge-existing-file", f"{MERGE} {{root}}/plain.txt", ["plain.txt", "is a file", "choose another --out"]),
    ("merge-user-folder", f"{MERGE} {{root}}/mine", ["mine", "not written by alps-ds merge", "choose a new"]),
    ("merge-file-in-path", f"{MERGE} {{root}}/plain.txt/m", ["plain.txt is a file, not a folder"]),
    ("merge-localize-output", f"{MERGE} {{root}}/loc", ["loc", "not written by alps-ds merge"]),
    ("localize-into-base", f"{LOCALIZE} {{root}}/base", ["is the input base", "choose a new --out"]),
    ("localize-user-folder", f"{LOCALIZE} {{root}}/mine", ["mine", "not written by alps-ds localize"]),
    ("localize-into-merge-output", f"{LOCALIZE} {{root}}/merged", ["not written by alps-ds localize"]),
    ("localize-file", f"{LOCALIZE} {{root}}/plain.txt", ["plain.txt", "is a file, not a folder"]),
    (
        "combine-over-input",
        "heads combine {root}/heads.json {root}/loc --op union --out {root}/heads.json",
        ["--out", "is the input heads.json"],
    ),
    (
        "combine-over-input-folder",
        "heads combine {root}/heads.json {root}/loc --op union --out {root}/loc",
        ["loc/heads.json", "is the input"],
    ),
    (
        "combine-over-other-file",
        "heads combine {root}/heads.json {root}/loc --op union --out {root}/run.yaml",
        ["run.yaml", "is not a heads.json", "choose another --out"],
    ),
    (
        "resize-slash-is-a-folder",
        "heads resize {root}/loc --ratio 0.25 --out {root}/plain.txt/",
        ["plain.txt", "is a file, not a folder"],
    ),
    ("show-png-over-input", "heads show {root}/heads.json --png {root}/heads.json", ["--png", "is the input"]),
    (
        "rebalance-over-other-file",
        "layout --heads {root}/loc --model {root}/base --tp 2 --rebalance --out {root}/good.jsonl",
        ["good.jsonl", "is not a heads.json"],
    ),
    ("demo-user-folder", "demo --out {root}/mine --device cpu", ["mine", "not written by alps-ds demo"]),
    ("demo-over-file", "demo --out {root}/plain.txt --device cpu", ["plain.txt", "is a file"]),
    (
        "train-empty-output-dir",
        "train --config {root}/empty_out.yaml",
        ["empty_out.yaml", "output.dir", "required"],
    ),
    (
        "train-output-dir-is-a-file",
        "train --config {root}/run.yaml --set output.dir={root}/plain.txt",
        ["--set", "output.dir", "is a file", "choose another output.dir"],
    ),
    (
        "train-output-dir-is-the-model",
        "train --config {root}/run.yaml --set output.dir={root}/base",
        ["output.dir", "is the input base", "choose a new output.dir"],
    ),
    (
        "train-output-dir-holds-the-data",
        "train --config {root}/run.yaml --set output.dir={root}",
        ["output.dir", "contains the input"],
    ),
    (
        "train-output-dir-not-a-run",
        "train --config {root}/run.yaml --set output.dir={root}/mine",
        ["mine", "not written by alps-ds train"],
    ),
]


def test_outputs_never_replace_inputs_or_other_files(world, capsys, monkeypatch):
    assert len(OUTPUT_CASES) >= 20
    assert {c[1].split()[0] for c in OUTPUT_CASES} >= {"merge", "localize", "heads", "layout", "demo", "train"}
    check_cases(OUTPUT_CASES, world, capsys, monkeypatch)


def test_slurm_hostfile_out_never_replaces_another_file(world, capsys, monkeypatch):
    for key, value in {"SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NNODES": "2", "SLURM_NODEID": "0",
                       "SLURM_GPUS_PER_NODE": "4", "SLURM_JOB_ID": "7"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # no scontrol: the built-in parser expands it
    cases = [
        ("hostfile-over-run-yaml", "launch --slurm --hostfile-out {root}/run.yaml -- --config {root}/run.yaml",
         ["--hostfile-out", "run.yaml", "is not a hostfile"]),
        ("hostfile-in-a-file", "launch --slurm --hostfile-out {root}/plain.txt/hf -- --config {root}/run.yaml",
         ["plain.txt is a file, not a folder"]),
    ]  # fmt: skip
    check_cases(cases, world, capsys, monkeypatch)


def test_own_outputs_are_replaced_and_a_trailing_slash_means_a_folder(world, tmp_path, capsys):
    """An earlier output of the same command is replaced; files the command did not write are refused."""
    from alps_ds.selection import HeadSelection

    merged = tmp_path / "merged"
    shutil.copytree(world / "merged", merged)
    argv = ["merge", "--base", str(world / "base"), "--adapter", str(world / "adapter"), "--out", str(merged)]
    assert run_cli(argv, capsys)[0] == 0
    (merged / "notes.txt").write_text("mine")
    rc, err = run_cli(argv, capsys)
    one_error_line("merge-foreign-file", rc, err, ["notes.txt", "did not write", "move it away"], tmp_path)
    out = tmp_path / "new" / "sub"
    rc, _ = run_cli(["heads", "resize", str(world / "loc"), "--ratio", "0.25", "--out", f"{out}/"], capsys)
    assert rc == 0 and len(HeadSelection.load(out / "heads.json")) == 2  # a folder, with heads.json inside
    loc = tmp_path / "loc"
    shutil.copytree(world / "loc", loc)
    (loc / "heads.rebalanced.json").write_text("a later file beside localize's own")
    argv = ["localize", "--base", str(world / "base"), "--task", str(world / "task"), "--out", str(loc), "--quiet"]
    assert run_cli([*argv, "--ratio", "0.25"], capsys)[0] == 0
    assert (loc / "heads.rebalanced.json").read_text() == "a later file beside localize's own"  # left alone


@pytest.mark.parametrize(
    ("sig", "target", "nth", "argv"),
    [
        ("INT", "safetensors.torch:save_file", 1, f"{MERGE} {{root}}/merged"),
        ("TERM", "safetensors.torch:save_file", 1, f"{MERGE} {{root}}/merged"),
        ("TERM", "os:fsync", 2, f"{LOCALIZE} {{root}}/loc --ratio 0.25"),
        ("INT", "os:fsync", 1, f"{LOCALIZE} {{root}}/fresh/new --ratio 0.25"),  # no folder is left behind either
        ("INT", "os:fsync", 1, "heads resize {root}/loc --ratio 0.25 --out {root}/prev.json"),
        ("TERM", "os:fsync", 1, "heads combine {root}/heads.json {root}/loc --op vote --out {root}/prev.json"),
    ],
    ids=["merge-INT", "merge-TERM", "localize-TERM", "localize-new-folder-INT", "resize-INT", "combine-TERM"],
)
def test_an_interrupt_mid_write_keeps_the_previous_output(world, sig, target, nth, argv):
    """Ctrl-C or SIGTERM while the output is being written: the earlier output stays, byte for byte, and no
    temporary file is left behind."""
    before = digest(world)
    args = [a.replace("{root}", str(world)) for a in argv.split()]
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "scripts" / "signal_mid_write.py"), sig, target, str(nth), *args],
        cwd=world / "cwd", env=plain_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    signum = getattr(signal, f"SIG{sig}")
    err = "\n".join(ln for ln in proc.stderr.splitlines() if "it/s]" not in ln and "file/s]" not in ln)
    line = one_error_line(argv, proc.returncode, err, [f"interrupted (SIG{sig})", "unchanged"], world)
    assert proc.returncode == 128 + signum, (proc.returncode, line)
    assert digest(world) == before, "the interrupted write changed or left files"


def test_a_failed_or_interrupted_demo_keeps_the_previous_demo(world, monkeypatch, capsys):
    """The demo builds its new run beside the old one: ranks that fail, or a Ctrl-C, leave the earlier demo."""
    from alps_ds.commands import demo

    def failing(work: Path, nproc: int, device: str) -> int:
        (work / "demo.log").write_text("half a run")
        return 1

    def interrupted(work: Path, nproc: int, device: str) -> int:
        (work / "demo.log").write_text("half a run")
        raise KeyboardInterrupt

    before = digest(world)
    for name, launch, words in (
        ("ranks-fail", failing, ["exited with code 1", "is unchanged"]),
        ("ctrl-c", interrupted, ["interrupted (SIGINT)", "unchanged"]),
    ):
        monkeypatch.setattr(demo, "_launch", launch)
        rc, err = run_cli(["demo", "--out", str(world / "demo"), "--device", "cpu", "--quick"], capsys)
        one_error_line(name, rc, err, words, world)
        assert digest(world) == before, name


# ---- 2. silent wrong training -------------------------------------------------------------------------------------

SILENT_CASES = [
    ("localize-ratio-rounds-to-0", f"{LOCALIZE} {{root}}/new --ratio 1e-12", ["--ratio", "keeps 0 of 8 heads"]),
    ("resize-ratio-rounds-to-0", "heads resize {root}/loc --ratio 1e-12 --out {root}/r.json", ["keeps 0 of 8"]),
    (
        "vote-ratio-rounds-to-0",
        "heads combine {root}/heads.json {root}/loc --op vote --ratio 1e-12 --out {root}/v.json",
        ["--ratio", "keeps 0 of 8"],
    ),
    ("plan-ratio-rounds-to-0", "plan --model {root}/base --ratio 1e-12", ["--ratio", "keeps 0"]),
    ("localize-empty-heads", f"{LOCALIZE} {{root}}/new --heads ,", ["--heads", "no head listed", "--select none"]),
    ("localize-blank-heads", f"{LOCALIZE} {{root}}/new --heads ,,", ["--heads", "no head listed"]),
    ("yaml-duplicate-nested-key", "train --config {root}/dup.yaml", ["dup.yaml", "line 5", "'lr'", "twice"]),
    ("yaml-duplicate-top-key", "train --config {root}/dup_top.yaml", ["dup_top.yaml", "line 3", "'model'", "keep one"]),
    ("check-yaml-duplicate", "check --world-size 1 --config {root}/dup.yaml", ["dup.yaml", "line 5", "twice"]),
    (
        "set-duplicate-key",
        "train --config {root}/run.yaml --set deepspeed={zero_optimization:{stage:1},zero_optimization:{stage:3}}",
        ["--set", "zero_optimization", "twice"],
    ),
]


def test_nothing_trains_the_wrong_thing_silently(world, capsys, monkeypatch):
    check_cases(SILENT_CASES, world, capsys, monkeypatch)


def test_a_stale_shard_index_beside_model_safetensors_is_ignored_as_from_pretrained_does(world, tmp_path, capsys):
    """both/ holds base's model.safetensors plus an index and shards of another model. transformers loads
    model.safetensors; localize and merge read exactly that too (and merge leaves the stale files out)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    assert (world / "both" / "model.safetensors.index.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(world / "both").state_dict()
    base = load_file(world / "base" / "model.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in base.items())  # transformers' choice, checked here
    for name in ("base", "both"):
        argv = ["localize", "--base", str(world / name), "--task", str(world / "task"), "--quiet"]
        assert run_cli([*argv, "--out", str(tmp_path / f"loc-{name}")], capsys)[0] == 0
    assert (tmp_path / "loc-base" / "scores.csv").read_text() == (tmp_path / "loc-both" / "scores.csv").read_text()
    argv = ["merge", "--base", str(world / "both"), "--adapter", str(world / "adapter"), "--out", str(tmp_path / "m")]
    assert run_cli(argv, capsys)[0] == 0
    assert sorted(p.name for p in (tmp_path / "m").glob("model*")) == ["model.safetensors"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").state_dict()
    want = AutoModelForCausalLM.from_pretrained(world / "merged").state_dict()
    assert merged.keys() == want.keys() and all(torch.equal(merged[k], want[k]) for k in want)
    # config.json's transformers_weights names the file from_pretrained starts from: here the index.
    explicit = tmp_path / "explicit"
    shutil.copytree(world / "both", explicit)
    config = json.loads((explicit / "config.json").read_text())
    (explicit / "config.json").write_text(
        json.dumps({**config, "transformers_weights": "model.safetensors.index.json"})
    )
    loaded = AutoModelForCausalLM.from_pretrained(explicit).state_dict()
    stale = AutoModelForCausalLM.from_pretrained(world / "stale_shards").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in stale.items())
    for name, folder in (("explicit", explicit), ("stale", world / "stale_shards")):
        argv = ["localize", "--base", str(folder), "--task", str(world / "task"), "--quiet"]
        assert run_cli([*argv, "--out", str(tmp_path / f"loc-{name}")], capsys)[0] == 0
    assert (tmp_path / "loc-explicit" / "scores.csv").read_text() == (tmp_path / "loc-stale" / "scores.csv").read_text()


# ---- 3. one line, never a traceback -----------------------------------------------------------------------------

ONE_LINE_CASES = [
    ("plan-tp-0", "plan --model {root}/base --tp 0", ["plan: argument --tp", "at least 1", "alps-ds plan --help"]),
    ("plan-pp-0", "plan --model {root}/base --pp 0", ["argument --pp", "at least 1"]),
    ("plan-gpu-mem-nan", "plan --model {root}/base --gpu-mem nan", ["argument --gpu-mem", "finite number"]),
    ("plan-gpu-mem-neg", "plan --model {root}/base --gpu-mem -8", ["argument --gpu-mem", "> 0"]),
    ("layout-tp-0", "layout --heads {root}/heads.json --model {root}/base --tp 0", ["layout: argument --tp"]),
    ("layout-vpp-0", "layout --heads {root}/heads.json --model {root}/base --vpp 0", ["argument --vpp"]),
    ("check-tp-0", "check --world-size 2 --tp 0", ["check: argument --tp", "at least 1"]),
    ("check-world-0", "check --world-size 0", ["argument --world-size", "at least 1"]),
    ("check-seq-len-0", "check --world-size 1 --seq-len 0", ["argument --seq-len", "at least 1"]),
    ("check-micro-batch-neg", "check --world-size 1 --micro-batch -2", ["argument --micro-batch"]),
    ("check-gpu-mem-nan", "check --world-size 1 --gpu-mem nan", ["argument --gpu-mem", "finite"]),
    ("check-gpu-mem-0", "check --world-size 1 --gpu-mem 0", ["argument --gpu-mem", "> 0"]),
    ("launch-port", "launch --master-port 70000 --dry-run -- --config {root}/run.yaml", ["--master-port", "1..65535"]),
    ("heads-top-neg", "heads show {root}/heads.json --top -1", ["heads show: argument --top", "at least 0"]),
    ("demo-steps-0", "demo --out {root}/new --steps 0", ["demo: argument --steps", "> 0"]),
    ("localize-ratio-text", f"{LOCALIZE} {{root}}/new --ratio ten", ["argument --ratio", "outside (0, 1]"]),
    ("missing-required", "merge --base {root}/base", ["merge:", "required", "--adapter", "alps-ds merge --help"]),
    ("unknown-flag", "plan --model {root}/base --colour", ["unrecognized arguments: --colour"]),
    ("bad-choice", "plan --model {root}/base --zero 5", ["argument --zero", "invalid choice"]),
    ("no-command", "", ["required", "COMMAND"]),
    ("set-names-set", "train --config {root}/run.yaml --set train.lr=-1", ["--set: train.lr", "must be positive"]),
    ("yaml-names-yaml", "train --config {root}/bad_lr.yaml", ["bad_lr.yaml: train.lr", "must be positive"]),
    ("set-batch", "train --config {root}/run.yaml --set train.epochs=0", ["--set: train.epochs"]),
]


def test_every_input_error_is_one_line(world, capsys, monkeypatch):
    check_cases(ONE_LINE_CASES, world, capsys, monkeypatch)


def C(cid: str, *sets: str) -> dict:
    return {"id": cid, "argv": ["train", "--config", "{root}/run.yaml", *[x for s in sets for x in ("--set", s)]]}


RUNTIME = [  # (case, words): each fails inside a started train, DeepSpeed and a process group up
    (C("vocab", "model.path={root}/small_vocab", "output.dir={root}/runs/a"), ["model.path", "token id", "100"]),
    (C("truncated", "model.path={root}/truncated", "output.dir={root}/runs/b"), ["truncated", "re-download"]),
    (C("fp16-on-cpu", "deepspeed={root}/fp16.json", "output.dir={root}/runs/c"), ["fp16.json", "fp16.enabled"]),
    (C("fp16-set", "deepspeed.fp16.enabled=true", "output.dir={root}/runs/d"), ["--set: deepspeed: fp16"]),
    (C("empty-data", "data.datasets=[{root}/empty.jsonl]", "output.dir={root}/runs/e"), ["empty.jsonl", "no rows"]),
    (C("blank-data", "data.datasets=[{root}/blank.jsonl]", "output.dir={root}/runs/f"), ["blank.jsonl", "no rows"]),
    (C("broken-json", "data.datasets=[{root}/broken.jsonl]", "output.dir={root}/runs/g"), ["broken.jsonl: line 2"]),
    (C("dup-ds-json", "deepspeed={root}/dup.json", "output.dir={root}/runs/h"), ["dup.json", "twice"]),
    (
        C("ratio-0", "selection.heads=null", "selection.method=random", "selection.ratio=1e-12", "output.dir={root}/r"),
        ["--set: selection.ratio", "keeps 0 of 8 heads"],
    ),
    (C("batch", "train.batch=5", "output.dir={root}/runs/i"), ["--set: train.batch", "not a multiple"]),
    (C("model-is-a-file", "model.path={root}/plain.txt", "output.dir={root}/runs/k"), ["plain.txt", "is a file"]),
    ({"id": "batch-yaml", "argv": ["train", "--config", "{root}/batch5.yaml"]}, ["batch5.yaml: train.batch"]),
    ({"id": "empty-data-yaml", "argv": ["train", "--config", "{root}/empty_data.yaml"]}, ["empty.jsonl", "no rows"]),
    (C("heads-folder-missing", "selection.heads={root}/mine", "output.dir={root}/runs/j"), ["mine", "without heads"]),
]


@pytest.fixture(scope="module")
def runtime_results(world, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("reliability_cases")
    cases = [{"id": c["id"], "argv": [a.replace("{root}", str(world)) for a in c["argv"]]} for c, _ in RUNTIME]
    (work / "cases.json").write_text(json.dumps(cases))
    before = digest(world)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "scripts" / "cli_cases.py"), str(work / "cases.json"),
         str(work / "results.json")],
        cwd=world / "cwd", env=plain_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = json.loads((work / "results.json").read_text())
    results["_changed"] = sorted(set(digest(world).items()) ^ set(before.items()))
    return results


@pytest.mark.parametrize(("case", "words"), RUNTIME, ids=[c["id"] for c, _ in RUNTIME])
def test_train_errors_after_deepspeed_starts_are_one_line(world, runtime_results, case, words):
    """Captured at the file-descriptor level: datasets' or DeepSpeed's own lines would count."""
    r = runtime_results[case["id"]]
    assert r["traceback"] is None, r["traceback"]
    one_error_line(case["id"], r["rc"], r["stderr"], words, world)


def test_failed_training_runs_left_every_file_as_it_was(runtime_results):
    assert not runtime_results["_changed"], runtime_results["_changed"]


# ---- 4. consistency between commands ----------------------------------------------------------------------------


def test_a_localize_folder_is_a_heads_json_for_every_command(world, capsys):
    """Every command that reads a selection takes localize's output folder; a folder without one is refused
    by every command, naming the file to pass."""
    loc, mine = str(world / "loc"), str(world / "mine")
    readers = [
        ["heads", "show", "{h}"],
        ["layout", "--heads", "{h}", "--model", str(world / "base")],
        ["plan", "--model", str(world / "base"), "--heads", "{h}"],
        ["heads", "compare", "{h}", str(world / "heads.json")],
    ]
    for argv in readers:
        assert run_cli([a.replace("{h}", loc) for a in argv], capsys)[0] == 0, argv
        rc, err = run_cli([a.replace("{h}", mine) for a in argv], capsys)
        one_error_line(argv[0], rc, err, ["mine", "a folder without heads.json", "pass a heads.json"], world)
    capsys.readouterr()
    assert main(["check", "--world-size", "1", "--model", str(world / "base"), "--heads", loc]) == 0
    assert "OK   selection" in capsys.readouterr().out
    assert main(["check", "--world-size", "1", "--model", str(world / "base"), "--heads", mine]) == 1
    assert "a folder without heads.json" in capsys.readouterr().err


def test_check_fails_what_train_refuses_with_the_same_words(world, runtime_results, capsys):
    """check runs train's own checks of the run: the same message, before any GPU hour is spent."""
    capsys.readouterr()
    assert main(["check", "--world-size", "1", "--config", str(world / "run.yaml")]) == 0, capsys.readouterr()
    for case, config, finding in (
        ("batch-yaml", "batch5.yaml", "batch"),
        ("empty-data-yaml", "empty_data.yaml", "data"),
    ):
        assert main(["check", "--world-size", "1", "--config", str(world / config)]) == 1
        lines = capsys.readouterr().err.splitlines()
        detail = next(ln for ln in lines if ln.startswith(f"FAIL {finding}: ")).removeprefix(f"FAIL {finding}: ")
        assert f"alps-ds: error: {detail}" == runtime_results[case]["stderr"].strip()
    argv = ["check", "--world-size", "1", "--config", str(world / "run.yaml"), "--output-dir", str(world / "base")]
    assert main(argv) == 1
    assert "FAIL output dir: " in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra",
    [
        ["--node-rank", "2"],  # one local host
        ["--hostfile", "{hf}", "--no-ssh", "--node-rank", "2"],
        ["--hostfile", "{hf}", "--starter", "torchrun", "--node-rank", "5"],
        ["--hostfile", "{hf}", "--mpi", "--node-rank", "3"],
    ],
    ids=["local", "no-ssh", "torchrun", "mpi"],
)
def test_launch_bounds_the_node_rank_in_every_mode(world, tmp_path, capsys, monkeypatch, extra):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=2\nnode2 slots=2\n")
    monkeypatch.chdir(tmp_path)
    argv = ["launch", *[a.replace("{hf}", str(hostfile)) for a in extra], "--dry-run", "--", "--config", "x.yaml"]
    rc, err = run_cli(argv, capsys)
    one_error_line(" ".join(extra), rc, err, ["--node-rank", "outside the", "use 0.."], tmp_path)


# ---- 5. named defects ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_with_others(world, tmp_path_factory) -> Path:
    """One real alps-ds train (DeepSpeed, 1 rank) with train_others: [o_proj], exporting merged/ and adapter/."""
    out = tmp_path_factory.mktemp("others") / "run"
    argv = ["-m", "alps_ds", "train", "--config", str(world / "run.yaml"), "--set", f"output.dir={out}",
            "--set", "train_others=[o_proj]", "--set", "train.lr=1e-2"]  # fmt: skip
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=plain_env(), capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out


def test_merge_of_an_adapter_with_train_others_equals_the_exported_model(world, trained_with_others, tmp_path):
    from safetensors.torch import load_file

    run = trained_with_others
    meta = json.loads((run / "adapter" / "adapter.json").read_text())
    assert meta["version"] == 2 and meta["others"] and all("o_proj" in n for n in meta["others"])
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(world / "base"), "--adapter", str(run / "adapter"), "--out", str(out)]) == 0
    got, want = load_file(out / "model.safetensors"), load_file(run / "merged" / "model.safetensors")
    base = load_file(world / "base" / "model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    moved = [k for k in meta["others"] if not torch.equal(want[k], base[k])]
    assert moved == meta["others"], "an o_proj did not train: the comparison would prove nothing"


def test_a_failed_train_leaves_the_runs_files_in_place(world, trained_with_others, tmp_path):
    """A run folder from before (here: one whose checkpoints were removed) and a new run that fails after
    its selection is made: OUT/heads.json, run_config.json and everything else stay byte-identical."""
    out = tmp_path / "run"
    shutil.copytree(trained_with_others, out, ignore=shutil.ignore_patterns("checkpoints"))
    before = digest(out)
    argv = ["-m", "alps_ds", "train", "--config", str(world / "run.yaml"), "--set", f"output.dir={out}",
            "--set", "selection.heads=null", "--set", "selection.method=none"]  # fmt: skip
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=plain_env(), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    one_error_line("train-after-selection", proc.returncode, proc.stderr, ["nothing to train"], world)
    assert digest(out) == before


def test_merge_inside_an_outer_gathered_parameters_on_zero3():
    proc = run_ranks(REPO / "tests" / "scripts" / "nested_gather.py", nproc=2, timeout=600)
    assert proc.stdout.count("nested merge ok") == 2, proc.stdout[-2000:]


def test_deepspeed_minimum_is_pinned_and_checked(monkeypatch):
    import deepspeed

    from alps_ds.deps import DEEPSPEED_MIN, require_deepspeed
    from alps_ds.errors import AlpsError

    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"deepspeed>={DEEPSPEED_MIN}"' in pyproject
    from deepspeed.module_inject.tp_shard import AutoTPMeta  # noqa: F401  (what the pin is for)

    require_deepspeed()  # the installed one
    monkeypatch.setattr(deepspeed, "__version__", "0.19.6")
    with pytest.raises(AlpsError, match=r"deepspeed 0\.19\.6 is installed; alps-ds needs deepspeed >= 0\.19\.7"):
        require_deepspeed()
    monkeypatch.setattr(deepspeed, "__version__", "0.19.7+cuda")
    require_deepspeed()
