"""Run the engine-hook acceptance matrix on real ranks in ONE process group; rank 0 writes a JSON.

Each case builds a fresh tiny model (optionally under ``zero.Init``), applies a head selection,
trains a few AdamW steps (weight decay 0.1) through ``deepspeed.initialize``, merges, and
records what tests/test_sparse_engine.py asserts: bit-identity of everything not selected,
slices that start from the base rows, change of every selected row, falling loss, and the
elements the optimizer really holds per rank.

usage: torchrun --nproc_per_node 2 tests/scripts/sparse_matrix.py OUT.json [CASE_ID ...]
"""

from __future__ import annotations

import gc
import json
import sys
import traceback

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from alps_ds.adapter import save_adapter
from alps_ds.arch import AttentionSpec
from alps_ds.layout import trainable_rows
from alps_ds.selection import HeadSelection, Provenance
from alps_ds.sparse import apply, merge, trainable_report
from alps_ds.tiny import build_model, tiny_config

STEPS = 4
HEADS = ((0, 1), (1, 3))  # 2 of 8 query heads; kv heads 0 and 1 (group size 2)


def case(cid, stage, dtype="fp32", *, zinit=False, accum=1, ckpt=None, kv="group", model="llama", others=()):
    return dict(
        id=cid, stage=stage, dtype=dtype, zinit=zinit, accum=accum, ckpt=ckpt, kv=kv, model=model, others=others
    )


CASES = [
    case("z0-fp32", 0),
    case("z0-bf16", 0, "bf16"),
    case("z1-fp32", 1),
    case("z1-bf16", 1, "bf16", kv="none"),
    case("z2-fp32", 2, accum=2, ckpt="reentrant"),
    case("z2-bf16", 2, "bf16", model="qwen2"),
    case("z3-fp32", 3, model="phi3"),
    case("z3-bf16", 3, "bf16", accum=2, ckpt="non-reentrant"),
    case("z3init-fp32", 3, zinit=True, ckpt="reentrant", model="qwen2"),
    case("z3init-bf16", 3, "bf16", zinit=True, kv="none"),
    case("z1-fp32-ckpt-nonreentrant", 1, ckpt="non-reentrant", others=("mlp",)),
    case("z3-fp32-accum-ckpt-reentrant", 3, accum=2, ckpt="reentrant"),
    case("z2-fp16", 2, "fp16"),
    # Added for pairwise coverage of stage x dtype x accum x ckpt x kv (proved by tests/test_bitexact_matrix.py).
    case("z0-fp32-accum-ckpt-reentrant-kvnone", 0, accum=2, ckpt="reentrant", kv="none"),
    case("z0-bf16-ckpt-nonreentrant", 0, "bf16", ckpt="non-reentrant", model="mistral"),
    case("z1-bf16-accum-ckpt-reentrant", 1, "bf16", accum=2, ckpt="reentrant", model="gemma"),
    case("z2-fp32-ckpt-nonreentrant-kvnone", 2, ckpt="non-reentrant", kv="none", model="gpt_neox"),
    case("z3init-bf16-accum", 3, "bf16", zinit=True, accum=2, model="qwen3"),
]


def ds_config(c):
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": c["accum"],
        "zero_optimization": {"stage": c["stage"]},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if c["dtype"] == "bf16":
        cfg["bf16"] = {"enabled": True}
    if c["dtype"] == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
    return cfg


def full_state(module) -> dict[str, torch.Tensor]:
    """Every parameter's full value (gathered under ZeRO-3), cloned to fp32-safe CPU tensors."""
    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {k: p.detach().clone() for k, p in params.items()}


def optimizer_elements(engine) -> int:
    """Elements this rank's optimizer really updates (fp32 partitions without padding)."""
    opt = engine.optimizer
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        return sum(g.numel() - sum(pad) for g, pad in zip(opt.fp32_partitioned_groups_flat, opt.groups_padding))
    if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        return sum(g.numel() - pad for g, pad in zip(opt.single_partition_of_fp32_groups, opt.groups_padding))
    if hasattr(opt, "fp32_groups_flat_partition"):  # BF16_Optimizer (stage 0, bf16)
        return sum(g.numel() - pad for g, pad in zip(opt.fp32_groups_flat_partition, opt.group_paddings))
    inner = getattr(opt, "optimizer", opt)  # FP16_Optimizer or the client optimizer itself
    groups = getattr(opt, "fp32_groups_flat", None)
    if groups is not None:
        return sum(g.numel() for g in groups)
    return sum(p.numel() for g in inner.param_groups for p in g["params"])


def run_case(c, rank, world, adapter_root):
    cfg = tiny_config(c["model"], layers=2, hidden=64, heads=4, kv_heads=2, vocab=128)
    spec = AttentionSpec.from_config(cfg)
    sel = HeadSelection(spec.fingerprint, HEADS, Provenance("explicit"))
    conf = ds_config(c)
    if c["zinit"]:
        # The way HF builds under zero.Init (its weight init then runs on gathered parameters).
        from transformers import AutoModelForCausalLM
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        hf_ds = HfDeepSpeedConfig(conf)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        assert hasattr(model.model.embed_tokens.weight, "ds_id"), "model was not built partitioned"
        del hf_ds
        unset_hf_deepspeed_config()
    else:
        model = build_model(cfg, seed=0)
    if c["ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": c["ckpt"] == "reentrant"})
    apply(model, sel, kv=c["kv"], train_others=c["others"])
    report = trainable_report(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2, weight_decay=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=conf)
    engine.train()
    before = full_state(engine.module)

    calls = [0]
    probe = engine.module.get_submodule(spec.module_path(1, spec.modules[0]))
    handle = probe.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    g = torch.Generator().manual_seed(100 + rank)
    batches = [torch.randint(3, 128, (2, 16), generator=g) for _ in range(c["accum"])]
    losses = []
    for _ in range(STEPS):
        step_loss = 0.0
        for ids in batches:
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / c["accum"]
        losses.append(step_loss)
    handle.remove()
    opt_elems = optimizer_elements(engine)

    adapter_dir = f"{adapter_root}/{c['id']}"
    save_adapter(engine, adapter_dir)  # collective under ZeRO-3: the slices are gathered first
    merge(engine.module)
    after = full_state(engine.module)

    rows = {spec.module_path(r.layer, r.module): r for r in trainable_rows(spec, HEADS, c["kv"])}
    frozen_same, rows_same, rows_changed, from_base, problems = True, True, True, True, []
    for name, a in after.items():
        mod = name.rpartition(".")[0]
        if mod in rows:
            b = before[name]
            idx = torch.tensor(rows[mod].indices())
            mask = torch.ones(a.shape[0], dtype=torch.bool)
            mask[idx] = False
            if not torch.equal(a[mask], b[mask]):
                rows_same = False
                problems.append(f"{name}: non-selected rows moved")
            trained = before[f"{mod}.head_{name.rpartition('.')[2]}"]
            if not torch.equal(b[idx], trained):
                from_base = False
                problems.append(f"{name}: slice did not start from the base rows")
            delta = (a[idx] - b[idx]).reshape(len(idx), -1).abs().amax(dim=1)
            if not bool((delta > 0).all()):
                rows_changed = False
                problems.append(f"{name}: {int((delta == 0).sum())} selected rows unchanged")
        elif not any(p in name for p in c["others"]) and not torch.equal(a, before[name]):
            frozen_same = False
            problems.append(f"{name}: frozen parameter changed")
    others_changed = all(not torch.equal(a, before[n]) for n, a in after.items() if any(p in n for p in c["others"]))
    analytic = sum(r.num_rows * (spec.hidden_size + (1 if spec.qkv_bias else 0)) for r in rows.values())
    analytic += sum(p.numel() for n, p in after.items() if any(x in n for x in c["others"]))

    # The adapter written before merge holds every hooked module, with the real trained rows (not ZeRO-3's
    # empty partitions), and every train_others tensor whole.
    adapter = load_file(f"{adapter_dir}/adapter.safetensors")
    hooked_tensors = {k for k in after if k.rpartition(".")[0] in rows}  # weight (and bias) of every hooked module
    other_tensors = {k for k in after if any(x in k for x in c["others"])}

    def stored(k: str) -> torch.Tensor:
        return after[k] if k in other_tensors else after[k][torch.tensor(rows[k.rpartition(".")[0]].indices())]

    adapter_matches = adapter.keys() == hooked_tensors | other_tensors and all(
        torch.equal(t, stored(k)) for k, t in adapter.items()
    )
    counts = [None] * world
    dist.all_gather_object(counts, opt_elems)
    oks = [None] * world
    dist.all_gather_object(oks, (frozen_same, rows_same, rows_changed, from_base, problems))
    engine.destroy()
    return dict(
        c,
        ok=True,
        losses=losses,
        frozen_identical=all(o[0] for o in oks),
        nonselected_rows_identical=all(o[1] for o in oks),
        selected_rows_changed=all(o[2] for o in oks),
        slices_started_from_base=all(o[3] for o in oks),
        others_changed=others_changed,
        adapter_matches=adapter_matches,
        problems=[p for o in oks for p in o[4]][:10],
        optimizer_elements_per_rank=counts,
        analytic_elements=analytic,
        report_trainable=report.trainable,
        report_per_kind=report.per_kind,
        forward_calls=calls[0],
        forward_passes=STEPS * c["accum"],
        dtype_after=str(next(iter(after.values())).dtype),
    )


def main() -> int:
    out = sys.argv[1]
    wanted = set(sys.argv[2:])
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for c in CASES:
        if wanted and c["id"] not in wanted:
            continue
        try:
            results.append(run_case(c, rank, world, out + ".adapters"))
        except Exception as e:  # record and go on: one broken case must not hide the others
            results.append(dict(c, ok=False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-3000:]))
        gc.collect()
        if rank == 0:
            r = results[-1]
            print(f"[matrix] {c['id']}: ok={r['ok']} {r.get('losses', r.get('error'))}", flush=True)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1, default=str)
    dist.barrier()
    dist.destroy_process_group()  # before exit: gloo torn down at exit can abort a finished rank
    return 0


if __name__ == "__main__":
    sys.exit(main())
