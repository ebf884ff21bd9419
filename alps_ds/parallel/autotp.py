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

from collections.abc import Iterable

import torch
from torch import nn

from alps_ds.arch import AttentionSpec
from alps_ds.errors import AlpsError
from alps_ds.hooked import HeadRows, HookedRows, HookReport, require_input_grads, set_submodule
from alps_ds.layout import KVPolicy
from alps_ds.parallel.mapping import ParallelPlan, TensorParallel, plan
from alps_ds.selection import HeadSelection
from alps_ds.sparse.hook import model_spec
from alps_ds.sparse.module import HeadRowsLinear, reparametrize


class TPHeadRowsLinear(HeadRowsLinear):
    """A :class:`HeadRowsLinear` on a column-parallel shard: like AutoTP's ``LinearLayer`` its
    input is replicated, so the input gradient is all-reduced over the TP group in backward."""

    def __init__(self, layer: nn.Module, ranges, kinds):
        base = reparametrize(layer, ranges, kinds=kinds)
        super().__init__(
            base.weight,
            base.bias,
            base.ranges,
            base.head_weight.data,
            None if base.head_bias is None else base.head_bias.data,
            base.kinds,
        )
        self.mp_group = layer.mp_group
        self.partition_sizes = tuple(layer._partition_sizes)
        self.__dict__["_shard"] = layer  # AutoTP's own layer, restored by unhook (not a submodule: no double keys)
        # One slice per TP rank, each different: gradient-norm clipping must count it on every rank.
        for p in (self.head_weight, self.head_bias):
            if p is not None:
                p.tensor_model_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from deepspeed.module_inject.layers import ColumnParallel

        return super().forward(ColumnParallel.apply(self.mp_group, x))

    def unhook(self) -> nn.Module:
        """AutoTP's ``LinearLayer`` again, this rank's trained rows written into its shard."""
        w, b = self.merged_weight()
        with torch.no_grad():
            self.weight.data.copy_(w)
            if b is not None:
                self.bias.data.copy_(b)
        return self.__dict__["_shard"]


def check_rules(
    spec: AttentionSpec,
    tp_size: int,
    *,
    heads: Iterable[tuple[int, int]] | None = None,
    kv: KVPolicy = "group",
    train_others: Iterable[str] | str = (),
) -> ParallelPlan | None:
    """Refuse what this hook cannot train on ``tp_size`` AutoTP ranks, before anything is sharded.

    The one set of rules that :func:`shard`, :func:`apply`, ``alps-ds train`` (``parallel.tp``),
    ``alps-ds check`` and ``alps-ds launch`` apply: separate q/k/v only, no ``train_others``, and
    (given ``heads``) every TP rank holds selected rows. Returns the plan of ``heads`` (None without).
    Deterministic, so every rank of a job fails alike instead of one hanging in a collective.
    """
    if spec.layout != "separate":
        raise AlpsError(
            f"AutoTP hook: {spec.model_type} has a {spec.layout} qkv weight; only separate q/k/v is supported"
        )
    others = (train_others,) if isinstance(train_others, str) else tuple(train_others or ())
    if tp_size > 1 and any(others):
        raise AlpsError(
            "AutoTP: train_others is not supported under tensor parallelism (replicated parameters would "
            "need AutoTP's gradient all-reduce); train heads only, or use tp 1"
        )
    if heads is None:
        TensorParallel(spec, "autotp", tp_size)
        return None
    result = plan(spec, heads, tp=tp_size, layout="autotp", kv=kv)
    empty = sorted(set(range(tp_size)) - {e.tp_rank for e in result.entries})
    if empty:
        # DeepSpeed ZeRO stops a rank with nothing to train: "AssertionError: zero stage 2 requires an optimizer".
        raise AlpsError(
            f"AutoTP: tp rank(s) {empty} of {tp_size} hold none of the selected rows ({spec.num_kv_heads} kv heads, "
            f"cut on kv-group boundaries) and DeepSpeed ZeRO needs something to train on every rank; "
            "use an autotp_size that gives every rank selected heads, or rebalance the selection "
            f"(alps-ds layout --layout autotp --tp {tp_size} --rebalance)"
        )
    return result


def shard(
    model: nn.Module,
    tp_size: int,
    spec: AttentionSpec | None = None,
    *,
    selection: HeadSelection | None = None,
    kv: KVPolicy = "group",
) -> nn.Module:
    """Shard ``model``'s attention and MLP projections over ``tp_size`` ranks exactly as AutoTP
    training does (call after ``deepspeed.init_distributed``; every rank of a TP group must
    later see the same batches). The LM head and embeddings stay replicated. With ``selection``,
    a split that would leave a TP rank without selected rows is refused before anything changes.
    """
    from alps_ds.deps import require_deepspeed

    require_deepspeed()  # before the imports: AutoTPMeta is missing from older DeepSpeed
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer, set_autotp_mode
    from deepspeed.module_inject.tp_shard import AutoTPMeta
    from deepspeed.utils import groups

    spec = model_spec(model, spec, "AutoTP shard")
    if selection is not None:
        selection.check_model(spec)
    check_rules(spec, tp_size, heads=None if selection is None else selection.heads, kv=kv)
    set_autotp_mode(training=True)
    groups._init_tp_mesh_device(tensor_model_parallel_size=tp_size)
    group = groups.get_tensor_model_parallel_group()
    meta = AutoTPMeta.from_model_config(model.config)
    column, row = spec.family.column_parallel, spec.family.row_parallel
    for layer in range(spec.num_layers):
        block = f"{spec.layers_path}.{layer}"
        for name, module in list(model.get_submodule(block).named_modules()):
            leaf = name.rpartition(".")[2]
            if not isinstance(module, nn.Linear) or leaf not in column + row:
                continue
            full = f"{block}.{name}"
            cls = LinearLayer if leaf in column else LinearAllreduce
            set_submodule(model, full, cls(module, group, name=full, tp_meta=meta))
    model.ds_autotp_parsed = True  # deepspeed.initialize must not shard (and drop our slices) again
    return model


def _refuse_unhookable(model: nn.Module) -> None:
    """AutoTP apply needs a model :func:`shard` sharded and not hooked yet (``train_others``: :func:`check_rules`)."""
    if not getattr(model, "ds_autotp_parsed", False):
        raise AlpsError("AutoTP apply: the model is not sharded; call alps_ds.parallel.autotp.shard(model, tp) first")
    if any(isinstance(m, HeadRows) for m in model.modules()):
        raise AlpsError("AutoTP apply: this model is already hooked; use a fresh model")


def apply(
    model: nn.Module,
    selection: HeadSelection,
    *,
    kv: KVPolicy = "group",
    train_others: Iterable[str] | str = (),
    spec: AttentionSpec | None = None,
) -> HookReport:
    """Hook this rank's selected LOCAL q/k/v rows of a model sharded by :func:`shard`.

    Freezes every parameter; the only trainable ones are the slices (one per hooked shard,
    marked ``tensor_model_parallel``). The TP size and rank are DeepSpeed's (set by ``shard``).
    ``train_others`` is refused: replicated parameters would need AutoTP's gradient hooks.
    Under ZeRO-3 call :func:`pad_modules` next.
    """
    from deepspeed.utils import groups

    spec = model_spec(model, spec, "AutoTP apply")
    _refuse_unhookable(model)
    selection.check_model(spec)
    tp_size, rank = groups.get_tensor_model_parallel_world_size(), groups.get_tensor_model_parallel_rank()
    result = check_rules(spec, tp_size, heads=selection.heads, kv=kv, train_others=train_others)
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
        kinds = ((spec.kind_of(e.module), e.num_rows),)
        mod = TPHeadRowsLinear(layer, e.rows, kinds)
        info = HookedRows(
            name, e.layer, e.module, mod.ranges, kinds, mod.in_features, mod.bias is not None, rank, tp_size
        )
        mod.describe(info, selection, kv)
        set_submodule(model, name, mod)
        hooked.append(info)
    # Every TP rank must run the same backward collectives (ColumnParallel all-reduces the input
    # gradient). Which activations require grad would otherwise differ by rank: a rank holding
    # no selected rows of layer 0 sees no gradient path until a later layer, and gloo aborts
    # on the mismatched all-reduce. Making the embedding output require grad gives every rank
    # the same graph.
    require_input_grads(model)
    return HookReport("autotp", kv, tuple(hooked))


def pad_modules(
    model: nn.Module, selection: HeadSelection, *, kv: KVPolicy = "group", spec: AttentionSpec | None = None
) -> None:
    """After :func:`apply`: wrap each q/k/v module another TP rank trains and this one does not with a
    frozen slice of local row 0, so every rank has the same parameters. ZeRO-3 checks that all ranks
    record the same parameter trace and otherwise stops the first forward with "Detected a disagreement
    on list contents" (seen here). The forward recomputes row 0 from its own frozen values; nothing
    trains, no optimizer state."""
    from deepspeed.utils import groups

    spec = model_spec(model, spec, "AutoTP pad_modules")
    tp_size, rank = groups.get_tensor_model_parallel_world_size(), groups.get_tensor_model_parallel_rank()
    result = plan(spec, selection.heads, tp=tp_size, layout="autotp", kv=kv)
    mine = {(e.layer, e.module) for e in result.entries if e.tp_rank == rank}
    for layer, module in sorted({(e.layer, e.module) for e in result.entries} - mine):
        name = spec.module_path(layer, module)
        mod = TPHeadRowsLinear(model.get_submodule(name), ((0, 1),), ())
        for p in (mod.head_weight, mod.head_bias):
            if p is not None:
                p.requires_grad_(False)
        set_submodule(model, name, mod)


@torch.no_grad()
def gather_qkv(model: nn.Module, spec: AttentionSpec | None = None) -> dict[str, torch.Tensor]:
    """Full (unsharded) q/k/v weights with the trained rows written in, on every rank.

    A collective: call on all ranks of the TP group. Keys are HF checkpoint names
    (``model.layers.0.self_attn.q_proj.weight``; ``.bias`` too when the model has biases).
    """
    import torch.distributed as dist

    spec = model_spec(model, spec, "gather_qkv")
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
