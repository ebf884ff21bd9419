"""What the DeepSpeed engine is built with: the DS config filled from the run config, ZeRO stage, dtype, LR schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from alps_ds.errors import AlpsError
from alps_ds.train.config import DEFAULT_ZERO_STAGE, ZERO_STAGES, RunConfig

# The run config owns these DeepSpeed keys; a DS JSON may leave them out, say "auto", or repeat the same value.
_DS_OWNED = {
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.batch",
    "train_batch_size": "train.batch",
    "gradient_clipping": "train.grad_clip",
}
DEFAULT_DS_CONFIG: dict[str, Any] = {"zero_optimization": {"stage": DEFAULT_ZERO_STAGE}}


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object that names a key twice is refused (json keeps the last value silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} is written twice in one object; keep one")
        out[key] = value
    return out


def deepspeed_config(cfg: RunConfig, grad_accum: int) -> dict[str, Any]:
    """The DS config with batch sizes, clipping and optimizer hyper-parameters filled from the run config."""
    raw = cfg.deepspeed
    src = "deepspeed"
    if raw is None:
        ds = json.loads(json.dumps(DEFAULT_DS_CONFIG))
    elif isinstance(raw, str):
        src = raw
        try:
            ds = json.loads(Path(raw).read_text(), object_pairs_hook=_unique_keys)
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
    if stage not in ZERO_STAGES or isinstance(stage, bool):
        raise AlpsError(f"{src}: zero_optimization.stage is {stage!r}; use one of {', '.join(map(str, ZERO_STAGES))}")
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
    _tensor_parallel(ds, cfg.parallel.tp, src)
    ds.setdefault("steps_per_print", 1 << 30)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _tensor_parallel(ds: dict[str, Any], tp: int, src: str) -> None:
    """``tensor_parallel.autotp_size`` from ``parallel.tp`` (the one place the TP size is set)."""
    section = ds.get("tensor_parallel", {})
    if not isinstance(section, dict):
        raise AlpsError(f"{src}: tensor_parallel: expected a JSON object; set the size with parallel.tp instead")
    have = section.get("autotp_size", "auto")
    if have not in ("auto", tp) and not (tp == 1 and have in (0, 1)):
        raise AlpsError(
            f"{src}: tensor_parallel.autotp_size is {have!r} but parallel.tp is {tp}; "
            'set the size with parallel.tp (remove the key or write "auto")'
        )
    if tp > 1:
        ds["tensor_parallel"] = {**section, "autotp_size": tp}
    elif "tensor_parallel" in ds:
        ds["tensor_parallel"] = {**section, "autotp_size": 0}


def check_precision(cfg: RunConfig, ds: dict[str, Any]) -> None:
    """fp16/bf16 the accelerator cannot run (fp16 on a CPU-only machine) is one line naming the key, before the
    model is loaded, instead of DeepSpeed's ValueError at initialize."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    src = cfg.deepspeed if isinstance(cfg.deepspeed, str) else f"{cfg.where('deepspeed')}: deepspeed"
    for prec, supported in (("fp16", acc.is_fp16_supported), ("bf16", acc.is_bf16_supported)):
        if ds.get(prec, {}).get("enabled") and not supported():
            raise AlpsError(
                f"{src}: {prec}.enabled: {acc.device_name()} does not support {prec} here; "
                f"use {'bf16' if prec == 'fp16' else 'fp32'} (set {prec}.enabled to false) or run on a GPU"
            )


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
