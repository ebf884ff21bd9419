"""`DemoConfig`: every size, step count and seed of one demo run, written to ``config.json`` for the ranks."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from alps_ds.demo.tasks import TASKS, check_task
from alps_ds.errors import AlpsError
from alps_ds.fsutil import atomic_write_text

ARMS: tuple[str, ...] = ("alps", "random", "layer-consistent", "all", "none")
# What trains beside the chosen heads' Q/K/V rows in each setting (run YAML ``train_others``): the
# paper trains the rest of the network in every arm and varies only the heads; heads-only is the
# memory-lean mode. The LoRA arm trains PEFT LoRA on q/k/v instead, through the same engine.
SETTINGS: dict[str, list[str]] = {"paper": ["all"], "heads-only": []}
LORA = "lora"
TRANSFER_ARMS: tuple[str, ...] = ("alps", "random")  # paper setting, on the transfer dataset


@dataclass(frozen=True)
class DemoConfig:
    # model: a Llama-style decoder, plain multi-head attention so every head owns its K/V rows
    # (then ALPS, random and layer-consistent 10 % train exactly the same number of elements).
    layers: int = 4
    hidden: int = 128
    heads: int = 8
    intermediate: int = 256
    # data: the target task is rare in pre-training (the base knows it a little) and is the
    # task the task model and the five arms are fine-tuned on.
    target: str = "reverse"
    target_weight: float = 0.05  # share of the target in the pre-training mix, relative to 1 for each other task
    # steps (global batch = micro_batch * ranks)
    pretrain_steps: int = 500
    task_steps: int = 100
    arm_steps: int = 80
    batch: int = 64  # global batch per optimizer step, split over the ranks
    pretrain_lr: float = 3e-3
    task_lr: float = 1e-3
    arm_lr: float = 3e-3
    pretrain_examples: int = 12000  # rows of the pre-training mix (repeated over epochs)
    finetune_examples: int = 2000  # the task model's dataset, and the fresh one each arm trains on (per seed)
    eval_examples: int = 512  # held-out target rows every arm is scored on
    retain_examples: int = 256  # held-out rows of each other task: what an arm kept of the base's abilities
    ratio: float = 0.1
    seed: int = 0
    seeds: int = 3
    device: str = "cpu"
    nproc: int = 2

    def scaled(self, factor: float) -> DemoConfig:
        """The same run with every step count multiplied by ``factor`` (at least 1 step each)."""
        if not (factor > 0 and math.isfinite(factor)):
            raise AlpsError(f"--steps {factor!r} must be a positive number (a multiplier, e.g. 0.5 or 2)")
        return replace(
            self,
            pretrain_steps=max(1, round(self.pretrain_steps * factor)),
            task_steps=max(1, round(self.task_steps * factor)),
            arm_steps=max(1, round(self.arm_steps * factor)),
        )

    @classmethod
    def quick(cls, **overrides) -> DemoConfig:
        """The shortened demo the test runs: same pipeline, far fewer steps and examples."""
        kw = dict(
            pretrain_steps=40,
            task_steps=20,
            arm_steps=15,
            batch=32,
            pretrain_examples=1280,
            finetune_examples=480,
            eval_examples=128,
            retain_examples=64,
            seeds=1,
        )
        kw.update(overrides)
        return cls(**kw)

    def check(self) -> DemoConfig:
        check_task(self.target)
        if self.seeds < 1:
            raise AlpsError(f"--seeds {self.seeds} must be at least 1")
        if self.nproc < 1 or self.batch % self.nproc:
            raise AlpsError(f"--nproc {self.nproc} must be at least 1 and divide the global batch ({self.batch})")
        if not 0 < self.ratio <= 1:
            raise AlpsError(f"--ratio {self.ratio} is outside (0, 1]")
        if self.device not in ("cpu", "cuda"):
            raise AlpsError(f"--device {self.device!r} must be cpu, cuda or auto")
        return self

    @property
    def micro_batch(self) -> int:
        return self.batch // self.nproc

    @property
    def pretrain_tasks(self) -> tuple[tuple[str, float], ...]:
        return tuple((t, self.target_weight if t == self.target else 1.0) for t in TASKS)

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> DemoConfig:
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known}).check()
