"""The demo's PEFT LoRA arm: LoRA on q/k/v trained by ``alps-ds train``'s own setup and loop.

Only the hook differs from the ALPS arms: PEFT's ``inject_adapter_in_model`` wraps q/k/v in place
(``lora_A`` [r, d], ``lora_B`` [d, r], alpha = r so the scaling is 1) and only those factors train;
the same data, DeepSpeed ZeRO-2 engine, optimizer, LR schedule and loop run them. ``merged/`` is
the base checkpoint with each projection's ``W + B A`` written in, like every other arm's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alps_ds.choose import count_for_ratio
from alps_ds.demo.config import DemoConfig

TARGETS = ("q_proj", "k_proj", "v_proj")


def lora_rank(cfg: DemoConfig) -> int:
    """The rank whose q/k/v LoRA factors train about as many elements as ALPS at ``cfg.ratio``.

    ALPS trains K heads' q, k and v rows (hd rows each, d columns; every head owns its K/V here);
    LoRA trains r * (d + d) per projection, 3 projections per layer.
    """
    heads = count_for_ratio(cfg.ratio, cfg.layers, cfg.heads)
    alps = heads * 3 * (cfg.hidden // cfg.heads) * cfg.hidden
    return max(1, round(alps / (cfg.layers * len(TARGETS) * 2 * cfg.hidden)))


def lora_hook(rank: int):
    """A hook for :func:`alps_ds.train.loop.setup`: freeze the model, add LoRA on q/k/v, train only it."""

    def hook(model, selection, *, kv, train_others, spec):
        from peft import LoraConfig, inject_adapter_in_model

        for p in model.parameters():
            p.requires_grad_(False)
        config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(TARGETS), bias="none")
        inject_adapter_in_model(config, model)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)

    return hook


@torch.no_grad()
def merged_weights(model) -> dict[str, tuple[None, torch.Tensor]]:
    """Base checkpoint key -> (None, W + B A) for every LoRA-wrapped projection (ZeRO-2: full params)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            w = module.base_layer.weight
            out[f"{name}.weight"] = (None, (w + module.get_delta_weight("default").to(w.dtype)).cpu())
    return out


def train_lora(config_path: Path, rank: int):
    """One LoRA run from a run YAML (``output.merged`` is written here, not by the ALPS export)."""
    from dataclasses import replace

    from alps_ds.train.config import load_config
    from alps_ds.train.distributed import on_rank0
    from alps_ds.train.export import write_merged
    from alps_ds.train.loop import finish, run_steps, setup

    cfg = load_config(config_path)
    cfg = replace(cfg, output=replace(cfg.output, merged=False))
    run = setup(cfg, hook=lora_hook(rank))
    summary = finish(run, run_steps(run))
    target = Path(cfg.output.dir) / "merged"
    updates = merged_weights(run.engine.module)
    on_rank0(lambda: write_merged(run.model_dir, target, updates), run.rank)
    return summary
