"""Head adapters: save/load round trip, shard-by-shard merge into a real sharded checkpoint, CLI."""

from __future__ import annotations

import copy
import filecmp
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from alps_ds.adapter import load_adapter, merge_adapter_into_checkpoint, save_adapter
from alps_ds.arch import AttentionSpec
from alps_ds.cli import main
from alps_ds.errors import AlpsError
from alps_ds.selection import HeadSelection, Provenance
from alps_ds.sparse import apply, hooked_modules, merge
from alps_ds.tiny import build_model, save_model, tiny_config

HEADS = ((0, 0), (1, 3))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A qwen2 (q/k/v biases) base saved as a sharded checkpoint, and a hooked copy trained 3 steps."""
    root = tmp_path_factory.mktemp("adapter")
    cfg = tiny_config("qwen2", layers=3, hidden=64, heads=4, kv_heads=2, vocab=96)
    spec = AttentionSpec.from_config(cfg)
    base = build_model(cfg, seed=0)
    save_model(base, root / "base", max_shard_size="40KB")
    sel = HeadSelection(spec.fingerprint, HEADS, Provenance("explicit"))
    model = copy.deepcopy(base)
    apply(model, sel)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    save_adapter(model, root / "adapter")
    return root, base, model, sel


def test_adapter_holds_only_the_slices(trained):
    root, _, model, sel = trained
    meta = json.loads((root / "adapter" / "adapter.json").read_text())
    tensors = load_file(root / "adapter" / "adapter.safetensors")
    assert HeadSelection.from_dict(meta["selection"]).heads == sel.heads
    assert meta["dtype"] == "float32" and meta["kv"] == "group"
    hooked = dict(hooked_modules(model))
    assert {m["module"] for m in meta["modules"]} == set(hooked)
    for name, mod in hooked.items():
        assert torch.equal(tensors[f"{name}.weight"], mod.head_weight.detach())
        assert torch.equal(tensors[f"{name}.bias"], mod.head_bias.detach())
    assert sum(t.numel() for t in tensors.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_load_onto_hooked_and_onto_plain_base(trained):
    root, base, model, sel = trained
    fresh = copy.deepcopy(base)
    apply(fresh, sel)
    load_adapter(fresh, root / "adapter")
    for (_, a), (_, b) in zip(hooked_modules(fresh), hooked_modules(model)):
        assert torch.equal(a.head_weight, b.head_weight) and torch.equal(a.head_bias, b.head_bias)

    merged = merge(copy.deepcopy(model)).state_dict()
    plain = load_adapter(copy.deepcopy(base), root / "adapter").state_dict()
    assert all(torch.equal(plain[k], v) for k, v in merged.items())

    other = copy.deepcopy(base)
    apply(other, sel, kv="none")
    with pytest.raises(AlpsError, match="hook the model with the adapter's selection"):
        load_adapter(other, root / "adapter")


def test_save_refuses_a_tensor_parallel_model(trained, tmp_path):
    """AutoTP slices hold rows local to each rank's shard; rank 0 alone would write a partial adapter."""
    import dataclasses

    root, base, _, sel = trained
    model = copy.deepcopy(base)
    apply(model, sel)
    _, mod = next(hooked_modules(model))
    mod.hooked = dataclasses.replace(mod.hooked, tp_rank=1, tp_size=2)  # how AutoTP's apply describes a shard
    with pytest.raises(AlpsError, match="tensor-parallel"):
        save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_load_onto_a_model_on_another_device(trained):
    """The adapter is read on the CPU; a base model on a GPU takes its rows there (index_copy refuses
    an index on another device; the meta device runs the same checks as CUDA)."""
    root, base, *_ = trained
    model = load_adapter(copy.deepcopy(base).to("meta"), root / "adapter")
    assert {p.device.type for p in model.parameters()} == {"meta"}


@pytest.mark.parametrize("damage", ["reversed", "negative", "overlapping"])
def test_damaged_row_ranges_are_one_line_errors(trained, tmp_path, capsys, damage):
    """Ranges that still add up to the tensor's rows reached index_copy and raised a traceback (or,
    overlapping, wrote some rows twice)."""
    root, base, *_ = trained
    adapter = tmp_path / "adapter"
    shutil.copytree(root / "adapter", adapter)
    meta = json.loads((adapter / "adapter.json").read_text())
    rows = sum(b - a for a, b in meta["modules"][0]["ranges"])
    meta["modules"][0]["ranges"] = {
        "reversed": [[rows + 8, rows], [0, rows + 8]],
        "negative": [[-rows, 0]],
        "overlapping": [[0, rows - 4], [rows - 8, rows - 4]],
    }[damage]
    (adapter / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(AlpsError, match="row ranges"):
        load_adapter(copy.deepcopy(base), adapter)
    assert main(["merge", "--base", str(root / "base"), "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "row ranges" in err[0]
    assert not (tmp_path / "m").exists()


def test_merge_into_sharded_checkpoint_equals_merge_and_copies_untouched_shards(trained, tmp_path):
    root, _, model, _ = trained
    shards = json.loads((root / "base" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(shards.values())) >= 3, "fixture must produce a sharded checkpoint"
    out = merge_adapter_into_checkpoint(root / "base", root / "adapter", tmp_path / "merged", progress=False)

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    expected = merge(copy.deepcopy(model)).state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())

    touched = {
        shards[f"{spec_name}.{leaf}"] for spec_name in dict(hooked_modules(model)) for leaf in ("weight", "bias")
    }
    names = sorted(p.name for p in (root / "base").iterdir())
    assert names == sorted(p.name for p in out.iterdir() if p.name != ".alps-merge")  # merge's marker
    untouched = [n for n in names if n not in touched]
    assert any(n.endswith(".safetensors") for n in untouched), "some shard must hold no adapted tensor"
    for n in untouched:
        assert filecmp.cmp(root / "base" / n, out / n, shallow=False), n
    for n in touched:
        assert not filecmp.cmp(root / "base" / n, out / n, shallow=False), n


def test_cli_merge_and_errors(trained, tmp_path, capsys):
    root, _, model, _ = trained
    assert (
        main(["merge", "--base", str(root / "base"), "--adapter", str(root / "adapter"), "--out", str(tmp_path / "m")])
        == 0
    )
    assert (tmp_path / "m" / "config.json").is_file()
    written = {k: v for f in (tmp_path / "m").glob("*.safetensors") for k, v in load_file(f).items()}
    expected = merge(copy.deepcopy(model)).state_dict()  # the trained rows, not the base's
    assert written.keys() == expected.keys() and all(torch.equal(written[k], v) for k, v in expected.items())
    (tmp_path / "not_an_adapter").mkdir()
    no_adapter = str(tmp_path / "not_an_adapter")
    assert main(["merge", "--base", str(root / "base"), "--adapter", no_adapter, "--out", str(tmp_path / "x")]) == 2
    assert "not an alps-ds adapter" in capsys.readouterr().err
    base = str(root / "base")
    assert main(["merge", "--base", base, "--adapter", str(root / "adapter"), "--out", base]) == 2
    assert "is the input" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_adapter_json_nested_too_deep_is_one_line(trained, tmp_path):
    root, base, *_ = trained
    adapter = tmp_path / "adapter"
    shutil.copytree(root / "adapter", adapter)
    (adapter / "adapter.json").write_text("[" * 100_000)  # past Python's recursion limit: RecursionError
    with pytest.raises(AlpsError, match="adapter.json: not valid JSON"):
        load_adapter(copy.deepcopy(base), adapter)


def test_merge_refuses_a_damaged_base_with_one_line(trained, tmp_path, capsys):
    root, base, *_ = trained
    single = tmp_path / "single"  # a single-file checkpoint whose safetensors file is garbage
    save_model(base, single)
    (single / "model.safetensors").write_bytes(b"not a safetensors file")
    listed = tmp_path / "listed"  # a shard index whose weight_map is not an object
    shutil.copytree(root / "base", listed)
    (listed / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model-00001.safetensors"]}))
    index = json.loads((root / "base" / "model.safetensors.index.json").read_text())
    q0 = "model.layers.0.self_attn.q_proj.weight"  # adapted: the fixture selects head (0, 0)
    lost = tmp_path / "lost"  # the shard holding an adapted tensor is gone: merged nothing, exit 0
    shutil.copytree(root / "base", lost)
    (lost / index["weight_map"][q0]).unlink()
    lying = tmp_path / "lying"  # the index puts an adapted tensor in a shard that does not hold it
    shutil.copytree(root / "base", lying)
    index["weight_map"][q0] = next(s for k, s in index["weight_map"].items() if s != index["weight_map"][q0])
    (lying / "model.safetensors.index.json").write_text(json.dumps(index))
    capsys.readouterr()  # save_model's progress bar
    for damaged, words in (
        (single, "unreadable safetensors shard"),
        (listed, "unreadable shard index"),
        (lost, "is missing"),
        (lying, f"no tensor {q0}"),
    ):
        out = tmp_path / f"out-{damaged.name}"
        assert main(["merge", "--base", str(damaged), "--adapter", str(root / "adapter"), "--out", str(out)]) == 2
        err = capsys.readouterr().err  # after merge's progress bar, when it got that far
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("alps-ds: error: "), err
        assert words in err.strip().splitlines()[-1], err
        assert not out.exists()


def test_adapter_for_another_model_is_refused(trained, tmp_path):
    root, *_ = trained
    cfg = tiny_config("qwen2", layers=2, hidden=64, heads=4, kv_heads=2, vocab=96)
    save_model(build_model(cfg), tmp_path / "small")
    with pytest.raises(AlpsError, match="num_layers: 3 != 2"):
        merge_adapter_into_checkpoint(tmp_path / "small", root / "adapter", tmp_path / "out", progress=False)
    with pytest.raises(AlpsError, match="num_layers: 3 != 2"):
        load_adapter(build_model(cfg), root / "adapter")
    assert not (tmp_path / "out").exists()
