"""The training run: config -> model dir -> selection -> hooked model -> DeepSpeed engine -> checkpoints -> export.

Read :func:`train` top to bottom: :func:`setup` checks every input and builds the engine (nothing is
written before it succeeds), :func:`run_steps` is the optimizer loop, :func:`finish` saves the last
checkpoint, exports and writes the summary. Runs the same under the deepspeed launcher, torchrun,
mpirun (ranks from mpi4py) and as one plain process. Rank 0 owns every shared file (TensorBoard, the
checkpoint pointer, the exports); other ranks stay quiet. Checkpoints hold only trainable tensors
(``exclude_frozen_parameters``); frozen weights come back from the base model on resume.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alps_ds.arch import AttentionSpec
from alps_ds.digest import base_record
from alps_ds.errors import AlpsError
from alps_ds.fsutil import atomic_write_text
from alps_ds.train.checkpoint import check_base, check_resume, load_checkpoint, read_latest, save_checkpoint
from alps_ds.train.config import RunConfig, gradient_accumulation
from alps_ds.train.data import StepPlan, collate, tokenize_all
from alps_ds.train.distributed import barrier, init_distributed, quiet_logs
from alps_ds.train.engine_config import check_precision, deepspeed_config, lr_lambda, train_dtype, zero_stage
from alps_ds.train.heads import resolve_selection
from alps_ds.train.model import check_token_ids, load_model, load_tokenizer, resolve_model_dir
from alps_ds.train.report import Summary, TrainLog, open_tensorboard, optimizer_bytes
from alps_ds.train.run_files import write_run_files
from alps_ds.train.tensor_parallel import Grid, export, grid, hook_model, load_model_stage


def train(cfg: RunConfig, *, resume: bool = False) -> Summary | None:
    """Run the whole job; returns the summary on rank 0 (None elsewhere)."""
    if cfg.engine == "megatron":
        from alps_ds.mcore.engine import train as train_megatron

        return train_megatron(cfg, resume=resume)
    run = setup(cfg, resume=resume)
    progress = run_steps(run)
    return finish(run, progress)


@dataclass
class Run:
    """Everything :func:`setup` built that the loop and :func:`finish` use."""

    cfg: RunConfig
    rank: int
    world: int
    out: Path
    ckpt_dir: Path
    resumed: bool  # a checkpoint was found and loaded
    start_wall: float
    model_dir: Path
    selection: Any  # HeadSelection
    report: Any  # TrainableReport of the hooked model
    engine: Any  # deepspeed.DeepSpeedEngine
    scheduler: Any
    tokenizer: Any
    examples: list
    plan: StepPlan
    grad_accum: int
    stage: int
    dtype: torch.dtype
    zero_init: bool  # the model was built partitioned (ZeRO-3 zero.Init)
    total_steps: int
    start_step: int
    base: dict | None = None  # digest record of the base Q/K/V (latest.json), refused on resume if it changed
    tp: Grid | None = None  # this rank's place in tp x dp (parallel.tp)
    log: TrainLog | None = None  # rank 0 only
    writer: Any = None  # TensorBoard SummaryWriter, rank 0 with logging.tensorboard


@dataclass
class Progress:
    """Where :func:`run_steps` stopped and what it saw."""

    final_step: int
    first_loss: float | None
    last_loss: float | None
    tokens_seen: int


# ---- setup ----------------------------------------------------------------------------------------------------
def setup(cfg: RunConfig, *, resume: bool = False, hook=None) -> Run:
    """Join the process group, check output/data/selection, build the hooked model and the DeepSpeed engine,
    load the checkpoint when resuming, then (only now) write OUT/run_config.json and open the logs. ``hook``
    replaces :func:`alps_ds.apply` (same signature; the demo's PEFT LoRA arm uses it to run the same engine)."""
    start_wall = time.time()
    rank, world = init_distributed()
    quiet_logs(rank, cfg.logging.progress)
    tp = grid(cfg, rank, world)
    out = Path(cfg.output.dir)
    ckpt_dir = out / "checkpoints"
    latest = _latest_checkpoint(ckpt_dir, out, rank, world, resume)
    model_dir = resolve_model_dir(cfg, out, rank)
    spec = AttentionSpec.from_pretrained(model_dir)
    base = base_record(model_dir)  # every rank reads it (cheap), so every rank refuses a changed base alike
    tokenizer = load_tokenizer(cfg, model_dir)
    grad_accum = gradient_accumulation(cfg, world)
    ds_config = deepspeed_config(cfg, grad_accum)
    if latest is not None:
        _refuse_bad_resume(ckpt_dir, latest, cfg, base, world, zero_stage(ds_config))
    examples, stats, plan, total_steps = _prepare_data(cfg, model_dir, tokenizer, grad_accum, tp.dp, rank)
    selection = resolve_selection(cfg, spec, model_dir, out, rank, resume and latest is not None)
    engine, scheduler, report, zero_init = _build_engine(
        cfg, model_dir, spec, selection, ds_config, total_steps, tp, hook
    )
    if rank == 0:  # only once every input checked out: a failed start leaves output.dir as it was
        write_run_files(out, cfg, selection)

    start_step = 0
    if latest is not None:
        start_step = load_checkpoint(engine, ckpt_dir, latest, rank, cfg.output.keep_checkpoints, tp.tp)
    barrier()
    run = Run(
        cfg=cfg,
        rank=rank,
        world=world,
        out=out,
        ckpt_dir=ckpt_dir,
        resumed=latest is not None,
        start_wall=start_wall,
        model_dir=model_dir,
        selection=selection,
        report=report,
        engine=engine,
        scheduler=scheduler,
        tokenizer=tokenizer,
        examples=examples,
        plan=plan,
        grad_accum=grad_accum,
        stage=zero_stage(ds_config),
        dtype=train_dtype(ds_config),
        zero_init=zero_init,
        total_steps=total_steps,
        start_step=start_step,
        base=base,
        tp=tp,
    )
    if rank == 0:
        _open_logs(run, stats)
    return run


def _refuse_bad_resume(ckpt_dir: Path, latest: dict, cfg: RunConfig, base, world: int, stage: int) -> None:
    """Same base and batch, or one line on every rank; another world size, ZeRO stage or TP size resumes
    elastically."""
    check_base(ckpt_dir, latest, base)
    check_resume(ckpt_dir, latest, world, stage, cfg.train.batch, cfg.parallel.tp)


def _latest_checkpoint(ckpt_dir: Path, out: Path, rank: int, world: int, resume: bool) -> str | None:
    """The checkpoint to resume from (None: start at step 0); refuses to overwrite a run without --resume."""
    latest = read_latest(ckpt_dir)
    if not resume and latest is not None:
        raise AlpsError(f"output.dir: {out} already holds checkpoints; pass --resume or choose another output.dir")
    if resume and latest is None and rank == 0:
        print(f"alps-ds train: --resume: no checkpoint in {ckpt_dir}; starting from step 0", flush=True)
    return latest


def _prepare_data(cfg: RunConfig, model_dir: Path, tokenizer, grad_accum: int, world: int, rank: int):
    """Tokenized examples (every id inside the model's vocabulary), their stats, the step plan over ranks and the
    schedule's total optimizer steps."""
    examples, stats = tokenize_all(cfg.data, tokenizer, progress=rank == 0 and cfg.logging.progress)
    check_token_ids(cfg, model_dir, tokenizer, examples)
    plan = StepPlan(len(examples), cfg.train.micro_batch, grad_accum, world, cfg.train.seed, cfg.data.shuffle)
    if plan.steps_per_epoch == 0:
        raise AlpsError(
            f"data.datasets: {len(examples)} examples are fewer than one effective batch (train.batch = "
            f"{cfg.train.batch}); add data or lower train.batch"
        )
    total_steps = cfg.train.max_steps or max(1, round(cfg.train.epochs * plan.steps_per_epoch))
    return examples, stats, plan, total_steps


def _build_engine(
    cfg: RunConfig, model_dir: Path, spec, selection, ds_config: dict, total_steps: int, tp: Grid, hook=None
):
    """The base model with the selection hooked in, wrapped by ``deepspeed.initialize`` with AdamW (unless the
    DS config names an optimizer) and the LR schedule. Returns (engine, scheduler, report, zero_init)."""
    import deepspeed

    t = cfg.train
    check_precision(cfg, ds_config)  # fp16/bf16 the accelerator lacks: one line before the model loads
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    np.random.seed(t.seed)
    model = load_model(model_dir, ds_config, load_model_stage(zero_stage(ds_config), cfg), train_dtype(ds_config))
    zero_init = any(hasattr(p, "ds_id") for p in model.parameters())  # zero.Init took effect
    model.config.use_cache = False
    report = hook_model(model, selection, cfg, spec, zero_stage(ds_config), hook)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise AlpsError(
            "selection/train_others: nothing to train (no head selected and train_others empty); "
            "select heads or set train_others"
        )
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
        mpu=tp.mpu,
    )
    return engine, scheduler, report, zero_init


def _open_logs(run: Run, stats) -> None:
    """Rank 0: OUT/train_log.jsonl (cut back to the checkpoint on resume), the banner line, TensorBoard."""
    cfg = run.cfg
    run.log = TrainLog(run.out / "train_log.jsonl", keep_until=run.start_step if run.resumed else None)
    print(
        f"alps-ds train: {run.world} rank(s), ZeRO-{run.stage}, {str(run.dtype).removeprefix('torch.')}, "
        f"{len(run.selection)} heads, {run.report.trainable:,} trainable of {run.report.total:,} elements, "
        f"{stats.examples} examples from {stats.rows} rows ({stats.dropped} dropped, {stats.truncated} truncated), "
        f"{run.total_steps} steps (grad accum {run.grad_accum})",
        flush=True,
    )
    if cfg.logging.tensorboard:
        run.writer = open_tensorboard(run.out / "tensorboard", cfg, run.selection, run.report, run.start_step)


# ---- the loop -------------------------------------------------------------------------------------------------
def run_steps(run: Run) -> Progress:
    """Optimizer steps from ``run.start_step`` to the end of the schedule (or ``train.stop_after`` more),
    logging each and checkpointing every ``output.checkpoint_every``."""
    from tqdm.auto import tqdm

    cfg = run.cfg
    stop_after = cfg.train.stop_after
    stop_at = run.total_steps if stop_after is None else min(run.total_steps, run.start_step + stop_after)
    bar = tqdm(
        total=run.total_steps,
        initial=run.start_step,
        desc="train",
        unit="step",
        disable=run.rank != 0 or not cfg.logging.progress,
    )
    progress = Progress(run.start_step, None, None, 0)
    step = run.start_step
    run.engine.train()
    for step, micro in run.plan.iterate(run.start_step, run.tp.dp_rank):
        if step >= stop_at:
            break
        tic = time.perf_counter()
        lr = run.scheduler.get_last_lr()[0]
        loss, tokens = _step(run, micro)
        elapsed = time.perf_counter() - tic
        grad_norm = run.engine.get_global_grad_norm()  # asked on every rank, as before rank 0 logs it
        done = step + 1
        progress.last_loss = loss
        progress.first_loss = loss if progress.first_loss is None else progress.first_loss
        progress.tokens_seen += tokens
        if run.rank == 0:
            _log_step(run, done, loss, lr, None if grad_norm is None else float(grad_norm), tokens, elapsed)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        every = cfg.output.checkpoint_every
        if every and done % every == 0 and done < stop_at:
            save_checkpoint(run.engine, run.ckpt_dir, done, run.rank, run.world, cfg.output.keep_checkpoints, run.base)
    progress.final_step = min(step, stop_at)
    bar.close()
    return progress


def _step(run: Run, micro: list[list[int]]) -> tuple[float, int]:
    """One optimizer step over this rank's micro-batches; returns (mean loss over all ranks, tokens of all ranks)."""
    import torch.distributed as dist

    engine = run.engine
    loss_sum, tokens = 0.0, 0
    for indices in micro:
        batch = collate([run.examples[i] for i in indices], run.tokenizer.pad_token_id)
        tokens += int(batch["attention_mask"].sum())
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        loss_sum += float(loss.detach().float())
    # on the engine's device: NCCL reduces only GPU tensors (gloo takes the CPU one)
    totals = torch.tensor([loss_sum / run.grad_accum, run.tp.tokens(tokens)], dtype=torch.float64, device=engine.device)
    dist.all_reduce(totals)
    return float(totals[0]) / run.world, int(totals[1])


def _log_step(run: Run, done: int, loss: float, lr: float, grad_norm, tokens: int, seconds: float) -> None:
    """Rank 0: one train_log.jsonl line per step; TensorBoard scalars every ``logging.every`` steps."""
    run.log.write({"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens})
    if run.writer is not None and done % run.cfg.logging.every == 0:
        run.writer.add_scalar("train/loss", loss, done)
        run.writer.add_scalar("train/lr", lr, done)
        if grad_norm is not None:
            run.writer.add_scalar("train/grad_norm", grad_norm, done)
        run.writer.add_scalar("train/tokens_per_s", tokens / max(seconds, 1e-9), done)


# ---- finish ---------------------------------------------------------------------------------------------------
def finish(run: Run, progress: Progress) -> Summary | None:
    """Save the last checkpoint, export merged/ and adapter/ when the schedule is done, write the summary."""
    import torch.distributed as dist

    cfg, final_step = run.cfg, progress.final_step
    if final_step > run.start_step or not run.resumed:
        save_checkpoint(
            run.engine, run.ckpt_dir, final_step, run.rank, run.world, cfg.output.keep_checkpoints, run.base
        )
    finished = final_step >= run.total_steps
    per_rank: list[Any] = [None] * run.world
    dist.all_gather_object(per_rank, optimizer_bytes(run.engine) | run.tp.facts(run.engine))
    merged_dir = adapter_dir = None
    if finished:
        merged_dir, adapter_dir = export(cfg, run.engine, run.selection, run.model_dir, run.out, run.rank)
    summary = None
    if run.rank == 0:
        if run.writer is not None:
            run.writer.close()
        run.log.close()
        summary = _summary(run, progress, per_rank, merged_dir, adapter_dir)
        name = "summary.json" if finished else "summary.partial.json"
        atomic_write_text(run.out / name, json.dumps(asdict(summary), indent=1) + "\n")
        loss = progress.last_loss
        print(f"alps-ds train: {'done' if finished else 'stopped'} at step {final_step}, loss {loss}", flush=True)
    barrier()
    return summary


def _summary(run: Run, progress: Progress, per_rank: list, merged_dir, adapter_dir) -> Summary:
    return Summary(
        steps=progress.final_step,
        total_steps=run.total_steps,
        resumed_from=run.start_step if run.resumed else None,
        final_loss=progress.last_loss,
        first_loss=progress.first_loss,
        trainable_elements=run.report.trainable,
        total_elements=run.report.total,
        heads_selected=len(run.selection),
        optimizer_bytes_per_rank=per_rank,
        world_size=run.world,
        tensor_parallel=run.tp.tp,
        grad_accum=run.grad_accum,
        zero_stage=run.stage,
        zero_init=run.zero_init,
        dtype=str(run.dtype).removeprefix("torch."),
        examples=len(run.examples),
        tokens_seen=progress.tokens_seen,
        wall_seconds=round(time.time() - run.start_wall, 3),
        merged=None if merged_dir is None else str(merged_dir),
        adapter=None if adapter_dir is None else str(adapter_dir),
    )
