"""megatron-core as an ``alps-ds train`` engine: HF <-> GPTModel conversion (:mod:`.convert`), CPU
shims for CUDA-only calls (:mod:`.shims`), Megatron's DDP/optimizer/checkpoints (:mod:`.engine`).

The ALPS hook itself is :mod:`alps_ds.parallel.megatron`. (Not named ``megatron``: running a file under
``alps_ds/`` as a script puts that folder on ``sys.path``, where such a package would shadow megatron-core.)
"""
