"""The demo pipeline, run on every rank of one process group (``python -m alps_ds.demo.ranks OUT``).

1. pre-train a tiny Llama-style base on the synthetic task family;
2. fully fine-tune it on the target task: the task model;
3. localize heads (``alps-ds localize`` on the saved base and task checkpoints, rank 0);
4. per seed, fine-tune the base on a fresh target dataset in the paper setting (heads + the rest
   of the network: ALPS, random, layer-consistent 10 %, all heads, no heads), in the heads-only
   setting (the same arms, nothing else trainable) and as PEFT LoRA on q/k/v; then ALPS and random
   10 % (paper setting) on a transfer dataset of the same task from another distribution. Every arm
   is scored on the held-out target set and on each other task (what it kept of the base), with
   its trainable elements and measured optimizer-state bytes.

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

from alps_ds.demo.config import ARMS, LORA, SETTINGS, TRANSFER_ARMS, DemoConfig
from alps_ds.demo.tasks import (
    TASKS,
    TRANSFER,
    VOCAB_SIZE,
    Distribution,
    generate,
    max_tokens,
    save_tokenizer,
    write_jsonl,
)
from alps_ds.fsutil import atomic_write_text

# Stage ids keep the random streams of the datasets apart.
_PRETRAIN, _TASK_DATA, _FRESH_DATA, _EVAL_DATA, _HEADS, _TRANSFER_DATA = range(1, 7)
TRANSFER_EVAL = 98  # stream index of the transfer held-out set (99: the target's; 0..5: each task's)
TARGET_EVAL = 99


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


@dataclass(frozen=True)
class HeldOut:
    """One held-out set, recorded in results.json so anyone can regenerate and re-score it."""

    name: str  # "target", "transfer" or a task name (retained ability)
    task: str
    count: int
    seed: int
    dist: Distribution = Distribution()

    def rows(self) -> list[dict]:
        return generate([self.task], self.count, self.seed, dist=self.dist)

    def to_dict(self) -> dict:
        return {"task": self.task, "count": self.count, "seed": self.seed, "distribution": asdict(self.dist)}


def held_out_sets(cfg: DemoConfig) -> dict[str, HeldOut]:
    """The target's held-out set, one per task (retained abilities) and the transfer dataset's."""
    sets = {"target": HeldOut("target", cfg.target, cfg.eval_examples, stream_seed(cfg.seed, _EVAL_DATA, TARGET_EVAL))}
    for i, task in enumerate(TASKS):
        sets[task] = HeldOut(task, task, cfg.retain_examples, stream_seed(cfg.seed, _EVAL_DATA, i))
    seed = stream_seed(cfg.seed, _EVAL_DATA, TRANSFER_EVAL)
    sets["transfer"] = HeldOut("transfer", cfg.target, cfg.eval_examples, seed, TRANSFER)
    return sets


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
        self.held_out = held_out_sets(cfg)
        self._encoded: dict[str, list] = {}

    # ---- files shared by all ranks ------------------------------------------------------------------
    def on_rank0(self, fn) -> None:
        """Run ``fn`` on rank 0 while the others wait (files written there are then visible to all)."""
        if self.rank == 0:
            fn()
        dist.barrier()

    def dataset(self, name: str, tasks, count: int, seed: int, weights=None, dist_=None) -> Path:
        path = self.data_dir / f"{name}.jsonl"
        kw = {} if dist_ is None else {"dist": dist_}
        self.on_rank0(lambda: write_jsonl(path, generate(tasks, count, seed, weights=weights, **kw)))
        return path

    # ---- one alps-ds train run ----------------------------------------------------------------------
    def run_config(self, name: str, model: Path, data: Path, *, steps: int, lr: float, selection, others) -> Path:
        """Write OUT/runs/NAME.yaml: the ``alps-ds train`` config of one stage or arm (re-runnable alone)."""
        import yaml

        cfg = self.cfg
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
            "output": {
                "dir": str(self.runs / name),
                "checkpoint_every": 0,
                "keep_checkpoints": 1,
                "merged": True,
                "adapter": False,
            },
            "logging": {"every": 5, "progress": True},
        }
        path = self.runs / f"{name}.yaml"
        self.on_rank0(lambda: atomic_write_text(path, yaml.safe_dump(config, sort_keys=False)))
        return path

    def train(self, name: str, model: Path, data: Path, **kw):
        """An ``alps-ds train`` run in this process group; returns (summary on rank 0 else None, run folder)."""
        from alps_ds.train.config import load_config
        from alps_ds.train.loop import train

        summary = train(load_config(self.run_config(name, model, data, **kw)))
        return summary, self.runs / name

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

    def examples(self, name: str) -> list:
        if name not in self._encoded:
            self._encoded[name] = self.encode(self.held_out[name].rows())
        return self._encoded[name]

    @torch.no_grad()
    def evaluate(self, model, examples: list) -> EvalResult:
        """Held-out answer loss and exact-match accuracy; each rank scores every world-th example."""
        import torch.nn.functional as F

        from alps_ds.train.data import IGNORE, collate

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

    def score(self, model_dir: Path, main: str = "target") -> dict:
        """``{"loss", "accuracy"}`` on held-out set ``main`` and ``per_task`` accuracy on every task's set."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(self.device).eval()
        ev = self.evaluate(model, self.examples(main))
        per_task = {t: self.evaluate(model, self.examples(t)).accuracy for t in TASKS}
        return {"loss": ev.loss, "accuracy": ev.accuracy, "examples": ev.examples, "per_task": per_task}

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
        scored = self.score(base)
        log("      base accuracy per task: " + ", ".join(f"{t} {a:.2f}" for t, a in scored["per_task"].items()))
        self.scalars(run, {f"base_accuracy/{t}": a for t, a in scored["per_task"].items()}, cfg.pretrain_steps)
        return base, {"summary": summary and asdict(summary), "eval": scored}

    def task_model(self, base: Path) -> tuple[Path, dict]:
        cfg = self.cfg
        data = self.dataset("task", [cfg.target], cfg.finetune_examples, stream_seed(cfg.seed, _TASK_DATA))
        log(f"[2/4] task model: fully fine-tuning the base on {cfg.target!r}, {cfg.task_steps} steps")
        summary, run = self.train(
            "task-model", base, data, steps=cfg.task_steps, lr=cfg.task_lr, selection={"method": "all"}, others=["all"]
        )
        scored = self.score(run / "merged")
        log(
            f"      task model on held-out {cfg.target!r}: loss {scored['loss']:.4f}, accuracy {scored['accuracy']:.3f}"
        )
        self.scalars(run, {"heldout/loss": scored["loss"], "heldout/accuracy": scored["accuracy"]}, cfg.task_steps)
        return run / "merged", {"summary": summary and asdict(summary), "eval": scored}

    def localize(self, base: Path, task: Path):
        """ALPS stage 1 on rank 0 (``make_selection``: heads.json, scores.csv, heatmap.png in OUT/localize)."""
        from alps_ds.errors import AlpsError
        from alps_ds.localize import make_selection, write_outputs
        from alps_ds.selection import HeadSelection
        from alps_ds.train.distributed import on_rank0

        log("[3/4] localizing heads: ALPS scores of base vs task model")
        target = self.out / "localize"

        def run() -> None:
            made = make_selection(base, task, method="top-k", ratio=self.cfg.ratio, device="cpu", progress=False)
            write_outputs(made, target)

        try:
            on_rank0(run, self.rank)
        except AlpsError as e:
            raise SystemExit(f"localize: {e}") from e
        selection = HeadSelection.load(target / "heads.json")
        log("      ALPS heads (layer:head): " + ", ".join(f"{a}:{b}" for a, b in selection.heads))
        return target / "heads.json", selection

    def arm(self, setting: str, arm: str, seed: int, base: Path, heads_json: Path, data: Path, held: str) -> dict:
        """One arm of one setting: train (unless nothing would train), score, and its results.json entry."""
        cfg = self.cfg
        name = f"{setting}-{arm}-seed{seed}" if held == "target" else f"{held}-{arm}-seed{seed}"
        selection = {
            "alps": {"heads": str(heads_json)},
            "random": {"method": "random", "ratio": cfg.ratio, "seed": stream_seed(seed, _HEADS, 0)},
            "layer-consistent": {
                "method": "layer-consistent",
                "ratio": cfg.ratio,
                "seed": stream_seed(seed, _HEADS, 1),
            },
            "all": {"method": "all"},
            "none": {"method": "none"},
        }[arm]
        others = SETTINGS[setting]
        if arm == "none" and not others:
            # No heads and nothing else trainable: there is nothing to optimize, the arm is the base itself.
            summary, run, model_dir, heads = None, self.runs / name, base, []
        else:
            summary, run = self.train(
                name, base, data, steps=cfg.arm_steps, lr=cfg.arm_lr, selection=selection, others=others
            )
            model_dir = run / "merged"
            heads = json.loads((run / "heads.json").read_text())["heads"]
        return self.entry(setting, arm, seed, held, summary, run, model_dir, heads)

    def lora_arm(self, seed: int, base: Path, data: Path) -> dict:
        """PEFT LoRA on q/k/v, rank sized to ALPS 10 %'s trainable elements, through the same engine."""
        from alps_ds.demo.lora import lora_rank, train_lora

        cfg = self.cfg
        name = f"lora-seed{seed}"
        rank = lora_rank(cfg)
        config = self.run_config(
            name, base, data, steps=cfg.arm_steps, lr=cfg.arm_lr, selection={"method": "none"}, others=[]
        )
        summary = train_lora(config, rank)
        run = self.runs / name
        return self.entry(LORA, LORA, seed, "target", summary, run, run / "merged", [], lora_rank=rank)

    def entry(self, setting, arm, seed, held, summary, run, model_dir, heads, **extra) -> dict:
        scored = self.score(model_dir, held)
        self.scalars(
            run,
            {"heldout/loss": scored["loss"], "heldout/accuracy": scored["accuracy"]},
            summary.steps if summary else 0,
        )
        kept = np.mean([a for t, a in scored["per_task"].items() if t != self.cfg.target])
        log(
            f"      {setting:<10} {arm:<17} seed {seed} ({held}): loss {scored['loss']:.4f}, "
            f"accuracy {scored['accuracy']:.3f}, other tasks {kept:.3f}"
        )
        if self.rank != 0:
            return {}
        return {
            "arm": arm,
            "setting": setting,
            "dataset": held,
            "seed": seed,
            "run": str(run),
            "model": str(model_dir),
            "heads": heads,
            "trainable_elements": summary.trainable_elements if summary else 0,
            "optimizer_bytes_per_rank": [r["total_bytes"] for r in summary.optimizer_bytes_per_rank] if summary else [],
            "steps": summary.steps if summary else 0,
            "first_loss": summary.first_loss if summary else None,
            "final_loss": summary.final_loss if summary else None,
            "train_seconds": summary.wall_seconds if summary else 0.0,
            "eval": scored,
            **extra,
        }


def fine_tune_arms(demo: Demo, seed: int, base: Path, heads_json: Path, record) -> None:
    """Every arm of one seed: both settings and LoRA on fresh target data, then transfer."""
    cfg = demo.cfg
    fresh = demo.dataset(f"fresh-seed{seed}", [cfg.target], cfg.finetune_examples, stream_seed(seed, _FRESH_DATA))
    for setting in SETTINGS:
        for arm in ARMS:
            record(demo.arm(setting, arm, seed, base, heads_json, fresh, "target"))
    record(demo.lora_arm(seed, base, fresh))
    shifted = demo.dataset(
        f"transfer-seed{seed}", [cfg.target], cfg.finetune_examples, stream_seed(seed, _TRANSFER_DATA), dist_=TRANSFER
    )
    for arm in TRANSFER_ARMS:
        record(demo.arm("paper", arm, seed, base, heads_json, shifted, "transfer"))


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
    results: dict = {
        "config": asdict(cfg),
        "world_size": dist.get_world_size(),
        "heldout": {name: h.to_dict() for name, h in demo.held_out.items()},
        "arms": [],
    }

    def flush() -> None:
        if demo.rank == 0:
            atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")

    def record(entry: dict) -> None:
        results["arms"].append(entry)
        flush()

    init = demo.init_model()
    base, results["pretrain"] = demo.pretrain(init)
    task, results["task_model"] = demo.task_model(base)
    heads_json, alps = demo.localize(base, task)
    results["alps_heads"] = [list(h) for h in alps.heads]
    results["base"], results["task"], results["heatmap"] = str(base), str(task), str(out / "localize" / "heatmap.png")
    flush()
    runs = len(SETTINGS) * len(ARMS) + 1 + len(TRANSFER_ARMS)
    log(f"[4/4] fine-tuning the base: {runs} arms (paper setting, heads-only, LoRA, transfer) x {cfg.seeds} seed(s)")
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        fine_tune_arms(demo, seed, base, heads_json, record)
    results["seconds"] = time.time() - started
    flush()
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
