"""HF ``Trainer`` for a model hooked by ``alps_ds.apply``: small checkpoints, exact resume, a merged final save.

Plain ``Trainer`` already saves correctly (the hooked modules' state-dict hooks and the DeepSpeed
wrappers merge the trained rows, see docs/engine-hook.md); :class:`AlpsTrainerMixin` adds what
Trainer only does for PEFT models:

- under DeepSpeed every ``checkpoint-N`` holds the trainable tensors only (DeepSpeed's
  ``exclude_frozen_parameters``, no ``model.safetensors``) plus ``checkpoint-N/adapter`` (the head
  adapter, ``alps_ds.save_adapter``); ``resume_from_checkpoint`` restores slices and optimizer states
  from it onto the re-hooked base;
- ``save_model(DIR)`` writes the merged model (``from_pretrained(DIR)`` is the fine-tuned model) and
  ``DIR/adapter``.
"""

from __future__ import annotations

import functools
from pathlib import Path

from transformers import Trainer

from alps_ds.adapter import save_adapter
from alps_ds.errors import AlpsError
from alps_ds.hooked import hooked_modules

ADAPTER_DIR = "adapter"


def require_hooked(model, who: str) -> None:
    """Refuse a model that ``alps_ds.apply`` has not hooked (it would train nothing or everything)."""
    if model is None or not any(True for _ in hooked_modules(model)):  # model_init: nothing hooked to check
        raise AlpsError(f"{who}: model has no hooked projections; call alps_ds.apply(model, selection) first")


class AlpsTrainerMixin:
    """Put before a ``Trainer`` subclass: ``class MyTrainer(AlpsTrainerMixin, SFTTrainer)``."""

    _alps_checkpointing = False

    def __init__(self, model=None, *args, **kwargs):
        require_hooked(model, type(self).__name__)
        super().__init__(model, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        self._alps_checkpointing = self.is_deepspeed_enabled  # DeepSpeed keeps the slices and optimizer itself
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._alps_checkpointing = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The merged model and ``output_dir/adapter``; inside a DeepSpeed checkpoint the adapter only."""
        output_dir = output_dir or self.args.output_dir
        if not self._alps_checkpointing:
            super().save_model(output_dir, _internal_call)
        save_adapter(self.model, Path(output_dir) / ADAPTER_DIR)  # every rank (ZeRO-3 gathers the slices)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        engine = self.model_wrapped
        # Trainer passes exclude_frozen_parameters=True only for PEFT models; frozen weights are the base's.
        engine.save_checkpoint = functools.partial(engine.save_checkpoint, exclude_frozen_parameters=True)
        try:
            super()._save_optimizer_and_scheduler(output_dir)
        finally:
            del engine.save_checkpoint


class AlpsTrainer(AlpsTrainerMixin, Trainer):
    """HF ``Trainer`` with :class:`AlpsTrainerMixin`."""
