"""Security defaults: weights only through safetensors (pickle refused unless --allow-pickle, then
torch.load(weights_only=True)), no trust_remote_code, subprocesses started from argv lists only.

The hostile inputs are real: a pickle whose unpickling would create a marker folder, and a model
folder whose config.json points transformers at custom code that would do the same.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist import REPO, rank_env

from alps_ds.cli import main
from alps_ds.errors import AlpsError
from alps_ds.localize.reader import read_index

PACKAGE = REPO / "alps_ds"


class _Exploit:
    """Unpickling this calls os.mkdir(marker): proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The same base/task pair as safetensors and as pickle (.bin), and a hostile .bin."""
    from alps_ds.arch import AttentionSpec
    from alps_ds.tiny import build_model, save_model, tiny_config
    from alps_ds.train.tokenizer import BYTE_VOCAB, save_byte_tokenizer

    root = tmp_path_factory.mktemp("security")
    cfg = tiny_config("llama", layers=2, hidden=32, heads=4, kv_heads=2, vocab=BYTE_VOCAB)
    spec = AttentionSpec.from_config(cfg)
    base, task = build_model(cfg, seed=0), build_model(cfg, seed=0)
    with torch.no_grad():
        for p in task.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    out = {"root": root, "marker": root / "CODE_RAN"}
    for name, model in (("base", base), ("task", task)):
        save_model(model, root / f"{name}_st")
        # transformers 5 writes safetensors only; a legacy checkpoint is config.json + torch.save(state_dict)
        (root / f"{name}_bin").mkdir()
        (root / f"{name}_bin" / "config.json").write_text((root / f"{name}_st" / "config.json").read_text())
        torch.save(model.state_dict(), root / f"{name}_bin" / "pytorch_model.bin")
        out[f"{name}_st"], out[f"{name}_bin"] = root / f"{name}_st", root / f"{name}_bin"
    save_byte_tokenizer(root / "base_bin")
    hostile = root / "hostile_bin"
    hostile.mkdir()
    (hostile / "config.json").write_text((root / "base_bin" / "config.json").read_text())
    save_byte_tokenizer(hostile)
    state = {k: v for k, v in base.state_dict().items()}
    state[f"{spec.module_path(0, 'q_proj')}.weight"] = _Exploit(out["marker"])
    torch.save(state, hostile / "pytorch_model.bin")
    out["hostile_bin"] = hostile
    return out


def _localize(capsys, base: Path, task: Path, out: Path, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["localize", "--base", str(base), "--task", str(task), "--out", str(out), "--quiet", *extra])
    return rc, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("alps-ds: error: "), err
    return lines[0]


def test_localize_refuses_a_pickle_checkpoint_by_default(models, tmp_path, capsys):
    rc, err = _localize(capsys, models["base_st"], models["task_bin"], tmp_path / "out")
    line = _one_error_line(err)
    assert rc == 2 and "pytorch_model.bin" in line and "safetensors" in line and "--allow-pickle" in line
    assert not (tmp_path / "out").exists()


def test_localize_with_allow_pickle_reads_bin_like_safetensors(models, tmp_path, capsys):
    assert _localize(capsys, models["base_st"], models["task_st"], tmp_path / "st")[0] == 0
    assert _localize(capsys, models["base_bin"], models["task_bin"], tmp_path / "bin", "--allow-pickle")[0] == 0
    st = json.loads((tmp_path / "st" / "heads.json").read_text())
    pk = json.loads((tmp_path / "bin" / "heads.json").read_text())
    assert pk["scores"] == st["scores"] and pk["heads"] == st["heads"]
    assert any(s > 0 for row in st["scores"] for s in row)


def test_allow_pickle_still_refuses_code_in_the_pickle(models, tmp_path, capsys):
    for extra in ((), ("--allow-pickle",)):
        rc, err = _localize(capsys, models["base_bin"], models["hostile_bin"], tmp_path / "out", *extra)
        line = _one_error_line(err)
        assert rc == 2 and "pytorch_model.bin" in line
        assert not models["marker"].exists(), "unpickling ran code"
    assert "weights_only" in line  # the --allow-pickle refusal says why


# ---- train ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_on_hostile_bin(models) -> dict:
    """``alps-ds train`` pointed at a model folder holding only a hostile pytorch_model.bin."""
    root = models["root"]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": "Echo.", "input": w, "output": w}) + "\n" for w in "abcd" * 2))
    out = root / "run"
    argv = [
        sys.executable, "-m", "alps_ds", "train", "--config", str(REPO / "configs" / "tiny.yaml"),
        "--set", f"model.path={models['hostile_bin']}", "--set", f"data.datasets=[{data}]",
        "--set", "train.batch=4", "--set", "train.micro_batch=2", "--set", "train.max_steps=1",
        "--set", f"output.dir={out}", "--set", "logging.progress=false",
    ]  # fmt: skip
    env = rank_env()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return {"rc": proc.returncode, "stderr": proc.stderr, "out": out}


def test_train_never_runs_code_from_a_pickle(models, train_on_hostile_bin):
    assert train_on_hostile_bin["rc"] != 0
    assert not models["marker"].exists(), "unpickling ran code"
    assert not (train_on_hostile_bin["out"] / "checkpoints").exists()


def test_train_refuses_a_pickle_only_model_with_one_line(train_on_hostile_bin):
    line = _one_error_line(train_on_hostile_bin["stderr"])
    assert "pytorch_model.bin" in line and "safetensors" in line


# ---- trust_remote_code ---------------------------------------------------------------------------------------------


def test_custom_code_in_a_model_folder_never_runs(models, tmp_path, capsys):
    marker = tmp_path / "REMOTE_CODE_RAN"
    model = tmp_path / "custom"
    model.mkdir()
    config = json.loads((models["base_st"] / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "evil.py").write_text(f"import os\nos.mkdir({str(marker)!r})\n")
    (model / "model.safetensors").write_bytes((models["base_st"] / "model.safetensors").read_bytes())
    heads = tmp_path / "h"
    for argv in (
        ["localize", "--base", str(model), "--task", str(models["task_st"]), "--out", str(heads), "--quiet"],
        ["plan", "--model", str(model), "--gpu-mem", "80"],
        ["layout", "--heads", str(heads / "heads.json"), "--model", str(model)],
    ):
        rc = main(argv)
        err = capsys.readouterr().err
        assert not marker.exists(), f"{argv[0]} ran custom code from the model folder"
        assert rc == 0, (argv[0], err)  # it read the folder and did its work, not refused it before reading
    assert (heads / "heads.json").is_file()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def unsafe_calls(source: str, where: str) -> list[str]:
    """Calls that run a shell, trust remote code, or unpickle without weights_only, in ``source``."""
    problems = []
    for call in _calls(ast.parse(source, where)):
        at = f"{where}:{call.lineno}"
        name = _dotted(call.func)
        for kw in call.keywords:
            literal_false = isinstance(kw.value, ast.Constant) and kw.value.value is False
            if kw.arg in ("trust_remote_code", "shell") and not literal_false:
                problems.append(f"{at}: {kw.arg} not literally False")
        if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
            problems.append(f"{at}: {name} runs a shell")
        command_string = call.args and isinstance(call.args[0], (ast.Constant, ast.JoinedStr, ast.BinOp))
        if name.startswith("subprocess.") and command_string:
            problems.append(f"{at}: {name} given a command string, not an argv list")
        if name == "torch.load":
            wo = [kw for kw in call.keywords if kw.arg == "weights_only"]
            if not wo or not (isinstance(wo[0].value, ast.Constant) and wo[0].value.value is True):
                problems.append(f"{at}: torch.load without weights_only=True")
    return problems


def test_the_scan_finds_unsafe_calls():
    bad = (
        "subprocess.run('ls ' + d, shell=True)\nos.system(c)\nsubprocess.Popen(f'x {y}')\n"
        "AutoModel.from_pretrained(p, trust_remote_code=True)\ntorch.load(f)\n"
    )
    assert len(unsafe_calls(bad, "x.py")) == 6
    assert unsafe_calls("subprocess.run(['ls', d], check=True)\ntorch.load(f, weights_only=True)\n", "y.py") == []


# alps-ds's own per-rank RNG state beside a DeepSpeed checkpoint (DeepSpeed itself unpickles that folder too)
ALLOWED = {("alps_ds/train/checkpoint.py", "torch.load without weights_only=True")}


def test_no_trust_remote_code_and_no_shell_strings_in_the_package():
    problems = [
        p
        for path in sorted(PACKAGE.rglob("*.py"))
        for p in unsafe_calls(path.read_text(), str(path.relative_to(REPO)))
        if (p.split(":")[0], p.split(": ", 1)[1]) not in ALLOWED
    ]
    assert not problems, problems


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/dir.safetensors", ".."])
def test_a_shard_index_cannot_point_outside_the_model_folder(tmp_path, shard):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"model.layers.0.self_attn.q_proj.weight": shard}}))
    with pytest.raises(AlpsError, match="not a file name in the model folder") as e:
        read_index(index)
    assert str(index) in str(e.value) and "\n" not in str(e.value)
