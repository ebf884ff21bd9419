"""The ALPS hook under DeepSpeed AutoTP training: shard a HF model the AutoTP way, then train
only the selected heads' LOCAL rows of each q/k/v shard.

AutoTP would replace any ``q_proj`` with a 2-D ``.weight`` by its own ``LinearLayer`` during
``deepspeed.initialize``, dropping our slice parameter. So the order is reversed: :func:`shard`
builds AutoTP's own ``LinearLayer`` / ``LinearAllreduce`` (split sizes from
``tp_shard.get_shard_size_list``, q/k/v cut on kv-group boundaries, possibly unevenly),
:func:`apply` re-parametrizes each local q/k/v shard with the local rows from
:mod:`alps_ds.parallel.mapping` (layout ``autotp``) through :func:`alps_ds.sparse.reparametrize`,
and sets ``model.ds_autotp_parsed = True`` so ``initialize`` does not shard again.

Only the head slices train (everything else is frozen): AutoTP's replicated-parameter gradient
hooks, which ``initialize`` skips for a pre-sharded model, are then not needed.
"""

from __future__ import annotations

import torch
from torch import nn

from alps_ds.arch import KINDS, AttentionSpec
from alps_ds.errors import AlpsError
from alps_ds.layout import KVPolicy
from alps_ds.parallel.mapping import TensorParallel, plan
from alps_ds.selection import HeadSelection
from alps_ds.sparse.module import HeadRowsLinear, reparametrize, set_submodule

# Column-parallel (output rows split) and row-parallel (input split, all-reduced) projections
# of the separate-q/k/v families, as AutoTP's parser classifies them.
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


class TPHeadRowsLinear(HeadRowsLinear):
    """A :class:`HeadRowsLinear` on a column-parallel shard: like AutoTP's ``LinearLayer`` its
    input is replicated, so the input gradient is all-reduced over the TP group in backward."""

    def __init__(self, base: HeadRowsLinear, mp_group, partition_sizes: tuple[int, ...]):
        super().__init__(
            base.weight,
            base.bias,
            base.ranges,
            base.head_weight.data,
            None if base.head_bias is None else base.head_bias.data,
            base.kinds,
        )
        self.mp_group = mp_group
        self.partition_sizes = tuple(partition_sizes)
        # One slice per TP rank, each different: gradient-norm clipping must count it on every rank.
        for p in (self.head_weight, self.head_bias):
            if p is not None:
                p.tensor_model_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from deepspeed.module_inject.layers import ColumnParallel

        return super().forward(ColumnParallel.apply(self.mp_group, x))


def shard(model: nn.Module, tp_size: int, spec: AttentionSpec | None = None) -> nn.Module:
    """Shard ``model``'s attention and MLP projections over ``tp_size`` ranks exactly as AutoTP
    training does (call after ``deepspeed.init_distributed``; every rank of a TP group must
    later see the same batches). The LM head and embeddings stay replicated."""
    from alps_ds.deps import require_deepspeed

    require_deepspeed()  # before the imports: AutoTPMeta is missing from older DeepSpeed
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer, set_autotp_mode
    from deepspeed.module_inject.tp_shard import AutoTPMeta
    from deepspeed.utils import groups

    spec = spec or AttentionSpec.from_config(model.config, source="model.config")
    if spec.layout != "separate":
        raise AlpsError(
            f"AutoTP hook: {spec.model_type} has a {spec.layout} qkv weight; only separate q/k/v is supported"
        )
    set_autotp_mode(training=True)
    groups._init_tp_mesh_device(tensor_model_parallel_size=tp_size)
    group = groups.get_tensor_model_parallel_group()
    meta = AutoTPMeta.from_model_config(model.config)
    for layer in range(spec.num_layers):
        block = f"{spec.layers_path}.{layer}"
        for name, module in list(model.get_submodule(block).named_modules()):
            leaf = name.rpartition(".")[2]
            if not isinstance(module, nn.Linear) or leaf not in COLUMN + ROW:
                continue
            full = f"{block}.{name}"
            cls = LinearLayer if leaf in COLUMN else LinearAllreduce
            set_submodule(model, full, cls(module, group, name=full, tp_meta=meta))
    model.ds_autotp_parsed = True  # deepspeed.initialize must not shard (and drop our slices) again
    return model


def apply(
    model: nn.Module,
    selection: HeadSelection,
    *,
    tp_size: int,
    kv: KVPolicy = "group",
    spec: AttentionSpec | None = None,
) -> list[tuple[str, TPHeadRowsLinear]]:
    """Shard ``model`` AutoTP-style and hook this rank's selected local q/k/v rows.

    Freezes every parameter; the only trainable ones are the slices (one per hooked shard,
    marked ``tensor_model_parallel``). Returns ``(module name, hooked module)`` for this rank.
    """
    spec = spec or AttentionSpec.from_config(model.config, source="model.config")
    selection.check_model(spec)
    result = plan(spec, selection.heads, tp=tp_size, layout="autotp", kv=kv)
    # Checked on every rank alike (the plan is deterministic), so all ranks fail together
    # instead of one hanging in a collective: DeepSpeed ZeRO stops a rank with nothing to train
    # with "AssertionError: zero stage 2 requires an optimizer".
    empty = sorted(set(range(tp_size)) - {e.tp_rank for e in result.entries})
    if empty:
        raise AlpsError(
            f"AutoTP: tp rank(s) {empty} of {tp_size} hold none of the selected rows ({spec.num_kv_heads} kv heads, "
            f"cut on kv-group boundaries) and DeepSpeed ZeRO needs something to train on every rank; "
            "use an autotp_size that gives every rank selected heads, or rebalance the selection "
            f"(alps-ds layout --layout autotp --tp {tp_size} --rebalance)"
        )
    from deepspeed.utils import groups

    shard(model, tp_size, spec)
    group = groups.get_tensor_model_parallel_group()
    rank = groups.get_tensor_model_parallel_rank()
    for p in model.parameters():
        p.requires_grad_(False)
    tensor: TensorParallel = result.tensor
    hooked = []
    for e in result.entries:
        if e.tp_rank != rank:
            continue
        name = spec.module_path(e.layer, e.module)
        layer = model.get_submodule(name)
        # The mapping's split must be the one DeepSpeed actually made, or we train wrong rows.
        if tuple(layer._partition_sizes) != tuple(tensor.shard_sizes(e.module)):
            raise AlpsError(
                f"AutoTP split of {name} is {layer._partition_sizes}, the mapping expects "
                f"{tensor.shard_sizes(e.module)}; this DeepSpeed version shards differently"
            )
        kind = next(k for k in KINDS if spec.rows(k, 0).module == e.module)  # separate q/k/v only
        kinds = ((kind, e.num_rows),)
        mod = TPHeadRowsLinear(reparametrize(layer, e.rows, kinds=kinds), group, layer._partition_sizes)
        set_submodule(model, name, mod)
        hooked.append((name, mod))
    # Every TP rank must run the same backward collectives (ColumnParallel all-reduces the input
    # gradient). Which activations require grad would otherwise differ by rank: a rank holding
    # no selected rows of layer 0 sees no gradient path until a later layer, and gloo aborts
    # on the mismatched all-reduce. Making the embedding output require grad gives every rank
    # the same graph (the sparse hook does the same for reentrant activation checkpointing).
    model.enable_input_require_grads()
    model.alps_input_grads = True
    model.alps_selection = selection
    model.alps_kv = kv
    return hooked


@torch.no_grad()
def gather_qkv(model: nn.Module, spec: AttentionSpec | None = None) -> dict[str, torch.Tensor]:
    """Full (unsharded) q/k/v weights with the trained rows written in, on every rank.

    A collective: call on all ranks of the TP group. Keys are HF checkpoint names
    (``model.layers.0.self_attn.q_proj.weight``; ``.bias`` too when the model has biases).
    """
    import torch.distributed as dist

    spec = spec or AttentionSpec.from_config(model.config, source="model.config")
    out = {}
    for layer in range(spec.num_layers):
        for m in spec.modules:
            name = spec.module_path(layer, m)
            mod = model.get_submodule(name)
            if isinstance(mod, HeadRowsLinear):
                w, b = mod.merged_weight()
                sizes, group = mod.partition_sizes, mod.mp_group
            else:
                w, b = mod.weight.detach(), None if mod.bias is None else mod.bias.detach()
                sizes, group = mod._partition_sizes, mod.mp_group
            for suffix, t in (("weight", w), ("bias", b)):
                if t is None:
                    continue
                # Uneven shards: pad to the largest so all_gather sees equal sizes, then trim.
                pad = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
                pad[: t.shape[0]] = t
                parts = [torch.empty_like(pad) for _ in sizes]
                dist.all_gather(parts, pad, group=group)
                out[f"{name}.{suffix}"] = torch.cat([p[:s] for p, s in zip(parts, sizes)])
    return out
