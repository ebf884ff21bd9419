"""DeepSpeed engine methods made aware of hooked models (installed once, when the first projection is hooked).

Module state-dict hooks (:mod:`alps_ds.integrations.state_dict`) cover every save built from
``state_dict()``. Four engine methods need more, and each wrapper changes nothing for an engine whose
module has no hooked projection:

- ``_zero3_consolidated_16bit_state_dict`` (what HF Trainer / accelerate save under ZeRO-3, and
  ``save_16bit_model``) gathers parameters one module at a time and never calls ``state_dict()``:
  its result gets the trained rows merged in on rank 0.
- ``save_checkpoint`` keeps the hooked names (``weight`` = base, ``head_weight`` = slice): with
  ``exclude_frozen_parameters`` DeepSpeed drops every frozen parameter's key, which would drop a
  merged ``weight`` with the trained rows in it.
- ``load_module_state_dict`` with ``strict``: a checkpoint saved with ``exclude_frozen_parameters``
  lacks only frozen keys, which the re-hooked base supplies; every trainable key must be there.
- ``save_16bit_model(exclude_frozen_parameters=True)`` would write the slices under hooked names, a
  file ``from_pretrained`` cannot use: refused with the call to make instead.
"""

from __future__ import annotations

import functools

from torch import nn

from alps_ds.errors import AlpsError
from alps_ds.hooked import HeadRows
from alps_ds.integrations.state_dict import merge_state_dict, raw_state_dict

_installed = False


def _hooked(engine) -> bool:
    module = getattr(engine, "module", None)
    return isinstance(module, nn.Module) and any(isinstance(m, HeadRows) for m in module.modules())


def _consolidated(original):
    @functools.wraps(original)
    def wrapper(self, exclude_frozen_parameters=False):
        state = original(self, exclude_frozen_parameters=exclude_frozen_parameters)
        if state is None or exclude_frozen_parameters or not _hooked(self):
            return state  # other ranks get None; excluding frozen weights leaves only the slices to save
        return merge_state_dict(self.module, state)

    return wrapper


def _save_checkpoint(original):
    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        if not _hooked(self):
            return original(self, *args, **kwargs)
        with raw_state_dict():
            return original(self, *args, **kwargs)

    return wrapper


def _load_module_state_dict(original):
    @functools.wraps(original)
    def wrapper(self, checkpoint, strict=True, *args, **kwargs):
        if strict and _hooked(self) and isinstance(checkpoint.get("module"), dict):
            saved = set(checkpoint["module"])
            params = dict(self.module.named_parameters())
            lost = sorted(n for n, p in params.items() if p.requires_grad and n not in saved)
            if lost:
                raise AlpsError(
                    f"checkpoint lacks {len(lost)} trainable tensor(s) of this hooked model, e.g. {lost[0]}; "
                    "it was saved for another selection or model: hook the same heads.json as the run that saved it"
                )
            frozen = {n for n, p in params.items() if not p.requires_grad}
            unexpected = saved - set(params) - {n for n, _ in self.module.named_buffers()}
            if not unexpected and set(params) - saved <= frozen:
                strict = False  # only frozen weights are missing: they are the base's, already in the model
        return original(self, checkpoint, strict, *args, **kwargs)

    return wrapper


def _save_16bit_model(original):
    @functools.wraps(original)
    def wrapper(self, save_dir, save_filename="pytorch_model.bin", exclude_frozen_parameters=False):
        if exclude_frozen_parameters and _hooked(self):
            raise AlpsError(
                "save_16bit_model(exclude_frozen_parameters=True) on a hooked model would write only the slices "
                "under hooked names; call alps_ds.save_adapter(engine, DIR) for them, or save_16bit_model(DIR)"
            )
        return original(self, save_dir, save_filename, exclude_frozen_parameters=exclude_frozen_parameters)

    return wrapper


def install() -> None:
    """Wrap the four engine methods (idempotent; a no-op when DeepSpeed is not installed)."""
    global _installed
    if _installed:
        return
    try:
        from deepspeed.runtime.engine import DeepSpeedEngine
    except ImportError:
        _installed = True
        return
    for name, wrap in (
        ("_zero3_consolidated_16bit_state_dict", _consolidated),
        ("save_checkpoint", _save_checkpoint),
        ("load_module_state_dict", _load_module_state_dict),
        ("save_16bit_model", _save_16bit_model),
    ):
        setattr(DeepSpeedEngine, name, wrap(getattr(DeepSpeedEngine, name)))
    _installed = True
