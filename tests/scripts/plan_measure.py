"""Measure the per-rank bytes a real DeepSpeed engine holds for a hooked tiny model (for tests/test_plan.py).

Usage: plan_measure.py MODEL_DIR HEADS_JSON OUT.json [STAGE ...]. For each ZeRO stage: build the model,
apply the ALPS hook, initialize a bf16 AdamW engine on every rank, run one step, then record per rank
the bytes of frozen weights, trainable weights, gradient partitions, fp32 master partitions and Adam
states. Rank 0 writes {stage: [per-rank dicts]}.
"""

import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from alps_ds.selection import HeadSelection
from alps_ds.sparse import apply


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def local(p: torch.Tensor) -> torch.Tensor:
    """What this rank stores of a parameter: its ZeRO-3 partition, else the whole tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p


def measure(stage: int, model_dir: str, heads: str) -> dict:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    apply(model, HeadSelection.load(heads))
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}},
        # Small buckets: the default 5e8-element buffers are planned separately (docs/plan.md).
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 4096, "allgather_bucket_size": 4096},
    }
    if stage == 3:
        config["zero_optimization"].update(stage3_prefetch_bucket_size=0, stage3_param_persistence_threshold=0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(dist.get_rank()))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    if stage == 3:
        grads = nbytes(opt.grad_partitions_flat_buffer)
    else:
        grads = sum(nbytes(g) for group in opt.averaged_gradients.values() for g in group)
    engine.step()
    if stage == 3:
        master = sum(nbytes(t) for t in opt.fp32_partitioned_groups_flat)
    else:
        master = sum(nbytes(t) for t in opt.single_partition_of_fp32_groups)
    adam = sum(
        nbytes(v) for state in opt.optimizer.state.values() for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")
    )
    params = list(engine.module.parameters())
    out = {
        "rank": dist.get_rank(),
        "frozen_weights": sum(nbytes(local(p)) for p in params if not p.requires_grad),
        "trainable_weights": sum(nbytes(local(p)) for p in params if p.requires_grad),
        "trainable_elements": sum(
            p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params if p.requires_grad
        ),
        "gradients": grads,
        "master": master,
        "optimizer": adam,
        "loss": loss.item(),
    }
    engine.destroy()
    return out


def main() -> None:
    model_dir, heads, out_path, *stages = sys.argv[1:]
    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for stage in map(int, stages or ["2", "3"]):
        mine = measure(stage, model_dir, heads)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        results[str(stage)] = everyone
    if dist.get_rank() == 0:
        with open(out_path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(out_path + ".tmp", out_path)
    dist.barrier()
    dist.destroy_process_group()  # before exit: gloo torn down at exit can abort a finished rank


if __name__ == "__main__":
    main()
