"""`apply` for HF causal LMs (plain PyTorch, DeepSpeed ZeRO 0-3): only the selected heads' Q/K/V rows train.

Data flow: config -> :class:`AttentionSpec` -> :class:`HeadSelection` -> :func:`trainable_rows`
-> one :class:`HeadRowsLinear` per projection with selected rows. Everything else is frozen
(``requires_grad=False`` before ``deepspeed.initialize``, which reads it once) unless matched by
``train_others``. The contract (signature, :class:`~alps_ds.hooked.HookReport`, ``merge``) is
the same for every engine: see :mod:`alps_ds.hooked`.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from alps_ds.arch import AttentionSpec
from alps_ds.errors import AlpsError
from alps_ds.hooked import (
    HeadRows,
    HookedRows,
    HookReport,
    Ranges,
    hooked_modules,
    merge,
    others_to_train,
    require_input_grads,
    set_submodule,
)
from alps_ds.layout import KVPolicy, trainable_rows
from alps_ds.selection import HeadSelection
from alps_ds.sparse.module import full_numel, reparametrize

__all__ = ["apply", "hooked_modules", "merge", "model_spec", "qkv_module_names", "slice_addresses"]


def model_spec(model: nn.Module, spec: AttentionSpec | None, who: str = "apply") -> AttentionSpec:
    """``spec``, or the model's own from its ``.config``."""
    if spec is not None:
        return spec
    if getattr(model, "config", None) is None:
        raise AlpsError(f"{who}: model has no .config; pass spec=AttentionSpec.from_config(...)")
    return AttentionSpec.from_config(model.config, source="model.config")


def slice_addresses(model: nn.Module) -> dict[str, tuple[str, Ranges | None]]:
    """Trainable parameter name -> (the tensor's key in the HF checkpoint, its row ranges or None for all of it).

    The address of what a parameter trains, independent of how it is held: checkpoints and exports
    key slices by it. Ranges are the module's own rows (the whole model's with no tensor parallelism).
    """
    hooked = dict(hooked_modules(model))
    out: dict[str, tuple[str, Ranges | None]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module_name, _, pname = name.rpartition(".")
        if module_name in hooked and pname in ("head_weight", "head_bias"):
            key = f"{module_name}.{'weight' if pname == 'head_weight' else 'bias'}"
            out[name] = (key, hooked[module_name].ranges)
        else:
            out[name] = (name, None)
    return out


def qkv_module_names(model: nn.Module, spec: AttentionSpec) -> set[str]:
    """Dotted names of every Q/K/V projection module (selected or not) present in ``model``."""
    present = {name for name, _ in model.named_modules()}
    return {
        spec.module_path(layer, m)
        for layer in range(spec.num_layers)
        for m in spec.modules
        if spec.module_path(layer, m) in present
    }


def apply(
    model: nn.Module,
    selection: HeadSelection,
    *,
    kv: KVPolicy = "group",
    train_others: Iterable[str] | str = (),
    spec: AttentionSpec | None = None,
) -> HookReport:
    """Re-parametrize ``model`` in place so only ``selection``'s Q/K/V rows (and ``train_others``) train.

    ``kv="group"`` also trains the K/V rows of each kv head read by a selected query head (the
    paper); ``kv="none"`` trains Q rows only. ``train_others`` lists module-name patterns
    (``"mlp"``, ``"o_proj"``, ``"norm"``, ``"embed_tokens"``, ``"lm_head"``, globs) trained in
    full; ``"all"`` means every parameter except Q/K/V. Call before ``deepspeed.initialize``;
    a model built under ``deepspeed.zero.Init`` works (call outside the ``zero.Init`` context).
    """
    if any(isinstance(m, HeadRows) for m in model.modules()):
        raise AlpsError("apply: this model is already re-parametrized; call merge(model) first or use a fresh model")
    spec = model_spec(model, spec)
    selection.check_model(spec)
    qkv = qkv_module_names(model, spec)
    if len(qkv) != spec.num_layers * len(spec.modules):
        raise AlpsError(
            f"apply: found {len(qkv)} of {spec.num_layers * len(spec.modules)} Q/K/V modules "
            f"({spec.module_path(0, spec.modules[0])} ...); is this a {spec.model_type} causal LM?"
        )
    # Everything that can fail is checked before the model changes: a refused call leaves it as it was.
    others = others_to_train(model, qkv, train_others)
    rows = trainable_rows(spec, selection.heads, kv)

    for p in model.parameters():
        p.requires_grad_(False)
    for p in others.values():
        p.requires_grad_(True)
    hooked = []
    for mr in rows:
        name = spec.module_path(mr.layer, mr.module)
        module = reparametrize(model.get_submodule(name), mr.ranges, kinds=mr.rows_per_kind)
        info = HookedRows(
            name, mr.layer, mr.module, module.ranges, mr.rows_per_kind, module.in_features, module.bias is not None
        )
        module.describe(info, selection, kv)
        set_submodule(model, name, module)
        hooked.append(info)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and not any(p.requires_grad for p in emb.parameters()):
        require_input_grads(model)
    return HookReport("hf", kv, tuple(hooked), {n: full_numel(p) for n, p in others.items()})
