"""``alps-ds localize``: score every attention head of a base/task pair and write a selection."""

from __future__ import annotations

import argparse
import io

from alps_ds.argtypes import integer, ratio

HELP = "score every attention head by how far the task model moved it; write heads.json, scores.csv, heatmap.png"
DESCRIPTION = (
    "Stream the Q/K/V weights of a base model and its task fine-tune layer by layer, score every "
    "query head (ALPS: W1 between softmax distributions of the head matrices), choose heads and "
    "write DIR/heads.json, DIR/scores.csv and DIR/heatmap.png. See docs/localize.md."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Choices are validated in run() so a bad value is one AlpsError line like every other error.
    p.add_argument("--base", required=True, help="base model: folder written by save_pretrained, or a hub id")
    p.add_argument("--task", required=True, help="task model (a fine-tune of the base): folder or hub id")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; files replaced atomically)")
    p.add_argument("--ratio", type=ratio, default=0.1, help="fraction of all heads to keep, in (0, 1] (default 0.1)")
    p.add_argument("--metric", default="w1", help="w1 (default, s_PAD) | w1-index | kl | js | cosine | euclidean")
    p.add_argument("--head-repr", default="product", help="product (paper eq. 5, default) | qkv-concat")
    p.add_argument("--select", default=None, help="top-k (default) | random | layer-consistent | all | none")
    p.add_argument("--seed", type=integer(0), default=0, help="seed of --select random / layer-consistent (default 0)")
    p.add_argument(
        "--dtype",
        default="float32",
        help="precision weights are cast to before scoring: float32 | bfloat16 | "
        "float16 | float64 (default float32; the public reference reads bfloat16)",
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
    """Check every flag before reading anything; returns the selection method."""
    from alps_ds.choose import METHODS, parse_heads
    from alps_ds.errors import AlpsError
    from alps_ds.localize.score import DTYPES, HEAD_REPRS, METRICS, check_choice

    check_choice("--metric", args.metric, METRICS)
    check_choice("--head-repr", args.head_repr, HEAD_REPRS)
    check_choice("--dtype", args.dtype, DTYPES)
    if args.heads is not None:
        if args.select is not None:
            raise AlpsError("--heads and --select both given; use one (--heads is an explicit selection)")
        parse_heads(args.heads)  # syntax now; bounds once the model's shape is known
        return "explicit"
    method = args.select or "top-k"
    check_choice("--select", method, METHODS)
    return method


def _scores_csv(scores) -> str:
    buf = io.StringIO()
    buf.write("layer,head,score\n")
    for layer, row in enumerate(scores):
        for h, s in enumerate(row):
            buf.write(f"{layer},{h},{float(s)!r}\n")
    return buf.getvalue()


def _summary(sel, scores, result, out) -> str:
    import numpy as np

    flat = scores.reshape(-1)
    n = scores.shape[1]
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


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from alps_ds import __version__
    from alps_ds.choose import choose, parse_heads
    from alps_ds.errors import AlpsError
    from alps_ds.fsutil import atomic_files, check_output_dir
    from alps_ds.heatmap import Panel, render_heatmap
    from alps_ds.localize import localize_scores
    from alps_ds.selection import HeadSelection, Provenance

    method = _validate(args)
    # Before scoring (minutes on a large model). Files in DIR other than the three written are left alone.
    out = check_output_dir(args.out, flag="--out", command="localize", inputs=(args.base, args.task), whole=False)
    result = localize_scores(
        args.base,
        args.task,
        head_repr=args.head_repr,
        metric=args.metric,
        dtype=args.dtype,
        device=args.device,
        progress=not args.quiet,
        allow_pickle=args.allow_pickle,
    )
    spec, scores = result.spec, result.scores
    L, n = spec.num_layers, spec.num_heads
    if method == "explicit":
        heads = parse_heads(args.heads, L, n)
    else:
        heads = choose(method, num_layers=L, num_heads=n, ratio=args.ratio, seed=args.seed, scores=scores)
    uses_ratio = method in ("top-k", "random", "layer-consistent")
    provenance = Provenance(
        select=method,
        metric=args.metric,
        head_repr=args.head_repr,
        ratio=args.ratio if uses_ratio else None,
        seed=args.seed if method in ("random", "layer-consistent") else None,
        dtype=args.dtype,
        base=str(args.base),
        task=str(args.task),
        alps_ds_version=__version__,
    )
    sel = HeadSelection(spec.fingerprint, tuple(heads), provenance, tuple(tuple(map(float, r)) for r in scores))
    # Everything is rendered in memory first: an error here leaves DIR as it was.
    heads_json = sel.to_json()
    csv = _scores_csv(scores)
    title = f"{Path(str(args.task)).name} vs {Path(str(args.base)).name}: {args.metric}, {args.head_repr}"
    png = render_heatmap([Panel(title, L, n, scores, sel.heads)])
    try:
        with atomic_files(out, command="localize") as put:  # all three replace the old ones in one swap
            put("heads.json", heads_json)
            put("scores.csv", csv)
            put("heatmap.png", png)
    except OSError as e:  # read-only, full disk: the old files are all still there
        raise AlpsError(f"--out {out}: cannot write ({e.strerror or e}); pick a writable folder") from e
    print(_summary(sel, scores, result, out))
    return 0
