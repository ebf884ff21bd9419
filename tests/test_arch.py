"""AttentionSpec against real ``transformers`` models of every supported family.

Beyond names and shapes, the row facts are checked against what the model computes:
changing the rows ``spec.rows`` names for one head must change that head's attention output
(the input of the output projection) and no other head's.
"""

from __future__ import annotations

import json

import pytest
import torch

from alps_ds.arch import SUPPORTED_MODEL_TYPES, AttentionSpec
from alps_ds.errors import AlpsError
from alps_ds.tiny import build_model, tiny_config

# kv_heads None: plain multi-head attention (gpt_neox supports nothing else)
FAMILIES = {mt: dict(heads=4, kv_heads=None if mt == "gpt_neox" else 2, head_dim=None) for mt in SUPPORTED_MODEL_TYPES}
FAMILIES["llama"]["head_dim"] = 12  # head_dim != hidden / heads
OUT_PROJ = {"gpt_neox": "dense"}


@pytest.fixture(scope="module")
def models():
    out = {}
    for mt, kw in FAMILIES.items():
        cfg = tiny_config(mt, layers=2, hidden=32, **kw)
        out[mt] = (AttentionSpec.from_config(cfg), build_model(cfg, seed=0).eval(), cfg)
    return out


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_spec_names_and_shapes_match_the_model(models, model_type):
    spec, model, cfg = models[model_type]
    params = dict(model.named_parameters())
    assert spec.num_layers == 2 and spec.hidden_size == 32
    assert spec.num_heads == 4 and spec.num_kv_heads == (FAMILIES[model_type]["kv_heads"] or 4)
    for layer in range(spec.num_layers):
        names = spec.tensor_names(layer)
        for m in spec.modules:
            w = params[f"{spec.module_path(layer, m)}.weight"]
            assert tuple(w.shape) == (spec.module_rows(m), spec.hidden_size)
        # every q/k/v bias the model has is named, and nothing else
        prefix = spec.module_path(layer, "")
        biases = {
            n for n in params if n.startswith(prefix) and n.endswith(".bias") and any(m in n for m in spec.modules)
        }
        assert biases == {n for n in names if n.endswith(".bias")}
        assert all(n in params for n in names)
    assert spec.fingerprint == AttentionSpec.from_config(cfg.to_dict()).fingerprint


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma", "gpt_neox"])
def test_bias_follows_the_config(model_type):
    for bias in (False, True):
        cfg = tiny_config(model_type, layers=1, hidden=32, heads=4, kv_heads=None, bias=bias)
        spec = AttentionSpec.from_config(cfg)
        params = dict(build_model(cfg).named_parameters())
        assert spec.qkv_bias == bias
        assert all(n in params for n in spec.tensor_names(0))


def _head_outputs(model, spec, x):
    """Per-layer attention output before the output projection, [layers][batch, seq, n*hd]."""
    outs, hooks = {}, []
    for layer in range(spec.num_layers):
        name = f"{spec.layers_path}.{layer}.{spec.attn_path}.{OUT_PROJ.get(spec.model_type, 'o_proj')}"
        mod = model.get_submodule(name)
        hooks.append(mod.register_forward_pre_hook(lambda m, a, layer=layer: outs.__setitem__(layer, a[0].clone())))
    try:
        with torch.no_grad():
            model(input_ids=x)
    finally:
        for h in hooks:
            h.remove()
    return outs


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
@pytest.mark.parametrize("kind", ["q", "k", "v"])
def test_rows_match_the_forward_pass(models, model_type, kind):
    spec, model, _ = models[model_type]
    x = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    hd, layer = spec.head_dim, 1
    ref = _head_outputs(model, spec, x)[layer]
    count = spec.num_heads if kind == "q" else spec.num_kv_heads
    for index in range(count):
        block = spec.rows(kind, index)
        w = model.get_parameter(f"{spec.module_path(layer, block.module)}.weight")
        saved = w.detach().clone()
        try:
            with torch.no_grad():
                w[block.start : block.stop] = torch.randn(len(block), w.shape[1]) * 3
            got = _head_outputs(model, spec, x)[layer]
        finally:
            with torch.no_grad():
                w.copy_(saved)
        readers = [index] if kind == "q" else [h for h in range(spec.num_heads) if spec.kv_head(h) == index]
        for h in range(spec.num_heads):
            cols = slice(h * hd, (h + 1) * hd)
            changed = not torch.allclose(got[..., cols], ref[..., cols], atol=1e-6, rtol=0)
            assert changed == (h in readers), (model_type, kind, index, h)


def test_kv_head_and_group_blocks():
    spec = AttentionSpec.from_config(
        dict(model_type="llama", num_hidden_layers=2, hidden_size=64, num_attention_heads=8, num_key_value_heads=2)
    )
    assert [spec.kv_head(h) for h in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert spec.head_blocks(5) == [spec.rows("q", 5), spec.rows("k", 1), spec.rows("v", 1)]
    with pytest.raises(IndexError):
        spec.rows("k", 2)


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(AlpsError, match="not supported; supported: gemma, gemma2, gpt_neox, llama"):
        AttentionSpec.from_config({"model_type": "bert"})
    with pytest.raises(AlpsError, match="'num_hidden_layers' is missing"):
        AttentionSpec.from_config({"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2})
    with pytest.raises(AlpsError, match="not a multiple"):
        AttentionSpec.from_config(
            dict(model_type="llama", num_hidden_layers=1, hidden_size=48, num_attention_heads=6, num_key_value_heads=4)
        )
    with pytest.raises(AlpsError, match="no config.json"):
        AttentionSpec.from_pretrained(tmp_path)
    for damaged in ("{oops", "[" * 100_000 + "]" * 100_000):  # the second is nested past the recursion limit
        (tmp_path / "config.json").write_text(damaged)
        with pytest.raises(AlpsError, match="not a readable JSON config"):
            AttentionSpec.from_pretrained(tmp_path)
    cfg = tiny_config("qwen2", layers=3, hidden=32, heads=4, kv_heads=2).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = AttentionSpec.from_pretrained(tmp_path)
    assert (spec.model_type, spec.num_layers, spec.num_kv_heads, spec.qkv_bias) == ("qwen2", 3, 2, True)
