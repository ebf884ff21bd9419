"""The one hook contract shared by every engine (HF/DeepSpeed ZeRO, DeepSpeed AutoTP, megatron-core).

Each engine module exposes ``apply(model, selection, *, kv="group", train_others=(), spec=None)``
which hooks ``model`` in place and returns a :class:`HookReport`. Every hooked projection is an
instance of a :class:`HeadRows` subclass and carries its own :class:`HookedRows` (where it is,
which LOCAL rows train), the selection and the kv policy, so adapters, reports and ``merge`` need
no engine module and nothing stashed on the model object.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from alps_ds.arch import Kind
from alps_ds.errors import AlpsError
from alps_ds.layout import KVPolicy, matches_train_others
from alps_ds.selection import HeadSelection

Ranges = tuple[tuple[int, int], ...]
KIND_ORDER = ("q", "k", "v", "others")


@dataclass(frozen=True)
class HookedRows:
    """One hooked projection on this rank: its place in the model and the LOCAL rows that train."""

    name: str  # dotted module name in the hooked model, e.g. model.layers.3.self_attn.q_proj
    layer: int  # global layer index
    module: str  # projection name: q_proj, k_proj, v_proj, qkv_proj, query_key_value, linear_qkv
    ranges: Ranges  # rows of this rank's local weight, half-open, sorted, merged (empty: a TP rank without rows)
    kinds: tuple[tuple[Kind, int], ...]  # selected rows per kind, e.g. (("q", 64), ("k", 16), ("v", 16))
    in_features: int
    bias: bool
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def num_rows(self) -> int:
        return sum(b - a for a, b in self.ranges)

    @property
    def elements(self) -> int:
        """Trainable elements of this projection on this rank: rows x (in + bias)."""
        return self.num_rows * (self.in_features + int(self.bias))


class HeadRows(nn.Module):
    """Base of every hooked projection type: a frozen projection whose selected rows train.

    Subclasses hold the frozen ``weight``/``bias`` (or the wrapped layer) and the trainable
    ``head_weight``/``head_bias`` of ``hooked.ranges``, and implement :meth:`merged_weight` and
    :meth:`unhook`.
    """

    hooked: HookedRows | None = None  # None until an engine's apply describes the module
    selection: HeadSelection | None = None
    kv: KVPolicy | None = None
    head_weight: nn.Parameter
    head_bias: nn.Parameter | None

    def describe(self, hooked: HookedRows, selection: HeadSelection, kv: KVPolicy) -> None:
        """Record what this module trains (called once by the engine's ``apply``)."""
        self.hooked, self.selection, self.kv = hooked, selection, kv

    def merged_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's weight (and bias) with the trained rows written in (full, gathered params)."""
        raise NotImplementedError

    def unhook(self) -> nn.Module:
        """The engine's plain module again, the trained rows written into its weight."""
        raise NotImplementedError


@dataclass(frozen=True)
class HookReport:
    """What an engine's ``apply`` hooked on this rank and how many elements train, per kind."""

    engine: str  # "hf" (sparse), "autotp" or "megatron"
    kv: KVPolicy
    modules: tuple[HookedRows, ...]
    others: dict[str, int] = field(default_factory=dict)  # parameter name -> elements, trained in full

    @property
    def per_kind(self) -> dict[str, int]:
        """Trainable elements of q, k, v rows and of ``others`` on this rank."""
        out = dict.fromkeys(KIND_ORDER, 0)
        for m in self.modules:
            per_row = m.in_features + int(m.bias)
            for kind, rows in m.kinds:
                out[kind] += rows * per_row
        out["others"] = sum(self.others.values())
        return out

    @property
    def trainable(self) -> int:
        return sum(self.per_kind.values())

    def rows(self) -> dict[str, Ranges]:
        """Hooked module name -> local trainable row ranges."""
        return {m.name: m.ranges for m in self.modules}

    def format(self) -> str:
        """Per kind elements and the number of hooked modules, for logs."""
        kinds = ", ".join(f"{k} {v:,}" for k, v in self.per_kind.items())
        tp = self.modules[0].tp_size if self.modules else 1
        where = f" (tp rank {self.modules[0].tp_rank} of {tp})" if tp > 1 else ""
        return f"{self.engine}: {len(self.modules)} hooked projections{where}; trainable {self.trainable:,} ({kinds})"


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DeepSpeed engine or any wrapper exposing ``.module``."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def hooked_modules(model: nn.Module) -> Iterator[tuple[str, HeadRows]]:
    """``(name, module)`` for every hooked projection of ``model`` (any engine)."""
    for name, module in unwrap(model).named_modules():
        if isinstance(module, HeadRows):
            yield name, module


def hook_state(model: nn.Module) -> tuple[HeadSelection, KVPolicy] | None:
    """The selection and kv policy a hooked model trains, read from its hooked modules."""
    for _, module in hooked_modules(model):
        if module.selection is not None:
            return module.selection, module.kv
    return None


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (``model.layers.0.self_attn.q_proj``) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def others_to_train(model: nn.Module, skip: set[str], train_others: Iterable[str] | str) -> dict[str, nn.Parameter]:
    """Parameters outside the modules ``skip`` matched by ``train_others`` patterns (``"all"``, names, globs).

    Raises before anything changes when a pattern matches nothing (a typo would silently train less).
    """
    patterns = (train_others,) if isinstance(train_others, str) else tuple(train_others)
    matched = dict.fromkeys(patterns, 0)
    out: dict[str, nn.Parameter] = {}
    for pname, p in model.named_parameters():
        if pname.rpartition(".")[0] in skip:
            continue
        hits = [pat for pat in patterns if matches_train_others(pat, pname)]
        for pat in hits:
            matched[pat] += 1
        if hits:
            out[pname] = p
    unmatched = [pat for pat, count in matched.items() if count == 0]
    if unmatched:
        raise AlpsError(
            f"apply: train_others pattern(s) {', '.join(map(repr, unmatched))} match no parameter outside Q/K/V; "
            "use module names such as mlp, o_proj, norm, embed_tokens, lm_head, or 'all'"
        )
    return out


def merge(model: nn.Module) -> nn.Module:
    """Write every trained slice back and put the engine's plain modules back (any engine).

    Returns ``model`` changed in place. Under ZeRO-3 call on every rank (rows are gathered and
    re-partitioned). Parameters keep the ``requires_grad`` that ``apply`` gave them.
    """
    inner = unwrap(model)
    for name, mod in list(hooked_modules(inner)):
        set_submodule(inner, name, mod.unhook())
    if getattr(inner, "_alps_input_grads", False):
        inner.disable_input_require_grads()
        del inner._alps_input_grads
    return model


def require_input_grads(model: nn.Module) -> None:
    """Make the embedding output require grad (undone by :func:`merge`).

    Reentrant activation checkpointing only back-propagates into a checkpointed block whose input
    requires grad, and TP ranks must all build the same backward graph; with frozen embeddings
    neither holds. HF's hook does this (PEFT uses it too).
    """
    if hasattr(model, "enable_input_require_grads") and not getattr(model, "_alps_input_grads", False):
        model.enable_input_require_grads()
        model._alps_input_grads = True
