"""The run config: paper defaults, YAML and --set overrides with types, errors that name the key."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from alps_ds.cli import main
from alps_ds.errors import AlpsError
from alps_ds.train.config import RunConfig, gradient_accumulation, load_config
from alps_ds.train.engine_config import deepspeed_config, lr_lambda

REPO = Path(__file__).resolve().parents[1]
MIN = "model: tiny:llama\nselection: {method: random}\ndata: {datasets: [d.jsonl]}\n"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_defaults_are_the_paper_recipe():
    t = RunConfig().train
    assert (t.lr, t.betas, t.weight_decay, t.warmup_ratio, t.min_lr_ratio) == (2e-5, (0.9, 0.999), 0.1, 0.1, 0.1)
    assert (t.batch, t.epochs, t.schedule) == (128, 3.0, "cosine")
    assert RunConfig().kv == "group" and RunConfig().selection.ratio == 0.1
    assert RunConfig().data.template == "alpaca"


def test_shipped_configs_load():
    tiny = load_config(REPO / "configs" / "tiny.yaml")
    assert tiny.model.path == "tiny:llama" and tiny.data.datasets[0].path == "configs/data/tiny.jsonl"
    paper = load_config(REPO / "configs" / "paper_recipe.yaml")
    assert paper.train.lr == 2e-5 and paper.deepspeed["bf16"]["enabled"] is True
    big = load_config(REPO / "configs" / "llama-3.1-70b.yaml")
    assert big.deepspeed["zero_optimization"]["stage"] == 3 and big.train.gradient_checkpointing is True
    for name in ("ds_zero2.json", "ds_zero3.json", "ds_zero3_offload.json"):
        ds = json.loads((REPO / "configs" / name).read_text())
        assert "auto" not in json.dumps(ds)


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("train: {lr: abc}", "run.yaml: train.lr: expected a number, got 'abc'"),
        ("train: {micro_batch: 2.5}", "run.yaml: train.micro_batch: expected an integer, got 2.5"),
        ("train: {lr_rate: 1}", "run.yaml: train.lr_rate: unknown key"),
        ("trian: {lr: 1}", "run.yaml: trian: unknown key"),
        ("data: {datasets: [{path: a.jsonl, format: xml}]}", "run.yaml: data.datasets[0].format: expected one of"),
        ("data: {packing: maybe}", "run.yaml: data.packing: expected true or false, got 'maybe'"),
        ("train: {betas: [0.9]}", "run.yaml: train.betas: expected a list of 2 values"),
        ("kv: both", "run.yaml: kv: expected one of group, none, got 'both'"),
        ("deepspeed: [1]", "run.yaml: deepspeed: expected a string or a mapping or null, got [1]"),
        ("train: {warmup_ratio: 1.5}", "run.yaml: train.warmup_ratio: must be in [0, 1)"),
        ("selection: {method: top-k}", "run.yaml: selection.task:"),
        ("model: tiny:lama", "run.yaml: model.path: no tiny model family 'lama'; use tiny:<family>, one of"),
    ],
)
def test_bad_values_name_the_key(tmp_path, yaml_text, message):
    text = yaml.safe_dump({**yaml.safe_load(MIN), **yaml.safe_load(yaml_text)})  # the case's keys replace MIN's
    with pytest.raises(AlpsError) as e:
        load_config(write(tmp_path, text))
    assert message in str(e.value).replace(str(tmp_path) + "/", "")


def test_yaml_numbers_without_a_dot_and_missing_keys(tmp_path):
    cfg = load_config(write(tmp_path, MIN + "train: {lr: 2e-5, epochs: 1}\n"))
    assert cfg.train.lr == 2e-5 and isinstance(cfg.train.epochs, float)
    with pytest.raises(AlpsError, match="model.path: required"):
        load_config(write(tmp_path, "selection: {method: random}\ndata: {datasets: [d.jsonl]}\n"))
    with pytest.raises(AlpsError, match="not valid YAML at line 3"):
        load_config(write(tmp_path, "model: x\ntrain: {lr: [\n"))


def test_overrides_are_typed(tmp_path):
    cfg = load_config(
        write(tmp_path, MIN),
        [
            "train.lr=1e-4",
            "data.packing=true",
            "train.betas=[0.8, 0.95]",
            "train.max_steps=7",
            "train_others=all",
            "deepspeed.zero_optimization.stage=3",
            "data.datasets.0.path=other.jsonl",
            "selection=heads.json",
        ],
    )
    assert cfg.train.lr == 1e-4 and cfg.data.packing is True and cfg.train.betas == (0.8, 0.95)
    assert cfg.train.max_steps == 7 and cfg.train_others == ["all"]
    assert cfg.deepspeed == {"zero_optimization": {"stage": 3}}
    assert cfg.data.datasets[0].path == "other.jsonl" and cfg.selection.heads == "heads.json"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=abc", "--set: train.lr: expected a number, got 'abc'"),
        ("train.nope=1", "--set: train.nope: unknown key"),
        ("data.datasets.3.path=x", "--set: data.datasets.3: no list item '3'"),
        ("train.lr", "--set 'train.lr': expected KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_key(tmp_path, override, message):
    with pytest.raises(AlpsError) as e:
        load_config(write(tmp_path, MIN), [override])
    assert message in str(e.value)


def test_cli_reports_one_line_and_exit_2(tmp_path, capsys):
    assert main(["train", "--config", str(write(tmp_path, MIN)), "--set", "train.lr=abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "alps-ds: error: --set: train.lr: expected a number, got 'abc'"


def test_gradient_accumulation_from_world_size(tmp_path):
    cfg = load_config(write(tmp_path, MIN + "train: {micro_batch: 4, batch: 32}\n"))
    assert (
        gradient_accumulation(cfg, 1) == 8 and gradient_accumulation(cfg, 2) == 4 and gradient_accumulation(cfg, 8) == 1
    )
    with pytest.raises(AlpsError, match=r"train.batch: 32 is not a multiple of .* \(4 x 3 = 12\)"):
        gradient_accumulation(cfg, 3)


def test_deepspeed_config_is_filled_from_the_run_config(tmp_path):
    cfg = load_config(write(tmp_path, MIN + "train: {micro_batch: 2, batch: 16, grad_clip: 0.5}\n"))
    ds = deepspeed_config(cfg, 4)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2  # the built-in default
    cfg.deepspeed = str(REPO / "configs" / "ds_zero3_offload.json")
    params = deepspeed_config(cfg, 4)["optimizer"]["params"]
    assert params == {"lr": 2e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1}
    cfg.deepspeed = {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 0.5}
    assert deepspeed_config(cfg, 4)["train_micro_batch_size_per_gpu"] == 2
    cfg.deepspeed = {"train_micro_batch_size_per_gpu": 8}
    with pytest.raises(AlpsError, match=r"train_micro_batch_size_per_gpu is 8 but the run config gives 2 \(train.mic"):
        deepspeed_config(cfg, 4)
    cfg.deepspeed = {"scheduler": {"type": "WarmupLR"}}
    with pytest.raises(AlpsError, match="scheduler: the LR schedule comes from train.schedule"):
        deepspeed_config(cfg, 4)
    cfg.deepspeed = str(tmp_path / "missing.json")
    with pytest.raises(AlpsError, match="missing.json: no such file"):
        deepspeed_config(cfg, 4)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays_to_ten_percent(tmp_path, schedule):
    cfg = load_config(write(tmp_path, MIN + f"train: {{schedule: {schedule}}}\n"))
    fn = lr_lambda(cfg, 100)
    warm = [fn(s) for s in range(10)]
    assert warm == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert fn(10) == pytest.approx(1.0)
    tail = [fn(s) for s in range(10, 101)]
    assert all(a >= b - 1e-12 for a, b in zip(tail, tail[1:]))
    assert fn(100) == pytest.approx(1.0 if schedule == "constant" else 0.1)
    if schedule == "cosine":
        assert fn(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
