"""Faults users meet on real clusters: a kill in the middle of a checkpoint save, a disk that fills up or is
read-only during export. Each must leave the last good state usable and no half-written model behind.

kill -9 of one rank mid-training, then ``--resume`` to completion, is proven on 2 ranks under ZeRO-3
by tests/test_train.py::test_kill_one_rank_then_resume_completes (not repeated here).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from dist import REPO, rank_env

from alps_ds.cli import main
from alps_ds.digest import base_record

TINY = REPO / "configs" / "tiny.yaml"


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def plain_env() -> dict[str, str]:
    env = rank_env()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def log_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines() if x.strip()]


# ---- a kill during checkpoint save ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def killed_in_save(tmp_path_factory) -> dict:
    """configs/tiny.yaml for 4 steps, checkpoint every 2, killed (SIGKILL) while writing step 4; then --resume."""
    out = tmp_path_factory.mktemp("kill_in_save") / "run"
    args = [
        "train", "--config", str(TINY), "--set", f"output.dir={out}", "--set", "train.max_steps=4",
        "--set", "output.checkpoint_every=2", "--set", "logging.progress=false", "--set", "logging.tensorboard=false",
    ]  # fmt: skip
    env = plain_env() | {"ALPS_KILL_IN": "step-00000004"}
    killed = subprocess.run(
        [sys.executable, str(REPO / "tests" / "scripts" / "kill_in_save.py"), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    state = {
        "rc": killed.returncode,
        "output": (killed.stdout + killed.stderr)[-3000:],
        "latest": json.loads((out / "checkpoints" / "latest.json").read_text()),
        "tags": sorted(p.name for p in (out / "checkpoints").glob("step-*")),
        "half": sorted(p.name for p in (out / "checkpoints" / "step-00000004").iterdir()),
        "log": log_of(out),
        "merged_after_kill": (out / "merged").exists(),
    }
    resumed = subprocess.run(
        [sys.executable, "-m", "alps_ds", *args, "--resume"],
        cwd=REPO, env=plain_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    return {"out": out, "killed": state}


def test_kill_mid_save_leaves_the_previous_checkpoint_current(killed_in_save):
    k = killed_in_save["killed"]
    assert k["rc"] == -signal.SIGKILL, k["output"]
    # the kill hit the save of step 4: its folder holds a half-written file, but the pointer never moved
    assert k["tags"] == ["step-00000002", "step-00000004"] and k["half"], k
    base = base_record(killed_in_save["out"] / "base")  # the tiny model the run built
    want = {"tag": "step-00000002", "step": 2, "world_size": 1, "zero_stage": 2, "batch": 16, "base": base}
    assert k["latest"] == want
    assert [r["step"] for r in k["log"]] == [1, 2, 3, 4] and not k["merged_after_kill"]


def test_resume_after_the_kill_restores_the_previous_checkpoint_exactly(killed_in_save):
    out, k = killed_in_save["out"], killed_in_save["killed"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["steps"] == 4
    log = log_of(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    # steps 3-4 retrained from the step-2 checkpoint give the losses the killed run had: state fully restored
    for before, after in zip(k["log"][2:], log[2:]):
        assert after["loss"] == pytest.approx(before["loss"], abs=1e-6), (before, after)
    assert json.loads((out / "checkpoints" / "latest.json").read_text()) == {
        "tag": "step-00000004",
        "step": 4,
        "world_size": 1,
        "zero_stage": 2,
        "batch": 16,
        "base": base_record(out / "base"),
    }
    assert (out / "merged" / "model.safetensors").is_file()


def test_half_written_checkpoint_was_replaced_not_loaded(killed_in_save):
    import torch

    step4 = killed_in_save["out"] / "checkpoints" / "step-00000004"
    files = sorted(step4.glob("*.pt"))
    assert files and all(f.stat().st_size > 100 for f in files), files
    state = torch.load(next(step4.glob("mp_rank_00_model_states.pt")), weights_only=False)
    assert state["alps_step"] == 4  # DeepSpeed stores client_state at the top level of the model states


# ---- a failing write during export ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export_inputs(tmp_path_factory) -> Path:
    """A base checkpoint and a head adapter for it (what ``alps-ds merge`` exports from)."""
    from alps_ds.adapter import save_adapter
    from alps_ds.arch import AttentionSpec
    from alps_ds.selection import HeadSelection, Provenance
    from alps_ds.sparse import apply
    from alps_ds.tiny import build_model, save_model, tiny_config

    root = tmp_path_factory.mktemp("export")
    cfg = tiny_config("llama", layers=2, hidden=64, heads=4, kv_heads=2, vocab=512)
    spec = AttentionSpec.from_config(cfg)
    save_model(build_model(cfg, seed=0), root / "base")
    model = build_model(cfg, seed=0)
    apply(model, HeadSelection(spec.fingerprint, ((0, 1), (1, 2)), Provenance("explicit")))
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)  # a "trained" adapter differing from the base
    save_adapter(model, root / "adapter")
    return root


@contextlib.contextmanager
def small_tmpfs(path: Path, size: int):
    """A real filesystem of ``size`` bytes at ``path`` (root only); skips the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()[:200]})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _previous_output(out: Path, base: Path) -> None:
    """An earlier merge output (with merge's marker listing its files), which a failing merge must keep."""
    import json

    out.mkdir()
    for f in sorted(base.iterdir()):
        (out / f.name).write_bytes(b"previous export of " + f.name.encode())
    files = sorted(f.name for f in base.iterdir())
    (out / ".alps-merge").write_text(json.dumps({"written_by": "alps-ds merge", "files": files}))


def _merge(capsys, base: Path, adapter: Path, out: Path) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)])
    return rc, capsys.readouterr().err


def _assert_failed_cleanly(rc: int, err: str, parent: Path, before: dict[str, str], out: Path) -> None:
    assert rc != 0
    lines = [x for x in err.splitlines() if x.strip()]  # a progress bar may come first
    errors = [x for x in lines if x.startswith("alps-ds: error: ")]
    assert "Traceback" not in err and len(errors) == 1 and lines[-1] == errors[0] and str(out) in errors[0], err
    assert digest(parent) == before, "the previous export changed or a partial file was left behind"


def test_disk_full_during_export_keeps_the_previous_export(export_inputs, tmp_path, capsys):
    base, adapter = export_inputs / "base", export_inputs / "adapter"
    model_bytes = (base / "model.safetensors").stat().st_size
    with small_tmpfs(tmp_path / "disk", size=model_bytes // 2 + 64 * 1024) as disk:
        out = disk / "merged"
        _previous_output(out, base)
        before = digest(disk)
        rc, err = _merge(capsys, base, adapter, out)
        _assert_failed_cleanly(rc, err, disk, before, out)
        assert "No space left" in err or "disk" in err.lower(), err


def test_read_only_target_fails_cleanly(export_inputs, tmp_path, capsys):
    base, adapter = export_inputs / "base", export_inputs / "adapter"
    with small_tmpfs(tmp_path / "ro", size=4 * 1024 * 1024) as disk:
        out = disk / "merged"
        _previous_output(out, base)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        before = digest(disk)
        rc, err = _merge(capsys, base, adapter, out)
        _assert_failed_cleanly(rc, err, disk, before, out)


def test_file_size_limit_during_export_fails_cleanly(export_inputs, tmp_path, capsys):
    """RLIMIT_FSIZE (works without root): the shard write fails with EFBIG halfway through."""
    base, adapter = export_inputs / "base", export_inputs / "adapter"
    parent = tmp_path / "target"
    out = parent / "merged"
    parent.mkdir()
    _previous_output(out, base)
    before = digest(parent)
    limit = (base / "model.safetensors").stat().st_size // 2
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        rc, err = _merge(capsys, base, adapter, out)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    _assert_failed_cleanly(rc, err, parent, before, out)
    assert os.listdir(parent) == ["merged"]


# ---- the atomic folder swap itself ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fail_at", ["writing", "swap"])
def test_atomic_dir_keeps_the_previous_version_when_replacing_fails(tmp_path, monkeypatch, fail_at):
    """Whatever fails (the writer, or the final rename), the folder holds its old content and no temp is left."""
    from alps_ds import fsutil

    target = tmp_path / "merged"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"old")
    before = digest(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.endswith(".tmp") and Path(dst) == target:  # the swap of the new folder into place
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    with pytest.raises(OSError), fsutil.atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_bytes(b"new, half")
        if fail_at == "writing":
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(fsutil.os, "replace", replace)
    assert digest(tmp_path) == before


def test_atomic_dir_replaces_despite_a_backup_left_by_a_killed_run(tmp_path):
    """A kill while the previous version is being deleted leaves its backup folder; a later run
    (with the same pid, as in containers) must still replace the target."""
    from alps_ds import fsutil

    target = tmp_path / "merged"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"old")
    stale = tmp_path / f".merged.old-{os.getpid()}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half deleted")
    with fsutil.atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_bytes(b"new")
    assert (target / "model.safetensors").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [stale.name, "merged"]  # only the stale one is left


# ---- a failure on rank 0 alone ---------------------------------------------------------------------------------------

RANK0_FAILS = """
import sys, torch.distributed as dist
from pathlib import Path
from alps_ds.errors import AlpsError
from alps_ds.train.config import ModelConfig, RunConfig
from alps_ds.train.model import resolve_model_dir
dist.init_process_group("gloo")
cfg = RunConfig(model=ModelConfig(path="no-such-org/no-such-model"))
try:
    resolve_model_dir(cfg, Path(sys.argv[1]), dist.get_rank())
except AlpsError as e:
    print("AlpsError:", e, flush=True)
dist.barrier()  # every rank still reaches the next collective
dist.destroy_process_group()
"""


def test_an_error_on_rank_0_reaches_every_rank(tmp_path):
    """Only rank 0 downloads a hub model: when that fails, every rank stops with the same one-line
    error instead of the others waiting for rank 0 in a collective (a hang on other nodes)."""
    from dist import free_port

    env = rank_env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"})
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK0_FAILS, str(tmp_path)],
            cwd=REPO,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            p.kill()
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank}:\n{out[-2000:]}"
        assert "AlpsError: model.path: 'no-such-org/no-such-model' is not a local folder" in out, f"rank {rank}: {out}"
