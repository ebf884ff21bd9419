"""Train a real megatron-core TransformerBlock with the ALPS hook on CPU/gloo, then gather linear_qkv.

Usage (every rank): ``megatron_tp.py OUT.json MODELS_DIR``. First converts each HF model folder in
MODELS_DIR to megatron-core at TP 2 and 4 (logits and round trip, see ``run_convert``). Then runs
each case of CASES whose TP size fits the world size
in one process group (re-initializing Megatron's model parallel state between cases);
rank 0 writes per case and layer the full gathered ``linear_qkv`` weight and bias before and
after a few AdamW steps (weight decay 0.1) on one fixed batch, for tests/test_megatron.py to compare.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch
import torch.distributed as dist

from alps_ds.mcore.shims import cpu_shims, seed_model_parallel

warnings.filterwarnings("ignore")

# name, tp, pp, heads n, query groups g, head_dim, layers, selected (layer, head)
CASES = [
    ("tp2_g2", 2, 1, 4, 2, 8, 2, [(0, 1), (1, 2), (1, 3)]),
    ("tp4_g1", 4, 1, 4, 1, 8, 2, [(0, 1), (1, 3)]),  # g < T: heads straddle ranks
    # 2 pipeline stages of 2 layers: the hook reads global layers from Megatron's layer_number.
    # Each stage trains on its own input (Megatron's pipeline schedule needs CUDA).
    ("tp2_pp2", 2, 2, 4, 2, 8, 4, [(0, 1), (2, 2), (3, 0)]),
]


def gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(group.size())]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def merged(qkv):
    """The layer's weight and bias with trained rows in (a plain layer of an unhooked layer as it is)."""
    from alps_ds.hooked import HeadRows

    if isinstance(qkv, HeadRows):
        return qkv.merged_weight()
    return qkv.weight.detach(), qkv.bias.detach()


def run_case(name, tp, pp, n, g, hd, layers, heads, rank):
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlock
    from megatron.core.transformer.transformer_config import TransformerConfig

    from alps_ds.hooked import merge
    from alps_ds.parallel import megatron as hook
    from alps_ds.selection import HeadSelection, Provenance

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.get_cuda_rng_tracker().reset()
    mrandom.get_cuda_rng_tracker().add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, 1234)
    torch.manual_seed(0)
    config = TransformerConfig(
        num_layers=layers,
        hidden_size=n * hd,
        num_attention_heads=n,
        num_query_groups=g,
        kv_channels=hd,
        ffn_hidden_size=2 * n * hd,
        add_qkv_bias=True,
        use_cpu_initialization=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        params_dtype=torch.float32,
    )
    block = TransformerBlock(config, get_gpt_layer_local_spec())
    group = parallel_state.get_tensor_model_parallel_group()
    qkvs = [layer.self_attention.linear_qkv for layer in block.layers]
    before = [(gather_rows(q.weight.detach(), group), gather_rows(q.bias.detach(), group)) for q in qkvs]

    spec = hook.spec_from_config(config)
    selection = HeadSelection(spec.fingerprint, tuple(map(tuple, heads)), Provenance(select="explicit"))
    report = hook.apply(block, selection, kv="group")
    params = [p for p in block.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    seq, batch = 6, 2
    mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)  # True = masked out
    gen = torch.Generator().manual_seed(7)  # the same batch on every rank, every step
    x = torch.randn(seq, batch, n * hd, generator=gen)
    target = torch.randn(seq, batch, n * hd, generator=gen)
    losses = []
    for _ in range(4):
        out = block(x, attention_mask=mask)
        loss = torch.nn.functional.mse_loss(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = [tuple(gather_rows(t, group) for t in merged(layer.self_attention.linear_qkv)) for layer in block.layers]
    merge(block)  # the engine-agnostic merge: plain ColumnParallelLinear layers with the trained rows written in
    plain = [layer.self_attention.linear_qkv for layer in block.layers]
    merge_ok = all(
        type(q).__name__ == "ColumnParallelLinear"
        and torch.equal(gather_rows(q.weight.detach(), group), a[0])
        and torch.equal(gather_rows(q.bias.detach(), group), a[1])
        for q, a in zip(plain, after)
    )
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    mine = {
        "pp_rank": pp_rank,
        "tp_rank": group.rank(),
        "rows": {h.layer: [list(r) for r in h.ranges] for h in report.modules if h.ranges},
        "kinds": {h.layer: dict(h.kinds) for h in report.modules},
        "trainable": report.trainable,
        "merge_ok": merge_ok,
        "losses": losses,
        # full (TP-gathered) weights of this stage's layers, keyed by global layer
        "layers": {
            layer.layer_number - 1: {
                "before_w": b[0].tolist(),
                "before_b": b[1].tolist(),
                "after_w": a[0].tolist(),
                "after_b": a[1].tolist(),
            }
            for layer, b, a in zip(block.layers, before, after)
        }
        if group.rank() == 0
        else {},
    }
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    parallel_state.destroy_model_parallel()
    if rank != 0:
        return None
    layers_by_global = {k: v for r in everyone for k, v in r["layers"].items()}
    return {
        "tp": tp,
        "n": n,
        "g": g,
        "hd": hd,
        "heads": heads,
        "losses": {r["pp_rank"]: r["losses"] for r in everyone},
        "ranks": [
            {k: r[k] for k in ("pp_rank", "tp_rank", "rows", "kinds", "trainable", "merge_ok")} for r in everyone
        ],
        "layers": [layers_by_global[i] for i in range(layers)],
    }


def run_convert(models_dir: str, rank: int) -> dict:
    """Each HF model in ``models_dir`` converted to a GPTModel at TP 2 and 4: logits vs the HF model's,
    and the HF tensors gathered back from the shards vs the checkpoint's (exact)."""
    from pathlib import Path

    from megatron.core import parallel_state
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from alps_ds.arch import AttentionSpec, read_config
    from alps_ds.mcore.convert import build_gpt, gather_hf, load_hf

    out = {}
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    for folder in sorted(Path(models_dir).iterdir()):
        hf = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            want = hf(input_ids=ids).logits
        cfg, _ = read_config(folder)
        spec = AttentionSpec.from_config(cfg)
        base = load_file(str(folder / "model.safetensors"))
        for tp in [t for t in (2, 4) if t <= dist.get_world_size()]:
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
            seed_model_parallel(0)
            model = build_gpt(cfg, spec, tp=tp, dtype=torch.float32).eval()
            load_hf(model, folder, spec, tied=False)
            mask = torch.triu(torch.ones(1, 1, 12, 12, dtype=torch.bool), diagonal=1)
            with torch.no_grad():
                local = model(ids, torch.arange(12).expand(2, 12), mask)
            logits = gather_rows(local.transpose(0, 2).contiguous(), parallel_state.get_tensor_model_parallel_group())
            back = gather_hf(model, spec, tied=False)
            # negative control: layer 0's q/k/v in [Q; K; V] order instead of the grouped layout
            group = parallel_state.get_tensor_model_parallel_group()
            qkv = model.decoder.layers[0].self_attention.linear_qkv
            names = [f"model.layers.0.self_attn.{m}_proj.weight" for m in "qkv"]
            with torch.no_grad():
                qkv.weight.copy_(torch.cat([base[n] for n in names]).chunk(tp)[group.rank()])
                bad = gather_rows(model(ids, torch.arange(12).expand(2, 12), mask).transpose(0, 2).contiguous(), group)
            out[f"{folder.name}_tp{tp}"] = {
                "max_abs_diff": float((logits.transpose(0, 2) - want).abs().max()),
                "logit_scale": float(want.abs().max()),
                "thirds_layout_diff": float((bad.transpose(0, 2) - want).abs().max()),
                "roundtrip_keys_equal": sorted(back) == sorted(base),
                "roundtrip_exact": all(torch.equal(back[k], base[k]) for k in base),
            }
            parallel_state.destroy_model_parallel()
    return out


def hooked_gpt(folder, tp: int, heads, load: bool):
    """The HF model of ``folder`` as a GPTModel at ``tp`` (weights loaded or left uninitialized), hooked."""
    from megatron.core import parallel_state

    from alps_ds.arch import AttentionSpec, read_config
    from alps_ds.mcore.convert import build_gpt, load_hf
    from alps_ds.parallel import megatron as hook
    from alps_ds.selection import HeadSelection, Provenance

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    seed_model_parallel(0)
    cfg, _ = read_config(folder)
    spec = AttentionSpec.from_config(cfg)
    model = build_gpt(cfg, spec, tp=tp, dtype=torch.float32)
    if load:
        load_hf(model, folder, spec, tied=False)
    hook.apply(model, HeadSelection(spec.fingerprint, heads, Provenance(select="explicit")), spec=spec)
    return model, spec


def run_full_checkpoint(models_dir: str, ckpt: str) -> dict:
    """A hooked model's full ``sharded_state_dict`` (frozen weights and slices) saved by dist_checkpointing
    at TP 2 and loaded into an uninitialized hooked model at TP 4: the same merged q/k/v and slices."""
    from pathlib import Path

    from megatron.core import dist_checkpointing, parallel_state

    from alps_ds.mcore.convert import gather_hf

    folder, heads = Path(models_dir) / "qwen2", ((0, 1), (1, 2), (1, 3))
    model, spec = hooked_gpt(folder, 2, heads, load=True)
    with torch.no_grad():  # "training": a TP-independent change of every selected row
        for m in model.modules():
            for p in (getattr(m, "head_weight", None), getattr(m, "head_bias", None)):
                if p is not None:
                    p.add_(1.0)
    want = gather_hf(model, spec, tied=False)
    Path(ckpt).mkdir(exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), ckpt)
    parallel_state.destroy_model_parallel()
    model, spec = hooked_gpt(folder, 4, heads, load=False)
    state = model.sharded_state_dict()
    model.load_state_dict(dist_checkpointing.load(state, ckpt))
    got = gather_hf(model, spec, tied=False)
    parallel_state.destroy_model_parallel()
    return {"same": sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)}


def main() -> None:
    dist.init_process_group("gloo")
    cpu_shims()
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"convert": run_convert(sys.argv[2], rank)}
    if world >= 4:
        results["full_checkpoint"] = run_full_checkpoint(sys.argv[2], sys.argv[1] + ".ckpt")
    for name, tp, pp, n, g, hd, layers, heads in CASES:
        if tp * pp <= world:
            results[name] = run_case(name, tp, pp, n, g, hd, layers, heads, rank)
    if rank == 0:
        with open(sys.argv[1] + ".tmp", "w") as f:
            json.dump(results, f)
        os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
