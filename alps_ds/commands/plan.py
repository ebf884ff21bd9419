"""``alps-ds plan``: will this job fit? Per-GPU memory of ALPS beside full fine-tuning and LoRA, with a verdict."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from alps_ds.argtypes import integer, number, ratio
from alps_ds.errors import AlpsError
from alps_ds.layout import KV_POLICIES
from alps_ds.train.config import DEFAULT_ZERO_STAGE, ZERO_STAGES

HELP = "per-GPU memory of an ALPS job (vs full fine-tuning and LoRA) and whether it fits"
DESCRIPTION = (
    "Estimate per-GPU memory for frozen weights, trainable weights, gradients, fp32 master copies, AdamW "
    "states, ZeRO-3 gather buffers and activations, for ALPS (worst case of K = ceil(ratio * layers * heads) "
    "heads, or the heads of --heads), full fine-tuning and LoRA on Q/K/V, on the most loaded rank. "
    "Parameter counts are exact; the formulas are in docs/plan.md."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="RUN.yaml",
        help="take model, heads, kv, train_others, parallel.tp, ZeRO stage, dtype, sequence length and micro "
        "batch from this alps-ds train run config (options given here override, --tp must agree)",
    )
    parser.add_argument("--model", metavar="CONFIG_OR_DIR", help="model folder, config.json or hub id")
    parser.add_argument("--ratio", type=ratio, help="fraction of heads ALPS trains (default 0.1)")
    parser.add_argument("--heads", metavar="HEADS_JSON", help="plan for this selection instead of the worst case")
    parser.add_argument("--kv", choices=KV_POLICIES, help="train K/V rows of selected heads (default group)")
    parser.add_argument("--train-others", nargs="*", metavar="PATTERN", help="modules trained in full")
    parser.add_argument(
        "--zero",
        type=int,
        choices=ZERO_STAGES,
        help=f"ZeRO stage (default {DEFAULT_ZERO_STAGE}, as alps-ds train without a DeepSpeed config)",
    )
    parser.add_argument("--offload", action="store_true", help="ZeRO optimizer offload: master + Adam in host RAM")
    parser.add_argument("--tp", type=integer(1), help="tensor-parallel size (default 1)")
    parser.add_argument("--pp", type=integer(1), default=1, help="pipeline-parallel size")
    parser.add_argument("--dp", type=integer(1), help="data-parallel size (default: all GPUs / (tp * pp))")
    parser.add_argument("--nodes", type=integer(1), default=1, help="nodes (with --gpus-per-node gives the GPU count)")
    parser.add_argument("--gpus-per-node", type=integer(1), default=8)
    parser.add_argument("--gpu-mem", type=number(above=0), default=80.0, metavar="GIB", help="memory per GPU in GiB")
    parser.add_argument("--headroom", type=number(), default=0.1, help="fraction of GPU memory kept free (default 0.1)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="weight/gradient dtype (default bf16)")
    parser.add_argument("--seq-len", type=integer(1), help="sequence length (default 4096)")
    parser.add_argument("--micro-batch", type=integer(1), help="sequences per rank per forward (default 1)")
    parser.add_argument(
        "--checkpointing", action=argparse.BooleanOptionalAction, help="activation checkpointing (default on)"
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


DEFAULTS = {
    "ratio": 0.1,
    "kv": "group",
    "train_others": [],
    "zero": DEFAULT_ZERO_STAGE,
    "tp": 1,
    "dtype": "bf16",
    "seq_len": 4096,
    "micro_batch": 1,
    "checkpointing": True,
}


def fill_defaults(args: argparse.Namespace) -> None:
    """Options left out take the run config's values (``--config``, read the way train and check read
    it: one source for the TP size, ZeRO stage and dtype), else the defaults above."""
    if args.config:
        from alps_ds.commands.check import load_run
        from alps_ds.launcher.preflight import CheckInputs, fill_from_run

        run = load_run(args.config)
        inp = CheckInputs(world_size=1, tp=args.tp or 1, model=args.model, heads=args.heads)
        given = {n for n in ("zero", "ratio", "seq_len", "micro_batch", "tp") if getattr(args, n) is not None}
        fill_from_run(inp, run, given)
        if inp.tp_conflict:
            raise AlpsError(inp.tp_conflict)
        if inp.model is None:
            raise AlpsError(f"{args.config}: model.path {run.model.path} is built in code; pass --model")
        taken = {
            "model": inp.model,
            "heads": inp.heads,
            "ratio": inp.ratio,
            "kv": inp.kv,
            "train_others": list(inp.train_others),
            "zero": inp.zero,
            "tp": inp.tp,
            "dtype": inp.dtype,
            "seq_len": inp.seq_len,
            "micro_batch": inp.micro_batch,
            "checkpointing": inp.checkpointing,
        }
        for name, value in taken.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        args.offload = args.offload or inp.offload
    if args.model is None:
        raise AlpsError("--model is required (or --config RUN.yaml naming a model folder)")
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _validate(args: argparse.Namespace) -> None:
    """Check every flag before reading the model, naming the flag (the library names its arguments)."""
    from alps_ds.choose import check_ratio
    from alps_ds.plan import check_headroom

    for name in ("tp", "pp", "dp", "seq_len", "micro_batch", "gpus_per_node", "nodes", "lora_rank"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise AlpsError(f"--{name.replace('_', '-')} {value} must be at least 1")
    check_headroom(args.headroom, "--headroom")
    if args.offload and args.zero == 0:
        raise AlpsError("--offload needs --zero 1, 2 or 3 (optimizer offload is a ZeRO feature)")
    if not args.heads:
        check_ratio(args.ratio, "--ratio")


def _validate_for_model(args: argparse.Namespace, cfg, spec) -> None:
    """The flags that depend on the model's shape: --pp against its layers, --train-others against its modules,
    --ratio (without --heads) against its head count."""
    from alps_ds.choose import count_for_ratio
    from alps_ds.plan import count_parameters, train_others_params

    if not args.heads:
        count_for_ratio(args.ratio, spec.num_layers, spec.num_heads, name="--ratio")
    if args.pp > spec.num_layers:
        raise AlpsError(f"--pp {args.pp} exceeds the model's {spec.num_layers} layers; use at most one stage per layer")
    train_others_params(count_parameters(cfg, spec), spec, args.train_others, source="--train-others")


def build(args: argparse.Namespace):
    from alps_ds.arch import AttentionSpec
    from alps_ds.plan import Activation, Parallel, load_config, make_plan
    from alps_ds.selection import HeadSelection

    fill_defaults(args)
    _validate(args)
    cfg = load_config(args.model)
    spec = AttentionSpec.from_config(cfg)
    _validate_for_model(args, cfg, spec)
    heads = None
    if args.heads:
        sel = HeadSelection.load(args.heads)
        sel.check_model(spec, source=args.heads)
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
