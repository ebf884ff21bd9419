"""The ALPS hook for megatron-core: train only the selected heads' rows of each ``linear_qkv``.

Megatron's ``linear_qkv`` is column-parallel: TP rank t holds the contiguous t-th 1/T of the
grouped [q of the group's heads; k_j; v_j] rows (:mod:`alps_ds.parallel.mapping`, layout
``megatron``). :func:`apply` replaces it by a :class:`MegatronHeadRows` that WRAPS the layer
(Megatron-Bridge's ``AdapterWrapper`` pattern): ``out = base(x) + delta`` where ``delta`` is
``x (head_weight - W_rows)^T + (head_bias - b_rows)`` added to this rank's selected output rows
only. The frozen rows' outputs are the base layer's, bit for bit, and the optimizer only ever
sees the slices, so weight decay and momentum cannot move any other row. Because only the
layer's output (and, for Transformer Engine's ``TELayerNormColumnParallelLinear``, its
layer-norm output via ``return_layernorm_output``) is used, the same code wraps the local
``ColumnParallelLinear`` and the TE layer.

Limits: sequence parallelism and ``skip_bias_add`` on ``linear_qkv`` are refused; call
:func:`apply` before wrapping the model in Megatron's DDP/optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from alps_ds.arch import KINDS, MEGATRON_MODULE, AttentionSpec
from alps_ds.errors import AlpsError
from alps_ds.hooked import HeadRows, HookedRows, HookReport, others_to_train, set_submodule
from alps_ds.layout import KVPolicy
from alps_ds.parallel.mapping import TensorParallel, plan
from alps_ds.selection import HeadSelection

SLICE_KEYS = ("head_weight", "head_bias")


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
            "attention_bias": bool(config.add_qkv_bias or config.add_bias_linear),
        },
        source="megatron TransformerConfig",
    )


def _tp_group(layer: nn.Module):
    """The layer's tensor-parallel group (megatron-core's global one when the layer does not keep it)."""
    from megatron.core import parallel_state

    return getattr(layer, "tp_group", None) or parallel_state.get_tensor_model_parallel_group()


def _rows_index(ranges, device) -> torch.Tensor:
    empty = torch.zeros(0, dtype=torch.long, device=device)  # a TP rank without rows: a 0-row slice
    return torch.cat([torch.arange(a, b, device=device) for a, b in ranges] + [empty])


def _load_pre_hook(module, state_dict, prefix, *args) -> None:
    """``load_state_dict``: the base layer's keys (``linear_qkv.weight``) go to the wrapped ``base``; a
    rank without rows has no part of the slices in a distributed checkpoint and keeps its empty ones."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        leaf = key[len(prefix) :]
        if leaf not in SLICE_KEYS and not leaf.startswith("base."):
            state_dict[f"{prefix}base.{leaf}"] = state_dict.pop(key)
    for leaf in SLICE_KEYS:
        p = getattr(module, leaf)
        if p is not None and not len(module.rows):
            state_dict.setdefault(prefix + leaf, p.detach())


class MegatronHeadRows(HeadRows):
    """A ``linear_qkv`` (local or Transformer Engine) whose selected LOCAL output rows train.

    ``base`` stays a frozen submodule; ``head_weight``/``head_bias`` hold this rank's selected
    rows (possibly none: a TP rank of a hooked layer without rows keeps a 0-row slice so every
    rank runs the same backward all-reduce).
    """

    def __init__(self, base: nn.Module, ranges, layer: int):
        super().__init__()
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        self.base = base
        self.ranges = tuple(ranges)
        self.layer = layer
        self.register_buffer("rows", _rows_index(ranges, base.weight.device), persistent=False)
        self.head_weight = nn.Parameter(base.weight.detach().index_select(0, self.rows).clone())
        bias = getattr(base, "bias", None)  # TE keeps an empty tensor when the layer has no bias
        bias = bias if isinstance(bias, torch.Tensor) and bias.numel() == base.weight.shape[0] else None
        self.head_bias = None if bias is None else nn.Parameter(bias.detach().index_select(0, self.rows).clone())
        for p in (self.head_weight, self.head_bias):
            if p is not None:  # one slice per TP rank: gradient-norm clipping counts it on every rank
                set_tensor_model_parallel_attributes(p, True, 0, 1)
        self._register_load_state_dict_pre_hook(_load_pre_hook, with_module=True)
        # TE's fused layer norm + linear: the delta needs the normalized input the matmul saw.
        self._ln_output = getattr(base, "return_layernorm_output", None)
        if self._ln_output is not None:
            base.return_layernorm_output = True

    @property
    def in_features(self) -> int:
        return self.base.weight.shape[1]

    def forward(self, x, *args, **kwargs):
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

        out, out_bias = self.base(x, *args, **kwargs)
        (y, ln) = out if self._ln_output is not None else (out, x)
        # like the base layer's input: identity forward, all-reduce of its gradient over TP ranks
        inp = copy_to_tensor_model_parallel_region(ln, group=_tp_group(self.base))
        w_rows = self.base.weight.detach().index_select(0, self.rows)
        dw = self.head_weight - w_rows.to(self.head_weight.dtype)
        db = None
        if self.head_bias is not None:
            db = self.head_bias - self.base.bias.detach().index_select(0, self.rows).to(self.head_bias.dtype)
        delta = F.linear(inp, dw.to(inp.dtype), None if db is None else db.to(inp.dtype))
        y = y.index_add(-1, self.rows, delta.to(y.dtype))
        return ((y, ln) if self._ln_output else y), out_bias

    @torch.no_grad()
    def merged_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's ``linear_qkv`` weight (and bias) with the trained rows written in."""
        w = self.base.weight.detach()
        w = w.index_copy(0, self.rows, self.head_weight.detach().to(w.dtype))
        b = None
        if self.head_bias is not None:
            b = self.base.bias.detach().index_copy(0, self.rows, self.head_bias.detach().to(self.base.bias.dtype))
        return w, b

    def unhook(self) -> nn.Module:
        """The wrapped layer again, this rank's trained rows written into its weight."""
        w, b = self.merged_weight()
        with torch.no_grad():
            self.base.weight.copy_(w)
            if b is not None:
                self.base.bias.copy_(b)
        if self._ln_output is not None:
            self.base.return_layernorm_output = self._ln_output
        return self.base

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """The base layer's keys unchanged (``linear_qkv.weight``) plus ``head_weight``/``head_bias``."""
        out = self.base.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in SLICE_KEYS:
            p = getattr(self, key)
            if p is not None:
                out[prefix + key] = p if keep_vars else p.detach()
        return out

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """The base's sharded state plus the slices: one global tensor per layer of all its selected
        rows in ``linear_qkv`` row order, each TP rank holding its own (uneven) run of them.

        megatron-core's default would call a slice TP-replicated (every rank the same tensor), which
        is wrong: ranks hold different rows, and a checkpoint written at one TP size must reshard.
        """
        out = self.base.sharded_state_dict(prefix, sharded_offsets, metadata)
        out.update(self.slice_sharded_state_dict(prefix))
        return out

    def slice_sharded_state_dict(self, prefix: str = "") -> dict:
        """Only the slices' ShardedTensors (what an ALPS checkpoint saves; frozen weights come from the base)."""
        import torch.distributed as dist
        from megatron.core import parallel_state
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        group = _tp_group(self.base)
        counts = [None] * group.size()
        dist.all_gather_object(counts, len(self.rows), group=group)
        offset, total = sum(counts[: group.rank()]), sum(counts)
        dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
        out = {}
        for key in SLICE_KEYS:
            p = getattr(self, key)
            if p is None or not len(self.rows):
                continue  # a rank without rows holds no part of the global tensor
            out[f"{prefix}{key}"] = ShardedTensor(
                key=f"{prefix}{key}.layer{self.layer}",  # slices differ by layer: no stacked layer axis
                data=p,
                dtype=p.dtype,
                local_shape=tuple(p.shape),
                global_shape=(total, *p.shape[1:]),
                global_offset=(offset, *[0] * (p.dim() - 1)),
                axis_fragmentations=None,  # uneven: ranks hold different numbers of rows
                replica_id=(0, 0, dp_rank),
            )
        return out

    def extra_repr(self) -> str:
        spans = ", ".join(f"{a}:{b}" for a, b in self.ranges)
        return f"layer={self.layer}, trainable_rows=[{spans}], bias={self.head_bias is not None}"


def _local_kinds(tensor: TensorParallel, heads: list[int], kv: KVPolicy, rank: int) -> tuple[tuple[str, int], ...]:
    """Rows per kind (q/k/v) of one layer's selected ``heads`` that TP rank ``rank`` holds."""
    view = tensor.view
    out = []
    for kind in KINDS if kv == "group" else ("q",):
        index = sorted({h if kind == "q" else view.kv_head(h) for h in heads})
        blocks = [(b.start, b.stop) for b in (view.rows(kind, i) for i in index)]
        rows = sum(b - a for a, b in tensor.localize(MEGATRON_MODULE, rank, blocks))
        if rows:
            out.append((kind, rows))
    return tuple(out)


def _layers(model: nn.Module):
    """``(dotted name of linear_qkv, TransformerLayer)`` for every Megatron layer in ``model``."""
    for name, module in model.named_modules():
        qkv = getattr(getattr(module, "self_attention", None), MEGATRON_MODULE, None)
        if qkv is not None and hasattr(module, "layer_number"):
            yield f"{name}.self_attention.{MEGATRON_MODULE}".lstrip("."), module, qkv


def _check_layer(qkv: nn.Module, layer: int, rank: int, tp: int, expect: int, hidden: int) -> None:
    if isinstance(qkv, HeadRows):
        raise AlpsError("megatron apply: this model is already hooked; use a fresh model")
    if getattr(qkv, "sequence_parallel", False):
        raise AlpsError("megatron apply: sequence_parallel is not supported by the ALPS hook; set it to False")
    if getattr(qkv, "skip_bias_add", False) and getattr(qkv, "bias", None) is not None:
        raise AlpsError(
            "megatron apply: linear_qkv with skip_bias_add is not supported (megatron-core builds it without)"
        )
    if tuple(qkv.weight.shape) != (expect, hidden):
        raise AlpsError(
            f"megatron apply: layer {layer} linear_qkv shard is {tuple(qkv.weight.shape)}, the spec expects "
            f"({expect}, {hidden}) at tp rank {rank}/{tp}; the selection is for another model"
        )


def apply(
    model: nn.Module,
    selection: HeadSelection,
    *,
    kv: KVPolicy = "group",
    train_others: Iterable[str] | str = (),
    spec: AttentionSpec | None = None,
) -> HookReport:
    """Hook every ``linear_qkv`` of ``model`` (a GPTModel, TransformerBlock or any module tree of
    Megatron ``TransformerLayer``s) whose layer has selected rows on any TP rank; freeze the rest
    except ``train_others``.

    The global layer is Megatron's own ``layer_number`` (1-based, pipeline offsets included), the
    TP rank and size the module's ``tp_group``. ``spec`` defaults to one from the model's
    ``TransformerConfig`` (:func:`spec_from_config`).
    """
    layers = list(_layers(model))
    if not layers:
        raise AlpsError("megatron apply: no TransformerLayer with self_attention.linear_qkv in the model")
    spec = spec or spec_from_config(layers[0][1].config)
    selection.check_model(spec)
    group = _tp_group(layers[0][2])
    tp, rank = group.size(), group.rank()
    p = plan(spec, selection.heads, tp=tp, layout="megatron", kv=kv)
    expect = p.tensor.shard_sizes(MEGATRON_MODULE)[rank]
    for _, layer_module, qkv in layers:
        _check_layer(qkv, layer_module.layer_number - 1, rank, tp, expect, spec.hidden_size)
    hooked_layers = {e.layer for e in p.entries}
    others = others_to_train(model, {name for name, *_ in layers}, train_others)
    for param in model.parameters():
        param.requires_grad_(False)
    for param in others.values():
        param.requires_grad_(True)
    per_layer: dict[int, list[int]] = {}
    for layer, h in selection.heads:
        per_layer.setdefault(layer, []).append(h)
    hooked = []
    for name, layer_module, qkv in layers:
        layer = layer_module.layer_number - 1
        if layer not in hooked_layers:
            continue
        # Every TP rank of a hooked layer is wrapped (ranks without rows with a 0-row slice): the
        # delta's input all-reduces its gradient in backward, and ranks that skipped it would hang.
        ranges = next((e.rows for e in p.entries if e.layer == layer and e.tp_rank == rank), ())
        mod = MegatronHeadRows(qkv, ranges, layer)
        kinds = _local_kinds(p.tensor, per_layer[layer], kv, rank)
        info = HookedRows(
            name, layer, MEGATRON_MODULE, mod.ranges, kinds, mod.in_features, mod.head_bias is not None, rank, tp
        )
        mod.describe(info, selection, kv)
        set_submodule(model, name, mod)
        hooked.append(info)
    return HookReport("megatron", kv, tuple(hooked), {n: q.numel() for n, q in others.items()})
