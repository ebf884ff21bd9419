"""The training run: config -> model dir -> selection -> hooked model -> DeepSpeed engine -> checkpoints -> export.

Runs the same under the deepspeed launcher, torchrun, mpirun (ranks from mpi4py) and as one
plain process. Rank 0 owns every shared file (TensorBoard, the checkpoint pointer, the
exports); other ranks stay quiet. Checkpoints hold only trainable tensors
(``exclude_frozen_parameters``); frozen weights come back from the base model on resume.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alps_ds.errors import AlpsError
from alps_ds.fsutil import atomic_dir, atomic_file, atomic_write_text
from alps_ds.train.config import RunConfig, gradient_accumulation
from alps_ds.train.data import StepPlan, collate, tokenize_all

# The run config owns these DeepSpeed keys; a DS JSON may leave them out, say "auto", or repeat the same value.
_DS_OWNED = {
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.batch",
    "train_batch_size": "train.batch",
    "gradient_clipping": "train.grad_clip",
}
DEFAULT_DS_CONFIG: dict[str, Any] = {"zero_optimization": {"stage": 2}}
MPI_ENV = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")
LATEST = "latest.json"


# ---- distributed setup -----------------------------------------------------------------------------------


def init_distributed() -> tuple[int, int]:
    """Join (or, alone, create) the process group; returns (rank, world size).

    torchrun and the deepspeed launcher export RANK/WORLD_SIZE; under mpirun DeepSpeed reads them
    from mpi4py; a plain process becomes a group of one on a free local port.
    """
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ and not any(k in os.environ for k in MPI_ENV):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    port = int(os.environ.get("MASTER_PORT", 29500))
    deepspeed.init_distributed(auto_mpi_discovery=True, distributed_port=port, verbose=False)
    return dist.get_rank(), dist.get_world_size()


def quiet_logs(rank: int) -> None:
    """Rank 0 keeps warnings; other ranks print errors only and draw no progress bars."""
    import warnings

    import datasets
    import transformers
    from deepspeed.utils import logger as ds_logger

    # DeepSpeed still calls collectives torch renamed; the warning repeats every step on every rank.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    level = logging.WARNING if rank == 0 else logging.ERROR
    ds_logger.setLevel(level)
    transformers.logging.set_verbosity(level)
    datasets.logging.set_verbosity(level)
    if rank != 0:
        transformers.logging.disable_progress_bar()
        datasets.disable_progress_bars()


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def broadcast(obj: Any, src: int = 0) -> Any:
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ---- model, tokenizer, selection ----------------------------------------------------------------------------


def resolve_model_dir(cfg: RunConfig, out: Path, rank: int) -> Path:
    """A local folder with config.json and safetensors: the configured one, a hub snapshot, or a built tiny model."""
    path = cfg.model.path
    if path.startswith("tiny:"):
        target = out / "base"
        if rank == 0 and not (target / "config.json").exists():
            build_tiny_base(path.removeprefix("tiny:"), target, seed=cfg.model.seed)
        barrier()
        return target
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise AlpsError(f"model.path: {local} has no config.json; point to a Hugging Face model folder")
        if not any(local.glob("*.safetensors")):
            pickled = sorted(p.name for p in local.glob("*.bin"))
            what = f"only {pickled[0]}, a pickle that can run code" if pickled else "no weights"
            raise AlpsError(
                f"model.path: {local} has no *.safetensors ({what}); alps-ds trains and exports safetensors "
                "checkpoints only: re-save it with save_pretrained(safe_serialization=True)"
            )
        return local
    if path.startswith((".", "/", "~")):
        raise AlpsError(f"model.path: {path} does not exist")
    from huggingface_hub import snapshot_download

    def fetch() -> str:
        try:
            return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        except Exception as e:
            raise AlpsError(f"model.path: {path!r} is not a local folder and the hub download failed ({e})") from e

    if rank == 0:
        fetch()
    barrier()
    return Path(fetch())


def build_tiny_base(family: str, target: Path, *, seed: int) -> None:
    """A tiny random ``family`` model with the offline byte tokenizer, written atomically to ``target``."""
    from alps_ds.tiny import build_model, save_model, tiny_config
    from alps_ds.train.tokenizer import BYTE_VOCAB, save_byte_tokenizer

    model = build_model(tiny_config(family or "llama", vocab=BYTE_VOCAB, max_positions=1024), seed=seed)
    with atomic_dir(target) as tmp:
        save_model(model, tmp)
        save_byte_tokenizer(tmp)


def load_tokenizer(cfg: RunConfig, model_dir: Path):
    from transformers import AutoTokenizer

    name = cfg.model.tokenizer or str(model_dir)
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise AlpsError(
            f"model.tokenizer: no usable tokenizer at {name} ({type(e).__name__}); set model.tokenizer to a folder "
            "with tokenizer files"
        ) from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def resolve_selection(cfg: RunConfig, spec, model_dir: Path, out: Path, rank: int, resume: bool):
    """The run's HeadSelection, saved as OUT/heads.json by rank 0 (a resumed run reuses that file)."""
    from alps_ds.choose import choose, count_for_ratio, top_k
    from alps_ds.selection import HeadSelection, Provenance

    saved = out / "heads.json"
    sel_cfg = cfg.selection
    if resume and saved.exists():
        return HeadSelection.load(saved, spec=spec)
    if sel_cfg.heads:
        selection = HeadSelection.load(sel_cfg.heads, spec=spec)
    elif sel_cfg.method == "top-k":
        selection = None
        if rank == 0:
            try:
                selection = localize_selection(cfg, model_dir, spec, count_for_ratio, top_k)
            except AlpsError as e:  # hand the error to every rank instead of leaving them waiting
                selection = e
        selection = broadcast(selection)
        if isinstance(selection, AlpsError):
            raise AlpsError(str(selection))
    else:
        heads = choose(
            sel_cfg.method,
            num_layers=spec.num_layers,
            num_heads=spec.num_heads,
            ratio=sel_cfg.ratio,
            seed=sel_cfg.seed,
        )
        ratio = None if sel_cfg.method in ("all", "none") else sel_cfg.ratio
        provenance = Provenance(select=sel_cfg.method, ratio=ratio, seed=sel_cfg.seed, base=cfg.model.path)
        selection = HeadSelection(spec.fingerprint, tuple(heads), provenance)
    if rank == 0:
        selection.save(saved)
    return selection


def localize_selection(cfg: RunConfig, model_dir: Path, spec, count_for_ratio, top_k):
    """Top-k heads of base (the model) vs task by alps_ds.localize (rank 0 only)."""
    from alps_ds.localize import localize_scores
    from alps_ds.selection import HeadSelection, Provenance

    s = cfg.selection
    kwargs = {k: v for k, v in (("metric", s.metric), ("head_repr", s.head_repr)) if v is not None}
    result = localize_scores(str(model_dir), s.task, progress=cfg.logging.progress, **kwargs)
    k = count_for_ratio(s.ratio, spec.num_layers, spec.num_heads)
    heads = top_k(result.scores, k)
    provenance = Provenance(
        select="top-k",
        metric=kwargs.get("metric"),
        head_repr=kwargs.get("head_repr"),
        ratio=s.ratio,
        base=cfg.model.path,
        task=s.task,
    )
    scores = tuple(tuple(float(x) for x in row) for row in result.scores)
    return HeadSelection(spec.fingerprint, tuple(heads), provenance, scores)


# ---- DeepSpeed config ------------------------------------------------------------------------------------------


def deepspeed_config(cfg: RunConfig, grad_accum: int) -> dict[str, Any]:
    """The DS config with batch sizes, clipping and optimizer hyper-parameters filled from the run config."""
    raw = cfg.deepspeed
    src = "deepspeed"
    if raw is None:
        ds = json.loads(json.dumps(DEFAULT_DS_CONFIG))
    elif isinstance(raw, str):
        src = raw
        try:
            ds = json.loads(Path(raw).read_text())
        except FileNotFoundError:
            raise AlpsError(f"deepspeed: {raw}: no such file (see configs/ds_zero2.json)") from None
        except ValueError as e:
            raise AlpsError(f"deepspeed: {raw}: not valid JSON ({e})") from e
        if not isinstance(ds, dict):
            raise AlpsError(f"deepspeed: {raw}: expected a JSON object")
    else:
        ds = json.loads(json.dumps(raw))
    for section in ("zero_optimization", "bf16", "fp16"):
        if not isinstance(ds.get(section, {}), dict):
            raise AlpsError(f'{src}: {section}: expected a JSON object, e.g. {{"stage": 2}} or {{"enabled": true}}')
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise AlpsError(f"{src}: zero_optimization.stage is {stage!r}; use 0, 1, 2 or 3")
    t = cfg.train
    wanted = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": t.batch,
        "gradient_clipping": t.grad_clip,
    }
    for key, value in wanted.items():
        have = ds.get(key, "auto")
        if have != "auto" and have != value:
            raise AlpsError(
                f"{src}: {key} is {have!r} but the run config gives {value!r} ({_DS_OWNED[key]}); "
                'remove the key or write "auto"'
            )
        ds[key] = value
    if "scheduler" in ds:
        raise AlpsError(f"{src}: scheduler: the LR schedule comes from train.schedule; remove 'scheduler'")
    if "optimizer" in ds:
        opt = ds["optimizer"]
        if not isinstance(opt, dict) or not isinstance(opt.get("type"), str):
            raise AlpsError(f'{src}: optimizer: expected {{"type": "AdamW", "params": {{...}}}}')
        params = opt.setdefault("params", {})
        if not isinstance(params, dict):
            raise AlpsError(f"{src}: optimizer.params: expected a JSON object of optimizer settings")
        for key, value in (("lr", t.lr), ("betas", list(t.betas)), ("eps", t.eps), ("weight_decay", t.weight_decay)):
            if params.get(key, "auto") == "auto":
                params[key] = value
    for prec in ("bf16", "fp16"):
        if ds.get(prec, {}).get("enabled") == "auto":
            raise AlpsError(f"{src}: {prec}.enabled: write true or false (mixed precision is set in the DS config)")
    ds.setdefault("steps_per_print", 1 << 30)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def train_dtype(ds: dict[str, Any]) -> torch.dtype:
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def lr_lambda(cfg: RunConfig, total_steps: int):
    """Multiplier of train.lr at optimizer step s: linear warmup, then cosine/linear decay to min_lr_ratio."""
    t = cfg.train
    warmup = math.ceil(t.warmup_ratio * total_steps)
    floor = t.min_lr_ratio

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if t.schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


# ---- checkpoints -------------------------------------------------------------------------------------------------


def read_latest(ckpt_dir: Path) -> dict[str, Any] | None:
    """The pointer to the last complete checkpoint, or None."""
    path = ckpt_dir / LATEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return {"tag": str(data["tag"]), "step": int(data["step"])}
    except (ValueError, KeyError, TypeError) as e:
        raise AlpsError(f"{path}: unreadable checkpoint pointer ({e}); delete it to start over") from e


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(engine, ckpt_dir: Path, step: int, rank: int, keep: int) -> str:
    """Save under a new tag, then (after every rank finished) point ``latest.json`` at it.

    A crash at any moment leaves ``latest.json`` naming a complete checkpoint (or none yet).
    """
    tag = f"step-{step:08d}"
    engine.save_checkpoint(
        str(ckpt_dir), tag=tag, client_state={"alps_step": step}, save_latest=False, exclude_frozen_parameters=True
    )
    with atomic_file(ckpt_dir / tag / f"alps_rank{rank}.pt", "wb") as f:
        torch.save({"step": step, "rng": rng_state()}, f)
    barrier()
    if rank == 0:
        atomic_write_text(ckpt_dir / LATEST, json.dumps({"tag": tag, "step": step}) + "\n")
        prune_checkpoints(ckpt_dir, keep, newest=step)
    barrier()
    return tag


def prune_checkpoints(ckpt_dir: Path, keep: int, newest: int) -> None:
    """Delete old tags beyond ``keep`` and any tag newer than ``newest`` (left half-written by a crash)."""
    tags = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())
    steps = {p: int(p.name.removeprefix("step-")) for p in tags if p.name.removeprefix("step-").isdigit()}
    done = [p for p, s in steps.items() if s <= newest]
    for p in done[:-keep] + [p for p, s in steps.items() if s > newest]:
        shutil.rmtree(p, ignore_errors=True)


# ---- export ------------------------------------------------------------------------------------------------------


def trained_tensors(engine) -> dict[str, torch.Tensor]:
    """Full fp32 values of every trainable parameter (collective: call on all ranks; rank 0 gets the dict)."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    from alps_ds.sparse.module import gathered

    out: dict[str, torch.Tensor] = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        value = safe_get_full_fp32_param(p)
        if value is None:
            with gathered([p]):
                value = p.detach().float().clone()
        if dist.get_rank() == 0:
            out[name] = value.detach().cpu().clone()
    return out


def merged_updates(engine, trained: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor | None, torch.Tensor]]:
    """Base checkpoint key -> (row indices or None for the whole tensor, new values)."""
    from alps_ds.sparse import hooked_modules

    updates: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
    hooked = dict(hooked_modules(engine.module))
    for name, value in trained.items():
        module_name, _, pname = name.rpartition(".")
        if module_name in hooked and pname in ("head_weight", "head_bias"):
            target = f"{module_name}.{'weight' if pname == 'head_weight' else 'bias'}"
            updates[target] = (hooked[module_name].rows.cpu(), value)
        else:
            updates[name] = (None, value)
    return updates


def write_merged(model_dir: Path, target: Path, updates: dict[str, tuple[torch.Tensor | None, torch.Tensor]]) -> None:
    """Copy the base checkpoint shard by shard, writing the trained rows/tensors in (base dtype).

    Untouched tensors are copied bit for bit; memory stays near one shard.
    """
    from safetensors.torch import load_file, save_file

    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise AlpsError(f"{model_dir}: no *.safetensors files; export needs a safetensors base checkpoint")
    pending = dict(updates)
    with atomic_dir(target) as tmp:
        for item in model_dir.iterdir():
            if item.is_file() and item.suffix != ".safetensors" and not item.name.startswith("."):
                shutil.copy2(item, tmp / item.name)
        for shard in shards:
            tensors = load_file(str(shard))
            for key in list(tensors):
                if key in pending:
                    rows, value = pending.pop(key)
                    base = tensors[key]
                    if rows is None:
                        tensors[key] = value.to(base.dtype).reshape(base.shape).contiguous()
                    else:
                        tensors[key] = base.index_copy(0, rows, value.to(base.dtype)).contiguous()
            save_file(tensors, str(tmp / shard.name), metadata={"format": "pt"})
        if pending:
            raise AlpsError(
                f"{model_dir}: trained tensor(s) {', '.join(sorted(pending)[:3])} not found in the base checkpoint; "
                "cannot export the merged model"
            )


def optimizer_bytes(engine) -> dict[str, int]:
    """Bytes this rank's optimizer holds: its (fp32 master) parameter partitions and its state (Adam moments)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    # ZeRO keeps the fp32 master partitions in its own lists (stage 3 swaps the inner groups' tensors).
    masters = getattr(opt, "single_partition_of_fp32_groups", None)
    masters = masters if masters is not None else getattr(opt, "fp32_partitioned_groups_flat", None)
    if masters is None:
        masters = [p for g in inner.param_groups for p in g["params"]]
    params = sum(p.numel() * p.element_size() for p in masters)
    state = sum(
        t.numel() * t.element_size() for s in inner.state.values() for t in s.values() if isinstance(t, torch.Tensor)
    )
    return {"param_bytes": int(params), "state_bytes": int(state), "total_bytes": int(params + state)}


# ---- the run -----------------------------------------------------------------------------------------------------


@dataclass
class Summary:
    steps: int
    total_steps: int
    resumed_from: int | None
    final_loss: float | None
    first_loss: float | None
    trainable_elements: int
    total_elements: int
    heads_selected: int
    optimizer_bytes_per_rank: list[dict[str, int]]
    world_size: int
    grad_accum: int
    zero_stage: int
    zero_init: bool  # the model was built partitioned (ZeRO-3), never whole on one rank
    dtype: str
    examples: int
    tokens_seen: int
    wall_seconds: float
    merged: str | None
    adapter: str | None


class TrainLog:
    """OUT/train_log.jsonl: one line per optimizer step (rank 0); a resume drops lines past the checkpoint."""

    def __init__(self, path: Path, keep_until: int | None):
        self.path = path
        lines = []
        if keep_until is not None and path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= keep_until]
        atomic_write_text(path, "".join(ln + "\n" for ln in lines))
        self.f = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def train(cfg: RunConfig, *, resume: bool = False) -> Summary | None:
    """Run the whole job; returns the summary on rank 0 (None elsewhere)."""
    start_wall = time.time()
    rank, world = init_distributed()
    quiet_logs(rank)
    out = Path(cfg.output.dir)
    ckpt_dir = out / "checkpoints"
    latest = read_latest(ckpt_dir)
    if not resume and latest is not None:
        raise AlpsError(f"output.dir: {out} already holds checkpoints; pass --resume or choose another output.dir")
    if resume and latest is None and rank == 0:
        print(f"alps-ds train: --resume: no checkpoint in {ckpt_dir}; starting from step 0", flush=True)

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
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "run_config.json", json.dumps(cfg.to_dict(), indent=1) + "\n")

    start_step = 0
    if latest is not None:
        load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=latest["tag"], load_module_strict=False)
        if load_path is None:
            raise AlpsError(f"{ckpt_dir / latest['tag']}: DeepSpeed could not load this checkpoint")
        start_step = latest["step"]
        state_file = ckpt_dir / latest["tag"] / f"alps_rank{rank}.pt"
        if state_file.exists():
            set_rng_state(torch.load(state_file, weights_only=False)["rng"])
        if rank == 0:
            prune_checkpoints(ckpt_dir, cfg.output.keep_checkpoints, newest=start_step)
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
        totals = torch.tensor([loss_sum / grad_accum, float(tokens)], dtype=torch.float64)
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
            save_checkpoint(engine, ckpt_dir, done, rank, cfg.output.keep_checkpoints)
    final_step = min(step, stop_at)
    bar.close()
    if final_step > start_step or latest is None:
        save_checkpoint(engine, ckpt_dir, final_step, rank, cfg.output.keep_checkpoints)

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


def load_model(model_dir: Path, ds_config: dict[str, Any], stage: int, dtype: torch.dtype):
    """The base causal LM in the training dtype; under ZeRO-3 built partitioned (zero.Init via HfDeepSpeedConfig)."""
    from transformers import AutoModelForCausalLM

    if stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        # transformers builds under deepspeed.zero.Init (and loads the shards into the partitions)
        # while this object is alive; keep it on the model for the run's lifetime.
        hf_ds = HfDeepSpeedConfig(ds_config)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, use_safetensors=True)
        model._alps_hf_ds_config = hf_ds
        return model
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, use_safetensors=True)


def open_tensorboard(path: Path, cfg: RunConfig, selection, report, start_step: int):
    """A SummaryWriter with the run config, trainable elements and the head heatmap (rank 0)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(path), purge_step=start_step or None)
    writer.add_text("run/config", "```\n" + json.dumps(cfg.to_dict(), indent=1) + "\n```", start_step)
    writer.add_scalar("model/trainable_elements", report.trainable, start_step)
    writer.add_scalar("model/trainable_fraction", report.fraction, start_step)
    if cfg.logging.heatmap:
        image = heatmap_image(selection)
        if image is not None:
            writer.add_image("selection/heads", image, start_step, dataformats="HWC")
    writer.flush()
    return writer


def heatmap_image(selection) -> np.ndarray | None:
    """The selection (and scores when present) as an RGB array, via alps_ds.heatmap."""
    import io

    import matplotlib.image as mpimg

    from alps_ds.heatmap import Panel, render_heatmap

    fp = selection.model
    scores = None if selection.scores is None else np.asarray(selection.scores)
    png = render_heatmap([Panel("heads", fp.num_layers, fp.num_heads, scores, selection.heads)])
    rgba = mpimg.imread(io.BytesIO(png), format="png")
    return (rgba[..., :3] * 255).astype(np.uint8)


def export(cfg: RunConfig, engine, selection, model_dir: Path, out: Path, rank: int):
    """OUT/merged (base checkpoint with trained rows written in) and OUT/adapter; collective."""
    trained = trained_tensors(engine)
    merged_dir = adapter_dir = None
    if rank == 0 and cfg.output.merged:
        merged_dir = out / "merged"
        write_merged(model_dir, merged_dir, merged_updates(engine, trained))
    if cfg.output.adapter:
        adapter_dir = save_adapter_dir(engine, selection, out / "adapter", rank)
    barrier()
    return merged_dir, adapter_dir


def save_adapter_dir(engine, selection, target: Path, rank: int) -> Path:
    """The head adapter (alps_ds.adapter format); collective: every rank takes part, rank 0 writes."""
    from alps_ds.adapter import save_adapter

    return save_adapter(engine.module, target, selection)
