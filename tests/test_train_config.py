"""The run config: paper defaults, YAML and --set overrides with types, errors that name the key."""

from __future__ import annotations

import json
import math
import typing
from pathlib import Path

import pytest
import yaml

from alps_ds.choose import METHODS
from alps_ds.cli import main
from alps_ds.errors import AlpsError
from alps_ds.layout import KV_POLICIES
from alps_ds.localize import HEAD_REPRS, METRICS, SCORE_DTYPES
from alps_ds.train.config import (
    DEFAULT_ZERO_STAGE,
    ZERO_STAGES,
    DataFormat,
    RunConfig,
    Schedule,
    Template,
    gradient_accumulation,
    load_config,
)
from alps_ds.train.engine_config import DEFAULT_DS_CONFIG, deepspeed_config, lr_lambda

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
        ("data: {datasets: [{path: a.jsonl, format: xml}]}", "run.yaml: data.datasets[0].format: 'xml' is unknown"),
        ("data: {packing: maybe}", "run.yaml: data.packing: expected true or false, got 'maybe'"),
        ("train: {betas: [0.9]}", "run.yaml: train.betas: expected a list of 2 values"),
        ("kv: both", "run.yaml: kv: 'both' is unknown; choose one of group, none"),
        ("deepspeed: [1]", "run.yaml: deepspeed: expected a string or a mapping or null, got [1]"),
        ("train: {warmup_ratio: 1.5}", "run.yaml: train.warmup_ratio: must be in [0, 1)"),
        ("selection: {method: top-k}", "run.yaml: selection.task:"),
        ("model: tiny:lama", "run.yaml: model.path: no tiny model family 'lama'; use tiny:<family>, one of"),
        ("engine: nemo", "run.yaml: engine: 'nemo' is unknown; choose one of deepspeed, megatron"),
        ("parallel: {tp: 0}", "run.yaml: parallel.tp: must be at least 1"),
        ("parallel: {pp: 2}", "run.yaml: parallel.pp: engine deepspeed runs no pipeline schedule here"),
        ("engine: megatron\nparallel: {pp: 2}", "run.yaml: parallel.pp: engine megatron runs no pipeline schedule"),
        ("engine: megatron\ntrain_others: [mlp]", "run.yaml: train_others: engine megatron trains the Q/K/V slices"),
    ],
)
def test_bad_values_name_the_key(tmp_path, yaml_text, message):
    text = yaml.safe_dump({**yaml.safe_load(MIN), **yaml.safe_load(yaml_text)})  # the case's keys replace MIN's
    with pytest.raises(AlpsError) as e:
        load_config(write(tmp_path, text))
    assert message in str(e.value).replace(str(tmp_path) + "/", "")


# key -> (run YAML with the bad value w2 at that key, the choices of the module that owns the enum)
ENUMS = {
    "selection.method": ("selection: {method: w2}", METHODS),
    "selection.metric": ("selection: {task: t, metric: w2}", METRICS),
    "selection.head_repr": ("selection: {task: t, head_repr: w2}", HEAD_REPRS),
    "selection.dtype": ("selection: {task: t, dtype: w2}", SCORE_DTYPES),
    "kv": ("selection: {method: random}\nkv: w2", KV_POLICIES),
    "data.datasets[0].format": ("data: {datasets: [{path: d, format: w2}]}", typing.get_args(DataFormat)),
    "data.template": ("data: {datasets: [d], template: w2}", typing.get_args(Template)),
    "train.schedule": ("train: {schedule: w2}", typing.get_args(Schedule)),
}


@pytest.mark.parametrize("key", ENUMS)
def test_an_unknown_enum_value_fails_at_load_naming_the_key(tmp_path, key):
    """One line naming the file and the key (not a CLI flag), listing the owner's choices, before any work."""
    body, choices = ENUMS[key]
    text = "model: tiny:llama\n" + body + "\n"
    if "selection:" not in body:
        text += "selection: {method: random}\n"
    if "data:" not in body:
        text += "data: {datasets: [d.jsonl]}\n"
    path = write(tmp_path, text)
    with pytest.raises(AlpsError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: {key}: 'w2' is unknown; choose one of " + ", ".join(choices)
    # The same words through --set (which names itself as the source).
    with pytest.raises(AlpsError) as e:
        load_config(write(tmp_path, MIN), [f"{key.replace('[0]', '.0')}=w2"])
    assert str(e.value).startswith(f"--set: {key}: 'w2' is unknown; choose one of ")


def test_selection_metric_w2_is_one_line_from_the_cli(tmp_path, capsys):
    path = write(tmp_path, "model: tiny:llama\nselection: {task: t, metric: w2}\ndata: {datasets: [d.jsonl]}\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"alps-ds: error: {path}: selection.metric: 'w2' is unknown; choose one of " + ", ".join(METRICS)


def test_cli_choices_are_the_owners_enums():
    """Every command's enum options accept exactly the words of the module that owns them."""
    from alps_ds.arch import TP_LAYOUTS
    from alps_ds.cli import _subcommands, build_parser

    commands = _subcommands(build_parser())
    want = {"--kv": KV_POLICIES, "--tp-layout": tuple(TP_LAYOUTS), "--zero": ZERO_STAGES}
    seen = set()
    for name, parser in commands.items():
        for action in parser._actions:
            for flag in set(action.option_strings) & set(want):
                assert tuple(action.choices) == want[flag], (name, flag)
                seen.add((name, flag))
        zero = next((a for a in parser._actions if "--zero" in a.option_strings), None)
        if zero is not None and zero.default is not None:
            assert zero.default == DEFAULT_ZERO_STAGE, name
    assert {("plan", "--kv"), ("plan", "--zero"), ("check", "--zero"), ("check", "--tp-layout")} <= seen
    assert RunConfig().deepspeed is None and DEFAULT_DS_CONFIG["zero_optimization"]["stage"] == DEFAULT_ZERO_STAGE


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
