"""``alps-ds export-lora``: write a head adapter as a standard PEFT LoRA adapter."""

from __future__ import annotations

import argparse

HELP = "write a head adapter as a PEFT LoRA adapter (exact by default; --rank R compresses by SVD)"
DESCRIPTION = (
    "Write --out as a standard PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) that "
    "reproduces the head adapter on its base exactly: per projection the update is zero outside the "
    "trained rows, so it factors as B @ A with A = the rows' change and B a one-hot row selector (rank = "
    "trained rows, scaling 1; q/k/v bias changes go in lora_B's bias). Load it with "
    "peft.PeftModel.from_pretrained(base, OUT) or any server that reads PEFT LoRA. The base rows are read "
    "from the base checkpoint; a base the adapter was not trained on is refused."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, metavar="DIR", help="adapter folder written by save_adapter")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder for the PEFT adapter")
    parser.add_argument(
        "--base", metavar="DIR", help="base model folder (safetensors); default: the one the adapter records"
    )
    parser.add_argument(
        "--rank",
        type=int,
        metavar="R",
        help="cap each module's rank at R by truncated SVD (smaller file, approximate; the error is printed)",
    )


def run(args: argparse.Namespace) -> int:
    from alps_ds.peft_lora import to_peft_lora

    result = to_peft_lora(args.adapter, args.out, base=args.base, rank=args.rank)
    ranks = sorted(result.ranks.values())
    print(
        f"exported {args.adapter} -> {result.out}: PEFT LoRA, {len(ranks)} modules, rank {ranks[0]}..{ranks[-1]}"
        + (", lora_bias" if result.lora_bias else "")
        + (f", modules_to_save: {len(result.modules_to_save)}" if result.modules_to_save else "")
    )
    if args.rank is None:
        print("exact: equals the head adapter merged into the base")
    else:
        worst = max(result.errors, key=result.errors.get)
        print(
            f"relative error (Frobenius, all modules): {result.relative_error:.6g}; "
            f"worst module {worst}: {result.errors[worst]:.6g}"
        )
    return 0
