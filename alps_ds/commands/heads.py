"""``alps-ds heads show|compare|combine|resize``: work with saved head selections (heads.json).

The algorithms live in :mod:`alps_ds.selection_ops`; this module reads files, prints, and
writes outputs atomically.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from alps_ds.argtypes import integer, ratio
from alps_ds.errors import AlpsError
from alps_ds.selection import HeadSelection

NAME = "heads"
HELP = "inspect, compare, combine and re-cut head selections (heads.json)"
DESCRIPTION = (
    "Work with saved head selections: show one, compare several (overlap, Jaccard, Spearman of "
    "scores, per-layer overlap), combine them (union, intersect, vote) or re-cut a scored one to "
    "another ratio without re-reading checkpoints. FILE may be a heads.json or a localize output "
    "folder holding one."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="heads_action", metavar="ACTION", required=True)

    p = sub.add_parser("show", help="fingerprint, method, heads per layer, top heads, heatmap")
    p.add_argument("file", metavar="FILE", help="heads.json (or a folder holding one)")
    p.add_argument("--top", type=integer(0), default=10, metavar="N", help="how many top heads to list (default 10)")
    p.add_argument("--png", metavar="OUT", help="also write a heatmap image (scores, selected heads marked)")
    p.set_defaults(_heads=_show)

    p = sub.add_parser("compare", help="overlap, Jaccard, Spearman and per-layer overlap of selections")
    p.add_argument("files", nargs="+", metavar="FILE", help="two or more heads.json of one model")
    p.add_argument("--png", metavar="OUT", help="also write side-by-side heatmaps, one panel per input")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON instead of tables")
    p.set_defaults(_heads=_compare)

    p = sub.add_parser(
        "combine",
        help="union, intersection or vote of selections",
        description=(
            "union: heads in any input. intersect: heads in every input. vote: without --ratio, heads "
            "selected by a strict majority of the inputs; with --ratio r, exactly ceil(r * layers * heads) "
            "heads ranked by how many inputs selected them, then by mean min-max normalized score."
        ),
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="two or more heads.json of one model")
    p.add_argument("--op", required=True, choices=("union", "intersect", "vote"), help="how to combine")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the new heads.json")
    p.add_argument("--ratio", type=ratio, metavar="R", help="with --op vote: keep exactly this fraction of heads")
    p.set_defaults(_heads=_combine)

    p = sub.add_parser("resize", help="re-cut a scored selection to another ratio (top-K by stored scores)")
    p.add_argument("file", metavar="FILE", help="heads.json that carries scores")
    p.add_argument("--ratio", required=True, type=ratio, metavar="R", help="fraction of all heads to keep, in (0, 1]")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the new heads.json")
    p.set_defaults(_heads=_resize)


def run(args: argparse.Namespace) -> int:
    return args._heads(args)


# ---- file handling -------------------------------------------------------------------------
def _in_path(name: str) -> Path:
    """A heads.json, or a folder holding one (what localize --out writes)."""
    from alps_ds.selection import heads_file

    return heads_file(name)


def _out_path(name: str, inputs) -> Path:
    """Where --out may write: a file (a folder or a path ending in '/' gets heads.json inside it), never an
    input, and an existing file only when it is a heads.json."""
    from alps_ds.fsutil import check_output_file
    from alps_ds.selection import is_heads_file

    return check_output_file(
        name, flag="--out", default_name="heads.json", is_own=is_heads_file, what="a heads.json", inputs=inputs
    )


def _png_path(name: str | None, inputs) -> str | None:
    """Where --png may write: never over an input, an existing file only when it is a PNG image."""
    if name is None:
        return None
    from alps_ds.fsutil import check_output_file

    def is_png(path: Path) -> bool:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89PNG\r\n\x1a\n"

    path = check_output_file(
        name, flag="--png", default_name="heatmap.png", is_own=is_png, what="a PNG image", inputs=inputs
    )
    return str(path)


def _label(path: str | Path) -> str:
    """A short panel title: the file name, with its folder when it is a localize folder's heads.json."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.name == "heads.json" and path.parent.name else path.name


def _save(selection: HeadSelection, path: Path) -> Path:
    try:
        return selection.save(path)
    except OSError as e:
        raise AlpsError(f"{path}: cannot write ({e.strerror or e}); choose another --out") from e


def _save_png(path: str, panels: list) -> None:
    from alps_ds.heatmap import save_heatmap

    try:
        save_heatmap(path, panels)
    except OSError as e:
        raise AlpsError(f"{path}: cannot write the image ({e.strerror or e}); choose another --png") from e


def _panel(title: str, sel: HeadSelection):
    from alps_ds.heatmap import Panel

    m = sel.model
    return Panel(title, m.num_layers, m.num_heads, _scores(sel), sel.heads)


def _scores(sel: HeadSelection) -> np.ndarray | None:
    return None if sel.scores is None else np.asarray(sel.scores, dtype=np.float64)


# ---- formatting ----------------------------------------------------------------------------
def _pct(count: int, total: int) -> str:
    return f"{100 * count / total:.1f} %"


def _describe(sel: HeadSelection) -> list[str]:
    m, p = sel.model, sel.provenance
    total = m.total_heads
    lines = [
        f"  selected  {len(sel)} of {total} heads ({_pct(len(sel), total)})",
        f"  model     {m.model_type}: {m.num_layers} layers x {m.num_heads} heads, {m.num_kv_heads} kv heads, "
        f"head_dim {m.head_dim}, hidden {m.hidden_size}",
    ]
    how = [p.select]
    for label, value in (("metric", p.metric), ("head repr", p.head_repr), ("ratio", p.ratio), ("seed", p.seed)):
        if value is not None:
            how.append(f"{label} {value}")
    if p.dtype:
        how.append(f"dtype {p.dtype}")
    lines.append(f"  made by   {', '.join(how)}")
    for label, value in (("base", p.base), ("task", p.task)):
        if value:
            lines.append(f"  {label:<9} {value}")
    if p.inputs:
        lines.append(f"  inputs    {', '.join(p.inputs)}")
    lines.append(f"  scores    {'stored' if sel.scores is not None else 'none'}")
    return lines


def _score_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of every head in the whole pool, in the order top_k picks them."""
    L, n = scores.shape
    order = np.lexsort((np.arange(L * n), -scores.reshape(-1)))
    ranks = np.empty(L * n, dtype=np.int64)
    ranks[order] = np.arange(1, L * n + 1)
    return ranks.reshape(L, n)


def _show(args: argparse.Namespace) -> int:
    path = _in_path(args.file)
    png = _png_path(args.png, [path])
    sel = HeadSelection.load(path)
    m = sel.model
    out = [str(path), *_describe(sel), f"heads per layer (of {m.num_heads}):"]
    by_layer = sel.by_layer()
    width = len(str(m.num_layers - 1))
    for layer in range(m.num_layers):
        heads = by_layer.get(layer, ())
        listed = ", ".join(map(str, heads))
        out.append(f"  layer {layer:>{width}}  {len(heads):>3}  {listed}".rstrip())
    if sel.scores is not None:
        scores = _scores(sel)
        ranks = _score_ranks(scores)
        top = sorted(sel.heads, key=lambda lh: ranks[lh])[: args.top]
        out.append(f"top {len(top)} selected heads by score (rank among all {ranks.size}):")
        out.append("  rank  layer  head  score")
        out += [f"  {ranks[lh]:>4}  {lh[0]:>5}  {lh[1]:>4}  {scores[lh]:.6g}" for lh in top]
        lo, hi = float(scores.min()), float(scores.max())
        out.append(f"scores: min {lo:.6g}, median {float(np.median(scores)):.6g}, max {hi:.6g}")
    else:
        top = list(sel.heads[: args.top])
        out.append(f"first {len(top)} selected heads (no scores stored): {', '.join(f'{a}:{b}' for a, b in top)}")
    out.append(_text_map(sel))
    print("\n".join(out))
    if png:
        _save_png(png, [_panel(_label(path), sel)])
        print(f"wrote {png}")
    return 0


def _text_map(sel: HeadSelection) -> str:
    from alps_ds.heatmap import text_heatmap

    scores = _scores(sel)
    if scores is None:  # no scores: a blank grid with the selection marked
        scores = np.zeros((sel.model.num_layers, sel.model.num_heads), dtype=bool)
    return text_heatmap(scores, sel.heads)


def _compare(args: argparse.Namespace) -> int:
    from alps_ds import selection_ops as ops

    if len(args.files) < 2:
        raise AlpsError("heads compare needs at least two files")
    paths = [str(_in_path(f)) for f in args.files]
    png = _png_path(args.png, paths)
    sels = [HeadSelection.load(p) for p in paths]
    names = ops.check_same_model(sels, paths)
    pairs = [
        (i, j, ops.compare(sels[i], sels[j], sources=[names[i], names[j]]))
        for i in range(len(sels))
        for j in range(i + 1, len(sels))
    ]
    in_all = ops.intersect(sels)
    counts = ops.votes(sels)
    per_layer = [
        {
            "layer": layer,
            "selected": [sum(1 for la, _ in s.heads if la == layer) for s in sels],
            "in_all": int((counts[layer] == len(sels)).sum()),
            "in_any": int((counts[layer] > 0).sum()),
        }
        for layer in range(sels[0].model.num_layers)
    ]
    if args.json:
        report = {
            "inputs": [{"file": f, "selected": len(s), "scores": s.scores is not None} for f, s in zip(names, sels)],
            "pairs": [{k: v for k, v in p.to_dict().items() if k != "per_layer"} for _, _, p in pairs],
            "in_all": len(in_all),
            "in_any": int((counts > 0).sum()),
            "per_layer": per_layer,
        }
        print(json.dumps(report, indent=1))
    else:
        print("\n".join(_compare_tables(names, sels, pairs, len(in_all), int((counts > 0).sum()), per_layer)))
    if png:
        _save_png(png, [_panel(f"[{i + 1}] {_label(n)}", s) for i, (n, s) in enumerate(zip(names, sels))])
        if not args.json:
            print(f"wrote {png}")
    return 0


def _compare_tables(names, sels, pairs, in_all: int, in_any: int, per_layer) -> list[str]:
    total = sels[0].model.total_heads
    out = ["inputs:"]
    for i, (name, sel) in enumerate(zip(names, sels)):
        how = sel.provenance.select + (f", task {sel.provenance.task}" if sel.provenance.task else "")
        how += f"; scores {'yes' if sel.scores is not None else 'no'}"
        out.append(f"  [{i + 1}] {name}: {len(sel)} of {total} heads ({how})")
    out += ["pairs:", "  A    B    overlap  union  jaccard  spearman"]
    for i, j, p in pairs:
        rho = "n/a" if p.spearman is None else ("undefined" if np.isnan(p.spearman) else f"{p.spearman:+.3f}")
        out.append(f"  [{i + 1}]  [{j + 1}]  {p.overlap:>7}  {p.union:>5}  {p.jaccard:>7.3f}  {rho}")
    out.append(f"heads in all {len(sels)} inputs: {in_all}; in any: {in_any}")
    out.append("per layer (selected heads in each input; in all; in any):")
    out.append("  layer  " + "  ".join(f"[{i + 1}]" for i in range(len(sels))) + "  all  any")
    for row in per_layer:
        cells = "  ".join(f"{c:>3}" for c in row["selected"])
        out.append(f"  {row['layer']:>5}  {cells}  {row['in_all']:>3}  {row['in_any']:>3}")
    return out


def _keeps_a_head(ratio: float, sel: HeadSelection) -> None:
    """A --ratio too small to keep one head of the selection's model is refused naming the flag."""
    from alps_ds.choose import count_for_ratio

    count_for_ratio(ratio, sel.model.num_layers, sel.model.num_heads, name="--ratio")


def _combine(args: argparse.Namespace) -> int:
    from alps_ds import selection_ops as ops

    if len(args.files) < 2:
        raise AlpsError(f"heads combine --op {args.op} needs at least two files")
    if args.ratio is not None and args.op != "vote":
        raise AlpsError(f"--ratio applies to --op vote only; re-cut the {args.op} with 'alps-ds heads resize'")
    paths = [str(_in_path(f)) for f in args.files]
    out = _out_path(args.out, paths)
    sels = [HeadSelection.load(p) for p in paths]
    if args.op == "vote":
        if args.ratio is not None:
            _keeps_a_head(args.ratio, sels[0])
        result = ops.vote(sels, ratio=args.ratio, sources=paths)
    else:
        result = getattr(ops, args.op)(sels, sources=paths)
    path = _save(result, out)
    total = result.model.total_heads
    print(f"wrote {path}: {len(result)} of {total} heads ({_pct(len(result), total)}), {args.op} of {len(sels)} files")
    return 0


def _resize(args: argparse.Namespace) -> int:
    from alps_ds.selection_ops import resize

    path = _in_path(args.file)
    target = _out_path(args.out, [path])
    sel = HeadSelection.load(path)
    _keeps_a_head(args.ratio, sel)
    result = resize(sel, args.ratio, source=str(path))
    out = _save(result, target)
    total = result.model.total_heads
    print(f"wrote {out}: {len(result)} of {total} heads ({_pct(len(result), total)}); {path} had {len(sel)}")
    return 0
