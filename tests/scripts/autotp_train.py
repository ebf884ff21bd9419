"""Train a tiny HF Llama under DeepSpeed AutoTP (autotp_size 2) with the ALPS hook, then gather q/k/v.

Usage (every rank): ``autotp_train.py OUT.json``. The model has 6 query heads and 3 kv heads, so
AutoTP splits q/k/v unevenly (2 kv groups on rank 0, 1 on rank 1). For each case in CASES
(ZeRO 1 and 2): build the model, record full q/k/v and the unsharded logits, shard + hook, check the
sharded logits, train a few AdamW steps (weight decay 0.1) on one fixed batch, gather q/k/v
back. Rank 0 writes everything tests/test_autotp.py asserts on.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")

# name: (ZeRO stage, query heads, kv heads, selected (layer, head))
CASES = {
    "zero1": (1, 6, 3, [(0, 1), (1, 4), (1, 5)]),
    "zero2": (2, 6, 3, [(0, 1), (1, 4), (1, 5)]),
}


def run_case(stage: int, n: int, g: int, heads: list) -> dict:
    import deepspeed
    import torch.distributed as dist

    import alps_ds
    from alps_ds.arch import AttentionSpec
    from alps_ds.parallel import autotp
    from alps_ds.selection import HeadSelection, Provenance
    from alps_ds.tiny import build_model, tiny_config

    config = tiny_config("llama", layers=2, hidden=48, heads=n, kv_heads=g, head_dim=48 // n, vocab=64, intermediate=64)
    model = build_model(config, seed=0)
    spec = AttentionSpec.from_config(config)
    before = {
        k: v.detach().clone() for k, v in model.state_dict().items() if k.rpartition(".")[0].endswith(spec.modules)
    }
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(1))  # same batch on every rank
    with torch.no_grad():
        ref_logits = model(input_ids=ids).logits

    selection = HeadSelection(spec.fingerprint, tuple(heads), Provenance("explicit"))
    autotp.shard(model, 2, selection=selection)
    report = autotp.apply(model, selection)
    with torch.no_grad():
        tp_logits = model(input_ids=ids).logits
    params = [p for p in model.parameters() if p.requires_grad]
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "tensor_parallel": {"autotp_size": 2},
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 1.0,
        "steps_per_print": 1000,
    }
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer, config=ds_config)
    losses, norms = [], []
    for _ in range(4):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        norms.append(float(engine.get_global_grad_norm()))
    after = autotp.gather_qkv(engine.module, spec)
    still_hooked = [name for name, m in engine.module.named_modules() if isinstance(m, autotp.TPHeadRowsLinear)]
    info = {
        "rank": dist.get_rank(),
        "hooked": {m.name: [list(r) for r in m.ranges] for m in report.modules},
        "report_per_kind": report.per_kind,
        "report_global": {m.name: [list(r) for r in _global_ranges(spec, m)] for m in report.modules},
        "trainable": sum(p.numel() for p in engine.module.parameters() if p.requires_grad),
        "still_hooked": still_hooked,
        "per_kind": alps_ds.trainable_report(engine.module).per_kind,
    }
    # merge is engine-agnostic: AutoTP's own layers come back with this rank's trained rows in them
    alps_ds.merge(engine.module)
    after_merge = autotp.gather_qkv(engine.module, spec)
    info["merge_kept_rows"] = all(torch.equal(after_merge[k], v) for k, v in after.items())
    info["left_hooked"] = sum(isinstance(m, alps_ds.hooked.HeadRows) for m in engine.module.modules())
    ref_losses, ref_norms, ref_after, ref_report = reference(config, spec, selection, ids)
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, info)
    return {
        "heads": heads,
        "n": spec.num_heads,
        "g": spec.num_kv_heads,
        "hd": spec.head_dim,
        "losses": losses,
        "logits_max_diff": (ref_logits - tp_logits).abs().max().item(),
        "ranks": ranks,
        "before": {k: v.tolist() for k, v in before.items()},
        "after": {k: v.tolist() for k, v in after.items()},
        "ref_losses": ref_losses,
        "norms": norms,
        "ref_norms": ref_norms,
        "ref_after": {k: v.tolist() for k, v in ref_after.items()},
        "ref_per_kind": ref_report.per_kind,
        "ref_rows": {m.name: [list(r) for r in m.ranges] for m in ref_report.modules},
    }


def _global_ranges(spec, hooked):
    """A hooked shard's LOCAL row ranges as rows of the unsharded weight (arch.py's AutoTP split)."""
    (start, _), *_ = spec.tp_segments("autotp", hooked.module, hooked.tp_size, hooked.tp_rank)
    return [(start + a, start + b) for a, b in hooked.ranges]


def reference(config, spec, selection, ids):
    """The same training without tensor parallelism or DeepSpeed: one process, the plain sparse
    hook, torch AdamW and global-norm clipping. TP training must reproduce it."""
    from alps_ds import sparse
    from alps_ds.tiny import build_model

    model = build_model(config, seed=0)
    report = sparse.apply(model, selection)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    losses, norms = [], []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, 1.0)))
        opt.step()
        losses.append(loss.item())
    sparse.merge(model)
    state = model.state_dict()
    after = {k: state[k].detach() for k in sorted(state) if k.rpartition(".")[0].endswith(spec.modules)}
    return losses, norms, after, report


def main() -> None:
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    results = {name: run_case(*case) for name, case in CASES.items()}
    if dist.get_rank() == 0:
        with open(sys.argv[1] + ".tmp", "w") as f:
            json.dump(results, f)
        os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    dist.barrier()
    dist.destroy_process_group()  # before exit: gloo torn down at exit can abort a finished rank


if __name__ == "__main__":
    main()
