"""Engine hook vs. gradient masking, and the cost of the hook, measured side by side in one run.

1. compose: forward+backward time of one projection at 10 % trainable rows: frozen vs. the hook
   (its custom autograd function; one row range and scattered rows) vs. the two plain-autograd
   compositions it replaced (merge the weight every step; an extra matmul on the selected
   channels written over the full output). Goal: hook <= 1.15x frozen.
2. masking: a gradient-masking baseline (whole Q/K/V trainable, hooks zeroing the other rows'
   gradients) beside the hook, AdamW weight decay 0.1: drift of the "frozen" rows and
   optimizer-state bytes (goal: >= 5x less for the hook at ratio 0.1, Q/K/V only).
3. step time: heads-only vs. full fine-tuning (goal <= 0.72x) and heads + rest vs. Q/K/V fully
   frozen + rest (the paper's "w/o attn"; goal <= 1.10x).

Single process, CPU, torch AdamW (the math the engine runs per rank).
usage: python benchmarks/bench_hook.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from alps_ds.arch import AttentionSpec
from alps_ds.choose import count_for_ratio, random_heads
from alps_ds.layout import trainable_rows
from alps_ds.selection import HeadSelection, Provenance
from alps_ds.sparse import HeadRowsLinear, apply, reparametrize, trainable_report
from alps_ds.tiny import build_model, tiny_config


def interleaved(fns: dict, repeat: int) -> dict[str, float]:
    """Median seconds per call of each ``fn``, one warm-up each, calls interleaved so that load
    from other processes on the machine hits every variant alike."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in samples.items()}


def merged_weight_forward(mod: HeadRowsLinear, x: torch.Tensor) -> torch.Tensor:
    """Plain autograd: write the slice into a full weight copy every step, one matmul (autograd then
    forms the full weight gradient and keeps only the selected rows)."""
    return F.linear(x, mod.weight.index_copy(0, mod.rows, mod.head_weight), mod.bias)


def two_matmul_forward(mod: HeadRowsLinear, x: torch.Tensor) -> torch.Tensor:
    """Plain autograd, the hook's earlier forward: the full output, then the selected channels
    overwritten by an extra slice matmul (two output-sized tensors, an activation-sized index_copy)."""
    y = F.linear(x, mod.weight, mod.bias)
    return y.index_copy(-1, mod.rows, F.linear(x, mod.head_weight, mod.head_bias))


def bench_compose(d: int, tokens: int, ratio: float, repeat: int) -> None:
    torch.manual_seed(0)
    n = max(1, int(d * ratio))
    base = nn.Linear(d, d, bias=False)
    x = torch.randn(tokens, d, requires_grad=True)
    one, merged, two = (reparametrize(copy.deepcopy(base), [(0, n)]) for _ in range(3))
    scattered = reparametrize(copy.deepcopy(base), [i * d // n for i in range(n)])  # n rows spread out
    variants = {
        "frozen layer": copy.deepcopy(base).requires_grad_(False),
        "fully trainable layer": copy.deepcopy(base),
        "hook, one row range": one,
        "hook, scattered rows": scattered,
        "merged weight (autograd)": lambda x: merged_weight_forward(merged, x),
        "two matmuls (previous)": lambda x: two_matmul_forward(two, x),
    }
    t = interleaved({k: (lambda f=f: f(x).sum().backward()) for k, f in variants.items()}, repeat)
    print(f"\n== 1. composing the trainable rows: [{tokens} x {d}] @ [{d} x {d}]^T, {n} rows, fwd+bwd")
    for key in variants:
        print(f"   {key:<26}{t[key] * 1e3:9.2f} ms   {t[key] / t['frozen layer']:.2f}x")
    print(f"   hook / frozen (one range)  {t['hook, one row range'] / t['frozen layer']:.2f}x (goal <= 1.15x)")


def bench_masking(cfg, sel: HeadSelection, steps: int) -> None:
    spec = AttentionSpec.from_config(cfg)
    batch = torch.randint(3, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    base = build_model(cfg, seed=0)
    rows = {spec.module_path(r.layer, r.module): r for r in trainable_rows(spec, sel.heads, "group")}

    # Baseline: whole Q/K/V trainable, a hook zeroes the gradient of every non-selected row.
    masked = copy.deepcopy(base)
    for p in masked.parameters():
        p.requires_grad_(False)
    for layer in range(spec.num_layers):
        for m in spec.modules:
            name = spec.module_path(layer, m)
            w = masked.get_submodule(name).weight
            w.requires_grad_(True)
            keep = torch.zeros(w.shape[0], 1)
            if name in rows:
                keep[torch.tensor(rows[name].indices())] = 1
            w.register_hook(lambda g, keep=keep: g * keep)
    ours = copy.deepcopy(base)
    apply(ours, sel, kv="group")

    def train(model):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
        for _ in range(steps):
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim() > 0)
        return state, sum(p.numel() for p in params)

    state_mask, n_mask = train(masked)
    state_ours, n_ours = train(ours)
    drift_mask = drift_ours = 0.0
    for layer in range(spec.num_layers):
        for m in spec.modules:
            name = spec.module_path(layer, m)
            w0 = base.get_submodule(name).weight.detach()
            keep = torch.ones(w0.shape[0], dtype=torch.bool)
            if name in rows:
                keep[torch.tensor(rows[name].indices())] = False
            w_mask = masked.get_submodule(name).weight.detach()
            mod = ours.get_submodule(name)
            w_ours = mod.merged_weight()[0] if isinstance(mod, HeadRowsLinear) else mod.weight.detach()
            drift_mask = max(drift_mask, (w_mask - w0)[keep].abs().max().item())
            drift_ours = max(drift_ours, (w_ours - w0)[keep].abs().max().item())
    print(f"\n== 2. gradient masking vs. the hook: {len(sel)} of {spec.total_heads} heads, AdamW wd 0.1, {steps} steps")
    print(f"   max drift of non-selected Q/K/V rows   masking {drift_mask:.3e}   hook {drift_ours:.3e}")
    print(f"   elements the optimizer updates         masking {n_mask:,}   hook {n_ours:,}   ({n_mask / n_ours:.2f}x)")
    print(
        f"   Adam state bytes (fp32 m + v)          masking {state_mask:,}   hook {state_ours:,}   "
        f"({state_mask / state_ours:.2f}x less; goal >= 5x)"
    )
    n, g, L = spec.num_heads, spec.num_kv_heads, spec.num_layers
    bound = (n + 2 * g) * L / (3 * len(sel))
    print(f"   kv='group' worst case (no kv head shared by two selected heads): (n+2g)L/3K = {bound:.2f}x")
    none = apply(copy.deepcopy(base), sel, kv="none").trainable
    print(f"   with kv='none' (Q rows only) the hook trains {none:,} elements ({n_mask / none:.2f}x less)")


def bench_step(cfg, sel: HeadSelection, repeat: int, batch_shape: tuple[int, int]) -> None:
    batch = torch.randint(3, cfg.vocab_size, batch_shape, generator=torch.Generator().manual_seed(0))
    base = build_model(cfg, seed=0)
    spec = AttentionSpec.from_config(cfg)
    nobody = HeadSelection(spec.fingerprint, (), Provenance("none"))

    def variant(kind):
        m = copy.deepcopy(base)
        if kind == "full":
            return m
        if kind == "heads":
            apply(m, sel)
        elif kind == "heads+rest":
            apply(m, sel, train_others="all")
        else:
            apply(m, nobody, train_others="all")  # Q/K/V fully frozen, rest trained
        return m

    def step_fn(model):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.1)

        def step():
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    models = {k: variant(k) for k in ("full", "heads", "heads+rest", "qkv-frozen+rest")}
    steps = {k: step_fn(m) for k, m in models.items()}
    times = interleaved(steps, repeat)
    print(f"\n== 3. training step time, batch {batch_shape}, median of {repeat} (interleaved)")
    for k in models:
        print(f"   {k:<18} {times[k] * 1e3:9.1f} ms   trainable {trainable_report(models[k]).trainable:>12,}")
    print(f"   heads-only / full fine-tuning          {times['heads'] / times['full']:.2f}x (goal <= 0.72x)")
    overhead = times["heads+rest"] / times["qkv-frozen+rest"]
    print(f"   heads+rest / Q/K/V frozen+rest         {overhead:.2f}x (goal <= 1.10x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats (smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    # Llama-3.2-1B's head geometry (32 query heads, 8 kv heads), scaled down in width and depth.
    layers, hidden, heads, kv, hd = (2, 256, 32, 8, 8) if args.quick else (4, 512, 32, 8, 16)
    cfg = tiny_config(
        "llama", layers=layers, hidden=hidden, heads=heads, kv_heads=kv, head_dim=hd, vocab=2048, intermediate=1376
    )
    spec = AttentionSpec.from_config(cfg)
    k = count_for_ratio(0.1, spec.num_layers, spec.num_heads)
    sel = HeadSelection(
        spec.fingerprint, tuple(random_heads(spec.num_layers, spec.num_heads, k, 0)), Provenance("random")
    )
    print(f"model: llama {layers} layers, hidden {hidden}, {heads} heads / {kv} kv heads, head_dim {hd}; ratio 0.1")
    bench_compose(hidden * 2, 1024 if args.quick else 4096, 0.1, 5 if args.quick else 15)
    bench_masking(cfg, sel, steps=3)
    bench_step(cfg, sel, 3 if args.quick else 5, (2, 128) if args.quick else (4, 256))


if __name__ == "__main__":
    main()
