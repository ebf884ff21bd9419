"""The base digest: an adapter or a training checkpoint is refused on a base it was not trained on.

Real checkpoints written by ``save_pretrained``: a base, the same model re-saved in bf16 and
sharded, another model of the same shape (another seed), and the merged model (the base with
the trained heads written in, which has the base's shape too). Every refusal: exit 2, one
``alps-ds: error:`` line naming the adapter (or checkpoint) and the base, files unchanged.
"""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist import REPO, rank_env

from alps_ds.adapter import load_adapter, merge_adapter_into_checkpoint, save_adapter
from alps_ds.arch import AttentionSpec
from alps_ds.cli import main
from alps_ds.digest import SCHEME, qkv_digest
from alps_ds.errors import AlpsError
from alps_ds.selection import HeadSelection, Provenance
from alps_ds.sparse import apply, merge
from alps_ds.tiny import build_model, save_model, tiny_config

HEADS = ((0, 1), (1, 3))


def snapshot(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("digest")
    cfg = tiny_config("qwen2", layers=2, hidden=64, heads=4, kv_heads=2, vocab=96)
    save_model(build_model(cfg, seed=0), root / "base")
    save_model(build_model(cfg, seed=0).to(torch.bfloat16), root / "base_bf16", max_shard_size="40KB")
    save_model(build_model(cfg, seed=1), root / "other")
    model = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    apply(model, HeadSelection(AttentionSpec.from_config(cfg).fingerprint, HEADS, Provenance("explicit")))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    save_adapter(model, root / "adapter")
    save_model(merge(model), root / "merged")
    return root


def test_digest_names_the_model_not_its_dtype_or_sharding(models):
    digest = qkv_digest(models / "base")
    assert digest.startswith("sha256:") and len(digest) == 7 + 64
    assert qkv_digest(models / "base_bf16") == digest  # bf16 re-save, 12 shards: the same base
    assert qkv_digest(models / "other") != digest
    assert qkv_digest(models / "merged") != digest  # two heads changed
    meta = json.loads((models / "adapter" / "adapter.json").read_text())
    assert meta["base"] == {"path": str((models / "base").resolve()), "scheme": SCHEME, "qkv_digest": digest}


@pytest.mark.parametrize("wrong", ["other", "merged"])
def test_merge_onto_another_base_is_refused(models, capsys, wrong):
    before = snapshot(models)
    argv = ["merge", "--base", str(models / wrong), "--adapter", str(models / "adapter"), "--out", str(models / "m")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alps-ds: error: ")
    for word in (str(models / "adapter"), str(models / wrong), "trained on another base", str(models / "base")):
        assert word in err[0]
    assert snapshot(models) == before and not (models / "m").exists()


def test_merge_onto_the_same_model_in_bf16_works(models, tmp_path):
    out = merge_adapter_into_checkpoint(models / "base_bf16", models / "adapter", tmp_path / "m", progress=False)
    assert (out / "model.safetensors.index.json").is_file()


def test_load_adapter_onto_another_base_is_refused(models):
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(models / "other", dtype=torch.float32)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(AlpsError, match="trained on another base") as e:
        load_adapter(other, models / "adapter")
    assert "\n" not in str(e.value) and str(models / "other") in str(e.value)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
    # the base it was trained on (also in bf16) takes it
    load_adapter(AutoModelForCausalLM.from_pretrained(models / "base_bf16"), models / "adapter")


def test_an_adapter_without_a_digest_works_as_before(models, tmp_path):
    """Adapters saved before alps-ds kept digests (no 'base' in adapter.json) merge and load unchecked."""
    from transformers import AutoModelForCausalLM

    old = tmp_path / "old"
    old.mkdir()
    for f in (models / "adapter").iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    meta = json.loads((old / "adapter.json").read_text())
    del meta["base"]
    (old / "adapter.json").write_text(json.dumps(meta))
    merge_adapter_into_checkpoint(models / "base", old, tmp_path / "m", progress=False)
    assert qkv_digest(tmp_path / "m") == qkv_digest(models / "merged")
    load_adapter(AutoModelForCausalLM.from_pretrained(models / "base"), old)


# ---- alps-ds train --resume after model.path changed -----------------------------------------------------------------


def train(out: Path, model: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "alps_ds", "train", "--config", str(REPO / "configs" / "tiny.yaml")]
    for kv in (f"model.path={model}", f"output.dir={out}", "logging.progress=false", "train.max_steps=4"):
        argv += ["--set", kv]
    env = rank_env()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([*argv, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_resume_on_another_model_of_the_same_shape_is_refused(tmp_path):
    from alps_ds.train.tokenizer import BYTE_VOCAB, save_byte_tokenizer

    cfg = tiny_config("llama", vocab=BYTE_VOCAB, max_positions=1024)
    for name, seed in (("a", 0), ("b", 1)):
        save_model(build_model(cfg, seed=seed), tmp_path / name)
        save_byte_tokenizer(tmp_path / name)
    out = tmp_path / "run"
    first = train(out, tmp_path / "a", "--set", "train.stop_after=2")
    assert first.returncode == 0, first.stderr[-3000:]
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 2 and latest["base"]["qkv_digest"] == qkv_digest(tmp_path / "a")

    before = snapshot(tmp_path)
    again = train(out, tmp_path / "b", "--resume")
    assert again.returncode == 2
    err = again.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alps-ds: error: "), again.stderr[-3000:]
    for word in ("latest.json", "step-00000002", str(tmp_path / "b"), "trained on another base", "model.path"):
        assert word in err[0]
    assert snapshot(tmp_path) == before
