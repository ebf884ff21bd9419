"""A head adapter as a standard PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

ALPS replaces whole rows, so per projection ``dW = W_trained - W_base`` is zero outside the
selected rows R and factors exactly as ``dW = B @ A``: ``A = dW[R]`` ``[r, in]`` and ``B`` the
one-hot row selector ``[out, r]`` (``B[R[i], i] = 1``), rank r = |R|. Each module gets its own
rank (``rank_pattern``) and ``alpha = rank`` (``alpha_pattern``), so PEFT scales by 1; the
global ``r`` equals the global ``lora_alpha`` too, for servers that read only those. A q/k/v
bias change (qwen2) is lora_B's bias (PEFT ``lora_bias=True``), exact as well. With ``rank``
given, each ``dW[R]`` is cut to its top singular directions instead and the error reported.
The base rows come straight from the base checkpoint's safetensors files (only those rows).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alps_ds.adapter import Adapter
from alps_ds.arch import AttentionSpec
from alps_ds.errors import AlpsError
from alps_ds.fsutil import atomic_dir

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MARKER = "alps_export.json"  # what the export was made from; an --out holding it may be replaced
PREFIX = "base_model.model."  # PEFT's key prefix for a causal LM (PeftModelForCausalLM)


@dataclass(frozen=True)
class LoraExport:
    """What :func:`to_peft_lora` wrote: per-module ranks and relative errors (0.0: exact)."""

    out: Path
    ranks: dict[str, int]
    errors: dict[str, float]
    relative_error: float  # ||dW - B A||_F / ||dW||_F over all modules together
    lora_bias: bool
    modules_to_save: tuple[str, ...]


def _factor(delta: torch.Tensor, rows: torch.Tensor, out_features: int, rank: int | None):
    """(A, B, discarded, total squared Frobenius norms) for ``dW`` whose rows ``rows`` are ``delta``."""
    total = float(delta.square().sum())
    r = delta.shape[0]
    if rank is None or rank >= r:
        b = torch.zeros(out_features, r, dtype=delta.dtype)
        b[rows, torch.arange(r)] = 1.0
        return delta, b, 0.0, total
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = s[:rank].sqrt()
    b = torch.zeros(out_features, rank, dtype=delta.dtype)
    b[rows] = u[:, :rank] * root
    return root[:, None] * vh[:rank], b, float(s[rank:].square().sum()), total


def _check_out(out: Path, inputs: dict[str, Path]) -> None:
    """Refuse an --out that is a file, overlaps an input, or is a folder of something else."""
    if out.is_file():
        raise AlpsError(f"{out}: --out is an existing file; name a folder for the PEFT adapter")
    real = out.resolve()
    for what, path in inputs.items():
        p = path.resolve()
        if real == p or p.is_relative_to(real) or real.is_relative_to(p):
            raise AlpsError(f"{out}: --out overlaps the {what} folder {path}; pick a folder outside it")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise AlpsError(f"{out}: --out is a non-empty folder not written by export-lora; pick a new or empty folder")


def _base_dir(adapter: Adapter, adapter_dir: Path, base: str | os.PathLike | None) -> Path:
    if base is not None:
        return Path(base)
    recorded = (adapter.base or {}).get("path")
    if not isinstance(recorded, str):
        raise AlpsError(f"{adapter_dir}: the adapter does not record its base model folder; pass --base")
    if not Path(recorded).is_dir():
        raise AlpsError(f"{adapter_dir}: its base {recorded} is not there any more; pass --base")
    return Path(recorded)


def _modules_to_save(adapter: Adapter, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """PEFT keys -> tensors of the fully trained ``train_others`` parameters (PEFT ``modules_to_save``);
    ``Adapter.read`` has checked that every listed parameter's tensor is in the adapter."""
    return {PREFIX + name: adapter.tensors[name].contiguous() for name in adapter.others}


def to_peft_lora(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    rank: int | None = None,
) -> LoraExport:
    """Write ``out_dir``, a PEFT LoRA adapter equal to the head adapter at ``adapter_dir`` on ``base``.

    ``base`` defaults to the folder the adapter records; a base other than the one it was trained on
    is refused (Q/K/V digest). ``rank`` caps every module's rank (truncated SVD; the result reports
    the relative error). Tensors are written in fp32, so the exact export stays exact. Atomic.
    """
    from safetensors.torch import save_file

    from alps_ds.digest import check_base, qkv_tensor_names
    from alps_ds.localize.reader import locate_tensors

    if rank is not None and rank < 1:
        raise AlpsError(f"--rank: {rank} is not a positive integer; give the largest LoRA rank per module")
    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    adapter = Adapter.read(adapter_dir)
    base_dir = _base_dir(adapter, adapter_dir, base)
    _check_out(out, {"adapter": adapter_dir, "base": base_dir})
    spec = AttentionSpec.from_pretrained(base_dir)
    adapter.selection.check_model(spec, source=str(adapter_dir))
    check_base(adapter.base, base_dir, owner=str(adapter_dir))
    tensors = _modules_to_save(adapter, adapter_dir)
    keys = [f"{m.module}.{leaf}" for m in adapter.modules for leaf in (("weight", "bias") if m.bias else ("weight",))]
    unknown = sorted(set(keys) - set(qkv_tensor_names(spec)))
    if unknown:
        raise AlpsError(f"{adapter_dir}: {unknown[0]} is not a Q/K/V tensor of the {spec.model_type} base {base_dir}")
    infos = locate_tensors(base_dir, keys, label="base")
    lora, ranks, errors, relative_error = _lora_tensors(adapter, infos, rank)
    lora_bias = any(".lora_B.bias" in k for k in lora)
    tensors.update(lora)
    to_save = sorted({k.removeprefix(PREFIX).rpartition(".")[0] for k in tensors if ".lora_" not in k})
    config = _config(base_dir, ranks, lora_bias, to_save)
    result = LoraExport(out, ranks, errors, relative_error, lora_bias, tuple(to_save))
    marker = {
        "format": "alps-ds/peft-lora-export",
        "adapter": str(adapter_dir.resolve()),
        "base": adapter.base,
        "rank": rank,
        "relative_error": relative_error,
        "errors": errors,
    }
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=1) + "\n")
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    return result


def _lora_tensors(adapter: Adapter, infos: dict, rank: int | None):
    """PEFT keys -> lora_A / lora_B (and lora_B bias) per module, with ranks and relative errors.

    lora_B biases are kept only when some bias changed: then PEFT needs ``lora_bias=True``, which
    gives every targeted layer one (they all have a base bias: the adapter stores a bias per module).
    """
    from alps_ds.localize.reader import read_rows
    from alps_ds.sparse.module import row_index

    tensors, biases, ranks, errors = {}, {}, {}, {}
    discarded = total = 0.0
    for m in adapter.modules:
        info = infos[f"{m.module}.weight"]
        if len(info.shape) != 2 or info.shape[1] != m.in_features or info.shape[0] < m.ranges[-1][1]:
            raise AlpsError(f"{info.shard}: {m.module}.weight {list(info.shape)} does not fit the adapter's rows")
        rows = row_index(m.ranges)
        delta = adapter.tensors[f"{m.module}.weight"].double() - read_rows(info, m.ranges).double()
        a, b, lost, norm = _factor(delta, rows, info.shape[0], rank)
        tensors[f"{PREFIX}{m.module}.lora_A.weight"] = a.float().contiguous()
        tensors[f"{PREFIX}{m.module}.lora_B.weight"] = b.float().contiguous()
        if m.bias:
            bias = torch.zeros(info.shape[0], dtype=torch.float32)
            base_bias = read_rows(infos[f"{m.module}.bias"], m.ranges).double()
            bias[rows] = (adapter.tensors[f"{m.module}.bias"].double() - base_bias).float()
            biases[f"{PREFIX}{m.module}.lora_B.bias"] = bias
        ranks[m.module] = a.shape[0]
        errors[m.module] = math.sqrt(lost / norm) if norm else 0.0
        discarded, total = discarded + lost, total + norm
    if any(bool(t.any()) for t in biases.values()):
        tensors.update(biases)
    return tensors, ranks, errors, math.sqrt(discarded / total) if total else 0.0


def _config(base_dir: Path, ranks: dict[str, int], lora_bias: bool, modules_to_save: list[str]) -> dict[str, Any]:
    """PEFT ``LoraConfig`` fields: per-module rank and alpha equal (scaling 1), no dropout, no variants."""
    top = max(ranks.values())
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_dir.resolve()),
        "r": top,
        "lora_alpha": top,
        "target_modules": sorted(ranks),
        "rank_pattern": dict(sorted(ranks.items())),
        "alpha_pattern": dict(sorted(ranks.items())),
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": lora_bias,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": modules_to_save or None,
        "inference_mode": True,
    }
