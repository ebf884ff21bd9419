"""Tiny models built from a config, for the demo, the tests and the benchmarks.

Nothing is downloaded: every model here is ``AutoModelForCausalLM.from_config`` of a small
config of a supported family, saved with ``save_pretrained`` like any real checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from alps_ds.arch import FAMILIES, SUPPORTED_MODEL_TYPES
from alps_ds.errors import AlpsError


def tiny_config(
    model_type: str = "llama",
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int | None = 2,
    head_dim: int | None = None,
    bias: bool | None = None,
    vocab: int = 128,
    intermediate: int = 128,
    max_positions: int = 256,
):
    """A small ``transformers`` config of ``model_type``; ``kv_heads=None`` means plain MHA."""
    from transformers import AutoConfig

    if model_type not in SUPPORTED_MODEL_TYPES:
        raise AlpsError(f"model_type {model_type!r} unsupported; choose from {', '.join(SUPPORTED_MODEL_TYPES)}")
    kw = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        vocab_size=vocab,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    family = FAMILIES[model_type]
    if family.layout != "neox":  # neox configs have neither (one kv head per query head)
        kw["num_key_value_heads"] = kv_heads or heads
        kw["head_dim"] = head_dim or hidden // heads
    if bias is not None and family.bias is None:  # families with a fixed q/k/v bias have no such key
        kw["attention_bias"] = bias
    return AutoConfig.for_model(model_type, **kw)


def build_model(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised causal LM of ``config``, reproducible from ``seed``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype)


def save_model(model, path: str | os.PathLike, *, max_shard_size: str | int | None = None) -> Path:
    """``save_pretrained`` as safetensors; ``max_shard_size`` (e.g. ``"20KB"``) forces sharding."""
    path = Path(path)
    kwargs = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    return path
