"""The training run: config -> model dir -> selection -> hooked model -> DeepSpeed engine -> checkpoints -> export.

Runs the same under the deepspeed launcher, torchrun, mpirun (ranks from mpi4py) and as one
plain process. Rank 0 owns every shared file (TensorBoard, the checkpoint pointer, the
exports); other ranks stay quiet. Checkpoints hold only trainable tensors
(``exclude_frozen_parameters``); frozen weights come back from the base model on resume.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alps_ds.errors import AlpsError
from alps_ds.fsutil import atomic_write_text, claim_dir
from alps_ds.train.checkpoint import check_world_size, load_checkpoint, read_latest, save_checkpoint
from alps_ds.train.config import RunConfig, gradient_accumulation
from alps_ds.train.data import StepPlan, collate, tokenize_all
from alps_ds.train.distributed import barrier, init_distributed, quiet_logs
from alps_ds.train.engine_config import check_precision, deepspeed_config, lr_lambda, train_dtype, zero_stage
from alps_ds.train.export import export
from alps_ds.train.heads import resolve_selection
from alps_ds.train.model import check_token_ids, load_model, load_tokenizer, resolve_model_dir
from alps_ds.train.report import Summary, TrainLog, open_tensorboard, optimizer_bytes


def train(cfg: RunConfig, *, resume: bool = False) -> Summary | None:
    """Run the whole job; returns the summary on rank 0 (None elsewhere)."""
    start_wall = time.time()
    rank, world = init_distributed()
    quiet_logs(rank, cfg.logging.progress)
    out = Path(cfg.output.dir)
    ckpt_dir = out / "checkpoints"
    latest = read_latest(ckpt_dir)
    if not resume and latest is not None:
        raise AlpsError(f"output.dir: {out} already holds checkpoints; pass --resume or choose another output.dir")
    if resume and latest is None and rank == 0:
        print(f"alps-ds train: --resume: no checkpoint in {ckpt_dir}; starting from step 0", flush=True)
    if latest is not None:
        check_world_size(ckpt_dir, latest, world)

    import deepspeed
    import torch.distributed as dist

    from alps_ds.arch import AttentionSpec
    from alps_ds.sparse import apply, trainable_report

    model_dir = resolve_model_dir(cfg, out, rank)
    spec = AttentionSpec.from_pretrained(model_dir)
    tokenizer = load_tokenizer(cfg, model_dir)
    grad_accum = gradient_accumulation(cfg, world)
    ds_config = deepspeed_config(cfg, grad_accum)
    stage = zero_stage(ds_config)
    dtype = train_dtype(ds_config)

    examples, stats = tokenize_all(cfg.data, tokenizer, progress=rank == 0 and cfg.logging.progress)
    check_token_ids(cfg, model_dir, tokenizer, examples)
    check_precision(cfg, ds_config)
    plan = StepPlan(len(examples), cfg.train.micro_batch, grad_accum, world, cfg.train.seed, cfg.data.shuffle)
    if plan.steps_per_epoch == 0:
        raise AlpsError(
            f"data.datasets: {len(examples)} examples are fewer than one effective batch (train.batch = "
            f"{cfg.train.batch}); add data or lower train.batch"
        )
    total_steps = cfg.train.max_steps or max(1, round(cfg.train.epochs * plan.steps_per_epoch))
    selection = resolve_selection(cfg, spec, model_dir, out, rank, resume and latest is not None)

    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    model = load_model(model_dir, ds_config, stage, dtype)
    built_partitioned = any(hasattr(p, "ds_id") for p in model.parameters())  # zero.Init took effect
    model.config.use_cache = False
    apply(model, selection, kv=cfg.kv, train_others=tuple(cfg.train_others), spec=spec)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    report = trainable_report(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise AlpsError(
            "selection/train_others: nothing to train (no head selected and train_others empty); "
            "select heads or set train_others"
        )
    t = cfg.train
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
    schedule = lr_lambda(cfg, total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=params,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=ds_config,
    )
    if rank == 0:  # only once every input checked out: a failed start leaves output.dir as it was
        claim_dir(out, "train")
        selection.save(out / "heads.json")
        atomic_write_text(out / "run_config.json", json.dumps(cfg.to_dict(), indent=1) + "\n")

    start_step = 0
    if latest is not None:
        start_step = load_checkpoint(engine, ckpt_dir, latest, rank, cfg.output.keep_checkpoints)
    barrier()

    writer = log = None
    if rank == 0:
        log = TrainLog(out / "train_log.jsonl", keep_until=start_step if latest is not None else None)
        print(
            f"alps-ds train: {world} rank(s), ZeRO-{stage}, {str(dtype).removeprefix('torch.')}, "
            f"{len(selection)} heads, {report.trainable:,} trainable of {report.total:,} elements, "
            f"{stats.examples} examples from {stats.rows} rows ({stats.dropped} dropped, {stats.truncated} truncated), "
            f"{total_steps} steps (grad accum {grad_accum})",
            flush=True,
        )
        if cfg.logging.tensorboard:
            writer = open_tensorboard(out / "tensorboard", cfg, selection, report, start_step)

    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps, initial=start_step, desc="train", unit="step", disable=rank != 0 or not cfg.logging.progress
    )
    last_loss = first_loss = None
    tokens_seen = 0
    step = start_step
    stop_at = total_steps if t.stop_after is None else min(total_steps, start_step + t.stop_after)
    engine.train()
    for step, micro in plan.iterate(start_step, rank):
        if step >= stop_at:
            break
        tic = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        loss_sum, tokens = 0.0, 0
        for indices in micro:
            batch = collate([examples[i] for i in indices], tokenizer.pad_token_id)
            tokens += int(batch["attention_mask"].sum())
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            loss_sum += float(loss.detach().float())
        done = step + 1
        # on the engine's device: NCCL reduces only GPU tensors (gloo takes the CPU one)
        totals = torch.tensor([loss_sum / grad_accum, float(tokens)], dtype=torch.float64, device=engine.device)
        dist.all_reduce(totals)
        last_loss = float(totals[0]) / world
        first_loss = last_loss if first_loss is None else first_loss
        tokens_seen += int(totals[1])
        elapsed = time.perf_counter() - tic
        grad_norm = engine.get_global_grad_norm()
        grad_norm = None if grad_norm is None else float(grad_norm)
        if rank == 0:
            record = {"step": done, "loss": last_loss, "lr": lr, "grad_norm": grad_norm, "tokens": int(totals[1])}
            log.write(record)
            if writer is not None and done % cfg.logging.every == 0:
                writer.add_scalar("train/loss", last_loss, done)
                writer.add_scalar("train/lr", lr, done)
                if grad_norm is not None:
                    writer.add_scalar("train/grad_norm", grad_norm, done)
                writer.add_scalar("train/tokens_per_s", totals[1].item() / max(elapsed, 1e-9), done)
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
        every = cfg.output.checkpoint_every
        if every and done % every == 0 and done < stop_at:
            save_checkpoint(engine, ckpt_dir, done, rank, world, cfg.output.keep_checkpoints)
    final_step = min(step, stop_at)
    bar.close()
    if final_step > start_step or latest is None:
        save_checkpoint(engine, ckpt_dir, final_step, rank, world, cfg.output.keep_checkpoints)

    finished = final_step >= total_steps
    opt_bytes = optimizer_bytes(engine)
    per_rank: list[Any] = [None] * world
    dist.all_gather_object(per_rank, opt_bytes)
    merged_dir = adapter_dir = None
    if finished:
        merged_dir, adapter_dir = export(cfg, engine, selection, model_dir, out, rank)
    summary = None
    if rank == 0:
        if writer is not None:
            writer.close()
        log.close()
        summary = Summary(
            steps=final_step,
            total_steps=total_steps,
            resumed_from=start_step if latest is not None else None,
            final_loss=last_loss,
            first_loss=first_loss,
            trainable_elements=report.trainable,
            total_elements=report.total,
            heads_selected=len(selection),
            optimizer_bytes_per_rank=per_rank,
            world_size=world,
            grad_accum=grad_accum,
            zero_stage=stage,
            zero_init=built_partitioned,
            dtype=str(dtype).removeprefix("torch."),
            examples=len(examples),
            tokens_seen=tokens_seen,
            wall_seconds=round(time.time() - start_wall, 3),
            merged=None if merged_dir is None else str(merged_dir),
            adapter=None if adapter_dir is None else str(adapter_dir),
        )
        name = "summary.json" if finished else "summary.partial.json"
        atomic_write_text(out / name, json.dumps(asdict(summary), indent=1) + "\n")
        print(f"alps-ds train: {'done' if finished else 'stopped'} at step {final_step}, loss {last_loss}", flush=True)
    barrier()
    return summary
