"""`apply` and `merge`: turn a HF causal LM into one where only the selected heads' Q/K/V rows train, and back.

Data flow: config -> :class:`AttentionSpec` -> :class:`HeadSelection` -> :func:`trainable_rows`
-> one :class:`HeadRowsLinear` per projection with selected rows. Everything else is frozen
(``requires_grad=False`` before ``deepspeed.initialize``, which reads it once) unless matched by
``train_others``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from alps_ds.arch import AttentionSpec
from alps_ds.errors import AlpsError
from alps_ds.layout import KVPolicy, matches_train_others, trainable_rows
from alps_ds.selection import HeadSelection
from alps_ds.sparse.module import HeadRowsLinear, Ranges, gathered, reparametrize, set_submodule


def hooked_modules(model: nn.Module) -> Iterator[tuple[str, HeadRowsLinear]]:
    """``(name, module)`` for every re-parametrized projection of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, HeadRowsLinear):
            yield name, module


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
) -> nn.Module:
    """Re-parametrize ``model`` in place so only ``selection``'s Q/K/V rows (and ``train_others``) train.

    ``kv="group"`` also trains the K/V rows of each kv head read by a selected query head (the
    paper); ``kv="none"`` trains Q rows only. ``train_others`` lists module-name patterns
    (``"mlp"``, ``"o_proj"``, ``"norm"``, ``"embed_tokens"``, ``"lm_head"``, globs) trained in
    full; ``"all"`` means every parameter except Q/K/V. Call before ``deepspeed.initialize``;
    a model built under ``deepspeed.zero.Init`` works (call outside the ``zero.Init`` context).
    """
    if any(isinstance(m, HeadRowsLinear) for m in model.modules()):
        raise AlpsError("apply: this model is already re-parametrized; call merge(model) first or use a fresh model")
    if spec is None:
        if getattr(model, "config", None) is None:
            raise AlpsError("apply: model has no .config; pass spec=AttentionSpec.from_config(...)")
        spec = AttentionSpec.from_config(model.config, source="model.config")
    selection.check_model(spec)
    if isinstance(train_others, str):
        train_others = (train_others,)
    patterns = tuple(train_others)
    qkv = qkv_module_names(model, spec)
    if len(qkv) != spec.num_layers * len(spec.modules):
        raise AlpsError(
            f"apply: found {len(qkv)} of {spec.num_layers * len(spec.modules)} Q/K/V modules "
            f"({spec.module_path(0, spec.modules[0])} ...); is this a {spec.model_type} causal LM?"
        )

    # Everything that can fail is checked before the model changes: a refused call leaves it as it was.
    others = []
    matched = dict.fromkeys(patterns, 0)
    for pname, p in model.named_parameters():
        if pname.rpartition(".")[0] in qkv:
            continue
        hits = [pat for pat in patterns if matches_train_others(pat, pname)]
        for pat in hits:
            matched[pat] += 1
        if hits:
            others.append(p)
    unmatched = [pat for pat, count in matched.items() if count == 0]
    if unmatched:
        raise AlpsError(
            f"apply: train_others pattern(s) {', '.join(map(repr, unmatched))} match no parameter outside Q/K/V; "
            "use module names such as mlp, o_proj, norm, embed_tokens, lm_head, or 'all'"
        )
    rows = trainable_rows(spec, selection.heads, kv)

    for p in model.parameters():
        p.requires_grad_(False)
    for p in others:
        p.requires_grad_(True)
    for mr in rows:
        name = spec.module_path(mr.layer, mr.module)
        hooked = reparametrize(model.get_submodule(name), mr.ranges, kinds=mr.rows_per_kind)
        set_submodule(model, name, hooked)

    # Reentrant activation checkpointing only back-propagates into a checkpointed block when
    # its input requires grad; with frozen embeddings it would not, and the head slices would
    # silently get no gradient. HF's hook makes the embedding output require grad (PEFT does the same).
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and not any(p.requires_grad for p in emb.parameters()):
        model.enable_input_require_grads()
        model.alps_input_grads = True
    model.alps_selection = selection
    model.alps_kv = kv
    return model


def merge(model: nn.Module) -> nn.Module:
    """Write every trained slice back into its projection and put plain ``nn.Linear`` modules back.

    Returns ``model`` (changed in place): an ordinary HF model whose ``save_pretrained`` output
    loads without alps_ds. Under ZeRO-3 call it on every rank: the rows are gathered, written
    on rank 0 and re-partitioned, and the model's parameters stay partitioned (read them with
    ``GatheredParameters`` or save with the engine's consolidated 16-bit state dict). Parameters
    keep the ``requires_grad`` that ``apply`` gave them: Q/K/V weights stay frozen.
    """
    for name, mod in list(hooked_modules(model)):
        params = [mod.weight, mod.bias, mod.head_weight, mod.head_bias]
        with gathered(params, modify=True):
            w, b = mod.merged_weight()
            with torch.no_grad():
                mod.weight.data.copy_(w)
                if b is not None:
                    mod.bias.data.copy_(b)
        linear = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
        linear.weight = mod.weight
        linear.bias = mod.bias
        set_submodule(model, name, linear)
    if getattr(model, "alps_input_grads", False):
        model.disable_input_require_grads()
    for attr in ("alps_selection", "alps_kv", "alps_input_grads"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model
