"""``alps-ds layout``: which local rows every (pipeline stage, tensor-parallel rank) trains."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from alps_ds.argtypes import integer
from alps_ds.errors import AlpsError

HELP = "show the local Q/K/V rows each tensor/pipeline-parallel rank trains for a selection"
DESCRIPTION = (
    "Map a heads.json onto a TP x PP grid: per (pp stage, tp rank) the modules and local row ranges it "
    "trains, its trainable elements, and the imbalance (max/mean over ranks). --rebalance writes a new "
    "selection with the same head count, best scores, at most CAP query heads per rank."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from alps_ds.arch import TP_LAYOUTS
    from alps_ds.layout import KV_POLICIES

    p.add_argument("--heads", required=True, help="heads.json from 'alps-ds localize'")
    p.add_argument("--model", required=True, help="model folder or config.json (only the config is read)")
    p.add_argument("--tp", type=integer(1), default=1, help="tensor-parallel size T (default 1)")
    p.add_argument("--pp", type=integer(1), default=1, help="pipeline-parallel size P (default 1)")
    p.add_argument("--vpp", type=integer(1), default=1, help="virtual pipeline stages per rank V (default 1)")
    p.add_argument("--first-stage-layers", type=integer(0), help="layers on the first stage (Megatron uneven split)")
    p.add_argument("--last-stage-layers", type=integer(0), help="layers on the last stage (Megatron uneven split)")
    p.add_argument(
        "--layout",
        choices=tuple(TP_LAYOUTS),
        help="weight layout and TP split (default: the model's own HF layout: hf, fused or neox)",
    )
    p.add_argument("--kv", choices=KV_POLICIES, default="group", help="group: also train the heads' k/v rows")
    p.add_argument("--json", action="store_true", help="print a JSON list of {pp_rank, tp_rank, layer, module, rows}")
    p.add_argument(
        "--rebalance",
        nargs="?",
        type=integer(1),
        const=0,
        metavar="CAP",
        help="rebalance across ranks: same head count, best scores, at most CAP query heads per (pp, tp) rank "
        "(default CAP: the smallest that fits); needs scores in heads.json",
    )
    p.add_argument("--out", help="where --rebalance writes the new heads.json (default: HEADS.rebalanced.json)")


def _validate(args: argparse.Namespace) -> None:
    """Check the sizes before reading anything, naming the flag (the library names its arguments)."""
    for flag, value in (("--tp", args.tp), ("--pp", args.pp), ("--vpp", args.vpp)):
        if value < 1:
            raise AlpsError(f"{flag} {value} must be at least 1")
    for flag, value in (
        ("--first-stage-layers", args.first_stage_layers),
        ("--last-stage-layers", args.last_stage_layers),
    ):
        if value is not None and value < 0:
            raise AlpsError(f"{flag} {value} must be >= 0")
    if args.rebalance is not None and args.rebalance < 0:
        raise AlpsError(
            f"--rebalance {args.rebalance}: CAP must be at least 1, or leave it out for the smallest that fits"
        )


def run(args: argparse.Namespace) -> int:
    from alps_ds.arch import AttentionSpec
    from alps_ds.parallel.mapping import PipelineSplit, plan, rebalance
    from alps_ds.selection import HeadSelection, heads_file

    _validate(args)
    out = _rebalance_out(args) if args.rebalance is not None else None
    spec = AttentionSpec.from_pretrained(args.model)
    selection = HeadSelection.load(args.heads, spec=spec)
    layout = args.layout or spec.native_tp_layout
    pipeline = PipelineSplit.megatron(
        spec.num_layers, args.pp, args.vpp, first=args.first_stage_layers, last=args.last_stage_layers
    )
    result = plan(spec, selection.heads, tp=args.tp, layout=layout, pipeline=pipeline, kv=args.kv)
    if args.rebalance is not None:
        if selection.scores is None:
            raise AlpsError(f"{args.heads}: --rebalance needs the 'scores' matrix; localize with --select top-k")
        r = rebalance(selection.scores, selection.heads, result.tensor, pipeline, cap=args.rebalance or None)
        heads_path = heads_file(args.heads)
        prov = replace(
            selection.provenance, select=f"{selection.provenance.select}+rebalance", inputs=(str(heads_path),)
        )
        selection = selection.with_heads(r.heads, prov)
        try:
            selection.save(out)
        except OSError as e:
            raise AlpsError(f"--out {out}: cannot write ({e.strerror or e}); choose another --out") from e
        print(
            f"rebalanced {len(r.heads)} heads, at most {r.cap} per rank ({layout}, tp {args.tp}, pp {args.pp}): "
            f"score {r.score_before:.6g} -> {r.score_after:.6g}, given up {r.score_given_up:.6g}; wrote {out}",
            file=sys.stderr if args.json else sys.stdout,
        )
        result = plan(spec, selection.heads, tp=args.tp, layout=layout, pipeline=pipeline, kv=args.kv)
    if args.json:
        print(json.dumps([e.to_dict() for e in result.entries]))
        return 0
    _print_text(result, layout, args, len(selection))
    return 0


def _rebalance_out(args: argparse.Namespace) -> Path:
    """Where --rebalance writes (default HEADS.rebalanced.json beside the input), checked before any work."""
    from alps_ds.fsutil import check_output_file
    from alps_ds.selection import heads_file, is_heads_file

    heads_path = heads_file(args.heads)
    name = args.out or heads_path.with_name(f"{heads_path.stem}.rebalanced.json")
    return check_output_file(
        name,
        flag="--out",
        default_name="heads.rebalanced.json",
        is_own=is_heads_file,
        what="a heads.json",
        inputs=(heads_path, args.model),
    )


def _print_text(result, layout: str, args: argparse.Namespace, num_heads: int) -> None:
    spec = result.spec
    print(
        f"{spec.model_type}: {spec.num_layers} layers x {spec.num_heads} heads ({spec.num_kv_heads} kv, "
        f"head_dim {spec.head_dim}, hidden {spec.hidden_size}); layout {layout}, tp {args.tp}, pp {args.pp}, "
        f"vpp {args.vpp}, kv {args.kv}; {num_heads} heads selected"
    )
    per_rank = result.rank_elements()
    for (pp_rank, tp_rank), elements in per_rank.items():
        print(f"pp {pp_rank} tp {tp_rank}: {elements:,} trainable elements")
        for e in result.for_rank(pp_rank, tp_rank):
            rows = " ".join(f"[{a}, {b})" for a, b in e.rows)
            print(f"  layer {e.layer} (vpp {e.vpp_rank}, local {e.local_layer}) {e.module}: rows {rows}")
    imbalance = result.imbalance()
    text = "n/a (nothing trains)" if imbalance is None else f"{imbalance:.3f}"
    print(f"imbalance (max/mean trainable elements over {len(per_rank)} ranks): {text}")
