"""Every save of a hooked projection writes its trained rows in the standard keys.

:func:`register` is what a hooked module type calls once per instance: the module's own state-dict
hooks (:mod:`.state_dict`) and, since ZeRO-3 consolidation and DeepSpeed checkpoints bypass them, the
DeepSpeed engine wrappers (:mod:`.deepspeed`, installed once).
"""

from __future__ import annotations

from torch import nn

from alps_ds.integrations import deepspeed, state_dict


def register(module: nn.Module) -> None:
    state_dict.register_hooks(module)
    deepspeed.install()
