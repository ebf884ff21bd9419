"""Head representations and distances of ALPS scoring (ALPS_METHOD.md, paper eq. 5-7).

Everything works on all heads of one layer at once (in chunks of heads that bound
memory) as batched torch ops, on the CPU or a GPU. Head vectors are formed in float32
(float64 when asked for), turned into distributions and compared in float64: a head
vector has up to millions of entries of size ~1/N, and W1 sums N cumulative differences.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from alps_ds.arch import AttentionSpec, Kind
from alps_ds.errors import AlpsError, check_choice
from alps_ds.localize.vocab import DEFAULT_DTYPE, DEFAULT_HEAD_REPR, DEFAULT_METRIC, HEAD_REPRS, METRICS, SCORE_DTYPES

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in SCORE_DTYPES}
KL_EPS = 1e-8
# (stored, --dtype) pairs where the cast changes no value, so no rounding copy is needed.
_EXACT_CASTS = {(a, a) for a in DTYPES.values()} | {
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.float64),
    (torch.float16, torch.float32),
    (torch.float16, torch.float64),
    (torch.float32, torch.float64),
}
# Entries of one [heads, N] block (64 MiB in float64; three such buffers): bounds the scoring
# working set independently of model size (a 70B head has N = 1M entries: 8 heads per chunk).
DEFAULT_MAX_ELEMENTS = 1 << 23


def resolve_device(name: str, *, source: str = "device") -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU. Errors name ``source``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AlpsError(f"{source} {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AlpsError(f"{source} {name}: CUDA is not available here; use cpu or auto")
    # torch.device does not check the index; the first allocation would fail with a traceback.
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise AlpsError(f"{source} {name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 and up")
    if device.type not in ("cpu", "cuda"):
        raise AlpsError(f"{source} {name}: only cpu and cuda are supported")
    return device


def vector_length(spec: AttentionSpec, head_repr: str) -> int:
    """N, the entries of one head's vector: d*hd (product) or 3*hd*d (qkv-concat)."""
    return spec.hidden_size * spec.head_dim * (1 if head_repr == "product" else 3)


def _blocks(spec: AttentionSpec, weights: dict[str, torch.Tensor], kind: Kind, count: int) -> torch.Tensor:
    """[count, hd, d]: the row blocks of ``kind`` heads 0..count-1, located by ``spec.rows``.

    Every supported layout places a kind's heads at a constant row stride (hd for
    separate/fused, 3*hd for neox), so this is a strided view without a copy.
    """
    rows = [spec.rows(kind, i) for i in range(count)]
    w = weights[rows[0].module]
    hd, d = spec.head_dim, w.shape[1]
    step = rows[1].start - rows[0].start if count > 1 else hd
    if w.is_contiguous() and all(r.start == rows[0].start + i * step for i, r in enumerate(rows)):
        return w.as_strided((count, hd, d), (step * d, d, 1), w.storage_offset() + rows[0].start * d)
    return torch.stack([w[r.start : r.stop] for r in rows])


Buffer = Callable[[tuple, torch.Size, torch.dtype], torch.Tensor]


def _fresh(key: tuple, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass
class LayerHeads:
    """One layer's Q [n, hd, d] (as stored), K and V [g, hd, d] in the compute dtype, and K_j V_j^T.

    Q is widened to the compute dtype one chunk of heads at a time: it is the bulk of a
    layer (n/g times K), and a full widened copy would double the layer's footprint.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    group_size: int
    compute: torch.dtype
    buffer: Buffer
    kv_products: torch.Tensor | None = None

    @classmethod
    def from_weights(
        cls,
        spec: AttentionSpec,
        weights: dict[str, torch.Tensor],
        *,
        head_repr: str,
        compute: torch.dtype,
        buffer: Buffer | None = None,
        side: str = "",
    ) -> LayerHeads:
        """``buffer(key, shape, dtype)`` supplies reusable memory (default: fresh tensors)."""
        device = next(iter(weights.values())).device
        buf = buffer or (lambda key, shape, dtype: _fresh(key, shape, dtype, device))

        def widened(kind: Kind, count: int) -> torch.Tensor:
            block = _blocks(spec, weights, kind, count)
            return block if block.dtype == compute else buf((side, kind), block.shape, compute).copy_(block)

        q = _blocks(spec, weights, "q", spec.num_heads)
        k, v = widened("k", spec.num_kv_heads), widened("v", spec.num_kv_heads)
        kvp = None
        if head_repr == "product":
            # K_j V_j^T is [hd, hd]: Q_h^T (K_j V_j^T) costs d*hd*hd per head instead of d*d*hd.
            # One product per query head (repeated over its group), so chunks slice it.
            kvp = torch.bmm(k, v.transpose(1, 2)).repeat_interleave(spec.group_size, dim=0)
        return cls(q, k, v, spec.group_size, compute, buf, kvp)

    def vectors(self, heads: range, out: torch.Tensor) -> torch.Tensor:
        """Write the [len(heads), N] head vectors (row-major flattening, paper eq. 6) into ``out``."""
        c = len(heads)
        q = self.q[heads.start : heads.stop]
        if q.dtype != self.compute:
            q = self.buffer(("q-chunk", c), q.shape, self.compute).copy_(q)
        if self.kv_products is not None:
            # W_o^h = Q_h^T (K_j V_j^T): [d, hd]
            kvp = self.kv_products[heads.start : heads.stop]
            torch.bmm(q.transpose(1, 2), kvp, out=out.view(c, q.shape[2], q.shape[1]))
        else:
            kv = torch.arange(heads.start, heads.stop, device=q.device) // self.group_size
            torch.cat([q.reshape(c, -1), self.k[kv].reshape(c, -1), self.v[kv].reshape(c, -1)], dim=1, out=out)
        return out


# exp() overflows float64 above ~709; below this bound no shift is needed (softmax is shift invariant).
_EXP_SAFE = 600.0


def exp_rows(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` = exp(x - shift) row-wise in float64; returns the row sums (softmax = out / sums).

    The shift (the row max, as in log-sum-exp) is applied only when some row reaches
    magnitudes where exp would overflow or underflow entirely: it costs a full pass.
    """
    hi = x.amax(dim=1, keepdim=True)
    out.copy_(x)
    if hi.abs().max() > _EXP_SAFE:
        out.sub_(hi.to(out.dtype))
    out.exp_()
    return out.sum(dim=1, keepdim=True)


def w1_from_exps(eb: torch.Tensor, sb: torch.Tensor, et: torch.Tensor, st: torch.Tensor, *, unit: bool):
    """W1 on a shared sorted support from unnormalized exps and their row sums. Clobbers both.

    W1 = sum_{i<N-1} |F_B(i) - F_T(i)| * step, F = cumulative sum. With e_B, e_T the exps,
    S_T (P_T - P_B) = e_T - (S_T / S_B) e_B is one fused pass, and a single cumsum of the
    difference (in float64) avoids subtracting two cumulative sums that both approach 1.
    """
    n = eb.shape[1]
    et.addcmul_(eb, st / sb, value=-1)
    cdf = torch.cumsum(et, dim=1, out=eb)
    total = torch.linalg.vector_norm(cdf[:, :-1], ord=1, dim=1) / st.squeeze(1)
    return total / (n - 1) if unit and n > 1 else total


def distance(pb: torch.Tensor, pt: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-row kl, js, cosine or euclidean distance between base and task distributions ([c, N]
    float64 each; W1 is :func:`w1_from_exps`, which needs no normalized copy). kl overwrites both."""
    if metric == "kl":
        # KL(P_T || P_B) with eps added to both and renormalized, as the paper's ablation.
        pt += KL_EPS
        pt /= pt.sum(dim=1, keepdim=True)
        pb += KL_EPS
        pb /= pb.sum(dim=1, keepdim=True)
        return (pt * (pt.log() - pb.log())).sum(dim=1)
    if metric == "js":
        m = (pb + pt) * 0.5
        # 0 * log 0 = 0; m > 0 wherever either distribution is.
        kb = torch.where(pb > 0, pb * (pb / m).log(), 0.0).sum(dim=1)
        kt = torch.where(pt > 0, pt * (pt / m).log(), 0.0).sum(dim=1)
        return 0.5 * (kb + kt)
    if metric == "cosine":
        dot = (pb * pt).sum(dim=1)
        return 1.0 - dot / (pb.norm(dim=1) * pt.norm(dim=1))
    if metric == "euclidean":
        return (pb - pt).norm(dim=1)
    raise AlpsError(f"metric {metric!r} is unknown; choose one of {', '.join(METRICS)}")


class LayerScorer:
    """Scores every query head of a layer, given the base and task layer's Q/K/V weights."""

    def __init__(
        self,
        spec: AttentionSpec,
        *,
        head_repr: str = DEFAULT_HEAD_REPR,
        metric: str = DEFAULT_METRIC,
        dtype: str = DEFAULT_DTYPE,
        device: torch.device | str = "cpu",
        max_elements: int = DEFAULT_MAX_ELEMENTS,
    ):
        check_choice("head_repr", head_repr, HEAD_REPRS)
        check_choice("metric", metric, METRICS)
        check_choice("dtype", dtype, SCORE_DTYPES)
        self.spec = spec
        self.head_repr = head_repr
        self.metric = metric
        self.dtype = DTYPES[dtype]
        self.dtype_name = dtype
        # Products are formed in float32 from the rounded weights (float64 when asked), so
        # scores do not depend on how a platform accumulates half-precision matmuls.
        self.compute = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.length = vector_length(spec, head_repr)
        self.chunk = max(1, max_elements // self.length)
        # Buffers reused across chunks and layers: first touch of fresh multi-MB allocations costs
        # a page fault per 4 KiB, which on the VMs we measured took longer than the arithmetic.
        self._cache: dict[tuple, torch.Tensor] = {}

    def _buffer(self, key: tuple, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        b = self._cache.get(key)
        if b is None or b.shape != shape or b.dtype != dtype:
            b = self._cache[key] = torch.empty(shape, dtype=dtype, device=self.device)
        return b

    def _prepare(self, weights: dict[str, torch.Tensor], side: str) -> LayerHeads:
        """Move to the device and round to --dtype (into reused buffers, only when needed).

        A float16 cast can overflow to inf; that surfaces as a non-finite score (checked in score()).
        """
        ready = {}
        for module, w in weights.items():
            if w.device != self.device:
                w = self._buffer((side, module, "device"), w.shape, w.dtype).copy_(w)
            # Rounding is the identity when --dtype holds every value of the stored dtype (bf16 ->
            # float32, ...): then no full-layer copy is made; Q is widened chunk by chunk later.
            if (w.dtype, self.dtype) not in _EXACT_CASTS:
                w = self._buffer((side, module, "dtype"), w.shape, self.dtype).copy_(w)
            ready[module] = w
        return LayerHeads.from_weights(
            self.spec, ready, head_repr=self.head_repr, compute=self.compute, buffer=self._buffer, side=side
        )

    @torch.no_grad()
    def score(self, layer: int, base: dict[str, torch.Tensor], task: dict[str, torch.Tensor]) -> np.ndarray:
        """[n] float64 scores of the query heads of ``layer``."""
        hb = self._prepare(base, "base")
        ht = self._prepare(task, "task")
        n = self.spec.num_heads
        out = torch.empty(n, dtype=torch.float64, device=self.device)
        for start in range(0, n, self.chunk):
            heads = range(start, min(n, start + self.chunk))
            shape = torch.Size((min(n, self.chunk), self.length))
            x, eb, et = (
                self._buffer(("work", name), shape, dtype)[: len(heads)]
                for name, dtype in (("x", self.compute), ("eb", torch.float64), ("et", torch.float64))
            )
            sb = exp_rows(hb.vectors(heads, x), eb)
            st = exp_rows(ht.vectors(heads, x), et)
            if self.metric in ("w1", "w1-index"):
                result = w1_from_exps(eb, sb, et, st, unit=self.metric == "w1")
            else:
                result = distance(eb.div_(sb), et.div_(st), self.metric)
            out[heads.start : heads.stop] = result
        scores = out.cpu().numpy()
        if not np.isfinite(scores).all():
            bad = [h for h in range(n) if not math.isfinite(scores[h])]
            raise AlpsError(
                f"layer {layer} heads {bad}: score is not finite (weights or head matrices overflow dtype "
                f"{self.dtype_name}); score in dtype float32 or float64"
            )
        return scores
