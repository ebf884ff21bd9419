"""``alps-ds export-lora``: a head adapter as a PEFT LoRA that real PEFT loads and that equals the merged model.

A tiny llama (GQA), qwen2 (q/k/v biases), phi3 (fused qkv_proj) and gpt_neox (per-head interleaved
query_key_value, biases) are saved with ``save_pretrained``, loaded with
``from_pretrained`` (so the adapter records its base), hooked, trained a few AdamW steps; the
adapter and the merged model are saved. The export runs as the CLI in its own process and is
checked in a fresh process with ``peft.PeftModel.from_pretrained`` on the base.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist import REPO, rank_env
from safetensors.torch import load_file

from alps_ds.adapter import save_adapter
from alps_ds.arch import AttentionSpec
from alps_ds.cli import main
from alps_ds.selection import HeadSelection, Provenance
from alps_ds.sparse import apply, merge
from alps_ds.tiny import build_model, save_model, tiny_config

HEADS = ((0, 1), (1, 2), (1, 3))  # layer 1: two query heads of one kv head -> q_proj 32 rows, k/v 16


def tiny(family: str):
    return tiny_config(family, layers=2, hidden=64, heads=4, kv_heads=2, vocab=96)


def train_and_save(base: Path, root: Path, *, train_others: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """Hook the model loaded from ``base``, train 4 AdamW steps, save ``root/adapter`` and ``root/merged``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    sel = HeadSelection(AttentionSpec.from_config(model.config).fingerprint, HEADS, Provenance("explicit"))
    apply(model, sel, train_others=train_others)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    save_adapter(model, root / "adapter")
    save_model(merge(model), root / "merged")
    return root / "adapter", root / "merged"


@pytest.fixture(scope="module", params=["llama", "qwen2", "phi3", "gpt_neox"])
def trained(request, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp(f"peft-{request.param}")
    # llama sharded: the base rows come from several shard files through the index
    save_model(build_model(tiny(request.param), seed=0), root / "base", max_shard_size="40KB")
    train_and_save(root / "base", root)
    return root


def cli(*args) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "alps_ds", *map(str, args)]
    return subprocess.run(argv, cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=600)


def peft_check(base: Path, lora: Path, merged: Path) -> dict:
    """Run tests/scripts/peft_load.py in a fresh process (real PEFT on the files on disk)."""
    script = REPO / "tests" / "scripts" / "peft_load.py"
    p = subprocess.run(
        [sys.executable, str(script), str(base), str(lora), str(merged)],
        env=rank_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def tensors_of(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for shard in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(shard).items()}


def selected_rows(adapter: Path) -> dict[str, set[int]]:
    """Checkpoint key -> trained rows, for every tensor the adapter changes."""
    meta = json.loads((adapter / "adapter.json").read_text())
    out = {}
    for m in meta["modules"]:
        rows = {r for a, b in m["ranges"] for r in range(a, b)}
        out[f"{m['module']}.weight"] = rows
        if m["bias"]:
            out[f"{m['module']}.bias"] = rows
    return out


def test_exact_export_loads_in_peft_and_equals_the_merged_model(trained):
    root = trained
    p = cli("export-lora", "--adapter", root / "adapter", "--out", root / "lora")  # the base: recorded in the adapter
    assert p.returncode == 0, p.stderr[-4000:]
    assert "exact" in p.stdout
    config = json.loads((root / "lora" / "adapter_config.json").read_text())
    rows = selected_rows(root / "adapter")
    modules = {k.removesuffix(".weight"): len(v) for k, v in rows.items() if k.endswith(".weight")}
    assert config["rank_pattern"] == modules and config["alpha_pattern"] == modules  # scaling 1 per module
    assert sorted(config["target_modules"]) == sorted(modules) and config["r"] == config["lora_alpha"]
    has_bias = AttentionSpec.from_pretrained(root / "base").qkv_bias  # qwen2, gpt_neox
    assert config["lora_bias"] is has_bias

    result = peft_check(root / "base", root / "lora", root / "merged")
    assert result["base_vs_merged"] > 1e-3, "training must have moved the logits for this test to mean anything"
    assert result["logits"] < 1e-5
    assert result["same_keys"]
    for key, t in result["tensors"].items():
        assert t["max"] < 1e-6, key
        assert set(t["rows"]) <= rows.get(key, set()), f"{key}: merge_and_unload changed rows outside the selection"
    if has_bias:  # the biases trained too, so the export's lora_B biases carry a real change
        base, merged = tensors_of(root / "base"), tensors_of(root / "merged")
        assert all(not torch.equal(base[k], merged[k]) for k in rows if k.endswith(".bias"))


def test_rank_cap_reports_the_true_error_and_it_falls_with_the_rank(trained, capsys):
    root = trained
    base, merged = tensors_of(root / "base"), tensors_of(root / "merged")
    most = max(len(rows) for rows in selected_rows(root / "adapter").values())
    reported = []
    for rank in (1, 2, 4, 8, most):
        out = root / f"lora-r{rank}"
        assert main(["export-lora", "--adapter", str(root / "adapter"), "--out", str(out), "--rank", str(rank)]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("relative error"))
        error = float(line.split(":")[1].split(";")[0])
        lora = load_file(out / "adapter_model.safetensors")
        lost = total = 0.0
        for key in selected_rows(root / "adapter"):
            if not key.endswith(".weight"):
                continue
            prefix = "base_model.model." + key.removesuffix(".weight")
            b, a = lora[f"{prefix}.lora_B.weight"].double(), lora[f"{prefix}.lora_A.weight"].double()
            assert a.shape[0] == min(rank, len(selected_rows(root / "adapter")[key]))
            delta = merged[key].double() - base[key].double()
            lost += float((delta - b @ a).square().sum())
            total += float(delta.square().sum())
        assert error == pytest.approx((lost / total) ** 0.5, rel=1e-4, abs=1e-7)
        reported.append(error)
    assert reported[0] > reported[1] > reported[2] > reported[3] > 0.0
    assert reported[4] == pytest.approx(0.0, abs=1e-7)  # as many as any module's rows: exact again


def test_train_others_go_in_modules_to_save(tmp_path):
    """o_proj trained in full (stored whole in the adapter, version 2 'others') becomes PEFT ``modules_to_save``."""
    save_model(build_model(tiny("llama"), seed=0), tmp_path / "base")
    adapter, merged = train_and_save(tmp_path / "base", tmp_path, train_others=("o_proj",))
    names = json.loads((adapter / "adapter.json").read_text())["others"]
    assert names and all(".o_proj." in n for n in names)
    assert set(names) <= set(load_file(adapter / "adapter.safetensors"))

    assert main(["export-lora", "--adapter", str(adapter), "--out", str(tmp_path / "lora")]) == 0
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == sorted({n.rpartition(".")[0] for n in names})
    result = peft_check(tmp_path / "base", tmp_path / "lora", merged)
    assert result["logits"] < 1e-5
    assert all(t["max"] < 1e-6 for t in result["tensors"].values())


# ---- refusals: one line, exit 2, nothing on disk changed ------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(capsys, root: Path, argv: list[str], *words: str) -> None:
    before = snapshot(root)
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alps-ds: error: "), err
    for word in words:
        assert word in err[0], (word, err[0])
    assert snapshot(root) == before


@pytest.fixture(scope="module")
def refusal_root(tmp_path_factory) -> Path:
    """A base, another model of the same shape and an adapter trained on the base."""
    root = tmp_path_factory.mktemp("peft-refusals")
    save_model(build_model(tiny("llama"), seed=0), root / "base")
    save_model(build_model(tiny("llama"), seed=1), root / "other")
    train_and_save(root / "base", root)
    model = build_model(tiny("llama"), seed=0)
    apply(model, HeadSelection(AttentionSpec.from_config(tiny("llama")).fingerprint, HEADS, Provenance("explicit")))
    save_adapter(model, root / "unrooted")  # built in code: no base folder known, none recorded
    (root / "moved").mkdir()  # an adapter whose recorded base folder is gone
    for f in (root / "adapter").iterdir():
        (root / "moved" / f.name).write_bytes(f.read_bytes())
    meta = json.loads((root / "moved" / "adapter.json").read_text())
    meta["base"]["path"] = str(root / "gone")
    (root / "moved" / "adapter.json").write_text(json.dumps(meta))
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("not an export")
    return root


def test_export_onto_another_base_is_refused(refusal_root, capsys):
    r = refusal_root
    argv = ["export-lora", "--adapter", r / "adapter", "--out", r / "lora", "--base", r / "other"]
    refused(capsys, r, argv, str(r / "adapter"), str(r / "other"), "trained on another base", str(r / "base"))
    assert not (r / "lora").exists()


@pytest.mark.parametrize(
    "case",
    ["no-base-recorded", "base-gone", "out-is-foreign", "out-inside-adapter", "out-is-a-file", "rank-zero"],
)
def test_export_bad_input_is_one_line(refusal_root, capsys, case):
    r = refusal_root
    adapter = ["--adapter", r / "adapter"]
    argv, words = {
        "no-base-recorded": (["--adapter", r / "unrooted", "--out", r / "lora"], ["unrooted", "pass --base"]),
        "base-gone": (["--adapter", r / "moved", "--out", r / "lora"], [str(r / "gone"), "pass --base"]),
        "out-is-foreign": ([*adapter, "--out", r / "foreign"], ["foreign", "non-empty", "not written by export-lora"]),
        "out-inside-adapter": ([*adapter, "--out", r / "adapter" / "lora"], ["overlaps the adapter", "outside"]),
        "out-is-a-file": ([*adapter, "--out", r / "foreign" / "notes.txt"], ["notes.txt", "existing file"]),
        "rank-zero": ([*adapter, "--out", r / "lora", "--rank", "0"], ["--rank", "positive"]),
    }[case]
    refused(capsys, r, ["export-lora", *argv], *words)


def test_a_previous_export_is_replaced(refusal_root, capsys):
    r = refusal_root / "again"
    r.mkdir()
    for _ in range(2):
        assert main(["export-lora", "--adapter", str(refusal_root / "adapter"), "--out", str(r / "lora")]) == 0
    assert sorted(p.name for p in (r / "lora").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "alps_export.json",
    ]
