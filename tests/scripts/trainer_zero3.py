"""HF Trainer + a ZeRO-3 DeepSpeed JSON on real ranks with a hooked model; rank 0 writes a results JSON.

usage: torchrun --nproc_per_node 2 tests/scripts/trainer_zero3.py OUT_DIR [--no-deepspeed]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from alps_ds.adapter import save_adapter
from alps_ds.arch import AttentionSpec
from alps_ds.layout import trainable_rows
from alps_ds.selection import HeadSelection, Provenance
from alps_ds.sparse import apply, merge, trainable_report
from alps_ds.tiny import build_model, tiny_config

HEADS = ((0, 2), (1, 0))

DS_CONFIG = {
    "zero_optimization": {"stage": 3},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 10**9,
}


class Rows(torch.utils.data.Dataset):
    """The same few sequences over and over: a batch the model can learn within a few steps."""

    def __init__(self, vocab: int, n: int = 8):
        g = torch.Generator().manual_seed(7)
        self.rows = [torch.randint(3, vocab, (16,), generator=g) for _ in range(4)]
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        ids = self.rows[i % len(self.rows)]
        return {"input_ids": ids, "labels": ids.clone()}


def full_state(model) -> dict[str, torch.Tensor]:
    import deepspeed

    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {k: p.detach().clone() for k, p in params.items()}


def main() -> int:
    from transformers import Trainer, TrainingArguments

    out = Path(sys.argv[1])
    use_ds = "--no-deepspeed" not in sys.argv
    cfg = tiny_config("llama", layers=2, hidden=64, heads=4, kv_heads=2, vocab=96)
    spec = AttentionSpec.from_config(cfg)
    sel = HeadSelection(spec.fingerprint, HEADS, Provenance("explicit"))
    base = build_model(cfg, seed=0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = build_model(cfg, seed=0)
    apply(model, sel)
    expected = trainable_report(model).trainable

    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=2,
        max_steps=5,
        learning_rate=1e-2,
        weight_decay=0.1,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        deepspeed=DS_CONFIG if use_ds else None,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Rows(cfg.vocab_size))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    engine = trainer.model_wrapped
    opt = getattr(engine, "optimizer", None)
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        held = sum(g.numel() - sum(pad) for g, pad in zip(opt.fp32_partitioned_groups_flat, opt.groups_padding))
    else:
        inner = trainer.optimizer
        held = sum(p.numel() for g in inner.param_groups for p in g["params"])
    save_adapter(engine, out / "adapter")
    merge(trainer.model)
    after = full_state(trainer.model)

    rows = {spec.module_path(r.layer, r.module): r.indices() for r in trainable_rows(spec, HEADS)}
    problems = []
    for key, b in before.items():
        a, module = after[key], key.rpartition(".")[0]
        if module in rows:
            idx = torch.tensor(rows[module])
            keep = torch.ones(b.shape[0], dtype=torch.bool)
            keep[idx] = False
            if not torch.equal(a[keep], b[keep]):
                problems.append(f"{key}: non-selected rows moved")
            if not (a[idx] != b[idx]).any(dim=1).all():
                problems.append(f"{key}: a selected row did not change")
        elif not torch.equal(a, b):
            problems.append(f"{key}: frozen parameter changed")
    world = dist.get_world_size() if dist.is_initialized() else 1
    counts = [held] * world
    if dist.is_initialized():
        dist.all_gather_object(counts, held)
    if not dist.is_initialized() or dist.get_rank() == 0:
        adapter = load_file(out / "adapter" / "adapter.safetensors")
        nonzero = all(t.abs().sum() > 0 for t in adapter.values())
        matches = all(torch.equal(t, after[k][torch.tensor(rows[k.rpartition(".")[0]])]) for k, t in adapter.items())
        result = dict(
            deepspeed=use_ds,
            engine=type(engine).__name__,
            zero_stage=getattr(engine, "zero_optimization_stage", lambda: None)(),
            losses=losses,
            problems=problems,
            adapter_elements=sum(t.numel() for t in adapter.values()),
            adapter_nonzero=nonzero,
            adapter_matches=matches,
            optimizer_elements_per_rank=counts,
            expected_elements=expected,
        )
        (out / "result.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
