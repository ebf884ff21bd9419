"""``alps-ds merge``: write a base checkpoint with a head adapter merged in, shard by shard."""

from __future__ import annotations

import argparse

HELP = "merge a head adapter into a base HF checkpoint (shard by shard, no full model in memory)"
DESCRIPTION = (
    "Copy the base checkpoint to --out, rewriting only the safetensors shards that hold adapted Q/K/V "
    "tensors; every other file (shards, index, config, tokenizer) is copied byte for byte. The result "
    "is an ordinary Hugging Face checkpoint that loads without alps-ds."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, metavar="DIR", help="base model folder (safetensors)")
    parser.add_argument("--adapter", required=True, metavar="DIR", help="adapter folder written by save_adapter")
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output folder: new, empty, or an earlier merge output (replaced atomically)",
    )


def run(args: argparse.Namespace) -> int:
    from alps_ds.adapter import merge_adapter_into_checkpoint
    from alps_ds.fsutil import check_output_dir

    out = check_output_dir(args.out, flag="--out", command="merge", inputs=(args.base, args.adapter))
    out = merge_adapter_into_checkpoint(args.base, args.adapter, out)
    print(f"merged {args.adapter} into {args.base} -> {out}")
    return 0
