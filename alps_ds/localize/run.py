"""Stream base and task checkpoints layer by layer and score every attention head.

Memory stays near one layer's Q/K/V of both models: the next layer is read on a
background thread (file reads release the GIL) while the current one is scored, so at
most two layers per model are held, plus the scorer's bounded working set.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from alps_ds.arch import AttentionSpec
from alps_ds.errors import AlpsError
from alps_ds.localize.reader import CheckpointReader
from alps_ds.localize.score import DEFAULT_MAX_ELEMENTS, LayerScorer, resolve_device
from alps_ds.localize.vocab import DEFAULT_DTYPE, DEFAULT_HEAD_REPR, DEFAULT_METRIC


@dataclass(frozen=True)
class LocalizeResult:
    """Scores of every query head (layers x heads, float64) and what it took."""

    spec: AttentionSpec
    scores: np.ndarray
    seconds: float
    bytes_read: int
    device: str


def open_pair(base: str, task: str, *, allow_pickle: bool = False) -> tuple[CheckpointReader, CheckpointReader]:
    """Open both checkpoints (headers only) and check they describe the same architecture.

    Each reader has checked every Q/K/V tensor's shape against its config, so equal
    fingerprints mean equal tensor shapes.
    """
    rb = CheckpointReader.open(base, label="base", allow_pickle=allow_pickle)
    rt = CheckpointReader.open(task, label="task", allow_pickle=allow_pickle)
    diff = rb.spec.fingerprint.diff(rt.spec.fingerprint)
    if diff:
        raise AlpsError(
            f"base {base} and task {task} are different architectures ({'; '.join(diff)}; base vs task); "
            "the task model must be a fine-tune of the base"
        )
    return rb, rt


def _read_layer(reader: CheckpointReader, layer: int) -> dict[str, torch.Tensor]:
    weights = reader.layer(layer)
    for module, w in weights.items():
        # min and max propagate NaN and are inf iff an entry is: one pass, no temporary the size of w
        # (isfinite(w).all() allocates and runs several kernels; a float64 sum of bf16 was 100x slower).
        lo, hi = torch.aminmax(w)
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            name = reader.spec.weight_name(layer, module)
            raise AlpsError(
                f"{reader.label} {reader.dir}: tensor {name!r} holds NaN or inf; the checkpoint is corrupt "
                "(re-download it or fix the training run that wrote it)"
            )
    return weights


def localize_scores(
    base: str,
    task: str,
    *,
    head_repr: str = DEFAULT_HEAD_REPR,
    metric: str = DEFAULT_METRIC,
    dtype: str = DEFAULT_DTYPE,
    device: str = "auto",
    progress: bool = True,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    allow_pickle: bool = False,
) -> LocalizeResult:
    """Score all heads of ``task`` against ``base`` (paths or hub ids).

    ``allow_pickle``: also read pytorch_model.bin checkpoints, through torch.load(weights_only=True).
    """
    start = time.perf_counter()
    dev = resolve_device(device)
    rb, rt = open_pair(base, task, allow_pickle=allow_pickle)
    spec = rb.spec
    scorer = LayerScorer(spec, head_repr=head_repr, metric=metric, dtype=dtype, device=dev, max_elements=max_elements)
    scores = np.zeros((spec.num_layers, spec.num_heads), dtype=np.float64)

    def read(layer: int):
        return _read_layer(rb, layer), _read_layer(rt, layer)

    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="alps-read") as pool:
        pending = pool.submit(read, 0)
        for layer in tqdm(range(spec.num_layers), desc="localize", unit="layer", disable=not progress):
            wb, wt = pending.result()
            if layer + 1 < spec.num_layers:
                pending = pool.submit(read, layer + 1)
            scores[layer] = scorer.score(layer, wb, wt)
            del wb, wt
    return LocalizeResult(spec, scores, time.perf_counter() - start, rb.bytes_read + rt.bytes_read, str(dev))
