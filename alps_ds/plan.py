"""Memory planner: per-GPU bytes of an ALPS job beside full fine-tuning and LoRA, before any GPU is touched.

Parameter counts are exact, computed from the model config per module (embeddings, q/k/v/o,
MLP, norms, lm_head; tied embeddings counted once); what ALPS trains comes from
:func:`alps_ds.layout.trainable_rows`, for a given selection or for the worst selection of
``K = count_for_ratio(r)`` heads. Byte terms follow how DeepSpeed holds state (see
``docs/plan.md``): 16-bit weights and gradients, an fp32 master copy and two fp32 AdamW
moments per trained element, partitioned over data-parallel ranks by ZeRO stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from alps_ds.arch import AttentionSpec, balanced_split, read_config
from alps_ds.choose import count_for_ratio
from alps_ds.errors import AlpsError, check_choice
from alps_ds.layout import KVPolicy, matches_train_others
from alps_ds.parallel.mapping import plan as parallel_plan
from alps_ds.train.config import DEFAULT_ZERO_STAGE, ZERO_STAGES

GiB = 1024**3
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
MASTER_BYTES = 4  # fp32 master copy of each trained element (ZeRO keeps one even for fp32 models)
ADAM_BYTES = 8  # exp_avg + exp_avg_sq in fp32
LORA_RANK = 128

Head = tuple[int, int]


# ---- exact parameter counts ----------------------------------------------------------------------
def _config_dict(config: Any) -> dict[str, Any]:
    """A config as a dict with the family's defaults filled in (``transformers`` knows them)."""
    if isinstance(config, dict):
        from transformers import AutoConfig

        try:
            config = AutoConfig.for_model(**config)
        except (ValueError, TypeError, KeyError) as e:
            raise AlpsError(f"config: transformers cannot read it ({e}); point to a model's config.json") from e
    return config.to_dict()


def count_parameters(config: Any, spec: AttentionSpec | None = None) -> dict[str, int]:
    """Parameter name (as ``model.named_parameters()`` gives it) -> element count, from the config alone."""
    cfg = _config_dict(config)
    spec = spec or AttentionSpec.from_config(cfg)
    d, n, hd, L = spec.hidden_size, spec.num_heads, spec.head_dim, spec.num_layers
    vocab, inter = cfg["vocab_size"], cfg["intermediate_size"]
    out: dict[str, int] = {}

    def linear(name: str, rows: int, cols: int, bias: bool) -> None:
        out[f"{name}.weight"] = rows * cols
        if bias:
            out[f"{name}.bias"] = rows

    def norm(name: str, width: int, bias: bool = False) -> None:
        out[f"{name}.weight"] = width
        if bias:
            out[f"{name}.bias"] = width

    def qkv(layer: int) -> None:
        # Q/K/V named and sized by AttentionSpec, exactly as the engine hook finds them.
        for m in spec.modules:
            linear(spec.module_path(layer, m), spec.module_rows(m), d, spec.qkv_bias)

    fam = spec.family
    out_bias = spec.qkv_bias if fam.out_bias is None else fam.out_bias
    mlp_bias = bool(cfg.get("mlp_bias")) if fam.mlp_bias is None else fam.mlp_bias
    tied = bool(cfg.get("tie_word_embeddings"))
    out[f"{fam.embed}.weight"] = vocab * d
    for i in range(L):
        p = f"{spec.layers_path}.{i}"
        qkv(i)
        linear(spec.module_path(i, fam.out_proj), d, n * hd, out_bias)
        for head_norm in fam.head_norms:
            norm(spec.module_path(i, head_norm), hd)
        for name, times in fam.mlp:
            linear(f"{p}.mlp.{name}", times * inter, d, mlp_bias)
        linear(f"{p}.mlp.{fam.mlp_down}", d, inter, mlp_bias)
        for layer_norm in fam.layer_norms:
            norm(f"{p}.{layer_norm}", d, fam.norm_bias)
    norm(fam.final_norm, d, fam.norm_bias)
    if not tied:
        out["lm_head.weight"] = vocab * d
    return out


def layer_of(name: str) -> int | None:
    """Layer index of a parameter name (``model.layers.3....`` -> 3), None for embeddings/head/final norm."""
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layers" and b.isdigit():
            return int(b)
    return None


# ---- which heads, and what they train ---------------------------------------------------------------
def worst_case_heads(spec: AttentionSpec, k: int, *, layers: Iterable[int] | None = None, groups=None) -> list[Head]:
    """A selection of ``k`` heads that trains the most elements on the rank holding ``layers`` and kv
    ``groups`` (default: all): heads go there first, and each new head touches a kv group not yet
    trained while one is left (its K/V rows then count too)."""
    layers = set(range(spec.num_layers) if layers is None else layers)
    groups = set(range(spec.num_kv_heads) if groups is None else groups)
    m = spec.group_size

    def key(head: Head) -> tuple:
        layer, h = head
        j = spec.kv_head(h)
        return (not (layer in layers and j in groups), h % m, layer, j)

    pool = sorted(((layer, h) for layer in range(spec.num_layers) for h in range(spec.num_heads)), key=key)
    return sorted(pool[:k])


def rank_elements(
    spec: AttentionSpec, heads: Sequence[Head], kv: KVPolicy = "group", *, tp: int = 1
) -> dict[tuple[int, int], int]:
    """(layer, tp rank) -> trainable slice elements with Q/K/V split over ``tp`` ranks the DeepSpeed
    AutoTP way (whole kv groups; :func:`alps_ds.parallel.mapping.plan`, layout ``autotp``). A rank's
    count depends only on the kv groups it holds, so this serves the fused and neox families too."""
    grid = parallel_plan(spec, heads, tp=tp, layout="autotp", kv=kv)
    out: dict[tuple[int, int], int] = {}
    for e in grid.entries:
        out[(e.layer, e.tp_rank)] = out.get((e.layer, e.tp_rank), 0) + grid.elements(e)
    return out


def module_elements(spec: AttentionSpec, heads: Sequence[Head], kv: KVPolicy = "group") -> dict[str, int]:
    """Q/K/V module path -> trainable slice elements of ``heads`` in the unsharded model."""
    grid = parallel_plan(spec, heads, kv=kv)
    return {spec.module_path(e.layer, e.module): grid.elements(e) for e in grid.entries}


def train_others_params(
    params: dict[str, int], spec: AttentionSpec, patterns: Sequence[str], source: str = "train_others"
) -> set[str]:
    """Names of parameters outside Q/K/V that ``train_others`` trains in full; a pattern matching none is
    an error naming ``source`` (the argument, key or flag the patterns came from)."""
    if not patterns:
        return set()
    qkv = {spec.module_path(layer, m) for layer in range(spec.num_layers) for m in spec.modules}
    chosen: set[str] = set()
    for pat in patterns:
        hits = {name for name in params if name.rpartition(".")[0] not in qkv and matches_train_others(pat, name)}
        if not hits:
            raise AlpsError(
                f"{source} {pat!r} matches no parameter outside Q/K/V; "
                "use module names such as mlp, o_proj, norm, embed_tokens, lm_head, or 'all'"
            )
        chosen |= hits
    return chosen


# ---- the plan ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Parallel:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero: int = DEFAULT_ZERO_STAGE
    offload: bool = False

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp"):
            if getattr(self, name) < 1:
                raise AlpsError(f"{name} {getattr(self, name)!r} must be at least 1")
        if self.zero not in ZERO_STAGES:
            raise AlpsError(f"zero {self.zero!r} is not a ZeRO stage; use {', '.join(map(str, ZERO_STAGES))}")
        if self.offload and self.zero == 0:
            raise AlpsError("offload needs zero 1, 2 or 3, not 0 (optimizer offload is a ZeRO feature)")

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass(frozen=True)
class Activation:
    seq_len: int = 4096
    micro_batch: int = 1
    checkpointing: bool = True


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU (the most loaded rank) for one way of training."""

    name: str
    trainable: int  # elements trained on this rank before ZeRO partitioning
    frozen_weights: int
    trainable_weights: int
    gradients: int
    master: int
    optimizer: int
    zero3_buffers: int
    activations: int
    cpu_offload: int  # bytes moved to host memory per rank (master + optimizer under --offload)

    @property
    def non_activation(self) -> int:
        return self.frozen_weights + self.trainable_weights + self.gradients + self.master + self.optimizer

    @property
    def total(self) -> int:
        return self.non_activation + self.zero3_buffers + self.activations

    def terms(self) -> dict[str, int]:
        return {
            "frozen weights": self.frozen_weights,
            "trainable weights": self.trainable_weights,
            "gradients": self.gradients,
            "fp32 master": self.master,
            "optimizer states": self.optimizer,
            "ZeRO-3 gather buffers": self.zero3_buffers,
            "activations": self.activations,
        }


@dataclass(frozen=True)
class Plan:
    model_type: str
    total_params: int
    heads: int
    heads_source: str  # "worst case of K" or the heads.json path
    parallel: Parallel
    activation: Activation
    gpu_mem_gib: float
    headroom: float
    gpus_per_node: int
    rows: tuple[Memory, ...]  # alps, full fine-tuning, lora
    per_module: dict[str, int] = field(repr=False)  # ALPS trainable slice elements per Q/K/V module

    @property
    def usable(self) -> float:
        return self.gpu_mem_gib * GiB * (1 - self.headroom)

    def verdict(self, mem: Memory) -> str:
        if mem.total <= self.usable:
            return f"fits ({mem.total / GiB:.1f} of {self.usable / GiB:.1f} GiB usable)"
        biggest = max(mem.terms().items(), key=lambda kv: kv[1])
        return (
            f"does not fit ({mem.total / GiB:.1f} > {self.usable / GiB:.1f} GiB usable; "
            f"largest term: {biggest[0]} {biggest[1] / GiB:.1f} GiB)"
        )


def _state_bytes(
    name: str,
    trainable: int,
    frozen: int,
    par: Parallel,
    wbytes: int,
    zero3_buffers: int,
    activations: int,
) -> Memory:
    """Per-rank bytes for ``trainable`` and ``frozen`` elements held by this model-parallel rank."""
    dp = par.dp

    def part(x: int, from_stage: int) -> int:
        # ZeRO partitions a state across data-parallel ranks from this stage on (ceil: padding).
        return -(-x // dp) if par.zero >= from_stage else x

    master = part(trainable, 1) * MASTER_BYTES if par.zero >= 1 or wbytes != 4 else 0
    optim = part(trainable, 1) * ADAM_BYTES
    cpu = 0
    if par.offload:
        cpu, master, optim = master + optim, 0, 0
    return Memory(
        name=name,
        trainable=trainable,
        frozen_weights=part(frozen, 3) * wbytes,
        trainable_weights=part(trainable, 3) * wbytes,
        gradients=part(trainable, 2) * wbytes,
        master=master,
        optimizer=optim,
        zero3_buffers=zero3_buffers if par.zero == 3 else 0,
        activations=activations,
        cpu_offload=cpu,
    )


def activation_bytes(
    cfg: dict[str, Any],
    spec: AttentionSpec,
    layers: int,
    act: Activation,
    *,
    stage: int = 0,
    pp: int = 1,
    tp: int = 1,
    wbytes: int = 2,
) -> int:
    """Estimate of activation memory on a rank of pipeline ``stage`` holding ``layers`` layers (see
    docs/plan.md; not validated against an engine).

    Per token and layer a decoder layer keeps about 4d + (n + 2g)hd + 2n*hd + 4I values of ``wbytes``
    for backward with a fused (flash) attention kernel; the attention and MLP parts split over TP.
    With checkpointing only each layer's input (d values) stays, plus one layer recomputed at a
    time. 1F1B pipelining keeps ``pp - stage`` micro-batches in flight on ``stage`` (all ``pp`` on
    the first, one on the last); the recomputed layer is one at a time however many are in flight.
    The last stage also holds the logits and their fp32 copy for the loss.
    """
    d, n, g, hd = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
    inter = cfg["intermediate_size"]
    tokens = act.seq_len * act.micro_batch
    full_layer = 4 * d + ((n + 2 * g) * hd + 2 * n * hd + 4 * inter) // tp
    kept = layers * (d if act.checkpointing else full_layer) * (pp - stage)
    total = tokens * (kept + (full_layer if act.checkpointing else 0)) * wbytes
    if stage == pp - 1:
        total += tokens * (cfg["vocab_size"] // tp) * (wbytes + 4)
    return total


@dataclass(frozen=True)
class _Stages:
    """What each pipeline stage holds, for the byte terms of its ranks (one tensor-parallel slice each)."""

    par: Parallel
    wbytes: int
    layers: list[range]  # stage -> its layers (even split; the first stages take the remainder)
    params: list[int]  # stage -> parameter elements
    others: list[int]  # stage -> elements of the parameters train_others trains in full
    activations: list[int]  # stage -> activation bytes per rank
    zero3_buffers: int  # one layer gathered plus one prefetched, per tensor-parallel slice

    def memory(self, name: str, stage: int, trainable: int, frozen: int) -> Memory:
        return _state_bytes(name, trainable, frozen, self.par, self.wbytes, self.zero3_buffers, self.activations[stage])

    def most_loaded(self, name: str, trained, frozen) -> Memory:
        """The stage whose ranks need the most bytes, with ``trained(stage)`` and ``frozen(stage)`` elements."""
        per_stage = (self.memory(name, s, trained(s), frozen(s)) for s in range(self.par.pp))
        return max(per_stage, key=lambda mem: mem.total)


def _stage_of(name: str, stages: list[range]) -> int:
    """Pipeline stage holding parameter ``name``: its layer's, else the last (lm_head, final norm) or the first."""
    layer = layer_of(name)
    if layer is not None:
        return next(s for s, r in enumerate(stages) if layer in r)
    return len(stages) - 1 if name.startswith(("lm_head", "model.norm", "gpt_neox.final")) else 0


def _largest_layer(params: dict[str, int]) -> int:
    """Elements of the biggest decoder layer (what ZeRO-3 gathers at a time)."""
    per_layer: dict[int, int] = {}
    for name, numel in params.items():
        layer = layer_of(name)
        if layer is not None:
            per_layer[layer] = per_layer.get(layer, 0) + numel
    return max(per_layer.values(), default=0)


def _stages(
    cfg: dict[str, Any],
    spec: AttentionSpec,
    params: dict[str, int],
    others: set[str],
    par: Parallel,
    act: Activation,
    wbytes: int,
) -> _Stages:
    """Split the parameters, the train_others parameters and the activations over the pipeline stages."""
    layers = balanced_split(spec.num_layers, par.pp)
    stage_params = [0] * par.pp
    stage_others = [0] * par.pp
    for name, numel in params.items():
        stage_params[_stage_of(name, layers)] += numel
        if name in others:
            stage_others[_stage_of(name, layers)] += numel
    acts = [
        activation_bytes(cfg, spec, len(layers[s]), act, stage=s, pp=par.pp, tp=par.tp, wbytes=wbytes)
        for s in range(par.pp)
    ]
    zero3 = 2 * _largest_layer(params) // par.tp * wbytes
    return _Stages(par, wbytes, layers, stage_params, stage_others, acts, zero3)


def _alps_row(
    spec: AttentionSpec, stages: _Stages, heads: Sequence[Head] | None, k: int, kv: KVPolicy
) -> tuple[Memory, dict[str, int]]:
    """ALPS on its most loaded (pipeline stage, tensor-parallel rank), for ``heads`` or each rank's own
    worst case of ``k`` heads; and the per-module slice elements of rank (0, 0)'s heads."""
    par = stages.par
    tp_groups = balanced_split(spec.num_kv_heads, par.tp)  # AutoTP gives rank 0 the most kv groups
    best: Memory | None = None
    per_module: dict[str, int] = {}
    for s in range(par.pp):
        for t in range(par.tp):
            layers = stages.layers[s]
            chosen = heads if heads is not None else worst_case_heads(spec, k, layers=layers, groups=tp_groups[t])
            per_rank = rank_elements(spec, chosen, kv, tp=par.tp)
            if (s, t) == (0, 0):
                per_module = module_elements(spec, chosen, kv)
            mine = sum(v for (layer, rank), v in per_rank.items() if rank == t and layer in layers)
            trainable = mine + stages.others[s] // par.tp
            frozen = (stages.params[s] - stages.others[s]) // par.tp
            mem = stages.memory("alps", s, trainable, frozen)
            if best is None or mem.total > best.total:
                best = mem
    assert best is not None
    return best, per_module


def _check_plan_args(spec: AttentionSpec, par: Parallel, dtype: str, headroom: float) -> None:
    """make_plan's arguments against each other and the model; errors name the argument."""
    check_choice("dtype", dtype, DTYPE_BYTES)
    check_headroom(headroom)
    if par.pp > spec.num_layers:
        raise AlpsError(f"pp {par.pp} exceeds the model's {spec.num_layers} layers; use at most one stage per layer")


def check_headroom(headroom: float, source: str = "headroom") -> None:
    """One AlpsError naming ``source`` (a flag or argument) unless ``headroom`` is in [0, 1)."""
    if not 0 <= headroom < 1:
        raise AlpsError(f"{source} {headroom!r} must be in [0, 1), e.g. 0.1 keeps 10 % of GPU memory free")


def make_plan(
    config: Any,
    *,
    ratio: float = 0.1,
    heads: Sequence[Head] | None = None,
    heads_source: str | None = None,
    kv: KVPolicy = "group",
    train_others: Sequence[str] = (),
    parallel: Parallel | None = None,
    activation: Activation | None = None,
    dtype: str = "bf16",
    gpu_mem_gib: float = 80.0,
    headroom: float = 0.1,
    gpus_per_node: int = 8,
    lora_rank: int = LORA_RANK,
) -> Plan:
    """Per-GPU memory of ALPS (``heads`` or the worst case of ``count_for_ratio(ratio)`` heads), full
    fine-tuning and LoRA r=``lora_rank`` on Q/K/V, on the most loaded rank."""
    cfg = _config_dict(config)
    spec = AttentionSpec.from_config(cfg)
    par = parallel or Parallel()
    act = activation or Activation()
    _check_plan_args(spec, par, dtype, headroom)
    params = count_parameters(cfg, spec)
    stages = _stages(cfg, spec, params, train_others_params(params, spec, train_others), par, act, DTYPE_BYTES[dtype])
    if heads is None:
        k = count_for_ratio(ratio, spec.num_layers, spec.num_heads)
        heads_source = heads_source or f"worst case of {k} heads (ratio {ratio})"
    else:
        k = len(heads)
    alps, per_module = _alps_row(spec, stages, heads, k, kv)
    # Full fine-tuning and LoRA, each on its own most loaded stage.
    full = stages.most_loaded("full fine-tuning", lambda s: stages.params[s] // par.tp, lambda s: 0)
    lora = lora_elements(spec, lora_rank)
    lora_row = stages.most_loaded(
        f"LoRA r={lora_rank} on Q/K/V",
        lambda s: len(stages.layers[s]) * lora // par.tp,
        lambda s: stages.params[s] // par.tp,
    )
    return Plan(
        model_type=spec.model_type,
        total_params=sum(params.values()),
        heads=k,
        heads_source=heads_source or "given heads",
        parallel=par,
        activation=act,
        gpu_mem_gib=gpu_mem_gib,
        headroom=headroom,
        gpus_per_node=gpus_per_node,
        rows=(alps, full, lora_row),
        per_module=per_module,
    )


def lora_elements(spec: AttentionSpec, rank: int) -> int:
    """LoRA A [r, d] and B [out, r] for each Q/K/V projection module of one layer."""
    return sum(rank * (spec.hidden_size + spec.module_rows(m)) for m in spec.modules)


def format_plan(plan: Plan) -> str:
    """A table of per-GPU GiB per term for ALPS, full fine-tuning and LoRA, then the verdicts."""
    par, act = plan.parallel, plan.activation
    lines = [
        f"model: {plan.model_type}, {plan.total_params:,} parameters; ALPS heads: {plan.heads_source}",
        f"parallel: tp={par.tp} pp={par.pp} dp={par.dp} (world {par.world}), ZeRO-{par.zero}"
        f"{', optimizer offload' if par.offload else ''}; activations: seq {act.seq_len} x micro batch "
        f"{act.micro_batch}, checkpointing {'on' if act.checkpointing else 'off'}",
        f"per GPU, GiB (most loaded rank; {plan.gpu_mem_gib:g} GiB GPUs, {plan.headroom:.0%} headroom):",
    ]
    names = [m.name for m in plan.rows]
    width = max(len(n) for n in names) + 2
    terms = list(plan.rows[0].terms())
    lines.append(f"  {'':24}" + "".join(f"{n:>{width}}" for n in names))
    lines.append(f"  {'trained elements':24}" + "".join(f"{m.trainable:>{width},}" for m in plan.rows))
    for term in terms:
        lines.append(f"  {term:24}" + "".join(f"{m.terms()[term] / GiB:>{width}.2f}" for m in plan.rows))
    lines.append(f"  {'total':24}" + "".join(f"{m.total / GiB:>{width}.2f}" for m in plan.rows))
    if par.offload:
        lines.append(
            f"  {'host RAM per node':24}"
            + "".join(f"{m.cpu_offload * plan.gpus_per_node / GiB:>{width}.2f}" for m in plan.rows)
        )
    for m in plan.rows:
        lines.append(f"{m.name}: {plan.verdict(m)}")
    return "\n".join(lines)


def load_config(model: str) -> dict[str, Any]:
    """A model folder, a ``config.json`` or a hub id -> its config dict with the family defaults filled in."""
    cfg, source = read_config(model)
    AttentionSpec.from_config(cfg, source=source)  # names the file in errors about the shape
    return _config_dict(cfg)
