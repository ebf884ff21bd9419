"""The ALPS hook for megatron-core: train only the selected heads' rows of each ``linear_qkv``.

Megatron's ``linear_qkv`` is a ``ColumnParallelLinear`` whose local weight is the contiguous
t-th 1/T of the grouped [q of the group's heads; k_j; v_j] rows (see
:mod:`alps_ds.parallel.mapping`, layout ``megatron``). :func:`apply` keeps the module and its
frozen weight in place and adds one trainable parameter ``head_weight`` (and ``head_bias``)
holding this rank's selected LOCAL rows. A forward pre-hook passes Megatron's own forward the
composed weight ``W.index_copy(0, rows, head_weight)`` through its ``weight=`` argument (a
forward hook swaps in the trained bias rows), so every Megatron path (input copy/all-reduce,
sequence parallel gather, async dgrad) is unchanged and state-dict keys stay
``linear_qkv.weight``. The optimizer only ever sees the slices, so
weight decay and momentum cannot move any other row.

Limits: the local ``ColumnParallelLinear`` (not Transformer Engine's
``TELayerNormColumnParallelLinear``);
``gradient_accumulation_fusion`` is turned off on the hooked modules (the composed weight has
no ``main_grad``); call :func:`apply` before wrapping the model in Megatron's DDP/optimizer;
Megatron's distributed-checkpoint ``sharded_state_dict`` does not describe ``head_weight``
(save it with :func:`merged_weight` or torch state dicts).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from alps_ds.arch import MEGATRON_MODULE, AttentionSpec
from alps_ds.errors import AlpsError
from alps_ds.layout import KVPolicy
from alps_ds.parallel.mapping import ParallelPlan, plan


def spec_from_config(config, model_type: str = "llama") -> AttentionSpec:
    """An :class:`AttentionSpec` of a megatron-core ``TransformerConfig`` (via ``AttentionSpec.from_config``)."""
    n = config.num_attention_heads
    return AttentionSpec.from_config(
        {
            "model_type": model_type,
            "num_hidden_layers": config.num_layers,
            "hidden_size": config.hidden_size,
            "num_attention_heads": n,
            "num_key_value_heads": config.num_query_groups or n,
            "head_dim": config.kv_channels or config.hidden_size // n,
        },
        source="megatron TransformerConfig",
    )


@dataclass(frozen=True)
class HookedQKV:
    """One hooked ``linear_qkv``: its global layer and local trainable row ranges (empty on a TP
    rank holding none of the layer's selected rows)."""

    layer: int
    module: nn.Module
    ranges: tuple[tuple[int, int], ...]


def _rows_index(ranges) -> torch.Tensor:
    return torch.cat([torch.arange(a, b) for a, b in ranges] + [torch.zeros(0, dtype=torch.long)])


def _pre_hook(module, args, kwargs):
    # Megatron's forward accepts the weight to use; hand it the frozen shard with our rows in.
    if kwargs.get("weight") is not None:
        raise AlpsError("alps hook: linear_qkv was called with an explicit weight; cannot compose head rows")
    kwargs["weight"] = module.weight.index_copy(0, module.alps_rows, module.head_weight.to(module.weight.dtype))
    return args, kwargs


def _post_hook(module, args, kwargs, output):
    # Megatron added the frozen bias; move the selected rows to the trained bias.
    out, _ = output
    delta = module.head_bias - module.bias.index_select(0, module.alps_rows)
    return out + torch.zeros_like(module.bias).index_copy(0, module.alps_rows, delta).to(out.dtype), None


def apply(
    model: nn.Module, spec: AttentionSpec, heads: Iterable[tuple[int, int]], kv: KVPolicy = "group"
) -> list[HookedQKV]:
    """Hook every ``linear_qkv`` of ``model`` (a GPTModel, TransformerBlock or any module tree
    holding Megatron ``TransformerLayer``s) whose layer has selected rows on any TP rank.

    The global layer is read from Megatron's own ``layer_number`` (1-based, pipeline offsets
    included), the TP rank and size from the module's ``tp_group``. Freezes nothing else:
    set ``requires_grad=False`` on what should not train.
    """
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, set_tensor_model_parallel_attributes

    heads = list(heads)
    hooked = []
    plans: dict[int, ParallelPlan] = {}
    for layer_module in model.modules():
        qkv = getattr(getattr(layer_module, "self_attention", None), MEGATRON_MODULE, None)
        if qkv is None or not hasattr(layer_module, "layer_number"):
            continue
        if not isinstance(qkv, ColumnParallelLinear):
            raise AlpsError(
                f"alps hook: linear_qkv is a {type(qkv).__name__}; use the local spec (ColumnParallelLinear) layers"
            )
        if qkv.skip_bias_add and qkv.bias is not None:
            raise AlpsError(
                "alps hook: linear_qkv with skip_bias_add is not supported (megatron-core builds it without)"
            )
        layer = layer_module.layer_number - 1
        tp, rank = qkv.tp_group.size(), qkv.tp_group.rank()
        if tp not in plans:
            plans[tp] = plan(spec, heads, tp=tp, layout="megatron", kv=kv)
        expect = plans[tp].tensor.shard_sizes(MEGATRON_MODULE)[rank]
        if tuple(qkv.weight.shape) != (expect, spec.hidden_size):
            raise AlpsError(
                f"alps hook: layer {layer} linear_qkv shard is {tuple(qkv.weight.shape)}, the spec expects "
                f"({expect}, {spec.hidden_size}) at tp rank {rank}/{tp}; the selection is for another model"
            )
        qkv.weight.requires_grad_(False)
        if qkv.bias is not None:
            qkv.bias.requires_grad_(False)
        entries = [e for e in plans[tp].entries if e.layer == layer]
        if not entries:
            continue
        # Every TP rank of a layer with selected rows is hooked, those without rows with a 0-row
        # slice: Megatron's linear picks its autograd function (and so its backward all-reduce)
        # by weight.requires_grad, and ranks that disagree would deadlock in backward.
        ranges = next((e.rows for e in entries if e.tp_rank == rank), ())
        rows = _rows_index(ranges).to(qkv.weight.device)
        qkv.register_buffer("alps_rows", rows, persistent=False)
        qkv.head_weight = nn.Parameter(qkv.weight.detach().index_select(0, rows).clone())
        # Sharded over TP like the weight it came from: gradient-norm clipping counts it once per rank.
        set_tensor_model_parallel_attributes(qkv.head_weight, True, 0, 1)
        qkv.register_forward_pre_hook(_pre_hook, with_kwargs=True)
        if qkv.bias is not None:
            qkv.head_bias = nn.Parameter(qkv.bias.detach().index_select(0, rows).clone())
            set_tensor_model_parallel_attributes(qkv.head_bias, True, 0, 1)
            qkv.register_forward_hook(_post_hook, with_kwargs=True)
        qkv.gradient_accumulation_fusion = False  # the composed weight has no main_grad buffer
        hooked.append(HookedQKV(layer, qkv, ranges))
    return hooked


@torch.no_grad()
def merged_weight(qkv: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This rank's ``linear_qkv`` weight (and bias) with the trained rows written in."""
    if not hasattr(qkv, "head_weight"):
        return qkv.weight.detach(), None if qkv.bias is None else qkv.bias.detach()
    w = qkv.weight.detach().index_copy(0, qkv.alps_rows, qkv.head_weight.detach().to(qkv.weight.dtype))
    b = None
    if qkv.bias is not None:
        b = qkv.bias.detach().index_copy(0, qkv.alps_rows, qkv.head_bias.detach().to(qkv.bias.dtype))
    return w, b
