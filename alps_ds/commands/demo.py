"""``alps-ds demo``: ALPS end to end on a tiny model in a few minutes, ending in one comparison table.

This process only prepares OUT, starts the ranks (``python -m alps_ds.demo.ranks`` under
torchrun: DeepSpeed, one process group for every stage) and renders their ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from alps_ds.argtypes import integer, number, ratio
from alps_ds.errors import AlpsError

HELP = "run ALPS end to end on a tiny model (pre-train, task model, localize, the paper's arms) and test its claims"
DESCRIPTION = (
    "Builds a tiny Llama-style model, pre-trains it on a synthetic task family (copy, reverse, sort, rotate, "
    "successor, lookup), fully fine-tunes it on the target task to get a task model and localizes heads with "
    "ALPS. Then, per seed, fine-tunes the base on fresh target data on 2 local DeepSpeed ranks: in the "
    "paper setting (the rest of the network trains in every arm; ALPS 10 %%, random 10 %%, layer-consistent "
    "10 %%, all heads, no heads), heads only (the same arms, nothing else trains) and as PEFT LoRA on q/k/v; "
    "and ALPS vs random 10 %% on a transfer dataset of the same task from another distribution. Every arm is "
    "scored on the held-out target set and on the other five tasks (forgetting). Prints a table (mean ± std "
    "over seeds) and one line per claim of the paper. Writes OUT/table.txt, OUT/results.json, the head heatmap "
    "OUT/localize/heatmap.png and TensorBoard logs under OUT/runs. See docs/demo.md."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="alps-demo", metavar="DIR", help="output folder (default ./alps-demo)")
    parser.add_argument(
        "--seeds",
        type=integer(1),
        default=None,
        metavar="N",
        help="fine-tuning seeds to average (default 3; 1 with --quick)",
    )
    parser.add_argument(
        "--steps", type=number(above=0), default=1.0, metavar="X", help="multiply every step count by X (default 1.0)"
    )
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when present (default)"
    )
    parser.add_argument("--nproc", type=integer(1), default=2, metavar="N", help="local ranks (default 2)")
    parser.add_argument("--task", default="reverse", metavar="NAME", help="target task (default reverse)")
    parser.add_argument("--ratio", type=ratio, default=0.1, metavar="R", help="head ratio of the 10 %% arms")
    parser.add_argument(
        "--seed", type=integer(0), default=0, help="seed of the base, the task model and the first arm seed"
    )
    parser.add_argument("--quick", action="store_true", help="a much shorter run (smoke test; numbers mean little)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device(choice: str, nproc: int) -> str:
    import torch

    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise AlpsError("--device cuda: no CUDA device is visible; use --device cpu")
        if nproc > count:
            raise AlpsError(f"--nproc {nproc} needs {nproc} GPUs but {count} is visible; pass --nproc {count}")
    return choice


def _launch(out: Path, nproc: int, device: str) -> int:
    """Start the ranks; their output goes to the terminal and to OUT/demo.log."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    argv += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    argv += ["-m", "alps_ds.demo.ranks", str(out)]
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR=device,
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONUNBUFFERED="1",
    )
    if device == "cpu":
        # One thread per rank: on a few cores, ranks with several threads each oversubscribe and crawl.
        env["OMP_NUM_THREADS"] = "1"
    with open(out / "demo.log", "wb") as logf:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        try:
            while chunk := os.read(proc.stdout.fileno(), 65536):
                logf.write(chunk)
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
        except BaseException:  # Ctrl-C or SIGTERM: stop the ranks too, before their folder is removed
            proc.terminate()
            proc.wait()
            raise
        return proc.wait()


def _relocate(work: Path, out: Path) -> None:
    """Paths the ranks recorded (results.json, each arm's run YAML, heads.json provenance) name the folder the
    demo was built in; make them name OUT, where it is about to be swapped in."""
    for path in work.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".yaml", ".txt", ".log"):
            text = path.read_text(errors="surrogateescape")
            if str(work) in text:
                path.write_text(text.replace(str(work), str(out)), errors="surrogateescape")


def _table(work: Path, cfg, where: str, started: float) -> str:
    """The comparison table of the ranks' results.json, also written to table.txt."""
    from alps_ds.demo.report import claims, render_table, retained, summarize

    results = json.loads((work / "results.json").read_text())
    stats = summarize(results)
    minutes = (time.time() - started) / 60
    head = (
        f"ALPS demo: target {cfg.target!r}, {results['world_size']} rank(s) on {where} (DeepSpeed ZeRO-2, fp32), "
        f"{cfg.arm_steps} steps per arm, held-out {cfg.eval_examples} examples, "
        f"{cfg.seeds} seed(s), {minutes:.1f} min"
    )
    base = retained(results["pretrain"]["eval"], cfg.target)
    text = "\n".join([head, "", render_table(stats, base), "", claims(stats)]) + "\n"
    (work / "table.txt").write_text(text)
    return text


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from alps_ds.demo.config import DemoConfig
    from alps_ds.fsutil import atomic_dir, check_output_dir

    cfg = (DemoConfig.quick() if args.quick else DemoConfig()).scaled(args.steps)
    seeds = cfg.seeds if args.seeds is None else args.seeds
    cfg = replace(cfg, seeds=seeds, nproc=args.nproc, target=args.task, ratio=args.ratio, seed=args.seed).check()
    cfg = replace(cfg, device=_device(args.device, args.nproc))
    # A previous demo in OUT stays in place until this one has finished: the run is built beside it.
    out = check_output_dir(args.out, flag="--out", command="demo")
    where = "CPU" if cfg.device == "cpu" else "CUDA"
    print(
        f"alps-ds demo: {cfg.nproc} rank(s) on {where}, target task {cfg.target!r}, {cfg.seeds} seed(s), output {out}",
        flush=True,
    )
    started = time.time()
    with atomic_dir(out, command="demo") as work:
        cfg.save(work / "config.json")
        code = _launch(work, cfg.nproc, cfg.device)
        if code != 0:
            raise AlpsError(f"the demo's ranks exited with code {code}; see the output above ({out} is unchanged)")
        text = _table(work, cfg, where, started)
        _relocate(work, out)
    print("\n" + text)
    print(f"heatmap: {out / 'localize' / 'heatmap.png'}   TensorBoard: tensorboard --logdir {out / 'runs'}")
    return 0
