"""HeadRowsLinear's custom autograd function against the plain reference ``x W'^T + b'`` with autograd.

``W'`` / ``b'`` are the frozen weight / bias with the selected rows replaced by the slices; the
reference differentiates through ``index_copy``, so its slice gradients are exactly the
selected rows of the full weight gradient. Checked for one row range (the slicing fast path)
and scattered rows (index ops), with and without bias, fp32/fp64/bf16, under bf16 autocast and
under both kinds of activation checkpointing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from alps_ds.errors import AlpsError
from alps_ds.sparse import reparametrize

ROWS = {"one range": [(5, 17)], "scattered": [(0, 2), (9, 12), (30, 31), (36, 40)]}
TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12), torch.bfloat16: (2e-2, 2e-2)}


def hooked(rows, dtype=torch.float32, bias=True, seed=0):
    """A hooked 24->40 projection whose slices differ from the base rows (as after some training)."""
    torch.manual_seed(seed)
    mod = reparametrize(nn.Linear(24, 40, bias=bias).to(dtype), rows)
    with torch.no_grad():
        mod.head_weight.add_(torch.randn_like(mod.head_weight))
        if bias:
            mod.head_bias.add_(torch.randn_like(mod.head_bias))
    return mod


def reference(mod, x):
    """``(y, x, head_weight, head_bias)`` of the plain formulation, leaves cloned from ``mod``/``x``."""
    x = x.detach().clone().requires_grad_(True)
    hw = mod.head_weight.detach().clone().requires_grad_(True)
    w = mod.weight.detach().index_copy(0, mod.rows, hw.to(mod.weight.dtype))
    hb = b = None
    if mod.bias is not None:
        hb = mod.head_bias.detach().clone().requires_grad_(True)
        b = mod.bias.detach().index_copy(0, mod.rows, hb.to(mod.bias.dtype))
    return F.linear(x, w, b), x, hw, hb  # autocast casts x, w, b alike when active


def assert_grads_match(mod, x, ref_x, ref_hw, ref_hb, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(mod.head_weight.grad, ref_hw.grad, rtol=rtol, atol=atol)
    if ref_hb is not None:
        torch.testing.assert_close(mod.head_bias.grad, ref_hb.grad, rtol=rtol, atol=atol)
    assert mod.weight.grad is None and (mod.bias is None or mod.bias.grad is None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("rows", list(ROWS), ids=list(ROWS))
@pytest.mark.parametrize("bias", [True, False])
def test_output_and_gradients_equal_the_reference(dtype, rows, bias):
    mod = hooked(ROWS[rows], dtype, bias)
    x = torch.randn(3, 7, 24, dtype=dtype, requires_grad=True)
    y = mod(x)
    y_ref, x_ref, hw_ref, hb_ref = reference(mod, x)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    assert y.dtype == dtype and y.shape == (3, 7, 40)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert_grads_match(mod, x, x_ref, hw_ref, hb_ref, dtype)
    # The slice gradient is nonzero only through the selected channels: with the other channels'
    # output gradient zeroed it is unchanged, and with the selected ones zeroed it vanishes.
    keep = torch.zeros(40, dtype=torch.bool)
    keep[mod.rows] = True
    for mask, expect in ((keep, mod.head_weight.grad.clone()), (~keep, torch.zeros_like(mod.head_weight))):
        mod.head_weight.grad = None
        mod(x).backward(grad * mask.to(dtype))
        torch.testing.assert_close(mod.head_weight.grad, expect, rtol=rtol, atol=atol)


def test_frozen_rows_stay_bit_identical_under_adamw_and_only_slices_move():
    mod = hooked(ROWS["scattered"])
    w0, b0 = mod.weight.detach().clone(), mod.bias.detach().clone()
    hw0 = mod.head_weight.detach().clone()
    opt = torch.optim.AdamW([p for p in mod.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        mod(torch.randn(8, 24)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(mod.weight, w0) and torch.equal(mod.bias, b0)
    assert (mod.head_weight != hw0).all()
    merged, _ = mod.merged_weight()
    keep = torch.ones(40, dtype=torch.bool)
    keep[mod.rows] = False
    assert torch.equal(merged[keep], w0[keep])


@pytest.mark.parametrize("rows", list(ROWS), ids=list(ROWS))
def test_bf16_autocast_matches_autocast_reference_and_keeps_fp32_gradients(rows):
    mod = hooked(ROWS[rows])  # fp32 parameters, bf16 math: what autocast training does
    x = torch.randn(4, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mod(x)
        y_ref, x_ref, hw_ref, hb_ref = reference(mod, x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)  # same bf16 operands, same single matmul
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert x.grad.dtype == mod.head_weight.grad.dtype == mod.head_bias.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, x_ref.grad.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(mod.head_weight.grad, hw_ref.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(mod.head_bias.grad, hb_ref.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_gives_the_same_gradients(reentrant):
    mod = hooked(ROWS["one range"])
    x = torch.randn(5, 24, requires_grad=True)
    leaves = (x, mod.head_weight, mod.head_bias)

    def grads(run):
        for t in leaves:
            t.grad = None
        run().sum().backward()
        return [t.grad.clone() for t in leaves]

    plain = grads(lambda: mod(x).tanh())
    calls = []
    handle = mod.register_forward_hook(lambda *_: calls.append(1))
    # tanh saves an activation inside the region, so non-reentrant checkpointing must recompute.
    got = grads(lambda: checkpoint(lambda t: mod(t).tanh(), x, use_reentrant=reentrant))
    handle.remove()
    assert len(calls) == 2, "checkpointing did not recompute the forward"
    for a, b in zip(got, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_no_grad_forward_and_a_trainable_base_weight_is_refused():
    mod = hooked(ROWS["scattered"])
    x = torch.randn(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), reference(mod, x)[0].detach())
    mod.weight.requires_grad_(True)
    with pytest.raises(AlpsError, match="must stay frozen"):
        mod(x)
