"""``alps_ds.merge`` inside the caller's own ``deepspeed.zero.GatheredParameters`` on a ZeRO-3 engine (2 ranks).

The natural ZeRO-3 pattern: gather the whole model, merge, look at (or save) the weights. The
merged Q/K/V weights must be right inside the context and stay right after it re-partitions.
Prints ``nested merge ok`` on every rank; raises otherwise.
"""

from __future__ import annotations

import copy

import deepspeed
import torch

from alps_ds.arch import AttentionSpec
from alps_ds.selection import HeadSelection, Provenance
from alps_ds.sparse import apply, merge
from alps_ds.tiny import build_model, tiny_config


def main() -> None:
    deepspeed.init_distributed("gloo")
    cfg = tiny_config("llama", layers=2, hidden=32, heads=4, kv_heads=2, vocab=64)
    spec = AttentionSpec.from_config(cfg)
    model = build_model(cfg, seed=0)
    apply(model, HeadSelection(spec.fingerprint, ((0, 1), (1, 3)), Provenance("explicit")))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)  # "trained" slices, different from the base rows
    expected = {n: p.detach().clone() for n, p in merge(copy.deepcopy(model)).named_parameters()}
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
    }
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds)
    module = engine.module
    assert any(hasattr(p, "ds_id") for p in module.parameters()), "not partitioned: the test would prove nothing"
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        merge(module)  # crashed with "Nested GatheredParameters contexts cannot overlap parameters"
        inside = {n: p.detach().clone() for n, p in module.named_parameters()}
    for name, want in expected.items():
        assert torch.equal(inside[name], want), f"{name} wrong inside the outer context"
        p = module.get_parameter(name)
        with deepspeed.zero.GatheredParameters([p]):
            after = p.detach().clone()
        assert torch.equal(after, want), f"{name} lost the merge when the outer context re-partitioned it"
    print("nested merge ok", flush=True)


if __name__ == "__main__":
    main()
