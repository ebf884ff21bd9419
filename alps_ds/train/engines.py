"""The training engines ``alps-ds train`` can run (config key ``engine``), defined once here."""

from __future__ import annotations

from typing import Literal, get_args

Engine = Literal["deepspeed", "megatron"]
ENGINES: tuple[str, ...] = get_args(Engine)


def validate_megatron(cfg, need) -> None:
    """Config checks of engine megatron (``need(cond, key, message)`` raises naming the key)."""
    need(
        cfg.parallel.pp == 1,
        "parallel.pp",
        "engine megatron runs no pipeline schedule (megatron-core's needs CUDA); set parallel.pp to 1",
    )
    need(
        not cfg.train_others,
        "train_others",
        "engine megatron trains the Q/K/V slices only (its checkpoints hold only them); leave it empty",
    )
    need(
        not cfg.train.gradient_checkpointing,
        "train.gradient_checkpointing",
        "not supported by engine megatron yet; set it to false",
    )
