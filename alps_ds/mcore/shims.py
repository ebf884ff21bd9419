"""Stand-ins for the CUDA-only calls megatron-core 0.16 makes on the paths alps-ds uses, on a CPU (gloo) job.

megatron-core asks ``torch.cuda.current_device()`` for its buffers' device and forks a CUDA RNG
for tensor-parallel initialization and dropout. On a machine without CUDA :func:`cpu_shims`
points both at the CPU; with CUDA it does nothing.
"""

from __future__ import annotations

import contextlib
import types

import torch


def cpu_shims() -> None:
    """Make megatron-core's device and RNG-tracker calls use the CPU (no-op when CUDA is available)."""
    if torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None  # dist_checkpointing's save waits for the GPU

    class CPURNGTracker(mrandom.CudaRNGStatesTracker):
        """The tracker forks torch's CPU generator instead of a CUDA one."""

        def add(self, name, seed):
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()
            self.seeds_.add(seed)

        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            @contextlib.contextmanager
            def _fork():
                state = torch.get_rng_state()
                torch.set_rng_state(self.states_[name])
                try:
                    yield
                finally:
                    self.states_[name] = torch.get_rng_state()
                    torch.set_rng_state(state)

            return _fork()

    mrandom._CUDA_RNG_STATE_TRACKER = CPURNGTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _cpu_optimizer_tensors()


class _CPUTorch(types.ModuleType):
    """``torch`` for one megatron-core module, its ``device='cuda'`` scalars made on the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _make(fn):
        def make(*args, device=None, **kwargs):
            return fn(*args, device="cpu" if device in ("cuda", torch.device("cuda")) else device, **kwargs)

        return make


def _cpu_optimizer_tensors() -> None:
    """FP32Optimizer's loss scale (optimizer/optimizer.py), gradient clipping's norm buffers
    (optimizer/clip_grads.py) and the local multi-tensor L2 norm (utils.py) are
    ``torch.tensor(..., device='cuda')`` literals: give those modules a CPU ``torch``."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    proxy = _CPUTorch("torch")
    for name in ("tensor", "zeros"):
        setattr(proxy, name, _CPUTorch._make(getattr(torch, name)))
    optimizer.torch = clip_grads.torch = utils.torch = proxy
    optimizer.clip_grad_by_total_norm_fp32 = _clip_by_total_norm  # it asserts grad.type() is CUDA's


@torch.no_grad()
def _clip_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron-core's rule (scale every gradient by max_norm / (total_norm + 1e-6) when below 1), on CPU."""
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0:
        for p in parameters:
            grad = getattr(p, "decoupled_grad", None) if use_decoupled_grad else p.grad
            if grad is not None:
                grad.mul_(coeff)


def seed_model_parallel(seed: int) -> None:
    """Megatron's ``model_parallel_cuda_manual_seed`` (on CPU: the shimmed tracker's seeds)."""
    from megatron.core.tensor_parallel import random as mrandom

    if torch.cuda.is_available():
        mrandom.model_parallel_cuda_manual_seed(seed)
        return
    from megatron.core import parallel_state

    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + parallel_state.get_tensor_model_parallel_rank())
