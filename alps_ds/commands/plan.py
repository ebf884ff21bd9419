"""``alps-ds plan``: will this job fit? Per-GPU memory of ALPS beside full fine-tuning and LoRA, with a verdict."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from alps_ds.argtypes import integer, number, ratio
from alps_ds.errors import AlpsError

HELP = "per-GPU memory of an ALPS job (vs full fine-tuning and LoRA) and whether it fits"
DESCRIPTION = (
    "Estimate per-GPU memory for frozen weights, trainable weights, gradients, fp32 master copies, AdamW "
    "states, ZeRO-3 gather buffers and activations, for ALPS (worst case of K = ceil(ratio * layers * heads) "
    "heads, or the heads of --heads), full fine-tuning and LoRA on Q/K/V, on the most loaded rank. "
    "Parameter counts are exact; the formulas are in docs/plan.md."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="CONFIG_OR_DIR", help="model folder, config.json or hub id")
    parser.add_argument("--ratio", type=ratio, default=0.1, help="fraction of heads ALPS trains (default 0.1)")
    parser.add_argument("--heads", metavar="HEADS_JSON", help="plan for this selection instead of the worst case")
    parser.add_argument("--kv", choices=("group", "none"), default="group", help="train K/V rows of selected heads")
    parser.add_argument("--train-others", nargs="*", default=[], metavar="PATTERN", help="modules trained in full")
    parser.add_argument("--zero", type=int, default=3, choices=(0, 1, 2, 3), help="ZeRO stage (default 3)")
    parser.add_argument("--offload", action="store_true", help="ZeRO optimizer offload: master + Adam in host RAM")
    parser.add_argument("--tp", type=integer(1), default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=integer(1), default=1, help="pipeline-parallel size")
    parser.add_argument("--dp", type=integer(1), help="data-parallel size (default: all GPUs / (tp * pp))")
    parser.add_argument("--nodes", type=integer(1), default=1, help="nodes (with --gpus-per-node gives the GPU count)")
    parser.add_argument("--gpus-per-node", type=integer(1), default=8)
    parser.add_argument("--gpu-mem", type=number(above=0), default=80.0, metavar="GIB", help="memory per GPU in GiB")
    parser.add_argument("--headroom", type=number(), default=0.1, help="fraction of GPU memory kept free (default 0.1)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="weight/gradient dtype")
    parser.add_argument("--seq-len", type=integer(1), default=4096)
    parser.add_argument("--micro-batch", type=integer(1), default=1)
    parser.add_argument(
        "--checkpointing", action=argparse.BooleanOptionalAction, default=True, help="activation checkpointing"
    )
    parser.add_argument("--lora-rank", type=integer(1), default=128)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def resolve_dp(args: argparse.Namespace) -> int:
    if args.dp is not None:
        return args.dp
    gpus = args.nodes * args.gpus_per_node
    if gpus % (args.tp * args.pp):
        raise AlpsError(
            f"{gpus} GPUs ({args.nodes} nodes x {args.gpus_per_node}) are not divisible by tp*pp = "
            f"{args.tp * args.pp}; change --nodes/--gpus-per-node or pass --dp"
        )
    return gpus // (args.tp * args.pp)


def build(args: argparse.Namespace):
    from alps_ds.arch import AttentionSpec
    from alps_ds.plan import Activation, Parallel, load_config, make_plan
    from alps_ds.selection import HeadSelection

    cfg = load_config(args.model)
    heads = None
    if args.heads:
        sel = HeadSelection.load(args.heads)
        sel.check_model(AttentionSpec.from_config(cfg), source=args.heads)
        heads = list(sel.heads)
    return make_plan(
        cfg,
        ratio=args.ratio,
        heads=heads,
        heads_source=args.heads,
        kv=args.kv,
        train_others=args.train_others,
        parallel=Parallel(tp=args.tp, pp=args.pp, dp=resolve_dp(args), zero=args.zero, offload=args.offload),
        activation=Activation(args.seq_len, args.micro_batch, args.checkpointing),
        dtype=args.dtype,
        gpu_mem_gib=args.gpu_mem,
        headroom=args.headroom,
        gpus_per_node=args.gpus_per_node,
        lora_rank=args.lora_rank,
    )


def run(args: argparse.Namespace) -> int:
    from alps_ds.plan import format_plan

    plan = build(args)
    if args.json:
        out = {
            "model_type": plan.model_type,
            "total_params": plan.total_params,
            "heads": plan.heads,
            "heads_source": plan.heads_source,
            "parallel": asdict(plan.parallel),
            "activation": asdict(plan.activation),
            "usable_bytes": int(plan.usable),
            "rows": [{**asdict(m), "total": m.total, "fits": m.total <= plan.usable} for m in plan.rows],
        }
        print(json.dumps(out, indent=1))
    else:
        print(format_plan(plan))
    return 0 if plan.rows[0].total <= plan.usable else 1
