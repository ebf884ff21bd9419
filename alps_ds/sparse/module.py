"""`HeadRowsLinear`: a projection whose selected output rows are the only trainable part.

The original weight (and bias) stay registered as FROZEN parameters, so every ZeRO stage
treats them like any frozen weight (stage 3 still partitions them, none gets an fp32 master,
gradient or Adam state). One small trainable parameter holds the selected rows, and one more
holds their bias entries. The optimizer therefore only ever sees the slice: weight decay and
momentum cannot move any other row, which gradient masking cannot promise.

Forward and backward are one custom autograd function (:class:`HeadRowsMatmul`): the weight is
composed once (``W.index_copy(0, rows, W_rows)``, weight-sized, never activation-sized) for a
single matmul; backward computes the input gradient with the composed weight and the weight
gradient of the selected rows only (``grad_out[..., rows]^T @ x``), so no full-size weight
gradient is ever formed. Rows forming one range are sliced instead of indexed. See
``benchmarks/bench_hook.py`` for its cost against a frozen ``nn.Linear``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from alps_ds.errors import AlpsError
from alps_ds.hooked import HeadRows
from alps_ds.integrations import saving
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


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run a linear layer on ``x`` in, or None outside autocast."""
    dev = x.device.type
    if not torch.amp.is_autocast_available(dev) or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev) if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else None


def _compose(full: torch.Tensor, part: torch.Tensor, rows: torch.Tensor, span: tuple[int, int] | None):
    """A copy of ``full`` with its ``rows`` (dim 0) replaced by ``part``; one range is sliced, not indexed."""
    part = part.to(full.dtype)
    if span is None:
        return full.index_copy(0, rows, part)
    return torch.cat((full[: span[0]], part, full[span[1] :]))


def _columns(g: torch.Tensor, rows: torch.Tensor, span: tuple[int, int] | None) -> torch.Tensor:
    """The ``rows`` output channels of a 2-D gradient ``g``; one range is a view (no copy)."""
    return g[:, span[0] : span[1]] if span is not None else g.index_select(1, rows)


class HeadRowsMatmul(torch.autograd.Function):
    """``x W'^T + b'`` where ``W'``/``b'`` are the frozen weight/bias with ``rows`` replaced by the slices.

    Only ``x`` and the slices get gradients. The composed weight is not kept between forward and
    backward (it is rebuilt from the saved parameters, which ZeRO-3 re-gathers for backward), so
    the saved state is that of a plain linear layer. ``dtype`` is the autocast dtype (or None):
    under autocast the math runs in it and gradients come back in each input's own dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, head_weight, head_bias, rows, span, dtype):
        ctx.span = span
        ctx.dtypes = (x.dtype, head_weight.dtype, None if head_bias is None else head_bias.dtype)
        w = _compose(weight, head_weight, rows, span)
        b = None if bias is None else _compose(bias, head_bias, rows, span)
        if dtype is not None:
            x, w, b = x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)
        ctx.save_for_backward(x, weight, head_weight, rows)
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, head_weight, rows = ctx.saved_tensors
        x_dtype, hw_dtype, hb_dtype = ctx.dtypes
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(x.dtype)
        grad_x = grad_hw = grad_hb = None
        if ctx.needs_input_grad[0]:
            w = _compose(weight, head_weight, rows, ctx.span).to(x.dtype)
            grad_x = (g @ w).reshape(*grad_out.shape[:-1], w.shape[1]).to(x_dtype)
        g_rows = _columns(g, rows, ctx.span)
        if ctx.needs_input_grad[3]:
            grad_hw = (g_rows.t() @ x.reshape(-1, x.shape[-1])).to(hw_dtype)
        if ctx.needs_input_grad[4]:
            grad_hb = g_rows.sum(0).to(hb_dtype)
        return grad_x, None, None, grad_hw, grad_hb, None, None, None


class HeadRowsLinear(HeadRows):
    """``x W^T + b`` with rows ``ranges`` of W (and b) replaced by trainable ``head_weight`` (``head_bias``).

    ``weight``/``bias`` are the original parameter objects, frozen. ``kinds`` records how many
    of the selected rows are q, k or v (for reports and adapters); ``apply`` also records the
    module's :class:`~alps_ds.hooked.HookedRows`, selection and kv policy with ``describe``.
    """

    base_only = False  # set by alps_ds.base_weights(model)

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
        saving.register(self)  # save: trained rows merged into weight; load: split back (integrations)

    @property
    def num_rows(self) -> int:
        return sum(b - a for a, b in self.ranges)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.base_only:  # alps_ds.base_weights: the frozen base projection, e.g. DPO's reference
            return F.linear(x, self.weight, self.bias)
        if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
            raise AlpsError(
                "HeadRowsLinear: the base weight/bias must stay frozen (only head_weight/head_bias train); "
                "call merge(model) before training the whole projection"
            )
        span = self.ranges[0] if len(self.ranges) == 1 else None
        return HeadRowsMatmul.apply(
            x, self.weight, self.bias, self.head_weight, self.head_bias, self.rows, span, _autocast_dtype(x)
        )

    def merged_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Full weight and bias with the trained rows written in (call with full, gathered params)."""
        w = self.weight.detach().index_copy(0, self.rows, self.head_weight.detach().to(self.weight.dtype))
        b = None
        if self.bias is not None:
            b = self.bias.detach().index_copy(0, self.rows, self.head_bias.detach().to(self.bias.dtype))
        return w, b

    def unhook(self) -> nn.Module:
        """A plain ``nn.Linear`` on the same (frozen) parameters, the trained rows written in.

        Under ZeRO-3 the rows are gathered, written on rank 0 and re-partitioned (call on every rank).
        """
        with gathered([self.weight, self.bias, self.head_weight, self.head_bias], modify=True):
            w, b = self.merged_weight()
            with torch.no_grad():
                self.weight.data.copy_(w)
                if b is not None:
                    self.bias.data.copy_(b)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        spans = ", ".join(f"{a}:{b}" for a, b in self.ranges)
        return f"in={self.in_features}, out={self.out_features}, trainable_rows=[{spans}], bias={self.bias is not None}"


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
