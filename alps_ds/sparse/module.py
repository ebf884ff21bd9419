"""`HeadRowsLinear`: a projection whose selected output rows are the only trainable part.

The original weight (and bias) stay registered as FROZEN parameters, so every ZeRO stage
treats them like any frozen weight (stage 3 still partitions them, none gets an fp32 master,
gradient or Adam state). One small trainable parameter holds the selected rows, and one more
holds their bias entries. The optimizer therefore only ever sees the slice: weight decay and
momentum cannot move any other row, which gradient masking cannot promise.

Forward is ``y = x W^T + b`` followed by overwriting the selected output channels with
``x W_rows^T + b_rows``. Measured against composing the weight every step
(``W.index_copy(0, rows, W_rows)`` then one matmul, see ``benchmarks/bench_hook.py``), the
extra slice matmul never materialises a full-size weight gradient, so backward is cheaper.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from alps_ds.errors import AlpsError
from alps_ds.layout import merge_ranges

Ranges = tuple[tuple[int, int], ...]


def _is_partitioned(p: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter (its local tensor is empty until gathered)."""
    return hasattr(p, "ds_id")


_GATHER_DEPTH = "_ds_z3_gathered_param_context_depth"  # DeepSpeed's mark of a param inside GatheredParameters


@contextlib.contextmanager
def gathered(params: Sequence[torch.Tensor], *, modify: bool = False):
    """Context giving full values of ZeRO-3 ``params`` (read-only unless ``modify``); a no-op otherwise.

    With ``modify`` rank 0's edits are broadcast to every rank and re-partitioned on exit. Params an
    outer ``GatheredParameters`` of the caller already holds are not gathered again (DeepSpeed refuses
    nested contexts over one param); edits to them are written into their partitions here, so they
    last whatever the outer context does on exit.
    """
    params = [p for p in params if p is not None and _is_partitioned(p)]
    outer = [p for p in params if getattr(p, _GATHER_DEPTH, 0) > 0]
    fresh = [p for p in params if getattr(p, _GATHER_DEPTH, 0) == 0]
    if fresh:
        import deepspeed

        context = deepspeed.zero.GatheredParameters(fresh, modifier_rank=0 if modify else None)
    else:
        context = contextlib.nullcontext()
    with context:
        yield
        if modify and outer:
            _write_partitions(outer)


def _write_partitions(params: Sequence[torch.Tensor]) -> None:
    """Rank 0's full value of each gathered ZeRO-3 param, broadcast and copied into every rank's partition."""
    import torch.distributed as dist

    for p in params:
        group = p.ds_process_group
        dist.broadcast(p.data, src=dist.get_global_rank(group, 0), group=group)
        part = p.ds_tensor
        size = int(part.ds_numel)
        start = dist.get_rank(group=group) * size
        flat = p.data.reshape(-1)
        count = max(0, min(size, flat.numel() - start))
        with torch.no_grad():
            part.data[:count].copy_(flat[start : start + count])


def full_numel(p: torch.Tensor) -> int:
    """Element count of a parameter, also when ZeRO-3 holds only a partition of it locally."""
    return int(p.ds_numel) if _is_partitioned(p) else p.numel()


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """Shape of a parameter, also when ZeRO-3 holds only a partition of it locally."""
    return tuple(p.ds_shape) if _is_partitioned(p) else tuple(p.shape)


def row_index(ranges: Ranges, device: torch.device | str | None = None) -> torch.Tensor:
    """The row indices of half-open ``ranges`` as one int64 tensor on ``device``."""
    return torch.cat([torch.arange(a, b, device=device) for a, b in ranges])


def as_ranges(rows: Sequence[int] | Sequence[tuple[int, int]], limit: int) -> Ranges:
    """Normalize row indices or half-open ``(start, stop)`` ranges to sorted, merged ranges."""
    items = list(rows)
    if not items:
        raise AlpsError("reparametrize: no rows given; leave a module without selected rows frozen instead")
    if all(isinstance(r, int) and not isinstance(r, bool) for r in items):
        pairs = [(r, r + 1) for r in items]
    elif all(isinstance(r, (tuple, list)) and len(r) == 2 for r in items):
        pairs = [(int(a), int(b)) for a, b in items]
    else:
        raise AlpsError("reparametrize: rows must be ints or (start, stop) pairs, not a mix")
    for a, b in pairs:
        if not 0 <= a < b <= limit:
            raise AlpsError(f"reparametrize: row range [{a}, {b}) outside the weight's {limit} rows")
    return merge_ranges(pairs)


class HeadRowsLinear(nn.Module):
    """``x W^T + b`` with rows ``ranges`` of W (and b) replaced by trainable ``head_weight`` (``head_bias``).

    ``weight``/``bias`` are the original parameter objects, frozen. ``kinds`` records how many
    of the selected rows are q, k or v (for reports and adapters).
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        ranges: Ranges,
        head_weight: torch.Tensor,
        head_bias: torch.Tensor | None,
        kinds: tuple[tuple[str, int], ...] = (),
    ):
        super().__init__()
        self.out_features, self.in_features = full_shape(weight)
        weight.requires_grad_(False)
        self.weight = weight
        if bias is not None:
            bias.requires_grad_(False)
        self.register_parameter("bias", bias)
        self.ranges = ranges
        self.kinds = kinds
        self.head_weight = nn.Parameter(head_weight, requires_grad=True)
        self.head_bias = None if head_bias is None else nn.Parameter(head_bias, requires_grad=True)
        # Not persistent: a state_dict of the hooked model holds weights only; ranges travel in adapters.
        # On the slice's device: index_copy refuses an index on another device, and DeepSpeed does
        # not move a model built under zero.Init (so a CPU buffer would stay behind the GPU weights).
        self.register_buffer("rows", row_index(ranges, head_weight.device), persistent=False)

    @property
    def num_rows(self) -> int:
        return sum(b - a for a, b in self.ranges)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        y_rows = F.linear(x, self.head_weight, self.head_bias)
        return y.index_copy(-1, self.rows, y_rows.to(y.dtype))

    def merged_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Full weight and bias with the trained rows written in (call with full, gathered params)."""
        w = self.weight.detach().index_copy(0, self.rows, self.head_weight.detach().to(self.weight.dtype))
        b = None
        if self.bias is not None:
            b = self.bias.detach().index_copy(0, self.rows, self.head_bias.detach().to(self.bias.dtype))
        return w, b

    def extra_repr(self) -> str:
        spans = ", ".join(f"{a}:{b}" for a, b in self.ranges)
        return f"in={self.in_features}, out={self.out_features}, trainable_rows=[{spans}], bias={self.bias is not None}"


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (``model.layers.0.self_attn.q_proj``) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def reparametrize(
    linear: nn.Module, rows: Sequence[int] | Sequence[tuple[int, int]], *, kinds: tuple[tuple[str, int], ...] = ()
) -> HeadRowsLinear:
    """A :class:`HeadRowsLinear` that trains only ``rows`` of ``linear`` (LOCAL row indices of its weight).

    ``linear`` may be any module computing ``x @ weight.T + bias`` with a 2-D ``.weight`` and an
    optional ``.bias`` (``nn.Linear``, a tensor-parallel shard such as DeepSpeed's ``LinearLayer``
    whose collective lives outside the row math); its parameter objects are reused, frozen. Under
    ZeRO-3 the rows are read inside ``GatheredParameters``; the new slice parameters are plain
    tensors that ``deepspeed.initialize`` partitions (call this outside a ``zero.Init`` context).
    """
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, torch.Tensor) or len(full_shape(weight)) != 2:
        raise AlpsError(f"reparametrize: {type(linear).__name__} has no 2-D .weight; expected a linear layer")
    bias = getattr(linear, "bias", None)
    if bias is not None and not isinstance(bias, torch.Tensor):
        bias = None
    ranges = as_ranges(rows, full_shape(weight)[0])
    with gathered([weight, bias]):
        head_weight = weight.detach().index_select(0, row_index(ranges, weight.device)).clone()
        head_bias = None if bias is None else bias.detach().index_select(0, row_index(ranges, bias.device)).clone()
    return HeadRowsLinear(weight, bias, ranges, head_weight, head_bias, kinds)
