"""HF Trainer, TRL SFTTrainer and DPOTrainer on hooked models (2 gloo ranks, ZeRO-2 and ZeRO-3, one launch).

What lands on disk is read here, in a process that never trained: ``from_pretrained`` of every save
path has every selected row changed and every other row bit-identical to the base; checkpoints
hold no frozen weights; a resumed run equals the uninterrupted one. The SFT and DPO scripts are
docs/hf-trl.md's, extracted from the page.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from dist import REPO, run_ranks  # noqa: E402

from alps_ds.arch import AttentionSpec  # noqa: E402
from alps_ds.layout import trainable_rows  # noqa: E402
from alps_ds.selection import HeadSelection, Provenance  # noqa: E402

HEADS = ((0, 2), (1, 0))
DOC = REPO / "docs" / "hf-trl.md"
SCRIPTS = ("alps_sft", "alps_dpo")


def doc_scripts() -> dict[str, str]:
    """The python blocks of docs/hf-trl.md, by the script name on their first line (``# alps_sft.py: ...``)."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    return {m.group(1): b for b in blocks if (m := re.match(r"# (\w+)\.py:", b))}


def config(family: str):
    """The tiny base of ``family`` (llama: GQA; qwen2: q/k/v biases) over the byte tokenizer's vocabulary."""
    from alps_ds.tiny import tiny_config
    from alps_ds.train.tokenizer import BYTE_VOCAB

    return tiny_config(family, layers=2, hidden=64, heads=4, kv_heads=2, vocab=BYTE_VOCAB + 1)


def build(work: Path, family: str):
    from alps_ds.tiny import build_model, save_model
    from alps_ds.train.tokenizer import save_byte_tokenizer

    cfg = config(family)
    save_byte_tokenizer(save_model(build_model(cfg, seed=0), work / family))
    spec = AttentionSpec.from_config(cfg)
    HeadSelection(spec.fingerprint, HEADS, Provenance("explicit")).save(work / f"heads-{family}.json")


def write_data(work: Path) -> None:
    words = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota", "kappa lambda mu"]
    with open(work / "sft.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"text": f"{words[i % 4]} {i % 4} {words[(i + 1) % 4]}"}) + "\n")
    with open(work / "dpo.jsonl", "w") as f:
        for i in range(12):
            pair = {"prompt": f"Q{i % 4}: {words[i % 4]}?", "chosen": " yes.", "rejected": " no way"}
            f.write(json.dumps(pair) + "\n")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("hf_trl")
    for family in ("llama", "qwen2"):
        build(work, family)
    write_data(work)
    scripts = work / "scripts"
    scripts.mkdir()
    for name, text in doc_scripts().items():
        (scripts / f"{name}.py").write_text(text)
    run_ranks(Path(__file__).parent / "scripts" / "hf_trl.py", str(work), str(scripts), timeout=1500)
    return work


@pytest.fixture(scope="module")
def result(work) -> dict:
    return json.loads((work / "result.json").read_text())


def selected_rows(family: str) -> dict[str, torch.Tensor]:
    spec = AttentionSpec.from_config(config(family))
    return {spec.module_path(r.layer, r.module): torch.tensor(r.indices()) for r in trainable_rows(spec, HEADS)}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")  # the saved dtype
    return {k: v.detach() for k, v in model.state_dict().items()}


def row_problems(saved: dict[str, torch.Tensor], base: dict[str, torch.Tensor], rows: dict) -> list[str]:
    """Every selected row changed, every other row and tensor bit-identical (in the saved dtype)."""
    problems = []
    for key, b in base.items():
        a, module = saved[key], key.rpartition(".")[0]
        b = b.to(a.dtype)
        if module in rows:
            keep = torch.ones(b.shape[0], dtype=torch.bool)
            keep[rows[module]] = False
            if not torch.equal(a[keep], b[keep]):
                problems.append(f"{key}: a row outside the selection moved")
            if not (a[rows[module]] != b[rows[module]]).reshape(len(rows[module]), -1).any(dim=1).all():
                problems.append(f"{key}: a selected row did not change")
        elif not torch.equal(a, b):
            problems.append(f"{key}: frozen tensor changed")
    return problems


def test_doc_has_both_scripts_and_the_readme_excerpt_is_from_the_tested_one():
    assert set(doc_scripts()) == set(SCRIPTS)
    readme = (REPO / "README.md").read_text()
    assert "docs/hf-trl.md" in readme
    excerpt = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "AlpsSFTTrainer" in b)
    script = {line.strip() for line in doc_scripts()["alps_sft"].splitlines()}
    exact = [line.strip() for line in excerpt.splitlines() if "..." not in line]
    assert len(exact) >= 5 and [line for line in exact if line not in script] == []


def test_every_case_ran(result):
    broken = {cid: r["traceback"] for cid, r in result.items() if "error" in r}
    assert not broken, next(iter(broken.values()))
    for kind in ("sft", "dpo"):
        assert {r["zero_stage"] for cid, r in result.items() if cid.startswith(kind)} == {2, 3}
    assert {r["zero_stage"] for cid, r in result.items() if cid.startswith("trainer")} == {0, 1, 2, 3}


SAVED = [
    ("sft-z3/final", "llama"),
    ("sft-z2/final", "llama"),
    ("dpo-z2/final", "qwen2"),
    ("dpo-z3/final", "qwen2"),
    *((f"trainer-z{z}/{how}", "qwen2") for z in range(4) for how in ("save_model", "get_state_dict", "save_16bit")),
    *((f"trainer-z3-bf16/{how}", "qwen2") for how in ("save_model", "get_state_dict", "save_16bit")),
]


@pytest.mark.parametrize("saved,family", SAVED)
def test_from_pretrained_has_exactly_the_trained_rows(work, result, saved, family):
    files = list((work / saved).glob("model*.safetensors")) + list((work / saved).glob("pytorch_model*.bin"))
    assert files, f"{saved}: no weights written"
    for f in files:
        state = load_file(f) if f.suffix == ".safetensors" else torch.load(f, weights_only=True)
        assert not [k for k in state if "head_" in k], f"{f}: hooked keys saved"
        want = torch.bfloat16 if "bf16" in saved else torch.float32
        assert {t.dtype for t in state.values()} == {want}, f"{f}: not saved in {want}"
    assert row_problems(tensors(work / saved), tensors(work / family), selected_rows(family)) == []


@pytest.mark.parametrize("run", ["sft-z3", "sft-z2", "dpo-z2"])
def test_final_adapter_holds_the_saved_rows(work, run):
    saved = tensors(work / run / "final")
    adapter = load_file(work / run / "final/adapter/adapter.safetensors")
    family = "llama" if run.startswith("sft") else "qwen2"
    rows = selected_rows(family)
    assert adapter and all(torch.equal(t, saved[k][rows[k.rpartition(".")[0]]]) for k, t in adapter.items())


@pytest.mark.parametrize("run", ["sft-z3", "sft-z2"])
def test_checkpoints_hold_no_frozen_weights(work, run):
    ckpt = work / run / "checkpoint-2"
    assert not list(ckpt.glob("model*.safetensors")) and not list(ckpt.glob("pytorch_model*"))
    files = list(ckpt.glob("global_step*/*model_states.pt"))
    assert files
    for f in files:
        states = torch.load(f, weights_only=False)
        assert states["module"] and all(k.rsplit(".", 1)[1] in ("head_weight", "head_bias") for k in states["module"])
        assert not states.get("frozen_param_fragments")
    weights = sum(f.stat().st_size for f in ckpt.rglob("*") if f.suffix in (".pt", ".safetensors"))
    assert weights < 0.5 * (work / "llama/model.safetensors").stat().st_size
    assert (ckpt / "adapter/adapter.safetensors").is_file()


@pytest.mark.parametrize("stage", ["z3", "z2"])
def test_resume_equals_an_uninterrupted_run(work, result, stage):
    whole, resumed = result[f"sft-{stage}"]["losses"], result[f"sft-{stage}-resume"]["losses"]
    assert [resumed[s] for s in ("3", "4")] == [whole[s] for s in ("3", "4")]
    a, b = tensors(work / f"sft-{stage}/final"), tensors(work / f"sft-{stage}-resume/final")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("run", ["sft-z3", "sft-z2", "trainer-z0", "trainer-z1", "trainer-z2", "trainer-z3"])
def test_loss_fell(result, run):
    losses = list(result[run]["losses"].values())
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("run", ["dpo-z2", "dpo-z3"])
def test_dpo_reference_is_the_base_and_no_copy_is_loaded(result, run):
    r = result[run]
    assert r["ref_max_diff"] == 0.0 and r["policy_max_diff"] > 0
    assert not r["ref_holds_tensors"] and r["trl_ref_bytes"] > 0
    assert r["reward_margins"][-1] > r["reward_margins"][0]


@pytest.mark.parametrize("run", ["trainer-z0", "trainer-z1", "trainer-z2", "trainer-z3"])
def test_plain_trainer_optimizer_holds_exactly_the_slices(result, run):
    spec = AttentionSpec.from_config(config("qwen2"))
    expected = sum(r.num_rows * (spec.hidden_size + 1) for r in trainable_rows(spec, HEADS))
    per_rank = result[run]["optimizer_elements_per_rank"]
    if run == "trainer-z0":  # no partitioning: every rank updates all the slices
        assert per_rank == [expected] * len(per_rank)
    else:
        assert sum(per_rank) == expected and all(0 < n < expected for n in per_rank)


@pytest.mark.parametrize("run", ["trainer-z0", "trainer-z1", "trainer-z2", "trainer-z3"])
def test_save_16bit_model_excluding_frozen_weights_is_refused(result, run):
    assert "save_adapter" in result[run]["refused"]
