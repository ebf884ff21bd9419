"""megatron-core as an ``alps-ds train`` engine: HF <-> GPTModel conversion (:mod:`.convert`), CPU
shims for CUDA-only calls (:mod:`.shims`), Megatron's DDP/optimizer/checkpoints (:mod:`.engine`).

The ALPS hook itself is :mod:`alps_ds.parallel.megatron`.
"""
