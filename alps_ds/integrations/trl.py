"""TRL trainers for hooked models: ``AlpsSFTTrainer`` and ``AlpsDPOTrainer`` (no reference model loaded).

An ALPS model's DPO reference is exactly its base, and the base is already in memory: every hooked
projection keeps its frozen weight. ``AlpsDPOTrainer`` therefore hands TRL a reference that runs the
policy model inside :func:`alps_ds.base_weights`, where TRL would load a second full copy of the model
for any non-PEFT policy (TRL's own no-copy path disables a PEFT adapter instead).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import trl.trainer.dpo_trainer as trl_dpo
from trl import DPOTrainer, SFTTrainer

from alps_ds.errors import AlpsError
from alps_ds.integrations.hf import AlpsTrainerMixin
from alps_ds.integrations.reference import base_weights


class AlpsSFTTrainer(AlpsTrainerMixin, SFTTrainer):
    """TRL ``SFTTrainer`` with :class:`~alps_ds.integrations.hf.AlpsTrainerMixin`."""


class FrozenRowsReference:
    """What TRL calls as ``ref_model``: the trainer's own model, every hooked projection on its frozen rows.

    TRL calls it under ``torch.no_grad()``. Calling the unwrapped model (not the DeepSpeed engine) is
    what TRL does for a PEFT reference too; ZeRO-3 gathers parameters through the module hooks.
    """

    def __init__(self, trainer):
        self._trainer = trainer

    def __call__(self, *args, **kwargs):
        model = self._trainer.model
        with base_weights(model):
            return model(*args, **kwargs)


@contextlib.contextmanager
def _no_reference_copy() -> Iterator[None]:
    """While ``DPOTrainer.__init__`` runs, its reference-model loader returns None (no second copy)."""
    if not hasattr(trl_dpo, "create_model_from_path"):
        raise AlpsError(
            "AlpsDPOTrainer: this TRL version builds its reference model differently; install the TRL range "
            "alps-ds tests (pip install 'alps-ds[test]')"
        )
    original = trl_dpo.create_model_from_path

    def no_copy(*args, **kwargs):
        return None

    trl_dpo.create_model_from_path = no_copy
    try:
        yield
    finally:
        trl_dpo.create_model_from_path = original


class AlpsDPOTrainer(AlpsTrainerMixin, DPOTrainer):
    """TRL ``DPOTrainer`` whose reference log-probs come from the policy's frozen rows (no ``ref_model``)."""

    def __init__(self, model, ref_model=None, args=None, *rest, **kwargs):
        if ref_model is not None:
            raise AlpsError(
                "AlpsDPOTrainer: pass no ref_model; the reference is the model's own frozen rows "
                "(use trl.DPOTrainer to train against another reference)"
            )
        if isinstance(model, str):
            raise AlpsError("AlpsDPOTrainer: pass the model hooked by alps_ds.apply, not a model id")
        if getattr(args, "sync_ref_model", False):
            raise AlpsError("AlpsDPOTrainer: sync_ref_model=True has no reference model to sync; set it False")
        with _no_reference_copy():
            super().__init__(model, None, args, *rest, **kwargs)
        self.ref_model = FrozenRowsReference(self)
