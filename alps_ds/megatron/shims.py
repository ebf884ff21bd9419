"""Stand-ins for the CUDA-only calls megatron-core 0.16 makes on the paths alps-ds uses, on a CPU (gloo) job.

megatron-core asks ``torch.cuda.current_device()`` for its buffers' device and forks a CUDA RNG
for tensor-parallel initialization and dropout. On a machine without CUDA :func:`cpu_shims`
points both at the CPU; with CUDA it does nothing.
"""

from __future__ import annotations

import contextlib

import torch


def cpu_shims() -> None:
    """Make megatron-core's device and RNG-tracker calls use the CPU (no-op when CUDA is available)."""
    if torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: "cpu"

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
