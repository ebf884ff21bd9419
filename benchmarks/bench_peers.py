"""ALPS against the fine-tuning methods a user would pick instead: one model, one engine, one run.

Arms (all through ``deepspeed.initialize`` on the same ranks, torch AdamW, weight decay 0.1):
  full            full fine-tuning
  lora-r128       PEFT LoRA r=128 on q/k/v (the paper's LoRA baseline), alpha 2r, no dropout
  lora-r16        PEFT LoRA r=16 on q/k/v
  grad-mask       whole q/k/v trainable, a gradient hook zeroing every row outside the selected
                  heads (how axolotl's ``unfrozen_parameters`` row ranges work)
  qkv-frozen      everything but q/k/v trained (the paper's "w/o attn")
  alps-heads      ALPS: only the selected heads' q/k/v rows (10 % of heads)
  alps-heads+rest ALPS rows plus everything but q/k/v

Per arm and ZeRO stage: median step time (every arm's steps interleaved in ONE 2-rank launch,
so load from other processes hits all arms alike), tokens/s, optimizer-state bytes per rank
(read from the engine's optimizer: fp32 master partitions + Adam moments), trainable elements;
and peak memory of the arm built alone: on CPU the peak RSS of a fresh launch per arm, on CUDA
the allocator's peak above what was allocated before the arm (arms in turn in one launch).
fp32 on CPU (gloo), bf16 on CUDA (nccl). The script launches its own ranks (torchrun).

usage: python benchmarks/bench_peers.py [--quick] [--arms full,alps-heads] [--stages 2 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = ("full", "lora-r128", "lora-r16", "grad-mask", "qkv-frozen", "alps-heads", "alps-heads+rest")
REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 layers, hidden 256, batch 2 x 128, 3 repeats (smoke run)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4, help="micro batch per rank")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--ratio", type=float, default=0.1, help="fraction of heads ALPS and grad-mask train")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random head selection")
    ap.add_argument("--repeat", type=int, default=7, help="timed steps per arm (median reported)")
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3], choices=[0, 1, 2, 3])
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    ap.add_argument("--nproc", type=int, help="ranks (default 2; on CUDA at most the GPU count)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-arm peak-memory launches")
    ap.add_argument("--json", type=Path, help="also write all results to this JSON file")
    ap.add_argument("--worker", choices=["time", "memory"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.head_dim, args.batch, args.seq = 2, 256, 8, 2, 128
        args.repeat = min(args.repeat, 3)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not args.worker:
        import torch

        args.cuda = torch.cuda.is_available()
        args.nproc = args.nproc or (min(2, torch.cuda.device_count()) if args.cuda else 2)
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown:
        ap.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    return args


# ---------------------------------------------------------------- worker side (one per rank)


def model_config(args):
    from alps_ds.tiny import tiny_config

    return tiny_config(
        "llama",
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        vocab=args.vocab,
        intermediate=args.intermediate,
    )


def selection(cfg, args):
    """``args.ratio`` of all heads, chosen at random with ``args.seed`` (the same on every rank)."""
    from alps_ds.arch import AttentionSpec
    from alps_ds.choose import count_for_ratio, random_heads
    from alps_ds.selection import HeadSelection, Provenance

    spec = AttentionSpec.from_config(cfg)
    k = count_for_ratio(args.ratio, spec.num_layers, spec.num_heads)
    heads = tuple(random_heads(spec.num_layers, spec.num_heads, k, args.seed))
    return spec, HeadSelection(spec.fingerprint, heads, Provenance("random"))


def mask_rows(model, spec, sel) -> None:
    """Gradient masking: q/k/v weights wholly trainable, a tensor hook zeroing non-selected rows' gradients."""
    import torch

    from alps_ds.layout import trainable_rows

    rows = {spec.module_path(r.layer, r.module): r.indices() for r in trainable_rows(spec, sel.heads, "group")}
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in range(spec.num_layers):
        for m in spec.modules:
            name = spec.module_path(layer, m)
            w = model.get_submodule(name).weight
            w.requires_grad_(True)
            keep = torch.zeros(w.shape[0], 1, dtype=w.dtype, device=w.device)
            keep[torch.tensor(rows.get(name, []), dtype=torch.long)] = 1
            # The engine may move the model after this (to CUDA, to bf16): follow the gradient.
            w.register_hook(lambda g, keep=keep: g * keep.to(device=g.device, dtype=g.dtype))


def build_arm(arm: str, cfg, spec, sel):
    """A fresh base model (seed 0) set up for ``arm``; nothing else differs between arms."""
    from alps_ds.selection import HeadSelection, Provenance
    from alps_ds.sparse import apply
    from alps_ds.tiny import build_model

    model = build_model(cfg, seed=0)
    if arm == "full":
        return model
    if arm.startswith("lora-r"):
        from peft import LoraConfig, get_peft_model

        r = int(arm.removeprefix("lora-r"))
        lora = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(spec.modules))
        return get_peft_model(model, lora)
    if arm == "grad-mask":
        mask_rows(model, spec, sel)
        return model
    if arm == "qkv-frozen":
        apply(model, HeadSelection(spec.fingerprint, (), Provenance("none")), train_others="all")
    else:
        apply(model, sel, train_others="all" if arm == "alps-heads+rest" else ())
    return model


def ds_config(stage: int, bf16: bool, batch: int) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def optimizer_state_bytes(engine) -> int:
    """Bytes this rank's optimizer holds after a step, read from it: each tensor it updates (ZeRO's
    fp32 master partitions) and their non-scalar state (Adam's moments). ZeRO-3 detaches its
    partitions from ``param_groups`` between steps, so the state's own keys are read."""
    import torch

    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    seen: dict[int, torch.Tensor] = {}
    for p, state in inner.state.items():
        seen[id(p)] = p
        for t in state.values():
            if torch.is_tensor(t) and t.dim() > 0:
                seen[id(t)] = t
    return sum(t.numel() * t.element_size() for t in seen.values())


def make_engine(arm, stage, args, cfg, spec, sel, bf16):
    import deepspeed
    import torch

    from alps_ds.sparse.module import full_numel

    model = build_arm(arm, cfg, spec, sel)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(full_numel(p) for p in params)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage, bf16, args.batch))
    engine.train()
    return engine, trainable


def step_fn(engine, batch):
    import torch

    def step():
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        if batch.is_cuda:
            torch.cuda.synchronize()

    return step


def time_stage(stage, args, cfg, spec, sel, bf16, device) -> dict[str, dict]:
    """Build every arm's engine for ``stage``, then time their steps interleaved (slowest rank per sample)."""
    import torch
    import torch.distributed as dist

    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(1000 + rank)
    batch = torch.randint(3, cfg.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    engines, out, steps = {}, {}, {}
    for arm in args.arms:
        engines[arm], trainable = make_engine(arm, stage, args, cfg, spec, sel, bf16)
        steps[arm] = step_fn(engines[arm], batch)
        out[arm] = {"trainable": trainable}
    for step in steps.values():  # warm-up (also allocates Adam state lazily)
        step()
    samples = {arm: [] for arm in args.arms}
    for _ in range(args.repeat):
        for arm, step in steps.items():
            dist.barrier()
            t = time.perf_counter()
            step()
            samples[arm].append(time.perf_counter() - t)
    for arm in args.arms:
        t = torch.tensor(samples[arm], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step is as slow as its slowest rank
        state = torch.tensor([optimizer_state_bytes(engines[arm])], dtype=torch.float64, device=device)
        gathered = [torch.zeros_like(state) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, state)
        out[arm].update(step_s=statistics.median(t.tolist()), opt_bytes_per_rank=[int(g.item()) for g in gathered])
        engines[arm].destroy()
    return out


def peak_memory(stage, args, cfg, spec, sel, bf16, device) -> dict[str, dict]:
    """Peak memory of each arm built alone and run for 2 steps. CUDA: arms one after another, the
    allocator's peak above what was allocated before the arm. CPU: this fresh process's peak RSS
    (freed heap is not given back to the OS, so the launcher starts one process per arm)."""
    import gc
    import resource

    import torch

    cuda = device.startswith("cuda")
    if not cuda and len(args.arms) != 1:
        raise SystemExit("bench_peers: peak RSS needs one arm per process")
    out = {}
    for arm in args.arms:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else None
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        engine, _ = make_engine(arm, stage, args, cfg, spec, sel, bf16)
        gen = torch.Generator().manual_seed(1000)
        step = step_fn(engine, torch.randint(3, cfg.vocab_size, (args.batch, args.seq), generator=gen).to(device))
        step()
        step()
        if cuda:
            out[arm] = {"peak_rss": None, "peak_cuda": torch.cuda.max_memory_allocated() - before}
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            out[arm] = {"peak_rss": peak, "rss_before_model": rss_before, "peak_cuda": None}
        engine.destroy()
        del engine, step
    return out


def worker(args) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    cuda = get_accelerator().device_name() == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    cfg = model_config(args)
    spec, sel = selection(cfg, args)
    fn = time_stage if args.worker == "time" else peak_memory
    results = {str(stage): fn(stage, args, cfg, spec, sel, cuda, device) for stage in args.stages}
    if args.worker == "memory":  # every rank's peak; the launch reports the largest
        keys = [(s, a) for s, v in results.items() for a in v]
        mine = torch.tensor([[results[s][a]["peak_rss"] or 0, results[s][a]["peak_cuda"] or 0] for s, a in keys])
        mine = mine.to(device)  # nccl reduces CUDA tensors only
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        for (s, arm), (rss, cu) in zip(keys, mine.tolist()):
            results[s][arm].update(peak_rss=None if cuda else int(rss), peak_cuda=int(cu) if cuda else None)
    if dist.get_rank() == 0:
        meta = {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": "bf16" if cuda else "fp32"}
        meta.update(world=dist.get_world_size(), heads=len(sel), total_heads=spec.total_heads)
        args.out.write_text(json.dumps({"meta": meta, "stages": results}))
    dist.barrier()
    dist.destroy_process_group()  # before exit: gloo torn down at exit can abort a finished rank (SIGABRT)


# ---------------------------------------------------------------- launcher side


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MODEL_FLAGS = ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "batch", "seq")


def worker_argv(args, phase: str, stages, arms, out: Path) -> list[str]:
    """torchrun command running this script as ``phase`` worker with the launcher's resolved sizes."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc)]
    argv += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__]
    for flag in (*MODEL_FLAGS, "ratio", "seed", "repeat"):
        argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return argv + ["--worker", phase, "--out", str(out), "--arms", ",".join(arms), "--stages", *map(str, stages)]


def launch(args, phase: str, stages, arms) -> dict:
    """Run this script as ``phase`` worker on ``args.nproc`` ranks; the JSON rank 0 wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        if not args.cuda:
            env.setdefault("DS_ACCELERATOR", "cpu")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        proc = subprocess.run(worker_argv(args, phase, stages, arms, out), env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stdout + proc.stderr)[-4000:]
            sys.exit(f"bench_peers: the {phase} launch failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out.read_text())


def ratio(r: dict, ref: dict | None) -> str:
    return "-" if ref is None else f"{r['step_s'] / ref['step_s']:.2f}x"


def mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def report(args, res: dict) -> None:
    m = res["meta"]
    print(
        f"model: llama {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.kv_heads} kv, "
        f"head_dim {args.head_dim}, vocab {args.vocab}; batch {args.batch} x {args.seq} per rank, {m['world']} ranks, "
        f"{m['dtype']} on {m['device']}; ALPS / grad-mask: {m['heads']} of {m['total_heads']} heads (random, "
        f"seed {args.seed}), kv='group'; median of {args.repeat} interleaved steps"
    )
    tokens = m["world"] * args.batch * args.seq
    for stage, arms in res["stages"].items():
        print(f"\nZeRO-{stage}")
        head = f"{'arm':<16}{'step ms':>9}{'tok/s':>9}{'vs full':>8}{'vs r128':>8}{'trainable':>12}"
        print(head + f"{'opt B/rank':>13}{'opt vs mask':>12}{'peak RSS MiB':>14}{'CUDA MiB':>10}")
        full, lora = arms.get("full"), arms.get("lora-r128")
        mask = arms.get("grad-mask")
        for arm, r in arms.items():
            opt = max(r["opt_bytes_per_rank"])
            vs_mask = "-" if mask is None else f"{opt / max(mask['opt_bytes_per_rank']):.3f}"
            print(
                f"{arm:<16}{r['step_s'] * 1e3:9.1f}{tokens / r['step_s']:9.0f}{ratio(r, full):>8}{ratio(r, lora):>8}"
                f"{r['trainable']:>12,}{opt:>13,}{vs_mask:>12}{mib(r.get('peak_rss')):>14}{mib(r.get('peak_cuda')):>10}"
            )
        goals(arms)


def goals(arms: dict) -> None:
    """The issue-16 goals this stage's numbers speak to (only those whose arms ran)."""
    a = arms.get("alps-heads")
    if a is None:
        return
    checks = []
    if "full" in arms:
        checks.append(("alps-heads / full step", a["step_s"] / arms["full"]["step_s"], 0.72))
    if "lora-r128" in arms:
        checks.append(("alps-heads / lora-r128 step", a["step_s"] / arms["lora-r128"]["step_s"], 1.0))
    if "grad-mask" in arms:
        mask = max(arms["grad-mask"]["opt_bytes_per_rank"])
        checks.append(("alps-heads / grad-mask optimizer bytes", max(a["opt_bytes_per_rank"]) / mask, 0.2))
    for label, value, goal in checks:
        print(f"  {label:<40}{value:6.3f}  (goal <= {goal}: {'met' if value <= goal else 'NOT met'})")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    res = launch(args, "time", args.stages, args.arms)
    if not args.no_memory:  # CUDA: one launch (the allocator's peak resets per arm); CPU: one per arm
        jobs = [(args.stages, args.arms)] if args.cuda else [([s], [a]) for s in args.stages for a in args.arms]
        for stages, arms in jobs:
            for stage, per_arm in launch(args, "memory", stages, arms)["stages"].items():
                for arm, mem in per_arm.items():
                    res["stages"][stage][arm].update(mem)
    res["command"] = " ".join(["python", "benchmarks/bench_peers.py", *(sys.argv[1:] if argv is None else argv)])
    report(args, res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
