"""The demo pipeline, run on every rank of one process group (``python -m alps_ds.demo.ranks OUT``).

1. pre-train a tiny Llama-style base on the synthetic task family;
2. fully fine-tune it on the target task: the task model;
3. localize heads (``alps-ds localize`` on the saved base and task checkpoints, rank 0);
4. per seed, fine-tune the base on a fresh target dataset in five arms, evaluate each on a
   held-out set, and collect trainable elements and measured optimizer-state bytes.

Every training stage is an ``alps-ds train`` run (:func:`alps_ds.train.loop.train`, called in
this process group so DeepSpeed and the imports start once); its YAML is kept under
``OUT/runs/`` so any arm can be re-run alone with ``alps-ds train --config``. Rank 0 writes
``results.json`` after every arm, so a crash keeps what finished.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from alps_ds.demo.config import ARMS, DemoConfig
from alps_ds.demo.tasks import TASKS, VOCAB_SIZE, generate, max_tokens, save_tokenizer, write_jsonl
from alps_ds.fsutil import atomic_write_text

# Stage ids keep the random streams of the datasets apart.
_PRETRAIN, _TASK_DATA, _FRESH_DATA, _EVAL_DATA, _HEADS = range(1, 6)


def stream_seed(*parts: int) -> int:
    """A reproducible 32-bit seed from several integers (no collisions between stages or seeds)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy over answer tokens and EOS
    accuracy: float  # exact match: every answer token is the argmax, i.e. greedy decoding reproduces the answer
    examples: int


class Demo:
    def __init__(self, out: Path, cfg: DemoConfig):
        self.out = out
        self.cfg = cfg
        self.rank = dist.get_rank()
        self.data_dir = out / "data"
        self.runs = out / "runs"
        from deepspeed.accelerator import get_accelerator

        self.device = torch.device(get_accelerator().current_device_name())
        self.tokenizer = None

    # ---- files shared by all ranks ------------------------------------------------------------------
    def on_rank0(self, fn) -> None:
        """Run ``fn`` on rank 0 while the others wait (files written there are then visible to all)."""
        if self.rank == 0:
            fn()
        dist.barrier()

    def dataset(self, name: str, tasks, count: int, seed: int, weights=None) -> Path:
        path = self.data_dir / f"{name}.jsonl"
        self.on_rank0(lambda: write_jsonl(path, generate(tasks, count, seed, weights=weights)))
        return path

    # ---- one alps-ds train run ----------------------------------------------------------------------
    def train(self, name: str, model: Path, data: Path, *, steps: int, lr: float, selection: dict, others: list):
        """An ``alps-ds train`` run in this process group; returns (summary on rank 0 else None, run folder)."""
        import yaml

        from alps_ds.train.config import load_config
        from alps_ds.train.loop import train

        cfg = self.cfg
        run = self.runs / name
        config = {
            "model": {"path": str(model)},
            "selection": selection,
            "kv": "group",
            "train_others": others,
            "data": {
                "datasets": [{"path": str(data), "format": "prompt-completion"}],
                "template": "chat",
                "max_length": max_tokens(),
            },
            "train": {
                "micro_batch": cfg.micro_batch,
                "batch": cfg.batch,
                "lr": lr,
                "weight_decay": 0.01,
                "max_steps": steps,
                "warmup_ratio": 0.1,
                "seed": cfg.seed,
            },
            "deepspeed": {"zero_optimization": {"stage": 2}},
            "output": {"dir": str(run), "checkpoint_every": 0, "keep_checkpoints": 1, "merged": True, "adapter": False},
            "logging": {"every": 5, "progress": True},
        }
        path = self.runs / f"{name}.yaml"
        self.on_rank0(lambda: atomic_write_text(path, yaml.safe_dump(config, sort_keys=False)))
        summary = train(load_config(path))
        return summary, run

    # ---- evaluation -------------------------------------------------------------------------------
    def encode(self, rows: list[dict]):
        """Token ids and labels exactly as ``alps-ds train`` builds them (same template, same masking)."""
        from alps_ds.train.data import Example, chat_segments, encode, to_messages

        out = []
        for i, row in enumerate(rows):
            where = f"held-out row {i}"
            segments = chat_segments(to_messages(row, "prompt-completion", where), None, self.tokenizer, where)
            ids, labels = encode(segments, self.tokenizer, bos=False)
            out.append(Example(tuple(ids), tuple(labels)))
        return out

    @torch.no_grad()
    def evaluate(self, model_dir: Path, examples: list, *, model=None) -> EvalResult:
        """Held-out answer loss and exact-match accuracy; each rank scores every world-th example."""
        import torch.nn.functional as F
        from transformers import AutoModelForCausalLM

        from alps_ds.train.data import IGNORE, collate

        if model is None:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.to(self.device).eval()
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, tokens, exact matches
        mine = examples[self.rank :: dist.get_world_size()]
        for i in range(0, len(mine), 128):
            batch = {k: v.to(self.device) for k, v in collate(mine[i : i + 128], pad_id=0).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            target = batch["labels"][:, 1:]
            mask = target != IGNORE
            stats[0] += F.cross_entropy(logits[mask].float(), target[mask], reduction="sum").double()
            stats[1] += mask.sum()
            stats[2] += ((logits.argmax(-1) == target) | ~mask).all(-1).sum()
        dist.all_reduce(stats)
        return EvalResult(
            loss=float(stats[0] / stats[1]), accuracy=float(stats[2] / len(examples)), examples=len(examples)
        )

    def scalars(self, run: Path, values: dict[str, float], step: int) -> None:
        """Held-out numbers into the run's TensorBoard folder, beside the training curves."""
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(str(run / "tensorboard")) as w:
                for tag, v in values.items():
                    w.add_scalar(tag, v, step)

    # ---- the stages ---------------------------------------------------------------------------------
    def init_model(self) -> Path:
        """A random tiny Llama with plain multi-head attention and the task tokenizer."""
        from alps_ds.tiny import build_model, save_model, tiny_config

        cfg = self.cfg
        path = self.out / "init"

        def build() -> None:
            config = tiny_config(
                "llama",
                layers=cfg.layers,
                hidden=cfg.hidden,
                heads=cfg.heads,
                kv_heads=cfg.heads,  # every head owns its K/V rows: the 10 % arms train equal element counts
                vocab=VOCAB_SIZE,
                intermediate=cfg.intermediate,
                max_positions=64,
            )
            save_model(build_model(config, seed=cfg.seed), path)
            save_tokenizer(path)

        self.on_rank0(build)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        return path

    def pretrain(self, init: Path) -> tuple[Path, dict]:
        cfg = self.cfg
        tasks, weights = zip(*cfg.pretrain_tasks)
        data = self.dataset("pretrain", tasks, cfg.pretrain_examples, stream_seed(cfg.seed, _PRETRAIN), weights)
        log(f"[1/4] pre-training the base on {', '.join(TASKS)} ({cfg.target} rare), {cfg.pretrain_steps} steps")
        summary, run = self.train(
            "pretrain",
            init,
            data,
            steps=cfg.pretrain_steps,
            lr=cfg.pretrain_lr,
            selection={"method": "all"},
            others=["all"],
        )
        base = run / "merged"
        per_task = {
            t: self.evaluate(base, self.encode(generate([t], 256, stream_seed(cfg.seed, _EVAL_DATA, i))))
            for i, t in enumerate(TASKS)
        }
        log("      base accuracy per task: " + ", ".join(f"{t} {r.accuracy:.2f}" for t, r in per_task.items()))
        self.scalars(run, {f"base_accuracy/{t}": r.accuracy for t, r in per_task.items()}, cfg.pretrain_steps)
        return base, {"summary": summary and asdict(summary), "accuracy": {t: r.accuracy for t, r in per_task.items()}}

    def task_model(self, base: Path, held_out: list) -> tuple[Path, dict]:
        cfg = self.cfg
        data = self.dataset("task", [cfg.target], cfg.finetune_examples, stream_seed(cfg.seed, _TASK_DATA))
        log(f"[2/4] task model: fully fine-tuning the base on {cfg.target!r}, {cfg.task_steps} steps")
        summary, run = self.train(
            "task-model", base, data, steps=cfg.task_steps, lr=cfg.task_lr, selection={"method": "all"}, others=["all"]
        )
        ev = self.evaluate(run / "merged", held_out)
        log(f"      task model on held-out {cfg.target!r}: loss {ev.loss:.4f}, accuracy {ev.accuracy:.3f}")
        self.scalars(run, {"heldout/loss": ev.loss, "heldout/accuracy": ev.accuracy}, cfg.task_steps)
        return run / "merged", {"summary": summary and asdict(summary), "eval": asdict(ev)}

    def localize(self, base: Path, task: Path):
        """``alps-ds localize`` (rank 0): heads.json, scores.csv and heatmap.png in OUT/localize."""
        from alps_ds.cli import main as cli_main
        from alps_ds.selection import HeadSelection

        log("[3/4] localizing heads: ALPS scores of base vs task model")
        target = self.out / "localize"
        code = torch.zeros(1, dtype=torch.int64, device=self.device)  # NCCL broadcasts GPU tensors only
        if self.rank == 0:
            argv = ["localize", "--base", str(base), "--task", str(task), "--out", str(target)]
            code[0] = cli_main([*argv, "--ratio", str(self.cfg.ratio), "--device", "cpu", "--quiet"])
        dist.broadcast(code, 0)
        if int(code[0]) != 0:
            raise SystemExit(f"alps-ds localize exited {int(code[0])}")
        selection = HeadSelection.load(target / "heads.json")
        log("      ALPS heads (layer:head): " + ", ".join(f"{a}:{b}" for a, b in selection.heads))
        return target / "heads.json", selection

    def arm(self, arm: str, seed: int, base: Path, heads_json: Path, data: Path, held_out: list) -> dict:
        cfg = self.cfg
        name = f"{arm}-seed{seed}"
        selection = {
            "alps": {"heads": str(heads_json)},
            "random": {"method": "random", "ratio": cfg.ratio, "seed": stream_seed(seed, _HEADS, 0)},
            "layer-consistent": {
                "method": "layer-consistent",
                "ratio": cfg.ratio,
                "seed": stream_seed(seed, _HEADS, 1),
            },
            "all": {"method": "all"},
        }.get(arm)
        if selection is None:
            # No heads and nothing else trainable: there is nothing to optimize, the arm is the base itself.
            summary, run, model_dir, heads = None, self.runs / name, base, []
        else:
            summary, run = self.train(
                name, base, data, steps=cfg.arm_steps, lr=cfg.arm_lr, selection=selection, others=[]
            )
            model_dir = run / "merged"
            heads = json.loads((run / "heads.json").read_text())["heads"]
        ev = self.evaluate(model_dir, held_out)
        self.scalars(run, {"heldout/loss": ev.loss, "heldout/accuracy": ev.accuracy}, cfg.arm_steps if summary else 0)
        log(f"      {arm:<17} seed {seed}: held-out loss {ev.loss:.4f}, accuracy {ev.accuracy:.3f}")
        if self.rank != 0:
            return {}
        return {
            "arm": arm,
            "seed": seed,
            "heads": heads,
            "trainable_elements": summary.trainable_elements if summary else 0,
            "optimizer_bytes_per_rank": [r["total_bytes"] for r in summary.optimizer_bytes_per_rank] if summary else [],
            "steps": summary.steps if summary else 0,
            "first_loss": summary.first_loss if summary else None,
            "final_loss": summary.final_loss if summary else None,
            "train_seconds": summary.wall_seconds if summary else 0.0,
            "eval": asdict(ev),
            "run": str(run),
        }


def main(argv: list[str]) -> int:
    import huggingface_hub.utils
    import transformers

    from alps_ds.train.distributed import init_distributed, shutdown

    out = Path(argv[0]).resolve()
    cfg = DemoConfig.load(out / "config.json")
    # Loading and saving a 2 MB model many times: their progress bars would only bury the demo's own lines.
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    init_distributed()
    started = time.time()
    demo = Demo(out, cfg)
    results: dict = {"config": asdict(cfg), "world_size": dist.get_world_size(), "arms": []}

    def flush() -> None:
        if demo.rank == 0:
            atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")

    init = demo.init_model()
    held_out = demo.encode(generate([cfg.target], cfg.eval_examples, stream_seed(cfg.seed, _EVAL_DATA, 99)))
    base, results["pretrain"] = demo.pretrain(init)
    task, results["task_model"] = demo.task_model(base, held_out)
    heads_json, alps = demo.localize(base, task)
    results["alps_heads"] = [list(h) for h in alps.heads]
    results["base"], results["task"], results["heatmap"] = str(base), str(task), str(out / "localize" / "heatmap.png")
    flush()
    log(f"[4/4] fine-tuning the base on fresh {cfg.target!r} data: {len(ARMS)} arms x {cfg.seeds} seed(s)")
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        fresh = demo.dataset(f"fresh-seed{seed}", [cfg.target], cfg.finetune_examples, stream_seed(seed, _FRESH_DATA))
        for arm in ARMS:
            results["arms"].append(demo.arm(arm, seed, base, heads_json, fresh, held_out))
            flush()
    results["seconds"] = time.time() - started
    flush()
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
