"""Cost of the base digest (alps_ds/digest.py) against hashing every Q/K/V byte, side by side in one run.

A synthetic safetensors checkpoint with Llama-3.1-70B's Q/K/V shapes (hidden 8192, 64 query heads,
8 kv heads, head_dim 128, bf16) for a few layers is written to a temporary folder; then, interleaved:
- digest: ``qkv_digest`` (the first row of every head block, 1/128 of the bytes, rounded to bf16);
- full: sha256 over every Q/K/V tensor's bytes, read the same way (plain reads, 64 MiB at a time).
Both read from the page cache (the file was just written), so the ratio is the CPU and syscall cost;
from a cold disk the full hash must also read all 13.4 GB of 70B's Q/K/V, the digest 105 MB.
Per-layer times are scaled to 80 layers.
usage: python benchmarks/bench_digest.py [--layers N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from alps_ds.arch import AttentionSpec
from alps_ds.digest import qkv_digest, qkv_tensor_names
from alps_ds.localize.reader import locate_tensors

CONFIG = {
    "model_type": "llama",
    "hidden_size": 8192,
    "num_hidden_layers": 0,  # set from --layers
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "attention_bias": False,
}


def write_checkpoint(root: Path, layers: int) -> int:
    """config.json + model.safetensors holding only the Q/K/V weights; returns their byte count."""
    cfg = {**CONFIG, "num_hidden_layers": layers}
    (root / "config.json").write_text(json.dumps(cfg))
    spec = AttentionSpec.from_config(cfg)
    gen = torch.Generator().manual_seed(0)
    tensors = {
        spec.weight_name(layer, m): torch.randn(spec.module_rows(m), spec.hidden_size, generator=gen).to(torch.bfloat16)
        for layer in range(layers)
        for m in spec.modules
    }
    save_file(tensors, str(root / "model.safetensors"))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def full_sha256(root: Path) -> str:
    spec = AttentionSpec.from_pretrained(root)
    infos = locate_tensors(root, qkv_tensor_names(spec), label="base")
    h = hashlib.sha256()
    with open(root / "model.safetensors", "rb", buffering=0) as f:
        for info in infos.values():
            f.seek(info.begin)
            left = info.end - info.begin
            while left:
                chunk = f.read(min(left, 64 << 20))
                h.update(chunk)
                left -= len(chunk)
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        nbytes = write_checkpoint(root, args.layers)
        fns = {"digest": lambda: qkv_digest(root), "full sha256": lambda: full_sha256(root)}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.repeat):
            for name, fn in fns.items():
                tic = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - tic)
    scale = 80 / args.layers
    print(
        f"{args.layers} layers of 70B Q/K/V ({nbytes / 1e6:.0f} MB bf16), median of {args.repeat}, scaled to 80 layers:"
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, t in med.items():
        print(f"  {name:12s} {t * 1e3:8.1f} ms here  -> {t * scale:7.2f} s for 70B")
    print(f"  ratio full / digest: {med['full sha256'] / med['digest']:.1f}x")


if __name__ == "__main__":
    main()
