"""``engine: megatron``: the ``alps-ds train`` job on megatron-core (GPTModel, its DDP, optimizer and checkpoints).

Same config keys, selection, data pipeline, logs and outputs as the DeepSpeed engine
(:mod:`alps_ds.train.loop`); what differs: the HF checkpoint is converted to a tensor-parallel
``GPTModel`` (:mod:`.convert`), ``linear_qkv`` is hooked by :mod:`alps_ds.parallel.megatron`,
gradients live in Megatron DDP's contiguous buffers and ``get_megatron_optimizer`` steps only the
slices; checkpoints are ``dist_checkpointing`` ones that reshard to another TP size
(:mod:`.checkpoint`); the export gathers the trained Q/K/V back into HF names (:mod:`.export`).
Each TP group sees the same batches; data parallel runs over the remaining ranks.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from alps_ds.errors import AlpsError
from alps_ds.fsutil import atomic_write_text
from alps_ds.train.config import RunConfig, gradient_accumulation
from alps_ds.train.data import IGNORE, StepPlan, collate, tokenize_all


@dataclass(frozen=True)
class Counts:
    """Trainable and total elements of the whole model (all TP ranks), for logs and TensorBoard."""

    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def causal_mask(seq: int) -> torch.Tensor:
    """megatron-core's explicit attention mask: True where a query may NOT attend (future keys)."""
    return torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)


def lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross entropy over labelled tokens, as a HF causal LM computes it.

    HF shifts labels inside the model; megatron-core takes the next token at each position. Right
    padding needs no key mask: causal attention never lets a real token see the pad after it.
    """
    ids, labels = batch["input_ids"], batch["labels"]
    b, s = ids.shape
    target = torch.full_like(labels, IGNORE)
    target[:, :-1] = labels[:, 1:]
    keep = target != IGNORE
    per_token = model(ids, torch.arange(s).expand(b, s), causal_mask(s), labels=target.clamp(min=0))
    return (per_token * keep).sum() / keep.sum()


def setup_parallel(cfg: RunConfig, world: int) -> tuple[int, int, int]:
    """Initialize Megatron's model-parallel state; returns (tp, dp size, dp rank)."""
    from megatron.core import parallel_state

    from alps_ds.mcore.shims import cpu_shims, seed_model_parallel

    tp = cfg.parallel.tp
    if world % tp:
        raise AlpsError(f"parallel.tp: {tp} does not divide the {world} ranks; use a TP size dividing the world size")
    cpu_shims()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    seed_model_parallel(cfg.train.seed)
    return tp, world // tp, parallel_state.get_data_parallel_rank()


def build(cfg: RunConfig, model_dir: Path, hf_cfg: dict, spec, selection, tp: int):
    """The converted GPTModel, hooked, in Megatron DDP, with its optimizer over the slices only."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from alps_ds.mcore.convert import build_gpt, load_hf
    from alps_ds.parallel.megatron import apply

    model = build_gpt(hf_cfg, spec, tp=tp, dtype=torch.float32)
    load_hf(model, model_dir, spec, tied=bool(hf_cfg.get("tie_word_embeddings", False)))
    report = apply(model, selection, kv=cfg.kv, train_others=tuple(cfg.train_others), spec=spec)
    if not any(p.requires_grad for p in model.parameters()):
        raise AlpsError("selection/train_others: nothing to train (no head selected and train_others empty)")
    # The distributed optimizer needs CUDA (see docs/parallel.md); grads reduce in fp32 buffers.
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False), model
    )
    t = cfg.train
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.lr * t.min_lr_ratio,
        weight_decay=t.weight_decay,
        adam_beta1=t.betas[0],
        adam_beta2=t.betas[1],
        adam_eps=t.eps,
        clip_grad=t.grad_clip,
        params_dtype=torch.float32,
    )
    # config_overrides={}: weight decay on every trained tensor, as the DeepSpeed engine's AdamW
    # (megatron-core's default skips biases and 1-D tensors).
    optimizer = get_megatron_optimizer(opt_config, [ddp], config_overrides={})
    return model, ddp, optimizer, report


def count(model, report, model_dir: Path) -> Counts:
    """Trainable elements over all TP ranks (slices differ per rank, train_others are replicated) and
    the HF checkpoint's size."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from safetensors import safe_open

    slices = torch.tensor([report.trainable - report.per_kind["others"]], dtype=torch.float64)
    dist.all_reduce(slices, group=parallel_state.get_tensor_model_parallel_group())
    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            total += sum(int(np.prod(h.get_slice(k).get_shape())) for k in h.keys())  # noqa: SIM118
    return Counts(int(slices.item()) + report.per_kind["others"], total)


def optimizer_bytes(ddp, optimizer) -> dict[str, int]:
    """Bytes this rank holds for training: fp32 params the optimizer steps, Adam state, DDP grad buffers."""
    inners = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    params = sum(p.numel() * p.element_size() for o in inners for g in o.param_groups for p in g["params"])
    state = sum(
        t.numel() * t.element_size()
        for o in inners
        for s in o.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    )
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in ddp.buffers)
    return {"param_bytes": params, "state_bytes": state, "grad_buffer_bytes": grads, "total_bytes": params + state}


def train_step(ddp, optimizer, micro, examples, pad_id: int, grad_accum: int, lr: float):
    """One optimizer step over this rank's micro-batches: (summed micro losses, tokens, grad norm)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    loss_sum, tokens = 0.0, 0
    for indices in micro:
        batch = collate([examples[i] for i in indices], pad_id)
        tokens += int(batch["attention_mask"].sum())
        loss = lm_loss(ddp, batch)
        (loss / grad_accum).backward()  # DDP averages over data-parallel ranks
        loss_sum += float(loss.detach())
    ddp.finish_grad_sync()
    ok, grad_norm, _ = optimizer.step()
    if not ok:  # fp32 has no loss scaler: a failed step means non-finite gradients
        raise AlpsError("engine megatron: the optimizer step failed (non-finite gradients); lower train.lr")
    return loss_sum, tokens, grad_norm


@dataclass
class Job:
    """Everything one engine-megatron run holds between setup, the step loop and the export."""

    cfg: RunConfig
    rank: int
    world: int
    tp: int
    dp: int
    dp_rank: int
    out: Path
    model_dir: Path
    hf_cfg: dict
    spec: object
    tokenizer: object
    examples: list
    stats: object
    plan: StepPlan
    grad_accum: int
    total_steps: int
    selection: object
    model: object = None
    ddp: object = None
    optimizer: object = None
    counts: Counts | None = None

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"


def setup(cfg: RunConfig, rank: int, world: int, latest) -> Job:
    """Parallel state, base model folder, data, selection; then the hooked model, DDP and optimizer."""
    from alps_ds.arch import AttentionSpec, read_config
    from alps_ds.mcore.convert import check_config
    from alps_ds.train.heads import resolve_selection
    from alps_ds.train.model import load_tokenizer, resolve_model_dir

    out = Path(cfg.output.dir)
    tp, dp, dp_rank = setup_parallel(cfg, world)
    model_dir = resolve_model_dir(cfg, out, rank)
    hf_cfg, source = read_config(model_dir)
    check_config(hf_cfg, source)
    spec = AttentionSpec.from_config(hf_cfg, source=source)
    tokenizer = load_tokenizer(cfg, model_dir)
    grad_accum = gradient_accumulation(cfg, world)  # micro-steps over the world / tp data-parallel ranks
    examples, stats = tokenize_all(cfg.data, tokenizer, progress=rank == 0 and cfg.logging.progress)
    plan = StepPlan(len(examples), cfg.train.micro_batch, grad_accum, dp, cfg.train.seed, cfg.data.shuffle)
    if plan.steps_per_epoch == 0:
        raise AlpsError(
            f"data.datasets: {len(examples)} examples are fewer than one effective batch (train.batch = "
            f"{cfg.train.batch}); add data or lower train.batch"
        )
    total_steps = cfg.train.max_steps or max(1, round(cfg.train.epochs * plan.steps_per_epoch))
    selection = resolve_selection(cfg, spec, model_dir, out, rank, latest is not None)
    job = Job(cfg, rank, world, tp, dp, dp_rank, out, model_dir, hf_cfg, spec, tokenizer, examples, stats, plan,
              grad_accum, total_steps, selection)  # fmt: skip
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    job.model, job.ddp, job.optimizer, report = build(cfg, model_dir, hf_cfg, spec, selection, tp)
    job.counts = count(job.model, report, model_dir)
    return job


def announce(job: Job, start_step: int, resumed: bool):
    """Rank 0: the start line, the train log and TensorBoard (None, None elsewhere)."""
    from alps_ds.train.report import TrainLog, open_tensorboard

    if job.rank != 0:
        return None, None
    cfg, c, s = job.cfg, job.counts, job.stats
    log = TrainLog(job.out / "train_log.jsonl", keep_until=start_step if resumed else None)
    print(
        f"alps-ds train: engine megatron, {job.world} rank(s) (tp {job.tp} x dp {job.dp}), float32, "
        f"{len(job.selection)} heads, {c.trainable:,} trainable of {c.total:,} elements, {s.examples} examples "
        f"from {s.rows} rows ({s.dropped} dropped, {s.truncated} truncated), {job.total_steps} steps "
        f"(grad accum {job.grad_accum})",
        flush=True,
    )
    if cfg.deepspeed is not None:
        print("alps-ds train: engine megatron does not read the deepspeed key (it trains in float32)", flush=True)
    writer = None
    if cfg.logging.tensorboard:
        writer = open_tensorboard(job.out / "tensorboard", cfg, job.selection, job.counts, start_step)
    return log, writer


def write_step(job: Job, log, writer, done: int, loss: float, lr: float, grad_norm, tokens: int, elapsed: float):
    """Rank 0: one train_log line and the TensorBoard scalars of optimizer step ``done``."""
    log.write({"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens})
    if writer is not None and done % job.cfg.logging.every == 0:
        writer.add_scalar("train/loss", loss, done)
        writer.add_scalar("train/lr", lr, done)
        if grad_norm is not None:
            writer.add_scalar("train/grad_norm", grad_norm, done)
        writer.add_scalar("train/tokens_per_s", tokens / max(elapsed, 1e-9), done)


def run_steps(job: Job, start_step: int, log, writer) -> tuple[int, float | None, float | None, int]:
    """The optimizer steps of this invocation: (final step, first loss, last loss, tokens seen)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from tqdm.auto import tqdm

    from alps_ds.mcore import checkpoint
    from alps_ds.train.engine_config import lr_lambda

    cfg, t = job.cfg, job.cfg.train
    schedule = lr_lambda(cfg, job.total_steps)
    show = job.rank == 0 and cfg.logging.progress
    bar = tqdm(total=job.total_steps, initial=start_step, desc="train", unit="step", disable=not show)
    first = last = None
    seen, step = 0, start_step
    stop_at = job.total_steps if t.stop_after is None else min(job.total_steps, start_step + t.stop_after)
    job.ddp.train()
    dp_group = parallel_state.get_data_parallel_group()
    for step, micro in job.plan.iterate(start_step, job.dp_rank):
        if step >= stop_at:
            break
        tic, lr = time.perf_counter(), t.lr * schedule(step)
        pad = job.tokenizer.pad_token_id
        loss_sum, tokens, grad_norm = train_step(job.ddp, job.optimizer, micro, job.examples, pad, job.grad_accum, lr)
        totals = torch.tensor([loss_sum / job.grad_accum, float(tokens)], dtype=torch.float64)
        dist.all_reduce(totals, group=dp_group)  # TP ranks of a group ran the same batch: count it once
        last = float(totals[0]) / job.dp
        first = last if first is None else first
        seen += int(totals[1])
        done = step + 1
        if job.rank == 0:
            norm = None if grad_norm is None else float(grad_norm)
            write_step(job, log, writer, done, last, lr, norm, int(totals[1]), time.perf_counter() - tic)
            bar.update(1)
            bar.set_postfix(loss=f"{last:.4f}", lr=f"{lr:.2e}")
        if cfg.output.checkpoint_every and done % cfg.output.checkpoint_every == 0 and done < stop_at:
            checkpoint.save(job.model, job.optimizer, job.ckpt_dir, done, job.rank, job.world, job.tp,
                            cfg.output.keep_checkpoints)  # fmt: skip
    bar.close()
    return min(step, stop_at), first, last, seen


def train(cfg: RunConfig, *, resume: bool = False):
    """Run the whole job on megatron-core; returns the summary on rank 0 (None elsewhere)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from alps_ds.mcore import checkpoint
    from alps_ds.mcore.export import export
    from alps_ds.train.distributed import barrier, init_distributed, quiet_logs

    start_wall = time.time()
    rank, world = init_distributed()
    quiet_logs(rank)
    out = Path(cfg.output.dir)
    latest = checkpoint.read_latest(out / "checkpoints")
    if not resume and latest is not None:
        raise AlpsError(f"output.dir: {out} already holds checkpoints; pass --resume or choose another output.dir")
    if resume and latest is None and rank == 0:
        print(f"alps-ds train: --resume: no checkpoint in {out / 'checkpoints'}; starting from step 0", flush=True)
    job = setup(cfg, rank, world, latest)
    if rank == 0:  # only once every input checked out: a failed start leaves output.dir as it was
        from alps_ds.train.run_files import write_run_files

        write_run_files(out, cfg, job.selection)
    start_step = 0
    if latest is not None:
        start_step = checkpoint.load(job.model, job.optimizer, job.ckpt_dir, latest, rank, cfg.output.keep_checkpoints)
    barrier()
    log, writer = announce(job, start_step, latest is not None)
    final_step, first_loss, last_loss, tokens_seen = run_steps(job, start_step, log, writer)
    if final_step > start_step or latest is None:
        checkpoint.save(job.model, job.optimizer, job.ckpt_dir, final_step, rank, world, job.tp,
                        cfg.output.keep_checkpoints)  # fmt: skip
    finished = final_step >= job.total_steps
    per_rank: list = [None] * world
    dist.all_gather_object(per_rank, optimizer_bytes(job.ddp, job.optimizer))
    merged_dir = adapter_dir = None
    if finished:
        merged_dir, adapter_dir = export(cfg, job.model, job.spec, job.hf_cfg, job.selection, job.model_dir, out, rank)
    summary = None
    if rank == 0:
        if writer is not None:
            writer.close()
        log.close()
        progress = (start_step if latest is not None else None, final_step, first_loss, last_loss, tokens_seen)
        summary = write_summary(job, out, world, progress, per_rank, merged_dir, adapter_dir, start_wall)
    barrier()
    parallel_state.destroy_model_parallel()
    return summary


def write_summary(job, out: Path, world: int, progress, per_rank, merged_dir, adapter_dir, start_wall: float):
    """Rank 0: the run's Summary (the DeepSpeed engine's fields plus engine and tp) in OUT/summary.json."""
    from alps_ds.train.report import Summary

    resumed_from, final_step, first_loss, last_loss, tokens_seen = progress
    finished = final_step >= job.total_steps
    summary = Summary(
        steps=final_step,
        total_steps=job.total_steps,
        resumed_from=resumed_from,
        final_loss=last_loss,
        first_loss=first_loss,
        trainable_elements=job.counts.trainable,
        total_elements=job.counts.total,
        heads_selected=len(job.selection),
        optimizer_bytes_per_rank=per_rank,
        world_size=world,
        grad_accum=job.grad_accum,
        zero_stage=0,
        zero_init=False,
        dtype="float32",
        examples=len(job.examples),
        tokens_seen=tokens_seen,
        wall_seconds=round(time.time() - start_wall, 3),
        merged=None if merged_dir is None else str(merged_dir),
        adapter=None if adapter_dir is None else str(adapter_dir),
    )
    record = {**asdict(summary), "engine": "megatron", "tp": job.tp}
    name = "summary.json" if finished else "summary.partial.json"
    atomic_write_text(out / name, json.dumps(record, indent=1) + "\n")
    print(f"alps-ds train: {'done' if finished else 'stopped'} at step {final_step}, loss {last_loss}", flush=True)
    return summary
