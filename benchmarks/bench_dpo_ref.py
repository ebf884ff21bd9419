"""DPO reference memory: TRL's default reference (a second full model) vs. AlpsDPOTrainer (the model's frozen rows).

Both runs train the same hooked policy for 2 DPO steps, each in its own process so peak RSS
(``ru_maxrss``) is per variant: ``trl.DPOTrainer`` loads the reference from the base folder,
``AlpsDPOTrainer`` computes it inside ``alps_ds.base_weights``. Reports the reference's parameter
bytes and each process's peak RSS, measured side by side in one run.

Single process, CPU, fp32, no DeepSpeed.
usage: python benchmarks/bench_dpo_ref.py [--layers 8] [--hidden 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

HEADS = ((0, 0), (1, 3))


def child(variant: str, work: Path) -> dict:
    """One DPO run; returns reference parameter bytes and this process's peak RSS."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    import alps_ds
    from alps_ds.integrations import AlpsDPOTrainer

    model = AutoModelForCausalLM.from_pretrained(work / "base")
    alps_ds.apply(model, alps_ds.HeadSelection.load(work / "heads.json"))
    args = DPOConfig(
        output_dir=str(work / variant),
        max_steps=2,
        per_device_train_batch_size=2,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    cls = AlpsDPOTrainer if variant == "alps" else DPOTrainer
    trainer = cls(
        model=model,
        args=args,
        train_dataset=load_dataset("json", data_files=str(work / "prefs.jsonl"), split="train"),
        processing_class=AutoTokenizer.from_pretrained(work / "base"),
    )
    trainer.train()
    ref = trainer.ref_model
    ref_bytes = sum(p.numel() * p.element_size() for p in ref.parameters()) if variant == "trl" else 0
    return {"ref_bytes": ref_bytes, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def prepare(work: Path, layers: int, hidden: int) -> int:
    """Write the base (a tiny llama, byte tokenizer), heads.json and a preference file; return the base's bytes."""
    from alps_ds.arch import AttentionSpec
    from alps_ds.selection import HeadSelection, Provenance
    from alps_ds.tiny import build_model, save_model, tiny_config
    from alps_ds.train.tokenizer import BYTE_VOCAB, save_byte_tokenizer

    cfg = tiny_config(
        "llama", layers=layers, hidden=hidden, heads=16, kv_heads=4, vocab=BYTE_VOCAB + 1, intermediate=hidden * 2
    )
    model = build_model(cfg, seed=0)
    save_byte_tokenizer(save_model(model, work / "base"))
    HeadSelection(AttentionSpec.from_config(cfg).fingerprint, HEADS, Provenance("explicit")).save(work / "heads.json")
    with open(work / "prefs.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"question {i}?", "chosen": " a good answer.", "rejected": " no."}) + "\n")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "WORK"))
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], Path(a.child[1]))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_bytes = prepare(work, a.layers, a.hidden)
        env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
        out = {}
        for variant in ("trl", "alps"):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", variant, str(work)], env=env, capture_output=True, text=True
            )
            if proc.returncode != 0:
                sys.exit(f"{variant} run failed:\n{proc.stderr[-3000:]}")
            out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = 2**20
    print(f"model: llama {a.layers} layers, hidden {a.hidden}; parameters {model_bytes / mib:.1f} MiB (fp32)")
    print(f"{'reference':<28}{'ref params MiB':>16}{'peak RSS MiB':>14}")
    for name, label in (("trl", "trl.DPOTrainer (default)"), ("alps", "AlpsDPOTrainer")):
        print(f"{label:<28}{out[name]['ref_bytes'] / mib:>16.1f}{out[name]['peak_rss'] / mib:>14.1f}")
    saved = out["trl"]["peak_rss"] - out["alps"]["peak_rss"]
    print(f"peak RSS saved: {saved / mib:.1f} MiB = {saved / model_bytes:.2f}x the model's parameter bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
