"""Benchmark: `alps-ds localize` vs a straightforward per-head scipy implementation.

Writes a base/task pair with Llama-3-8B-shaped attention (hidden 4096, 32 heads, 8 kv heads,
head_dim 128; 8 layers by default; bfloat16; only the Q/K/V tensors, sharded two layers per
file with an index) into a temp dir, then measures, side by side in one run, each in its own
process so peak RSS is per process (os.wait4):

- raw read: the same Q/K/V tensors read with safetensors' own ``safe_open`` (the ceiling);
- ``alps-ds localize`` as a subprocess (whole process incl. python/torch start-up);
- localize's scoring alone (LayerScorer on layers already in memory);
- the reference algorithm: per head, numpy W_o^h = Q_h^T K_j V_j^T, float64 softmax and
  ``scipy.stats.wasserstein_distance`` on the unit support. Its loading runs in full; its
  per-head scoring runs on a subset of heads per layer and is extrapolated to all heads
  (printed as such), which keeps the run short.

Usage: python benchmarks/bench_localize.py [--layers 8] [--ref-heads-per-layer 2] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 4096, 32, 8, 128
MODULES = {"q_proj": HEADS * HEAD_DIM, "k_proj": KV_HEADS * HEAD_DIM, "v_proj": KV_HEADS * HEAD_DIM}


def _name(layer: int, module: str) -> str:
    return f"model.layers.{layer}.self_attn.{module}.weight"


def write_pair(root: Path, layers: int) -> tuple[Path, Path]:
    """base: N(0, 0.02) weights; task: base plus noise whose size differs per head (bf16)."""
    import torch
    from safetensors.torch import save_file

    config = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        num_hidden_layers=layers,
        intermediate_size=14336,
        vocab_size=128256,
        torch_dtype="bfloat16",
    )
    g = torch.Generator().manual_seed(0)
    dirs = (root / "base", root / "task")
    for d in dirs:
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(config, indent=1))
    index: dict[str, dict[str, str]] = {"base": {}, "task": {}}
    for first in range(0, layers, 2):
        shard = f"model-{first // 2 + 1:05d}-of-{(layers + 1) // 2:05d}.safetensors"
        tb, tt = {}, {}
        for layer in range(first, min(layers, first + 2)):
            for module, rows in MODULES.items():
                w = torch.randn(rows, HIDDEN, generator=g) * 0.02
                per_head = 0.0005 + 0.004 * torch.rand(rows // HEAD_DIM, 1, 1, generator=g)
                delta = (torch.randn(rows // HEAD_DIM, HEAD_DIM, HIDDEN, generator=g) * per_head).view(rows, HIDDEN)
                tb[_name(layer, module)] = w.bfloat16()
                tt[_name(layer, module)] = (w + delta).bfloat16()
        for d, tensors, key in ((dirs[0], tb, "base"), (dirs[1], tt, "task")):
            save_file(tensors, d / shard, metadata={"format": "pt"})
            index[key].update(dict.fromkeys(tensors, shard))
    for d, key in zip(dirs, ("base", "task")):
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index[key]}))
    return dirs


def measure(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stdout) of one child process; os.wait4 gives that child's own rusage."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            sys.exit(f"failed: {' '.join(cmd)}\n{err.read()[-3000:]}")
        return wall, usage.ru_maxrss / 1024, out.read()


# ---- child modes ------------------------------------------------------------------------------


def child_raw(base: str, task: str) -> None:
    from safetensors import safe_open

    start, nbytes = time.perf_counter(), 0
    for d in (Path(base), Path(task)):
        weight_map = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        for shard, names in sorted(by_shard.items()):
            with safe_open(d / shard, framework="pt") as f:
                for name in names:
                    t = f.get_tensor(name)
                    nbytes += t.numel() * t.element_size()
                    del t
    print(json.dumps({"seconds": time.perf_counter() - start, "bytes": nbytes}))


def child_scoring(base: str, task: str, layers: int) -> None:
    import torch

    from alps_ds.arch import AttentionSpec
    from alps_ds.localize.reader import CheckpointReader
    from alps_ds.localize.score import LayerScorer

    spec = AttentionSpec.from_pretrained(base)
    rb, rt = CheckpointReader(Path(base), spec, label="base"), CheckpointReader(Path(task), spec, label="task")
    held = [tuple({k: v.clone() for k, v in r.layer(i).items()} for r in (rb, rt)) for i in range(layers)]
    scorer = LayerScorer(spec, device="cpu")
    scorer.score(0, *held[0])  # warm-up (buffers, kernels), as in a long run
    start = time.perf_counter()
    scores = [scorer.score(i, *held[i]).tolist() for i in range(layers)]
    print(json.dumps({"seconds": time.perf_counter() - start, "threads": torch.get_num_threads(), "scores": scores}))


def child_reference(base: str, task: str, layers: int, per_layer: int) -> None:
    """The reference algorithm, written plainly: per head numpy + scipy."""
    import numpy as np
    from safetensors import safe_open
    from scipy.stats import wasserstein_distance

    t0 = time.perf_counter()

    def load(d: Path) -> dict[str, np.ndarray]:
        weight_map = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        out = {}
        for name, shard in weight_map.items():
            with safe_open(d / shard, framework="pt") as f:
                out[name] = f.get_tensor(name).float().numpy()  # numpy has no bfloat16
        return out

    wb, wt = load(Path(base)), load(Path(task))
    load_s = time.perf_counter() - t0
    m = HEADS // KV_HEADS
    heads = np.linspace(0, HEADS - 1, per_layer).round().astype(int).tolist()
    scores, score_s = {}, 0.0
    for layer in range(layers):
        for h in heads:
            t = time.perf_counter()
            p = []
            for w in (wb, wt):
                q = w[_name(layer, "q_proj")][h * HEAD_DIM : (h + 1) * HEAD_DIM]
                j = h // m
                k = w[_name(layer, "k_proj")][j * HEAD_DIM : (j + 1) * HEAD_DIM]
                v = w[_name(layer, "v_proj")][j * HEAD_DIM : (j + 1) * HEAD_DIM]
                x = (q.T @ (k @ v.T)).astype(np.float64).reshape(-1)
                e = np.exp(x - x.max())
                p.append(e / e.sum())
            support = np.linspace(0.0, 1.0, p[0].size)
            scores[f"{layer}:{h}"] = wasserstein_distance(support, support, p[0], p[1])
            score_s += time.perf_counter() - t
    print(json.dumps({"load_s": load_s, "score_s": score_s, "heads_scored": len(scores), "scores": scores}))


# ---- driver ----------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ref-heads-per-layer", type=int, default=2, help="heads per layer the scipy reference scores")
    p.add_argument("--dir", default=None, help="work folder (default: a temp dir, deleted afterwards)")
    p.add_argument("_child", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        mode, *rest = args._child
        if mode == "write":
            write_pair(Path(rest[0]), int(rest[1]))
        else:
            {"raw": child_raw, "scoring": child_scoring, "reference": child_reference}[mode](
                *rest[:2], *(int(x) for x in rest[2:])
            )
        return 0

    root = Path(args.dir or tempfile.mkdtemp(prefix="alps-bench-"))
    try:
        return drive(root, args.layers, args.ref_heads_per_layer)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


def drive(root: Path, layers: int, per_layer: int) -> int:
    # Everything heavy runs in child processes: on Linux a child's ru_maxrss starts from the
    # parent's RSS at fork, so a parent that generated the weights itself would floor every reading.
    t = time.perf_counter()
    me = [sys.executable, str(Path(__file__).resolve())]
    measure(me + ["write", str(root), str(layers)])
    base, task = root / "base", root / "task"
    print(f"wrote base+task ({layers} layers, Llama-3-8B-shaped attention, bf16) in {time.perf_counter() - t:.1f} s")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other work shares the CPUs)")

    raw_wall, raw_rss, out = measure(me + ["raw", str(base), str(task)])
    raw = json.loads(out)
    gib = raw["bytes"] / 2**30

    alps = shutil.which("alps-ds") or "alps-ds"
    loc_wall, loc_rss, loc_out = measure(
        [alps, "localize", "--base", str(base), "--task", str(task), "--out", str(root / "out"), "--quiet"]
    )
    inner = float(re.search(r" in ([0-9.]+) s on ", loc_out).group(1))
    sel = json.loads((root / "out" / "heads.json").read_text())

    sc_wall, sc_rss, out = measure(me + ["scoring", str(base), str(task), str(layers)])
    scoring = json.loads(out)

    ref_wall, ref_rss, out = measure(me + ["reference", str(base), str(task), str(layers), str(per_layer)])
    ref = json.loads(out)
    total_heads = layers * HEADS
    per_head = ref["score_s"] / ref["heads_scored"]
    ref_score_full = per_head * total_heads
    ref_whole_full = ref_wall - ref["score_s"] + ref_score_full

    rel = max(abs(sel["scores"][int(k.split(":")[0])][int(k.split(":")[1])] - v) / v for k, v in ref["scores"].items())
    print()
    print(f"{'':34}{'seconds':>10}{'peak RSS MiB':>14}")
    print(f"{'raw safetensors read (Q/K/V)':34}{raw['seconds']:10.2f}{raw_rss:14.0f}   {gib:.2f} GiB, page cache warm")
    print(f"{'alps-ds localize, whole process':34}{loc_wall:10.2f}{loc_rss:14.0f}   (its own timer: {inner:.2f} s)")
    print(f"{'localize scoring alone':34}{scoring['seconds']:10.2f}{sc_rss:14.0f}   ({scoring['threads']} threads)")
    print(
        f"{'scipy reference, whole (extrap.)':34}{ref_whole_full:10.2f}{ref_rss:14.0f}   "
        f"(measured {ref_wall:.2f} s scoring {ref['heads_scored']} of {total_heads} heads)"
    )
    print(
        f"{'scipy reference scoring (extrap.)':34}{ref_score_full:10.2f}{'':14}   "
        f"({per_head:.3f} s/head x {total_heads} heads; load {ref['load_s']:.2f} s)"
    )
    print()
    print(f"ratio, whole process:   {ref_whole_full / loc_wall:6.1f}x   (goal >= 15x)")
    print(f"ratio, scoring alone:   {ref_score_full / scoring['seconds']:6.1f}x   (goal >= 30x)")
    raw_tp = raw["bytes"] / raw["seconds"] / 2**20
    print(
        f"throughput: raw read {raw_tp:.0f} MiB/s; localize {raw['bytes'] / inner / 2**20:.0f} MiB/s "
        f"= {100 * raw['seconds'] / inner:.0f} % of raw (goal >= 50 %); "
        f"whole process {raw['bytes'] / loc_wall / 2**20:.0f} MiB/s = {100 * raw['seconds'] / loc_wall:.0f} %"
    )
    print(f"max relative difference localize vs scipy on the {ref['heads_scored']} reference heads: {rel:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
