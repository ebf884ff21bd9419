"""GPU check of the megatron-core hook on Transformer Engine layers (needs CUDA and transformer_engine).

Run: ``torchrun --nproc_per_node N benchmarks/gpu_check_megatron.py`` (TP over N GPUs; part ``megatron-te`` of
``benchmarks/gpu_check.sh`` runs it on one).
Builds a small ``GPTModel`` with megatron-core's TE layer spec (``linear_qkv`` is
``TELayerNormColumnParallelLinear``), hooks it, and checks on every TP rank: the hooked forward
equals the plain one before training (the delta starts at zero), a few optimizer steps change every
selected row and no other row of the local ``linear_qkv`` shard. Prints one line per rank; exits 1 on failure.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def main() -> int:
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    from alps_ds.mcore.engine import causal_mask
    from alps_ds.parallel.megatron import MegatronHeadRows, apply
    from alps_ds.selection import HeadSelection, Provenance

    dist.init_process_group("nccl")
    torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
    model_parallel_cuda_manual_seed(0)
    config = TransformerConfig(
        num_layers=2, hidden_size=256, num_attention_heads=8, num_query_groups=2, kv_channels=32,
        ffn_hidden_size=512, normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False,
        add_qkv_bias=True, tensor_model_parallel_size=dist.get_world_size(), hidden_dropout=0.0,
        attention_dropout=0.0, params_dtype=torch.float32,
    )  # fmt: skip
    model = GPTModel(
        config, get_gpt_layer_with_transformer_engine_spec(), vocab_size=512, max_sequence_length=64,
        position_embedding_type="rope",
    ).cuda()  # fmt: skip
    ids = torch.randint(0, 512, (2, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    pos, mask = torch.arange(32, device="cuda").expand(2, 32), causal_mask(32).cuda()
    with torch.no_grad():
        plain = model(ids, pos, mask)
    from alps_ds.parallel.megatron import spec_from_config

    spec = spec_from_config(config)
    sel = HeadSelection(spec.fingerprint, ((0, 1), (1, 6)), Provenance(select="explicit"))
    apply(model, sel, spec=spec)
    hooked = [m for m in model.modules() if isinstance(m, MegatronHeadRows)]
    kind = type(hooked[0].base).__name__
    with torch.no_grad():
        same = torch.equal(model(ids, pos, mask), plain)
    before = [m.base.weight.detach().clone() for m in hooked]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(ids, pos, mask, labels=ids.roll(-1, 1)).mean().backward()
        opt.step()
    ok = same and kind == "TELayerNormColumnParallelLinear"
    for m, w0 in zip(hooked, before):
        merged = m.merged_weight()[0]
        changed = (merged != w0).any(dim=1)
        want = torch.zeros_like(changed)
        want[m.rows] = True
        ok &= torch.equal(changed, want) and torch.equal(m.base.weight, w0)
    print(f"rank {dist.get_rank()}: {kind}, forward unchanged at start {same}, only selected rows trained {ok}")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
