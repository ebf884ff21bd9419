"""Base-model digest: tells whether an adapter or a training checkpoint belongs to a given base checkpoint.

Two models of the same shape (a base and its instruct variant, or the base and an ``OUT/merged``)
fit the same adapter, so shape checks cannot catch the swap. The digest is a sha256 over the first
row of every head block (rows 0, head_dim, 2*head_dim, ... : the first row of each q, k and v head
in every layout) of each layer's Q/K/V weights and biases, rounded to bf16, in layer order. Any
change to a head, which is what ALPS training makes, changes it; reading 1/head_dim of the Q/K/V
bytes keeps it cheap (see ``benchmarks/bench_digest.py``). Rounding to bf16 makes the same model
saved in fp32, bf16 or fp16 one base. A checkpoint is read straight from its safetensors files.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from alps_ds.arch import AttentionSpec
from alps_ds.errors import AlpsError

SCHEME = "qkv-head-rows-bf16/1"


def qkv_tensor_names(spec: AttentionSpec) -> list[str]:
    """Checkpoint keys of every layer's Q/K/V weights (and biases), in the order the digest reads them."""
    return [name for layer in range(spec.num_layers) for name in spec.tensor_names(layer)]


def qkv_digest(model_dir: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a safetensors checkpoint folder's Q/K/V head rows (see the module docstring)."""
    from alps_ds.localize.reader import locate_tensors, read_rows

    root = Path(model_dir)
    spec = AttentionSpec.from_pretrained(root)
    names = qkv_tensor_names(spec)
    infos = locate_tensors(root, names, label="base")
    h = hashlib.sha256(SCHEME.encode())
    for name in names:
        info = infos[name]
        rows = read_rows(info, [(r, r + 1) for r in range(0, info.shape[0], spec.head_dim)])
        h.update(json.dumps([name, list(info.shape)]).encode())
        h.update(rows.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return f"sha256:{h.hexdigest()}"


def base_record(model_dir: str | os.PathLike) -> dict[str, Any]:
    """What an adapter or checkpoint stores about its base: the folder (informational) and the digest."""
    return {"path": str(Path(model_dir).resolve()), "scheme": SCHEME, "qkv_digest": qkv_digest(model_dir)}


def model_base_dir(model) -> Path | None:
    """The local safetensors folder ``model`` was loaded from with ``from_pretrained``, or None (built in
    code, loaded from a hub id, or the folder is gone)."""
    from alps_ds.localize.reader import INDEX_FILE, SINGLE_FILE

    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    path = Path(name) if name else None
    if path is None or not (path / "config.json").is_file():
        return None
    return path if (path / INDEX_FILE).is_file() or (path / SINGLE_FILE).is_file() else None


def check_base(
    recorded: dict[str, Any] | None,
    base_dir: str | os.PathLike,
    *,
    owner: str,
    fix: str = "use the base it was trained on",
    found: str | None = None,
) -> None:
    """Refuse ``base_dir`` unless its digest (``found``, computed when not given) equals ``recorded``,
    what ``owner`` (a file or folder) was trained on. Nothing recorded (written before alps-ds kept
    digests): accepted as before."""
    if recorded is None:
        return
    if not isinstance(recorded, dict) or not isinstance(recorded.get("qkv_digest"), str):
        raise AlpsError(f"{owner}: 'base' record malformed (needs 'qkv_digest'); save it again")
    if recorded.get("scheme") != SCHEME:
        raise AlpsError(
            f"{owner}: base digest scheme {recorded.get('scheme')!r} unknown (this alps-ds: {SCHEME}); upgrade"
        )
    found = found or qkv_digest(base_dir)
    if found != recorded["qkv_digest"]:
        path = recorded.get("path")
        raise AlpsError(
            f"{owner}: trained on another base than {base_dir} (Q/K/V digest {recorded['qkv_digest'][:19]}... "
            f"recorded, {found[:19]}... found there); {fix}" + (f" ({path})" if isinstance(path, str) else "")
        )
