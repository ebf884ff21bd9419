"""The training engines ``alps-ds train`` can run (config key ``engine``), defined once here."""

from __future__ import annotations

from typing import Literal, get_args

Engine = Literal["deepspeed", "megatron"]
ENGINES: tuple[str, ...] = get_args(Engine)
