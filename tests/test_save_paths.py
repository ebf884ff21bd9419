"""A hooked model saves and loads as the fine-tuned model it is (one process, no engine).

``state_dict()`` / ``save_pretrained`` hold the standard keys with the trained rows merged in;
loading such a file into a freshly hooked base restores the slices and keeps the base rows that
``base_weights`` runs on; DeepSpeed's raw form round-trips too.
"""

from __future__ import annotations

import pytest
import torch

from alps_ds.arch import AttentionSpec
from alps_ds.errors import AlpsError
from alps_ds.integrations import base_weights, merge_state_dict, raw_state_dict
from alps_ds.selection import HeadSelection, Provenance
from alps_ds.sparse import apply
from alps_ds.tiny import build_model, tiny_config

CFG = tiny_config("qwen2", layers=2, hidden=64, heads=4, kv_heads=2, vocab=96)  # q/k/v biases
SEL = HeadSelection(AttentionSpec.from_config(CFG).fingerprint, ((0, 2), (1, 0)), Provenance("explicit"))
IDS = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(1))


def hooked():
    model = build_model(CFG, seed=0)
    apply(model, SEL)
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def trained():
    """A hooked model whose slices moved (as after training), and the base it was hooked from."""
    model = hooked()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    return model, build_model(CFG, seed=0)


def test_state_dict_has_the_base_models_keys_with_the_trained_rows(trained):
    model, base = trained
    state = model.state_dict()
    assert list(state) == list(base.state_dict())
    merged = build_model(CFG, seed=0)
    merged.load_state_dict(state)
    assert torch.equal(logits(merged), logits(model)) and not torch.equal(logits(merged), logits(base))


def test_save_pretrained_loads_as_the_trained_model(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = trained
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path)), logits(model))


def test_a_merged_file_resumes_into_a_hooked_base_and_keeps_its_base_rows(trained):
    model, base = trained
    again = hooked()
    again.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(logits(again), logits(model))
    with base_weights(again):
        assert torch.equal(logits(again), logits(base))


def test_raw_state_dict_round_trips(trained):
    model, _ = trained
    with raw_state_dict():
        raw = model.state_dict()
    assert any(k.endswith("head_weight") for k in raw) and any(k.endswith("head_bias") for k in raw)
    again = hooked()
    again.load_state_dict(raw, strict=True)
    assert torch.equal(logits(again), logits(model))


def test_base_weights_is_the_base_inside_and_restores_training_outside(trained):
    model, base = trained
    with pytest.raises(RuntimeError), base_weights(model):
        assert torch.equal(logits(model), logits(base))
        raise RuntimeError("leave the context by an error")
    assert not torch.equal(logits(model), logits(base))


def test_base_weights_refuses_a_model_that_is_not_hooked():
    with pytest.raises(AlpsError, match="alps_ds.apply"), base_weights(build_model(CFG, seed=0)):
        pass


def test_merge_state_dict_refuses_hooked_keys_it_cannot_merge(trained):
    model, _ = trained
    with raw_state_dict():
        raw = model.state_dict()
    raw.pop("model.layers.0.self_attn.q_proj.weight")  # a partial dict: the slice has no weight to go into
    with pytest.raises(AlpsError, match="save_adapter"):
        merge_state_dict(model, raw)


def test_the_trainers_refuse_what_they_cannot_do(tmp_path):
    from trl import DPOConfig

    from alps_ds.integrations import AlpsDPOTrainer, AlpsTrainer

    with pytest.raises(AlpsError, match="alps_ds.apply"):
        AlpsTrainer(model=build_model(CFG, seed=0))
    model = hooked()
    with pytest.raises(AlpsError, match="no ref_model"):
        AlpsDPOTrainer(model=model, ref_model=build_model(CFG, seed=0))
    args = DPOConfig(output_dir=str(tmp_path), sync_ref_model=True, use_cpu=True, bf16=False, report_to=[])
    with pytest.raises(AlpsError, match="sync_ref_model"):
        AlpsDPOTrainer(model=model, args=args)
