"""What a hooked projection's state dict looks like to other libraries: the standard keys, trained rows merged.

A :class:`~alps_ds.sparse.module.HeadRowsLinear` holds the frozen base ``weight`` (``bias``) and the
trainable rows ``head_weight`` (``head_bias``). Every library that writes a model for
``from_pretrained`` (``save_pretrained``, HF Trainer, accelerate, DeepSpeed's ``save_16bit_model`` on
ZeRO 0-2) builds the file from ``state_dict()``; the module's state-dict hook therefore writes the
rows into ``weight`` and drops the ``head_*`` keys, so the file is an ordinary fine-tuned model. The
load pre-hook reverses it: loading a merged ``weight`` into a hooked module puts its selected rows
into ``head_weight`` and keeps the module's frozen base rows (the reference :func:`base_weights`
reads). DeepSpeed's own checkpoints keep the hooked names (:func:`raw_state_dict`): see
:mod:`alps_ds.integrations.deepspeed`, which also covers ZeRO-3, where DeepSpeed builds the 16-bit
state dict from the parameters and never calls these hooks.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import nn

from alps_ds.errors import AlpsError
from alps_ds.hooked import hooked_modules

_RAW = contextvars.ContextVar("alps_ds_raw_state_dict", default=False)
LEAVES = (("weight", "head_weight"), ("bias", "head_bias"))


@contextlib.contextmanager
def raw_state_dict() -> Iterator[None]:
    """Inside, hooked modules' state dicts keep ``weight`` (the base) and ``head_weight`` apart (for resume)."""
    token = _RAW.set(True)
    try:
        yield
    finally:
        _RAW.reset(token)


def _is_full(t: torch.Tensor | None, rows: int) -> bool:
    """False for a ZeRO-3 partition (an empty local tensor outside ``GatheredParameters``)."""
    return t is not None and t.dim() >= 1 and t.shape[0] == rows


def merge_rows_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata=None) -> None:
    """State-dict post-hook: ``prefix.weight`` gets the trained rows, ``prefix.head_*`` keys go.

    A ZeRO-3 partition (nothing gathered) stays as DeepSpeed wrote it: only its own checkpoint reads it.
    """
    if _RAW.get():
        return
    pairs = [(prefix + leaf, prefix + head) for leaf, head in LEAVES if prefix + head in state_dict]
    if not pairs or not all(
        _is_full(state_dict.get(w), module.out_features) and _is_full(state_dict[h], module.num_rows) for w, h in pairs
    ):
        return
    for w_key, h_key in pairs:
        w, rows = state_dict[w_key].detach(), state_dict.pop(h_key).detach()
        state_dict[w_key] = w.index_copy(0, module.rows.to(w.device), rows.to(w.device, w.dtype))


def merge_state_dict(model: nn.Module, state_dict: dict) -> dict:
    """``state_dict`` (of ``model``, e.g. DeepSpeed's consolidated ZeRO-3 one) with every hooked module merged."""
    for name, module in hooked_modules(model):
        if hasattr(module, "rows"):  # HeadRowsLinear and its subclasses; other types stay and are refused below
            merge_rows_hook(module, state_dict, f"{name}." if name else "")
    leftover = [k for k in state_dict if k.rpartition(".")[2] in ("head_weight", "head_bias")]
    if leftover and not _RAW.get():
        raise AlpsError(
            f"state dict still holds the hooked key {leftover[0]} after merging (a partial or sharded state dict?); "
            "save with alps_ds.save_adapter(model, DIR) or call alps_ds.merge(model) before saving"
        )
    return state_dict


def split_rows_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Load pre-hook: a merged ``prefix.weight`` (no ``head_weight`` key) fills the slice from its selected rows.

    The module's frozen ``weight`` keeps its own (base) values in those rows, so :func:`base_weights`
    stays the base model after a resume from a merged file.
    """
    for leaf, head in LEAVES:
        w_key, h_key = prefix + leaf, prefix + head
        if h_key in state_dict or getattr(module, head, None) is None:
            continue
        if not _is_full(state_dict.get(w_key), module.out_features):
            continue
        w = state_dict[w_key]
        rows = module.rows.to(w.device)
        state_dict[h_key] = w.index_select(0, rows)
        own = getattr(module, leaf)
        if _is_full(own, module.out_features):  # a ZeRO-3 partition has no base rows to keep here
            base_rows = own.detach().index_select(0, module.rows.to(own.device)).to(w.device, w.dtype)
            state_dict[w_key] = w.index_copy(0, rows, base_rows)


def register_hooks(module: nn.Module) -> None:
    """Give one hooked projection the merge-on-save and split-on-load hooks."""
    module.register_state_dict_post_hook(merge_rows_hook)
    module.register_load_state_dict_pre_hook(split_rows_hook)
