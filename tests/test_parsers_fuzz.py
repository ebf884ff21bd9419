"""Property tests: every file parser users feed answers with success or one clean AlpsError line, never a traceback.

Already fuzzed elsewhere (not repeated): heads.json dicts and bytes (test_heads.py), hostfile
text and SLURM node lists (test_hosts.py). Here: adapter folders (adapter.json + tensors),
the run YAML and ``--set`` overrides, the DeepSpeed JSON the run config points to, the
checkpoint pointer ``latest.json``, safetensors shard headers (localize's own reader) and
hostfiles as raw bytes (undecodable files included).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from alps_ds.adapter import Adapter
from alps_ds.arch import AttentionSpec
from alps_ds.errors import AlpsError
from alps_ds.selection import HeadSelection, Provenance
from alps_ds.train.config import RunConfig, load_config

FIXTURE_OK = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)


def clean(e: AlpsError, *names: str) -> None:
    """One line, naming one of ``names`` (the file or key at fault)."""
    text = str(e)
    assert "\n" not in text and text.strip(), repr(text)
    assert not names or any(n in text for n in names), (names, text)


# ---- adapter folders ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    from alps_ds.adapter import save_adapter
    from alps_ds.sparse import apply
    from alps_ds.tiny import build_model, tiny_config

    cfg = tiny_config("llama", layers=2, hidden=32, heads=4, kv_heads=2, vocab=64)
    spec = AttentionSpec.from_config(cfg)
    model = build_model(cfg)
    apply(model, HeadSelection(spec.fingerprint, ((0, 1), (1, 3)), Provenance("explicit")))
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "adapter")


@st.composite
def damaged_adapter_meta(draw, valid: dict):
    """The valid adapter.json with keys replaced by arbitrary JSON, down into modules and their ranges."""
    d = json.loads(json.dumps(valid))
    for key in draw(st.sets(st.sampled_from(sorted(d)), max_size=2)):
        d[key] = draw(json_values)
    mods = d.get("modules")
    modules = [m for m in mods if isinstance(m, dict) and m] if isinstance(mods, list) else []
    if modules:  # a replaced "modules" list may hold any JSON; damage one of its objects
        m = modules[draw(st.integers(0, len(modules) - 1))]
        for key in draw(st.sets(st.sampled_from(sorted(m)), min_size=1, max_size=2)):
            m[key] = draw(json_values | st.lists(st.lists(st.integers(-5, 10**6), max_size=3), max_size=3))
    if draw(st.booleans()):
        d.pop(draw(st.sampled_from(sorted(d))), None)
    return d


@FIXTURE_OK
@given(data=st.data())
def test_adapter_json_damaged_gives_only_alps_errors(adapter_dir, tmp_path_factory, data):
    valid = json.loads((adapter_dir / "adapter.json").read_text())
    meta = data.draw(damaged_adapter_meta(valid) | json_values)
    target = tmp_path_factory.mktemp("a") / "adapter"
    shutil.copytree(adapter_dir, target)
    (target / "adapter.json").write_text(json.dumps(meta))
    try:
        adapter = Adapter.read(target)
    except AlpsError as e:
        clean(e, str(target))
    else:  # what reads must be consistent: every module's tensor has its rows
        for m in adapter.modules:
            rows = sum(b - a for a, b in m.ranges)
            assert adapter.tensors[f"{m.module}.weight"].shape == (rows, m.in_features)


@FIXTURE_OK
@given(blob=st.binary(max_size=200), which=st.sampled_from(["adapter.json", "adapter.safetensors"]))
def test_adapter_files_as_arbitrary_bytes_give_only_alps_errors(adapter_dir, tmp_path_factory, blob, which):
    target = tmp_path_factory.mktemp("a") / "adapter"
    shutil.copytree(adapter_dir, target)
    (target / which).write_bytes(blob)
    with pytest.raises(AlpsError) as info:
        Adapter.read(target)
    clean(info.value, str(target))


@FIXTURE_OK
@given(data=st.data())
def test_adapter_tensors_of_wrong_shape_or_name_give_only_alps_errors(adapter_dir, tmp_path_factory, data):
    from safetensors.torch import load_file

    tensors = load_file(str(adapter_dir / "adapter.safetensors"))
    key = data.draw(st.sampled_from(sorted(tensors)))
    action = data.draw(st.sampled_from(["drop", "reshape", "rename"]))
    if action == "drop":
        tensors.pop(key)
    elif action == "reshape":
        tensors[key] = torch.zeros(data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)))
    else:
        tensors[key + "x"] = tensors.pop(key)
    target = tmp_path_factory.mktemp("a") / "adapter"
    shutil.copytree(adapter_dir, target)
    save_file(tensors, str(target / "adapter.safetensors"))
    with pytest.raises(AlpsError) as info:
        Adapter.read(target)
    clean(info.value, str(target))


# ---- the run YAML and --set overrides ------------------------------------------------------------------------------

VALID_RUN = {
    "model": "tiny:llama",
    "selection": {"method": "random", "ratio": 0.25},
    "data": {"datasets": ["d.jsonl"], "max_length": 64},
    "train": {"micro_batch": 2, "batch": 8, "lr": 1e-3, "betas": [0.9, 0.99]},
    "deepspeed": {"zero_optimization": {"stage": 2}},
    "output": {"dir": "runs/x"},
}
KEYS = sorted(RunConfig().to_dict()) + ["bogus"]


@st.composite
def damaged_run(draw):
    d = json.loads(json.dumps(VALID_RUN))
    for key in draw(st.sets(st.sampled_from(KEYS), max_size=3)):
        d[key] = draw(json_values)
    section = d.get(draw(st.sampled_from(["train", "data", "selection", "output"])))
    if isinstance(section, dict) and section:
        section[draw(st.sampled_from(sorted(section) + ["bogus"]))] = draw(json_values)
    return d


def _load(tmp_path: Path, text: str, overrides=()):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return load_config(path, overrides)


@FIXTURE_OK
@given(run=damaged_run() | json_values)
def test_run_yaml_structures_give_only_alps_errors(tmp_path, run):
    try:
        cfg = _load(tmp_path, yaml.safe_dump(run))
    except AlpsError as e:
        clean(e, "run.yaml")
    else:
        assert isinstance(cfg, RunConfig) and cfg.model.path and cfg.data.datasets


yaml_noise = st.text(alphabet=st.sampled_from("abz:-[]{}\"'#&*!|>%@`\n \t0.5e"), max_size=60) | st.text(max_size=40)


@FIXTURE_OK
@given(text=yaml_noise)
def test_run_yaml_text_gives_only_alps_errors(tmp_path, text):
    try:
        _load(tmp_path, text)
    except AlpsError as e:
        clean(e, "run.yaml")


override_key = st.sampled_from(
    [
        "train.lr",
        "train.betas",
        "train.micro_batch",
        "data.datasets",
        "data.datasets.0.path",
        "data.datasets.5",
        "selection",
        "deepspeed",
        "deepspeed.bf16.enabled",
        "train_others",
        "model",
        "output.dir.x",
        "kv",
        "bogus.key",
        "",
        ".",
        "train..lr",
        "train.lr.x",
    ]
) | st.text(alphabet=st.sampled_from("abtrain.0_"), max_size=12)
override_value = st.text(alphabet=st.sampled_from("0123456789.e-+abc[]{},: truefalsenul'\""), max_size=20)


@FIXTURE_OK
@given(items=st.lists(st.tuples(override_key, st.sampled_from(["=", "", "=="]), override_value), max_size=3))
def test_set_overrides_give_only_alps_errors(tmp_path, items):
    overrides = [k + eq + v for k, eq, v in items]
    try:
        cfg = _load(tmp_path, yaml.safe_dump(VALID_RUN), overrides)
    except AlpsError as e:
        clean(e, "--set", "run.yaml")
    else:
        assert isinstance(cfg, RunConfig)


# ---- the DeepSpeed JSON a run points to ----------------------------------------------------------------------------


@st.composite
def damaged_ds(draw):
    d = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": False}, "optimizer": {"type": "AdamW", "params": {}}}
    keys = [
        "zero_optimization",
        "bf16",
        "fp16",
        "optimizer",
        "scheduler",
        "train_batch_size",
        "gradient_clipping",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
    ]
    for key in draw(st.sets(st.sampled_from(keys), max_size=3)):
        d[key] = draw(json_values)
    return d


@FIXTURE_OK
@given(ds=damaged_ds() | json_values)
def test_deepspeed_json_gives_only_alps_errors(tmp_path, ds):
    from alps_ds.train.engine_config import deepspeed_config, train_dtype, zero_stage

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    cfg = _load(tmp_path, yaml.safe_dump({**VALID_RUN, "deepspeed": str(path)}))
    try:
        out = deepspeed_config(cfg, grad_accum=2)
        zero_stage(out), train_dtype(out)
    except AlpsError as e:
        clean(e, "ds.json")


# ---- the checkpoint pointer and safetensors headers ----------------------------------------------------------------


@FIXTURE_OK
@given(blob=st.binary(max_size=80) | json_values.map(lambda v: json.dumps(v).encode()))
def test_latest_pointer_gives_only_alps_errors(tmp_path, blob):
    from alps_ds.train.checkpoint import read_latest

    (tmp_path / "latest.json").write_bytes(blob)
    try:
        got = read_latest(tmp_path)
    except AlpsError as e:
        clean(e, "latest.json")
    else:
        assert isinstance(got["tag"], str) and isinstance(got["step"], int)


@st.composite
def safetensors_blobs(draw):
    """Headers that claim arbitrary lengths, JSON, dtypes, shapes and offsets, then arbitrary data."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=64))
    entry = {
        "dtype": draw(st.sampled_from(["F32", "BF16", "I8", "F64", "x"]) | json_values),
        "shape": draw(st.lists(st.integers(-2, 4), max_size=3) | json_values | st.just([1e400])),
        "data_offsets": draw(st.lists(st.integers(-64, 64), min_size=2, max_size=2) | json_values),
    }
    header = json.dumps({"t": entry} if draw(st.booleans()) else draw(json_values)).encode()
    claimed = draw(st.sampled_from([len(header), len(header) + 7, 2**63, 0]))
    return struct.pack("<Q", claimed) + header + draw(st.binary(max_size=64))


@FIXTURE_OK
@given(blob=safetensors_blobs())
def test_safetensors_headers_give_only_alps_errors(tmp_path, blob):
    from alps_ds.localize.reader import read_header

    shard = tmp_path / "model.safetensors"
    shard.write_bytes(blob)
    try:
        infos = read_header(shard)
    except AlpsError as e:
        clean(e, "model.safetensors")
    else:
        assert all(0 <= i.begin <= i.end <= len(blob) for i in infos.values())


# ---- hostfiles as bytes --------------------------------------------------------------------------------------------


@FIXTURE_OK
@given(blob=st.binary(max_size=80) | st.text(max_size=40).map(str.encode))
def test_hostfile_bytes_give_only_alps_errors(tmp_path, blob):
    from alps_ds.launcher.hosts import read_hostfile

    path = tmp_path / "hostfile"
    path.write_bytes(blob)
    try:
        hosts = read_hostfile(path)
    except AlpsError as e:
        clean(e, "hostfile")
    else:
        assert hosts and all(h.slots >= 1 for h in hosts)
