"""``alps-ds train``: fine-tune only the selected heads (DeepSpeed or megatron-core), YAML to exported model."""

from __future__ import annotations

import argparse

HELP = "train the selected heads' Q/K/V rows (DeepSpeed or megatron-core) from a run YAML; checkpoint, resume, export"
DESCRIPTION = (
    "Train a base model on a dataset while only the selected attention heads' Q/K/V rows (and "
    "train_others) update, on DeepSpeed (default) or megatron-core (--set engine=megatron --set "
    "parallel.tp=T). Runs as one process or under deepspeed, torchrun or mpirun. Writes "
    "OUT/checkpoints, OUT/tensorboard, OUT/merged (a Hugging Face model), OUT/adapter and "
    "OUT/summary.json. See docs/train.md for every config key."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="RUN.yaml", help="run config (see configs/tiny.yaml, configs/paper_recipe.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=1e-4 --set data.packing=true (repeatable)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output.dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from alps_ds.train.config import load_config, output_dir

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    output_dir(cfg)  # before DeepSpeed starts: a bad output.dir is one line, and nothing is written
    from alps_ds.train.distributed import shutdown
    from alps_ds.train.loop import train

    try:
        train(cfg, resume=args.resume)
    except BaseException:
        shutdown(wait=False)
        raise
    shutdown()
    return 0
