"""``alps-ds localize``: score every attention head of a base/task pair and write a selection."""

from __future__ import annotations

import argparse

from alps_ds.argtypes import integer, ratio

HELP = "score every attention head by how far the task model moved it; write heads.json, scores.csv, heatmap.png"
DESCRIPTION = (
    "Stream the Q/K/V weights of a base model and its task fine-tune layer by layer, score every "
    "query head (ALPS: W1 between softmax distributions of the head matrices), choose heads and "
    "write DIR/heads.json, DIR/scores.csv and DIR/heatmap.png. See docs/localize.md."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from alps_ds.choose import METHODS
    from alps_ds.localize import HEAD_REPRS, METRICS, SCORE_DTYPES
    from alps_ds.localize.vocab import DEFAULT_DTYPE, DEFAULT_HEAD_REPR, DEFAULT_METRIC

    # Choices are validated in run() so a bad value is one AlpsError line like every other error.
    p.add_argument("--base", required=True, help="base model: folder written by save_pretrained, or a hub id")
    p.add_argument("--task", required=True, help="task model (a fine-tune of the base): folder or hub id")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; files replaced atomically)")
    p.add_argument("--ratio", type=ratio, default=0.1, help="fraction of all heads to keep, in (0, 1] (default 0.1)")
    p.add_argument("--metric", default=DEFAULT_METRIC, help=f"{' | '.join(METRICS)} (default {DEFAULT_METRIC}: s_PAD)")
    p.add_argument(
        "--head-repr", default=DEFAULT_HEAD_REPR, help=f"{' | '.join(HEAD_REPRS)} (default {DEFAULT_HEAD_REPR}, eq. 5)"
    )
    p.add_argument("--select", default=None, help=f"{' | '.join(METHODS)} (default {METHODS[0]})")
    p.add_argument("--seed", type=integer(0), default=0, help="seed of --select random / layer-consistent (default 0)")
    p.add_argument(
        "--dtype",
        default=DEFAULT_DTYPE,
        help=f"precision weights are cast to before scoring: {' | '.join(SCORE_DTYPES)} "
        f"(default {DEFAULT_DTYPE}; the public reference reads bfloat16)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")
    p.add_argument("--heads", default=None, help="explicit selection instead of --select, e.g. 3:5,7:0 (0-based)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also read pytorch_model.bin checkpoints, through torch.load(weights_only=True) (tensors only, "
        "no code runs); off by default: safetensors only",
    )


def _validate(args: argparse.Namespace) -> str:
    """Check every flag before reading anything, naming the flag; returns the selection method."""
    from alps_ds.choose import METHODS, check_ratio, parse_heads
    from alps_ds.errors import AlpsError, check_choice
    from alps_ds.localize import HEAD_REPRS, METRICS, SCORE_DTYPES

    check_choice("--metric", args.metric, METRICS)
    check_choice("--head-repr", args.head_repr, HEAD_REPRS)
    check_choice("--dtype", args.dtype, SCORE_DTYPES)
    check_ratio(args.ratio, "--ratio")
    if args.heads is not None:
        if args.select is not None:
            raise AlpsError("--heads and --select both given; use one (--heads is an explicit selection)")
        parse_heads(args.heads, source="--heads")  # syntax now; bounds once the model's shape is known
        return "explicit"
    method = args.select or METHODS[0]
    check_choice("--select", method, METHODS)
    return method


def _summary(made, out) -> str:
    import numpy as np

    sel, result = made.selection, made.result
    flat = result.scores.reshape(-1)
    n = result.scores.shape[1]
    top = np.lexsort((np.arange(flat.size), -flat))[:5]
    spec = result.spec
    lines = [
        f"localized {spec.model_type}: {spec.num_layers} layers x {spec.num_heads} heads "
        f"({spec.num_kv_heads} kv) in {result.seconds:.1f} s on {result.device}, "
        f"read {result.bytes_read / 2**20:.1f} MiB",
        f"scores ({sel.provenance.metric}, {sel.provenance.head_repr}): min {flat.min():.4g}  "
        f"median {np.median(flat):.4g}  mean {flat.mean():.4g}  max {flat.max():.4g}",
        "top heads: " + ", ".join(f"{i // n}:{i % n} ({flat[i]:.4g})" for i in top),
        f"selected {len(sel)} heads ({sel.provenance.select}) -> {out}/heads.json, scores.csv, heatmap.png",
    ]
    if not flat.any():
        lines.append("warning: every score is 0: base and task weights are identical")
    return "\n".join(lines)


def _check_head_count(args: argparse.Namespace, method: str) -> None:
    """A --ratio that keeps no head of this model is refused by its flag before any weight is read."""
    from alps_ds.arch import AttentionSpec
    from alps_ds.choose import RATIO_METHODS, count_for_ratio

    if method in RATIO_METHODS:
        spec = AttentionSpec.from_pretrained(args.base)
        count_for_ratio(args.ratio, spec.num_layers, spec.num_heads, name="--ratio")


def run(args: argparse.Namespace) -> int:
    from alps_ds.choose import parse_heads
    from alps_ds.fsutil import check_output_dir
    from alps_ds.localize import make_selection, write_outputs
    from alps_ds.localize.score import resolve_device

    method = _validate(args)
    resolve_device(args.device, source="--device")  # imports torch: after the cheap checks
    # Before scoring (minutes on a large model). Files in DIR other than the three written are left alone.
    out = check_output_dir(args.out, flag="--out", command="localize", inputs=(args.base, args.task), whole=False)
    _check_head_count(args, method)
    made = make_selection(
        args.base,
        args.task,
        method=method,
        ratio=args.ratio,
        seed=args.seed,
        heads=None if args.heads is None else parse_heads(args.heads, source="--heads"),
        metric=args.metric,
        head_repr=args.head_repr,
        dtype=args.dtype,
        device=args.device,
        progress=not args.quiet,
        allow_pickle=args.allow_pickle,
    )
    write_outputs(made, out, source="--out")
    print(_summary(made, out))
    return 0
