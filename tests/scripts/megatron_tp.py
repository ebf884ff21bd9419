"""Train a real megatron-core TransformerBlock with the ALPS hook on CPU/gloo, then gather linear_qkv.

Usage (every rank): ``megatron_tp.py OUT.json``. Runs each case of CASES whose TP size fits the
world size in one process group (re-initializing Megatron's model parallel state between cases);
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

warnings.filterwarnings("ignore")

# name, tp, pp, heads n, query groups g, head_dim, layers, selected (layer, head)
CASES = [
    ("tp2_g2", 2, 1, 4, 2, 8, 2, [(0, 1), (1, 2), (1, 3)]),
    ("tp4_g1", 4, 1, 4, 1, 8, 2, [(0, 1), (1, 3)]),  # g < T: heads straddle ranks
    # 2 pipeline stages of 2 layers: the hook reads global layers from Megatron's layer_number.
    # Each stage trains on its own input (Megatron's pipeline schedule needs CUDA).
    ("tp2_pp2", 2, 2, 4, 2, 8, 4, [(0, 1), (2, 2), (3, 0)]),
]


def cpu_shims() -> None:
    """Stand-ins for the CUDA-only calls megatron-core makes on the paths used here."""
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: "cpu"

    class CPURNGTracker(mrandom.CudaRNGStatesTracker):
        """The tracker forks torch's CPU generator instead of a CUDA one."""

        def add(self, name, seed):
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()
            self.seeds_.add(seed)

        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            import contextlib

            @contextlib.contextmanager
            def _fork():
                state = torch.get_rng_state()
                torch.set_rng_state(self.states_[name])
                try:
                    yield
                finally:
                    self.states_[name] = torch.get_rng_state()
                    torch.set_rng_state(state)

            return _fork()

    mrandom._CUDA_RNG_STATE_TRACKER = CPURNGTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


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
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    mine = {
        "pp_rank": pp_rank,
        "tp_rank": group.rank(),
        "rows": {h.layer: [list(r) for r in h.ranges] for h in report.modules if h.ranges},
        "kinds": {h.layer: dict(h.kinds) for h in report.modules},
        "trainable": report.trainable,
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
        "ranks": [{k: r[k] for k in ("pp_rank", "tp_rank", "rows", "kinds", "trainable")} for r in everyone],
        "layers": [layers_by_global[i] for i in range(layers)],
    }


def main() -> None:
    dist.init_process_group("gloo")
    cpu_shims()
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
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
