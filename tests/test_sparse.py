"""The engine hook in one process: exact forward, gradients only on the slices, merge, report, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from alps_ds.arch import AttentionSpec
from alps_ds.errors import AlpsError
from alps_ds.layout import trainable_rows
from alps_ds.selection import HeadSelection, Provenance
from alps_ds.sparse import HeadRowsLinear, apply, hooked_modules, merge, reparametrize, trainable_report
from alps_ds.tiny import build_model, tiny_config

HEADS = ((0, 1), (1, 2), (1, 3))
FAMILIES = ["llama", "qwen2", "phi3", "gpt_neox"]


def make(model_type="llama", dtype=torch.float32):
    kv = None if model_type == "gpt_neox" else 2
    cfg = tiny_config(model_type, layers=2, hidden=64, heads=4, kv_heads=kv, vocab=96)
    spec = AttentionSpec.from_config(cfg)
    return build_model(cfg, seed=0, dtype=dtype), spec, HeadSelection(spec.fingerprint, HEADS, Provenance("explicit"))


def batch(vocab=96, seed=0):
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def analytic(spec, kv="group"):
    per_row = spec.hidden_size + (1 if spec.qkv_bias else 0)
    return sum(r.num_rows * per_row for r in trainable_rows(spec, HEADS, kv))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_forward_equals_plain_model_and_only_slices_train(model_type):
    base, spec, sel = make(model_type)
    hooked = copy.deepcopy(base)
    apply(hooked, sel)
    x = batch()
    torch.testing.assert_close(hooked(x).logits, base(x).logits, rtol=0, atol=1e-5)
    trainable = {n for n, p in hooked.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[1] in ("head_weight", "head_bias") for n in trainable)
    assert (("head_bias" in " ".join(trainable)) is spec.qkv_bias) or model_type == "gpt_neox"

    # Gradient of each slice == the same rows of the full weight's gradient in the plain model.
    hooked(input_ids=x, labels=x).loss.backward()
    base(input_ids=x, labels=x).loss.backward()
    for name, mod in hooked_modules(hooked):
        full = base.get_submodule(name).weight.grad
        torch.testing.assert_close(mod.head_weight.grad, full[mod.rows], rtol=1e-4, atol=1e-6)
        assert mod.weight.grad is None
    assert all(p.grad is None for n, p in hooked.named_parameters() if n not in trainable)


def test_adamw_moves_only_selected_rows_and_merge_round_trips(tmp_path):
    base, spec, sel = make("qwen2")
    model = copy.deepcopy(base)
    apply(model, sel)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x = batch()
    losses = []
    for _ in range(5):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    logits = model(x).logits.detach()
    merge(model)
    assert not any(isinstance(m, HeadRowsLinear) for m in model.modules())
    assert all(type(model.get_submodule(spec.module_path(layer, "q_proj"))) is nn.Linear for layer in range(2))
    torch.testing.assert_close(model(x).logits, logits, rtol=0, atol=1e-5)

    rows = {spec.module_path(r.layer, r.module): r.indices() for r in trainable_rows(spec, HEADS)}
    before, after = base.state_dict(), model.state_dict()
    assert before.keys() == after.keys()
    for key, b in before.items():
        module = key.rsplit(".", 1)[0]
        if module in rows:
            sel_rows = torch.tensor(rows[module])
            keep = torch.ones(b.shape[0], dtype=torch.bool)
            keep[sel_rows] = False
            assert torch.equal(after[key][keep], b[keep]), key
            assert (after[key][sel_rows] != b[sel_rows]).reshape(len(sel_rows), -1).any(1).all(), key
        else:
            assert torch.equal(after[key], b), key

    # save_pretrained output loads without alps_ds into a plain model with the same weights.
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, after[key]), key


def test_train_others_and_kv_policy():
    base, spec, sel = make()
    model = copy.deepcopy(base)
    apply(model, sel, train_others="all")
    qkv = {spec.module_path(layer, m) for layer in range(2) for m in spec.modules}
    for name, p in model.named_parameters():
        module, leaf = name.rsplit(".", 1)
        assert p.requires_grad == (module not in qkv or leaf.startswith("head_")), name

    model = copy.deepcopy(base)
    apply(model, sel, train_others=("norm", "o_proj"))
    trained = {n for n, p in model.named_parameters() if p.requires_grad and "head_" not in n}
    assert trained == {n for n, _ in base.named_parameters() if "norm" in n or "o_proj" in n}

    model = copy.deepcopy(base)
    hook = apply(model, sel, kv="none")
    report = trainable_report(model)
    assert hook.per_kind == report.per_kind  # apply's report and the model's own counts agree
    assert report.per_kind["k"] == report.per_kind["v"] == 0
    assert report.trainable == report.per_kind["q"] == analytic(spec, "none")


@pytest.mark.parametrize("model_type", ["llama", "phi3"])
def test_report_counts_match_the_selection(model_type):
    base, spec, sel = make(model_type, dtype=torch.bfloat16)
    model = copy.deepcopy(base)
    hook = apply(model, sel, train_others=("mlp",))
    report = trainable_report(model)
    assert hook.per_kind == report.per_kind and hook.trainable == report.trainable
    mlp = sum(p.numel() for n, p in base.named_parameters() if ".mlp." in n)
    assert report.trainable == analytic(spec) + mlp
    assert report.total == sum(p.numel() for p in base.parameters())
    hd, d = spec.head_dim, spec.hidden_size
    # 3 query heads; their kv heads: layer 0 kv 0 (head 1), layer 1 kv 1 (heads 2 and 3 share it).
    assert report.per_kind == {"q": 3 * hd * d, "k": 2 * hd * d, "v": 2 * hd * d, "others": mlp}
    assert report.param_bytes == 2 * report.trainable  # bf16
    assert report.master_bytes == 4 * report.trainable and report.adam_bytes == 8 * report.trainable
    assert report.optimizer_bytes == 12 * report.trainable
    text = report.format()
    assert f"{report.trainable:,}" in text and "Adam moments" in text
    if model_type == "phi3":
        assert {m.kind for m in report.modules} == {"qkv", "others"}


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_with_frozen_embeddings_reaches_the_slices(reentrant):
    base, spec, sel = make()
    model = copy.deepcopy(base)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    apply(model, sel)
    model.train()
    x = batch()
    model(input_ids=x, labels=x).loss.backward()
    for _, mod in hooked_modules(model):
        assert mod.head_weight.grad is not None and mod.head_weight.grad.abs().sum() > 0


def test_hooked_model_runs_on_the_device_its_weights_are_on():
    """A model hooked where it already sits (a GPU, or built under zero.Init, which DeepSpeed never
    moves) must run there: index_copy refuses a row index on another device. The meta device runs
    the same device checks as CUDA, so this runs on CPU-only machines too."""
    base, spec, sel = make("qwen2")
    model = copy.deepcopy(base).to("meta")
    apply(model, sel)
    assert {mod.rows.device.type for _, mod in hooked_modules(model)} == {"meta"}
    assert model(batch().to("meta")).logits.shape == (2, 12, 96)
    merge(model)  # writes the slices back with the same index
    assert model.get_submodule(spec.module_path(0, "q_proj")).weight.device.type == "meta"


def test_reparametrize_takes_any_linear_like_module_and_local_rows():
    class Shard(nn.Module):  # e.g. a tensor-parallel shard: .weight [out, in], .bias, x @ W^T + b
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(10, 6))
            self.bias = nn.Parameter(torch.randn(10))

    shard = Shard()
    mod = reparametrize(shard, [(2, 4), (7, 8)], kinds=(("q", 3),))
    assert mod.ranges == ((2, 4), (7, 8)) and mod.num_rows == 3
    assert mod.weight is shard.weight and not mod.weight.requires_grad
    x = torch.randn(5, 6)
    torch.testing.assert_close(mod(x), x @ shard.weight.T + shard.bias)
    assert reparametrize(nn.Linear(6, 10), [3, 1, 2]).ranges == ((1, 4),)


def test_errors_are_one_line_alps_errors():
    base, spec, sel = make()
    other = tiny_config("llama", layers=3, hidden=64, heads=4, kv_heads=2, vocab=96)
    with pytest.raises(AlpsError, match="num_layers: 2 != 3"):
        apply(build_model(other), sel)
    refused = copy.deepcopy(base)
    with pytest.raises(AlpsError, match="match no parameter"):
        apply(refused, sel, train_others=("mlpp",))
    with pytest.raises(AlpsError, match="kv policy"):
        apply(refused, sel, kv="all")
    assert all(p.requires_grad for p in refused.parameters()), "a refused apply must leave the model as it was"
    model = copy.deepcopy(base)
    apply(model, sel)
    with pytest.raises(AlpsError, match="already re-parametrized"):
        apply(model, sel)
    with pytest.raises(AlpsError, match="outside the weight"):
        reparametrize(nn.Linear(4, 8), [(6, 9)])
    with pytest.raises(AlpsError, match="no rows"):
        reparametrize(nn.Linear(4, 8), [])
    with pytest.raises(AlpsError, match="2-D .weight"):
        reparametrize(nn.LayerNorm(4), [0])
