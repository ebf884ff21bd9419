"""The memory planner: exact parameter/trainable counts (70B on the meta device, every family), and its
non-activation bytes against what a real 2-rank DeepSpeed engine holds (ZeRO 2 and 3)."""

from __future__ import annotations

import json

import pytest
import torch
from dist import REPO, run_ranks
from transformers import AutoModelForCausalLM, LlamaConfig

from alps_ds.arch import AttentionSpec
from alps_ds.choose import random_heads
from alps_ds.cli import main
from alps_ds.errors import AlpsError
from alps_ds.plan import (
    Activation,
    Parallel,
    activation_bytes,
    count_parameters,
    make_plan,
    module_elements,
    worst_case_heads,
)
from alps_ds.selection import HeadSelection, Provenance
from alps_ds.sparse import apply, hooked_modules
from alps_ds.tiny import build_model, save_model, tiny_config


def llama_70b() -> LlamaConfig:
    return LlamaConfig(
        num_hidden_layers=80,
        hidden_size=8192,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=28672,
        vocab_size=128256,
        tie_word_embeddings=False,
    )


def meta_model(cfg):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def hooked_counts(model) -> dict[str, int]:
    """Trainable elements per hooked Q/K/V module, read from the model's own parameters."""
    return {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in hooked_modules(model)}


@pytest.fixture(scope="module")
def spec70():
    return AttentionSpec.from_config(llama_70b())


@pytest.mark.parametrize("which", ["worst-case", "random"])
def test_70b_meta_model_counts_match_planner_exactly(spec70, which):
    cfg = llama_70b()
    model = meta_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert total == sum(count_parameters(cfg).values()) == 70_553_706_496

    k = 512  # 10 % of 80 x 64
    heads = worst_case_heads(spec70, k) if which == "worst-case" else random_heads(80, 64, k, seed=3)
    sel = HeadSelection(spec70.fingerprint, tuple(heads), Provenance(which, ratio=0.1))
    apply(model, sel)
    measured = hooked_counts(model)
    assert measured == module_elements(spec70, heads)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(measured.values())

    plan = make_plan(cfg, heads=None if which == "worst-case" else heads, ratio=0.1, parallel=Parallel(zero=0))
    assert plan.total_params == total
    assert plan.per_module == measured
    assert plan.rows[0].trainable == sum(measured.values())
    if which == "worst-case":
        # 512 heads on 512 distinct (layer, kv group) pairs: q, k and v rows each 128 x 8192.
        assert plan.rows[0].trainable == 512 * 3 * 128 * 8192


FAMILIES = [
    ("llama", {}),
    ("llama", {"bias": True}),
    ("mistral", {}),
    ("qwen2", {}),
    ("qwen3", {}),
    ("gemma", {}),
    ("gemma2", {}),
    ("phi3", {}),
    ("gpt_neox", {"kv_heads": None}),
]


@pytest.mark.parametrize(
    ("family", "kw"), FAMILIES, ids=[f"{f}{'-bias' if k.get('bias') else ''}" for f, k in FAMILIES]
)
def test_every_family_counts_match_meta_model(family, kw):
    cfg = tiny_config(family, layers=3, hidden=48, heads=6, **{"kv_heads": 2, **kw}, vocab=97, intermediate=80)
    model = meta_model(cfg)
    assert count_parameters(cfg) == {n: p.numel() for n, p in model.named_parameters()}
    spec = AttentionSpec.from_config(cfg)
    heads = random_heads(3, 6, 5, seed=1)
    apply(model, HeadSelection(spec.fingerprint, tuple(heads), Provenance("random")))
    assert hooked_counts(model) == module_elements(spec, heads)


def test_tied_embeddings_counted_once():
    cfg = tiny_config("llama")
    cfg.tie_word_embeddings = True
    model = meta_model(cfg)
    assert sum(count_parameters(cfg).values()) == sum(p.numel() for p in model.parameters())
    assert "lm_head.weight" not in count_parameters(cfg)


def test_zero_partitioning_and_lora_rows(spec70):
    cfg = llama_70b()
    p0 = make_plan(cfg, parallel=Parallel(dp=8, zero=0))
    p3 = make_plan(cfg, parallel=Parallel(dp=8, zero=3))
    alps0, full0, lora0 = p0.rows
    alps3 = p3.rows[0]
    assert full0.trainable == p0.total_params
    assert full0.optimizer == 8 * p0.total_params  # two fp32 moments per parameter, unpartitioned
    assert lora0.trainable == 80 * 128 * (3 * 8192 + 8192 + 2 * 1024)
    assert alps3.frozen_weights * 8 == pytest.approx(alps0.frozen_weights, rel=1e-6)
    assert alps3.optimizer * 8 == pytest.approx(alps0.optimizer, rel=1e-6)
    assert alps3.total < full0.total


def test_train_others_and_bad_patterns():
    cfg = tiny_config("llama", layers=2)
    base = make_plan(cfg, ratio=0.25, parallel=Parallel(zero=0)).rows[0].trainable
    mlp = make_plan(cfg, ratio=0.25, train_others=["mlp"], parallel=Parallel(zero=0)).rows[0].trainable
    params = count_parameters(cfg)
    assert mlp - base == sum(v for k, v in params.items() if ".mlp." in k)
    with pytest.raises(AlpsError, match="^train_others 'nonexistent_module' matches no parameter"):
        make_plan(cfg, train_others=["nonexistent_module"])


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda cfg: Parallel(tp=0), "^tp 0 must be at least 1"),
        (lambda cfg: Parallel(dp=-1), "^dp -1 must be at least 1"),
        (lambda cfg: Parallel(zero=4), "^zero 4 is not a ZeRO stage"),
        (lambda cfg: Parallel(zero=0, offload=True), "^offload needs zero 1, 2 or 3"),
        (lambda cfg: make_plan(cfg, dtype="fp8"), "^dtype 'fp8' is unknown; choose one of bf16, fp16, fp32"),
        (lambda cfg: make_plan(cfg, headroom=1.0), r"^headroom 1.0 must be in \[0, 1\)"),
        (lambda cfg: make_plan(cfg, parallel=Parallel(pp=3)), "^pp 3 exceeds the model's 2 layers"),
        (lambda cfg: make_plan(cfg, ratio=0), r"^ratio 0 is outside \(0, 1\]"),
    ],
)
def test_library_errors_name_the_argument_not_a_flag(build, message):
    """The library is called from Python, YAML-driven checks and the CLI alike: its errors name its own
    arguments; ``alps-ds plan`` checks its flags first (tests/test_bad_input.py)."""
    with pytest.raises(AlpsError, match=message) as e:
        build(tiny_config("llama", layers=2))
    assert "--" not in str(e.value)


def test_pipeline_activations_follow_1f1b(spec70):
    """1F1B: stage s of P keeps P - s micro-batches of checkpointed layer inputs but recomputes one layer
    at a time; the last stage keeps one micro-batch (plus the logits), like a run without pipelining."""
    cfg = llama_70b().to_dict()
    act = Activation(seq_len=4096, micro_batch=1, checkpointing=True)

    def stage(s: int) -> int:
        return activation_bytes(cfg, spec70, 20, act, stage=s, pp=4)

    layer_inputs = 4096 * 20 * 8192 * 2  # one micro-batch's checkpoints of 20 layers, bf16
    assert stage(3) == activation_bytes(cfg, spec70, 20, act)
    assert stage(2) - stage(3) + 4096 * 128256 * 6 == layer_inputs  # the last stage adds the logits
    assert stage(0) - stage(1) == stage(1) - stage(2) == layer_inputs


# ---- against a real engine ---------------------------------------------------------------------------
TERMS = ("frozen_weights", "trainable_weights", "gradients", "master", "optimizer")


@pytest.fixture(scope="module")
def engine_bytes(tmp_path_factory):
    """One 2-rank launch measures ZeRO 2 and 3 on a hooked tiny llama (bf16, AdamW)."""
    tmp = tmp_path_factory.mktemp("plan")
    cfg = tiny_config("llama", layers=2, hidden=64, heads=4, kv_heads=2, vocab=128, intermediate=128)
    save_model(build_model(cfg), tmp / "model")
    spec = AttentionSpec.from_config(cfg)
    sel = HeadSelection(spec.fingerprint, tuple(random_heads(2, 4, 3, seed=0)), Provenance("random", seed=0))
    sel.save(tmp / "heads.json")
    run_ranks(REPO / "tests/scripts/plan_measure.py", tmp / "model", tmp / "heads.json", tmp / "out.json", "2", "3")
    return cfg, sel, json.loads((tmp / "out.json").read_text())


@pytest.mark.parametrize("stage", [2, 3])
def test_planner_matches_engine_bytes_within_5_percent(engine_bytes, stage):
    cfg, sel, measured = engine_bytes
    plan = make_plan(cfg, heads=list(sel.heads), parallel=Parallel(dp=2, zero=stage), dtype="bf16")
    alps = plan.rows[0]
    planned = {
        "frozen_weights": alps.frozen_weights,
        "trainable_weights": alps.trainable_weights,
        "gradients": alps.gradients,
        "master": alps.master,
        "optimizer": alps.optimizer,
    }
    for rank in measured[str(stage)]:
        assert rank["trainable_elements"] == alps.trainable
        for term in TERMS:
            assert planned[term] == pytest.approx(rank[term], rel=0.05), (stage, term, planned, rank)
        assert alps.non_activation == pytest.approx(sum(rank[t] for t in TERMS), rel=0.05)


def test_plan_cli_verdicts(engine_bytes, tmp_path, capsys):
    cfg, _, _ = engine_bytes
    cfg.save_pretrained(tmp_path)
    base = ["plan", "--model", str(tmp_path), "--seq-len", "64"]
    assert main([*base, "--gpu-mem", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in out["rows"]][:2] == ["alps", "full fine-tuning"] and out["rows"][0]["fits"]
    assert main([*base, "--gpu-mem", "0.0001"]) == 1  # does not fit: exit 1, the table says why
    text = capsys.readouterr().out
    assert "alps: does not fit" in text and "largest term" in text
    assert main([*base, "--nodes", "1", "--gpus-per-node", "3", "--tp", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not divisible" in err
