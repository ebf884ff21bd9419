"""Fresh process: load a base with transformers, put a PEFT LoRA export on it with real PEFT, compare
against the merged model, print one JSON line.

usage: python peft_load.py BASE LORA MERGED
Prints: max |logits(PEFT) - logits(merged)| and |logits(base) - logits(merged)| (fp32), and per tensor
of ``merge_and_unload()`` the max |difference| to the merged model and the rows that differ at all.
"""

from __future__ import annotations

import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main(base_dir: str, lora_dir: str, merged_dir: str) -> None:
    load = dict(dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, **load).eval()
    x = torch.randint(3, merged.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = merged(input_ids=x).logits
        plain = AutoModelForCausalLM.from_pretrained(base_dir, **load).eval()(input_ids=x).logits
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, **load), lora_dir).eval()
        got = peft(input_ids=x).logits
    unloaded = peft.merge_and_unload().state_dict()
    expected = merged.state_dict()
    tensors = {}
    for key, value in expected.items():
        diff = (unloaded[key].float() - value.float()).abs()
        rows = diff.reshape(diff.shape[0], -1).amax(dim=1) if diff.dim() else diff.reshape(1)
        tensors[key] = {"max": float(diff.max()), "rows": torch.nonzero(rows).flatten().tolist()}
    print(
        json.dumps(
            {
                "logits": float((got - want).abs().max()),
                "base_vs_merged": float((plain - want).abs().max()),
                "same_keys": sorted(unloaded) == sorted(expected),
                "tensors": tensors,
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:4])
