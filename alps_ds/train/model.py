"""The run's base model: its local folder (configured, hub snapshot or built tiny), tokenizer, and the loaded LM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from alps_ds.errors import AlpsError
from alps_ds.fsutil import atomic_dir, claim_dir
from alps_ds.train.config import RunConfig
from alps_ds.train.distributed import on_rank0


def resolve_model_dir(cfg: RunConfig, out: Path, rank: int) -> Path:
    """A local folder with config.json and safetensors: the configured one, a hub snapshot, or a built tiny model."""
    path = cfg.model.path
    if path.startswith("tiny:"):
        target = out / "base"

        def build() -> None:
            if not (target / "config.json").exists():
                claim_dir(out, "train")
                build_tiny_base(path.removeprefix("tiny:"), target, seed=cfg.model.seed)

        on_rank0(build, rank)
        return target
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise AlpsError(f"model.path: {local} has no config.json; point to a Hugging Face model folder")
        from alps_ds.localize.reader import weight_shards

        try:  # the files from_pretrained will read, every header checked: a truncated shard is one line here
            shards = weight_shards(local)
        except AlpsError as e:
            raise AlpsError(f"model.path: {e}") from None
        if not shards:
            pickled = sorted(p.name for p in local.glob("*.bin"))
            what = f"only {pickled[0]}, a pickle that can run code" if pickled else "no weights"
            raise AlpsError(
                f"model.path: {local} has no *.safetensors ({what}); alps-ds trains and exports safetensors "
                "checkpoints only: re-save it with save_pretrained(safe_serialization=True)"
            )
        return local
    if local.exists():
        raise AlpsError(f"model.path: {path} is a file; point to the model's folder (config.json and safetensors)")
    if path.startswith((".", "/", "~")):
        raise AlpsError(f"model.path: {path} does not exist")
    from huggingface_hub import snapshot_download

    def fetch() -> str:
        try:
            return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        except Exception as e:
            raise AlpsError(f"model.path: {path!r} is not a local folder and the hub download failed ({e})") from e

    on_rank0(fetch, rank)  # downloaded once; the other ranks then find it in the cache
    return Path(fetch())


def build_tiny_base(family: str, target: Path, *, seed: int) -> None:
    """A tiny random ``family`` model with the offline byte tokenizer, written atomically to ``target``."""
    from alps_ds.tiny import build_model, save_model, tiny_config
    from alps_ds.train.tokenizer import BYTE_VOCAB, save_byte_tokenizer

    vocab = -(-BYTE_VOCAB // 64) * 64  # padded like real checkpoints, so it splits over tensor-parallel ranks
    model = build_model(tiny_config(family or "llama", vocab=vocab, max_positions=1024), seed=seed)
    with atomic_dir(target) as tmp:
        save_model(model, tmp)
        save_byte_tokenizer(tmp)


def check_token_ids(cfg: RunConfig, model_dir: Path, tokenizer, examples) -> None:
    """Every token id the tokenizer produced (and its pad id) must have a row in the model's embedding: a
    tokenizer for another model would fail deep in the forward pass (IndexError) or, on a GPU, crash the kernel."""
    from transformers import AutoConfig

    vocab = getattr(AutoConfig.from_pretrained(str(model_dir)).get_text_config(), "vocab_size", None)
    if not vocab:
        return
    top = max(max(e.input_ids) for e in examples)
    pad = tokenizer.pad_token_id
    worst = max(top, pad if pad is not None else -1)
    if worst >= vocab:
        key = "model.tokenizer" if cfg.model.tokenizer else "model.path"  # unset: the model folder's own tokenizer
        raise AlpsError(
            f"{cfg.where(key)}: {key}: the tokenizer of {cfg.model.tokenizer or model_dir} gives token id {worst} "
            f"but the model has {vocab} embeddings (vocab_size in {model_dir / 'config.json'}); "
            "set model.tokenizer to the tokenizer this model was trained with"
        )


def load_tokenizer(cfg: RunConfig, model_dir: Path):
    from transformers import AutoTokenizer

    name = cfg.model.tokenizer or str(model_dir)
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise AlpsError(
            f"model.tokenizer: no usable tokenizer at {name} ({type(e).__name__}); set model.tokenizer to a folder "
            "with tokenizer files"
        ) from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_dir: Path, ds_config: dict[str, Any], stage: int, dtype: torch.dtype):
    """The base causal LM in the training dtype; under ZeRO-3 built partitioned (zero.Init via HfDeepSpeedConfig)."""
    hf_ds = None
    if stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        # transformers builds under deepspeed.zero.Init (and loads the shards into the partitions)
        # while this object is alive; keep it on the model for the run's lifetime.
        hf_ds = HfDeepSpeedConfig(ds_config)
    model = _from_pretrained(model_dir, dtype)
    if hf_ds is not None:
        model._alps_hf_ds_config = hf_ds
    return model


def _from_pretrained(model_dir: Path, dtype: torch.dtype):
    """``from_pretrained``, with what it raises on a damaged checkpoint turned into one line naming the folder."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise AlpsError(
            f"model.path: {model_dir}: transformers cannot load this model ({type(e).__name__}: {first}); "
            "re-download or re-save it with save_pretrained"
        ) from e
