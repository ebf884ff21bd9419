"""HF Trainer, TRL SFT and TRL DPO on hooked models, ZeRO-2 and ZeRO-3, in ONE process group.

The SFT and DPO runs are docs/hf-trl.md's scripts (extracted by the test into SCRIPTS_DIR and
imported here). Plain ``Trainer`` cases (no alps_ds.integrations class) save through every path a
user may call. Rank 0 writes WORK/result.json; tests/test_hf_trl.py checks what landed on disk in
its own process.

usage: torchrun --nproc_per_node 2 tests/scripts/hf_trl.py WORK SCRIPTS_DIR [CASE ...]
"""

from __future__ import annotations

import gc
import json
import shutil
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
Z2, Z3 = str(REPO / "configs/hf/ds_zero2.json"), str(REPO / "configs/hf/ds_zero3.json")


def rank0() -> bool:
    return dist.get_rank() == 0


def barrier() -> None:
    dist.barrier()


def losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def reset_accelerate() -> None:
    """A fresh AcceleratorState for the next Trainer (its DeepSpeed plugin is per process otherwise)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    gc.collect()


def sft(work: Path, scripts, case: str, ds: str, *, resume_from: str | None = None) -> dict:
    out = work / case
    if resume_from is not None:
        if rank0():
            shutil.copytree(work / resume_from / "checkpoint-2", out / "checkpoint-2")
        barrier()
    trainer = scripts.alps_sft.train(
        str(work / "llama"),
        str(work / "heads-llama.json"),
        str(work / "sft.jsonl"),
        str(out),
        ds,
        max_steps=4,
        save_steps=2,
        resume=resume_from is not None,
        seed=3,
    )
    return {"losses": losses(trainer), "zero_stage": trainer.model_wrapped.zero_optimization_stage()}


def reference_matches_base(trainer, base_dir: Path) -> dict:
    """Logits of TRL's reference call (AlpsDPOTrainer's) against the base model loaded from disk."""
    import transformers.integrations.deepspeed as hf_ds
    from transformers import AutoModelForCausalLM

    live = hf_ds._hf_deepspeed_config_weak_ref() if hf_ds._hf_deepspeed_config_weak_ref else None
    hf_ds.unset_hf_deepspeed_config()  # a plain copy of the base, not one partitioned by zero.Init
    try:
        base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    finally:
        if live is not None:
            hf_ds.set_hf_deepspeed_config(live)
    ids = torch.randint(3, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    model = trainer.model
    model.eval()
    with torch.no_grad():
        ref = trainer.ref_model(input_ids=ids).logits
        policy = model(input_ids=ids).logits
        want = base(input_ids=ids).logits
    model.train()
    return {
        "ref_max_diff": (ref - want).abs().max().item(),
        "policy_max_diff": (policy - want).abs().max().item(),
        "ref_holds_tensors": any(isinstance(v, torch.Tensor) for v in vars(trainer.ref_model).values()),
    }


def trl_default_ref_bytes(work: Path, ds: str) -> int:
    """Parameter bytes (full sizes, summed over what this rank builds) of the reference model TRL loads itself."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(work / "qwen2")
    args = DPOConfig(output_dir=str(work / "dpo-default"), deepspeed=ds, use_cpu=True, bf16=False, report_to=[])
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=load_dataset("json", data_files=str(work / "dpo.jsonl"), split="train"),
        processing_class=AutoTokenizer.from_pretrained(work / "qwen2"),
    )
    ref = trainer.ref_model
    return sum(int(getattr(p, "ds_numel", p.numel())) * p.element_size() for p in ref.parameters())


def dpo(work: Path, scripts, case: str, ds: str) -> dict:
    trainer = scripts.alps_dpo.train(
        str(work / "qwen2"),
        str(work / "heads-qwen2.json"),
        str(work / "dpo.jsonl"),
        str(work / case),
        ds,
        max_steps=3,
        save_steps=2,
        seed=3,
    )
    result = {"losses": losses(trainer), "zero_stage": trainer.model_wrapped.zero_optimization_stage()}
    result.update(reference_matches_base(trainer, work / "qwen2"))
    rewards = [h.get("rewards/margins") for h in trainer.state.log_history if "rewards/margins" in h]
    result["reward_margins"] = rewards
    del trainer
    reset_accelerate()
    result["trl_ref_bytes"] = trl_default_ref_bytes(work, ds)
    return result


class Rows(torch.utils.data.Dataset):
    """The same few sequences over and over: a batch the model can learn within a few steps."""

    def __init__(self, vocab: int, n: int = 16):
        g = torch.Generator().manual_seed(7)
        self.rows = [torch.randint(3, vocab, (16,), generator=g) for _ in range(4)]
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        ids = self.rows[i % len(self.rows)]
        return {"input_ids": ids, "labels": ids.clone()}


def optimizer_elements(engine) -> int:
    """Elements this rank's optimizer updates (ZeRO: fp32 partitions minus padding; stage 0: all it holds)."""
    opt = engine.optimizer
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        return sum(g.numel() - sum(pad) for g, pad in zip(opt.fp32_partitioned_groups_flat, opt.groups_padding))
    if hasattr(opt, "single_partition_of_fp32_groups"):
        return sum(g.numel() - pad for g, pad in zip(opt.single_partition_of_fp32_groups, opt.groups_padding))
    return sum(p.numel() for g in opt.param_groups for p in g["params"])


def with_stage(path: str, stage: int) -> dict:
    """configs/hf/ds_zero2.json with another ZeRO stage (0 and 1 ship no JSON of their own)."""
    config = json.loads(Path(path).read_text())
    config["zero_optimization"]["stage"] = stage
    return config


def plain_trainer(work: Path, case: str, ds: str | dict, *, bf16: bool = False) -> dict:
    """HF Trainer without any alps_ds class: every save path a user may call must write the trained rows."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    import alps_ds

    out = work / case
    model = AutoModelForCausalLM.from_pretrained(work / "qwen2")
    alps_ds.apply(model, alps_ds.HeadSelection.load(work / "heads-qwen2.json"))
    args = TrainingArguments(
        output_dir=str(out),
        deepspeed=ds,
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},
        disable_tqdm=True,
        seed=3,
        bf16=bf16,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Rows(model.config.vocab_size))
    trainer.train()
    engine = trainer.model_wrapped
    trainer.save_model(str(out / "save_model"))
    state = trainer.accelerator.get_state_dict(engine)
    engine.save_16bit_model(str(out / "save_16bit"))
    if rank0():
        (out / "get_state_dict").mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "get_state_dict/model.safetensors"))
        for name in ("get_state_dict", "save_16bit"):
            model.config.save_pretrained(out / name)
    refused = ""
    try:
        engine.save_16bit_model(str(out / "refused"), exclude_frozen_parameters=True)
    except alps_ds.AlpsError as e:
        refused = str(e)
    counts = [0] * dist.get_world_size()
    dist.all_gather_object(counts, optimizer_elements(engine))
    return {
        "losses": losses(trainer),
        "zero_stage": engine.zero_optimization_stage(),
        "refused": refused,
        "optimizer_elements_per_rank": counts,
    }


def main() -> int:
    work, scripts_dir = Path(sys.argv[1]), Path(sys.argv[2])
    sys.path.insert(0, str(scripts_dir))
    import alps_dpo
    import alps_sft

    scripts = type("Scripts", (), {"alps_sft": alps_sft, "alps_dpo": alps_dpo})
    dist.init_process_group("gloo")
    cases = {
        "sft-z3": lambda: sft(work, scripts, "sft-z3", Z3),
        "sft-z3-resume": lambda: sft(work, scripts, "sft-z3-resume", Z3, resume_from="sft-z3"),
        "sft-z2": lambda: sft(work, scripts, "sft-z2", Z2),
        "sft-z2-resume": lambda: sft(work, scripts, "sft-z2-resume", Z2, resume_from="sft-z2"),
        "dpo-z2": lambda: dpo(work, scripts, "dpo-z2", Z2),
        "dpo-z3": lambda: dpo(work, scripts, "dpo-z3", Z3),
        "trainer-z0": lambda: plain_trainer(work, "trainer-z0", with_stage(Z2, 0)),
        "trainer-z1": lambda: plain_trainer(work, "trainer-z1", with_stage(Z2, 1)),
        "trainer-z2": lambda: plain_trainer(work, "trainer-z2", Z2),
        "trainer-z3": lambda: plain_trainer(work, "trainer-z3", Z3),
        "trainer-z3-bf16": lambda: plain_trainer(work, "trainer-z3-bf16", Z3, bf16=True),
    }
    chosen = sys.argv[3:] or list(cases)
    results = {}
    for cid in chosen:
        try:
            results[cid] = cases[cid]()
        except Exception as e:  # one broken case must not hide the others' results
            results[cid] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        reset_accelerate()
        barrier()
    if rank0():
        (work / "result.json").write_text(json.dumps(results, indent=1))
    barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
