"""Architecture facts: the one place that knows where each attention head's rows live.

Everything else in alps_ds (scoring, the engine hook, tensor-parallel layout, the memory
planner) asks an :class:`AttentionSpec` instead of reading configs or module names itself.

Weights are in the ``[out, in]`` layout (``m = n / g`` query heads per kv head). Four row layouts occur:

- ``separate``: ``q_proj`` [n*hd, d], ``k_proj`` and ``v_proj`` [g*hd, d] (llama, mistral,
  qwen2/3, gemma/gemma2).
- ``fused``: one ``qkv_proj`` [(n + 2g)*hd, d] holding [Q; K; V] (phi3).
- ``neox``: one ``query_key_value`` [3*n*hd, d], per head [q_h; k_h; v_h] (gpt_neox, g = n).
- ``grouped``: megatron-core's ``linear_qkv`` [(n + 2g)*hd, d], per kv group j the block
  [q rows of its m query heads; k_j; v_j], (m + 2)*hd rows each.

Tensor-parallel layouts (:data:`TP_LAYOUTS`) name a row layout and how its rows are cut over T
ranks; :meth:`AttentionSpec.tp_segments` is the one place that computes which rows a rank holds.
The family table (:data:`FAMILIES`) holds every per-family fact: module names, bias rules and the
parameter facts the memory planner, tiny models and AutoTP's split use. Adding a family means
adding one row there.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from alps_ds.errors import AlpsError

Layout = Literal["separate", "fused", "neox", "grouped"]
Kind = Literal["q", "k", "v"]
KINDS: tuple[Kind, ...] = ("q", "k", "v")
Range = tuple[int, int]

# The projection modules of each row layout, in checkpoint order.
LAYOUT_MODULES: dict[str, tuple[str, ...]] = {
    "separate": ("q_proj", "k_proj", "v_proj"),
    "fused": ("qkv_proj",),
    "neox": ("query_key_value",),
    "grouped": ("linear_qkv",),
}
MEGATRON_MODULE = "linear_qkv"
MEGATRON_LAYERS, MEGATRON_ATTN = "decoder.layers", "self_attention"  # GPTModel's module names

TPLayout = Literal["hf", "fused", "neox", "megatron", "autotp"]
# Tensor-parallel layout -> the row layout it cuts. ``hf``/``fused``/``neox``/``megatron``: each
# module's rows in T equal parts (fused: [Q_t; K_t; V_t], vLLM's QKVParallelLinear); ``autotp``:
# DeepSpeed AutoTP's cut on kv-group boundaries, possibly uneven (``tp_shard.get_shard_size``).
TP_LAYOUTS: dict[str, Layout] = {
    "hf": "separate",
    "fused": "fused",
    "neox": "neox",
    "megatron": "grouped",
    "autotp": "separate",
}
NATIVE_TP_LAYOUT: dict[str, str] = {"separate": "hf", "fused": "fused", "neox": "neox", "grouped": "megatron"}


@dataclass(frozen=True)
class Family:
    """Everything alps-ds knows about one model family (module names relative to a decoder layer)."""

    layout: Layout
    layers_path: str
    attn_path: str
    bias: bool | None  # q/k/v bias: fixed, or None: the config's ``attention_bias``
    bias_default: bool = False
    head_dim_default: int | None = None  # None: hidden_size // num_heads
    # Parameter facts (the memory planner's exact counts, tiny models, AutoTP's split):
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    out_proj: str = "o_proj"  # attention output projection, under attn_path
    out_bias: bool | None = False  # None: the same as the q/k/v bias
    mlp: tuple[tuple[str, int], ...] = (("gate_proj", 1), ("up_proj", 1))  # column-parallel: (name, x intermediate)
    mlp_down: str = "down_proj"  # row-parallel
    mlp_bias: bool | None = False  # None: the config's ``mlp_bias``
    layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    head_norms: tuple[str, ...] = ()  # per-head norms of width head_dim under attn_path (qwen3's q_norm/k_norm)
    norm_bias: bool = False

    @property
    def modules(self) -> tuple[str, ...]:
        return LAYOUT_MODULES[self.layout]

    @property
    def column_parallel(self) -> tuple[str, ...]:
        """Projections whose output rows a TP split cuts (AutoTP's ``LinearLayer``)."""
        return self.modules + tuple(name for name, _ in self.mlp)

    @property
    def row_parallel(self) -> tuple[str, ...]:
        """Projections whose input a TP split cuts, output all-reduced (AutoTP's ``LinearAllreduce``)."""
        return (self.out_proj, self.mlp_down)


_NEOX = dict(
    embed="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    out_proj="dense",
    out_bias=None,
    mlp=(("dense_h_to_4h", 1),),
    mlp_down="dense_4h_to_h",
    mlp_bias=True,
    norm_bias=True,
)
FAMILIES: dict[str, Family] = {
    "llama": Family("separate", "model.layers", "self_attn", None, out_bias=None, mlp_bias=None),
    "mistral": Family("separate", "model.layers", "self_attn", False),
    "qwen2": Family("separate", "model.layers", "self_attn", True),
    "qwen3": Family(
        "separate",
        "model.layers",
        "self_attn",
        None,
        head_dim_default=128,
        out_bias=None,
        head_norms=("q_norm", "k_norm"),
    ),
    "gemma": Family("separate", "model.layers", "self_attn", None, head_dim_default=256, out_bias=None),
    "gemma2": Family(
        "separate",
        "model.layers",
        "self_attn",
        None,
        head_dim_default=256,
        out_bias=None,
        layer_norms=(
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ),
    ),
    "phi3": Family("fused", "model.layers", "self_attn", False, mlp=(("gate_up_proj", 2),)),
    "gpt_neox": Family("neox", "gpt_neox.layers", "attention", None, bias_default=True, **_NEOX),
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(FAMILIES))


def balanced_split(count: int, parts: int) -> list[range]:
    """``count`` items in ``parts`` consecutive runs, the first ``count % parts`` one longer: how
    AutoTP cuts kv groups over TP ranks (``get_shard_size``; ranks past ``count`` get none)."""
    base, extra = divmod(count, parts)
    bounds = [p * base + min(p, extra) for p in range(parts + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def looks_local(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else is meant as a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


def read_config(name_or_path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """The raw config dict of a model folder, a ``config.json`` file or a hub id (needs network),
    and the name to put in error messages."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep
            raise AlpsError(f"{path}: not a readable JSON config ({e}); point to a model folder") from e
        if not isinstance(cfg, dict):
            raise AlpsError(f"{path}: expected a JSON object; point to a model's config.json")
        return cfg, str(path)
    if path.parent.exists() and path.name == "config.json" or looks_local(str(name_or_path)):
        raise AlpsError(f"{name_or_path}: no config.json there; point to a Hugging Face model folder")
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(name_or_path)).to_dict(), str(name_or_path)
    except Exception as e:  # network, auth, missing repo
        raise AlpsError(
            f"{name_or_path}: not a local model folder and the hub lookup failed ({type(e).__name__}); "
            "pass a local path or check the model id and network"
        ) from e


@dataclass(frozen=True)
class ModelFingerprint:
    """The shape facts a head selection depends on; two models with equal fingerprints
    address the same heads."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    @property
    def total_heads(self) -> int:
        """Query heads over all layers: what a selection's ratio is a fraction of."""
        return self.num_layers * self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def diff(self, other: ModelFingerprint) -> list[str]:
        """Human-readable list of fields that differ, e.g. ``['num_layers: 16 != 32']``."""
        mine, theirs = asdict(self), asdict(other)
        return [f"{k}: {mine[k]} != {theirs[k]}" for k in mine if mine[k] != theirs[k]]


@dataclass(frozen=True)
class RowBlock:
    """Rows [start, stop) of one projection module's weight (and bias) in the unsharded model."""

    module: str
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class AttentionSpec:
    """Attention geometry and module names of one model family instance."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool
    layout: Layout
    layers_path: str
    attn_path: str
    modules: tuple[str, ...]

    def __post_init__(self) -> None:
        n, g = self.num_heads, self.num_kv_heads
        if min(self.num_layers, self.hidden_size, n, g, self.head_dim) <= 0:
            raise AlpsError(f"{self.model_type} config: layers, hidden size, heads and head_dim must be positive")
        if n % g:
            raise AlpsError(
                f"{self.model_type} config: num_attention_heads ({n}) is not a multiple of "
                f"num_key_value_heads ({g}); fix the config"
            )
        if self.layout == "neox" and g != n:
            raise AlpsError("gpt_neox layout needs num_kv_heads == num_heads")

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Any, *, source: str = "config") -> AttentionSpec:
        """Build from a ``transformers`` config object or a ``config.json`` dict."""
        cfg = config if isinstance(config, dict) else config.to_dict()
        model_type = cfg.get("model_type")
        family = FAMILIES.get(model_type)
        if family is None:
            raise AlpsError(
                f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )

        def need(key: str) -> int:
            value = cfg.get(key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise AlpsError(f"{source}: key {key!r} is missing or not an integer; fix the config")
            return value

        layers = need("num_hidden_layers")
        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        kv = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or family.head_dim_default or hidden // heads
        bias = family.bias if family.bias is not None else bool(cfg.get("attention_bias", family.bias_default))
        return cls(
            model_type=model_type,
            num_layers=layers,
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(kv),
            head_dim=int(head_dim),
            qkv_bias=bias,
            layout=family.layout,
            layers_path=family.layers_path,
            attn_path=family.attn_path,
            modules=family.modules,
        )

    def in_layout(self, layout: Layout) -> AttentionSpec:
        """The same geometry with its Q/K/V in another row layout (``grouped``: megatron-core names)."""
        if layout == self.layout:
            return self
        if layout not in LAYOUT_MODULES:
            raise AlpsError(f"row layout {layout!r} is unknown; use one of {', '.join(LAYOUT_MODULES)}")
        paths = (MEGATRON_LAYERS, MEGATRON_ATTN) if layout == "grouped" else (self.layers_path, self.attn_path)
        return replace(self, layout=layout, modules=LAYOUT_MODULES[layout], layers_path=paths[0], attn_path=paths[1])

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike) -> AttentionSpec:
        """From a model folder, a ``config.json`` file, or a hub id (needs network)."""
        cfg, source = read_config(name_or_path)
        return cls.from_config(cfg, source=source)

    # ---- derived facts ------------------------------------------------------------
    @property
    def group_size(self) -> int:
        """Query heads per kv head (m = n / g)."""
        return self.num_heads // self.num_kv_heads

    @property
    def total_heads(self) -> int:
        return self.fingerprint.total_heads

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def native_tp_layout(self) -> str:
        """The TP layout of the model's own weights."""
        return NATIVE_TP_LAYOUT[self.layout]

    def kind_of(self, module: str) -> Kind | None:
        """The one kind a separate projection holds (``k_proj`` -> ``k``); None for fused layouts."""
        return next((k for k in KINDS if self.layout == "separate" and module == f"{k}_proj"), None)

    @property
    def fingerprint(self) -> ModelFingerprint:
        return ModelFingerprint(
            self.model_type, self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim, self.hidden_size
        )

    def kv_head(self, head: int) -> int:
        """The kv head that query head ``head`` reads: floor(h / m)."""
        return head // self.group_size

    def module_path(self, layer: int, module: str) -> str:
        """Dotted module name in the HF causal LM, e.g. ``model.layers.3.self_attn.q_proj``."""
        return f"{self.layers_path}.{layer}.{self.attn_path}.{module}"

    def module_rows(self, module: str) -> int:
        """Output rows of one projection module."""
        n, g, hd = self.num_heads, self.num_kv_heads, self.head_dim
        return {
            "q_proj": n * hd,
            "k_proj": g * hd,
            "v_proj": g * hd,
            "qkv_proj": (n + 2 * g) * hd,
            "query_key_value": 3 * n * hd,
            MEGATRON_MODULE: (n + 2 * g) * hd,
        }[module]

    def rows(self, kind: Kind, index: int) -> RowBlock:
        """Rows of query head ``index`` (kind q) or kv head ``index`` (kind k, v)."""
        n, g, hd = self.num_heads, self.num_kv_heads, self.head_dim
        limit = n if kind == "q" else g
        if not 0 <= index < limit:
            raise IndexError(f"{kind} head {index} out of range [0, {limit})")
        if self.layout == "separate":
            start = index * hd
            return RowBlock(f"{kind}_proj", start, start + hd)
        if self.layout == "fused":
            offset = {"q": 0, "k": n * hd, "v": (n + g) * hd}[kind]
            start = offset + index * hd
            return RowBlock("qkv_proj", start, start + hd)
        if self.layout == "grouped":
            m = self.group_size
            group = index // m if kind == "q" else index  # block of group j: [q of its m heads; k_j; v_j]
            start = group * (m + 2) * hd + {"q": (index % m) * hd, "k": m * hd, "v": (m + 1) * hd}[kind]
            return RowBlock(MEGATRON_MODULE, start, start + hd)
        start = index * 3 * hd + KINDS.index(kind) * hd
        return RowBlock("query_key_value", start, start + hd)

    def head_blocks(self, head: int, *, kv: bool = True) -> list[RowBlock]:
        """θ_h: the q rows of query head ``head`` and, with ``kv``, the k/v rows of its kv head."""
        blocks = [self.rows("q", head)]
        if kv:
            j = self.kv_head(head)
            blocks += [self.rows("k", j), self.rows("v", j)]
        return blocks

    def weight_name(self, layer: int, module: str) -> str:
        """Checkpoint key of a projection's weight, e.g. ``model.layers.3.self_attn.q_proj.weight``."""
        return f"{self.module_path(layer, module)}.weight"

    def tensor_names(self, layer: int) -> list[str]:
        """Checkpoint keys of one layer's Q/K/V weights (and biases when the model has them)."""
        suffixes = ("weight", "bias") if self.qkv_bias else ("weight",)
        return [f"{self.module_path(layer, m)}.{s}" for m in self.modules for s in suffixes]

    # ---- tensor parallelism: which rows each rank holds ----------------------------------
    def tp_check(self, tp_layout: str, tp: int) -> None:
        """Refuse a TP size that ``tp_layout`` cannot split this model's Q/K/V over."""
        n, g, T = self.num_heads, self.num_kv_heads, tp
        if tp_layout not in TP_LAYOUTS:
            raise AlpsError(f"layout {tp_layout!r} is unknown; use one of {', '.join(TP_LAYOUTS)}")
        if not isinstance(T, int) or isinstance(T, bool) or T < 1:
            raise AlpsError(f"tp {T!r}: tensor-parallel size must be a positive integer")
        if tp_layout == "neox" and g != n:
            raise AlpsError(f"layout neox needs num_kv_heads == num_heads (model has {g} != {n}); use another layout")
        if tp_layout == "autotp":
            return
        if n % T:
            raise AlpsError(
                f"layout {tp_layout}: {n} query heads do not split over tp {T} (n % T != 0); "
                f"pick a TP size dividing {n}"
            )
        if tp_layout == "megatron":
            if g % T and T % g:
                raise AlpsError(
                    f"layout megatron: {g} query groups and tp {T} need g % T == 0 or T % g == 0; "
                    "pick a TP size that divides or is a multiple of the kv head count"
                )
            if ((n + 2 * g) * self.head_dim) % T:
                raise AlpsError(
                    f"layout megatron: linear_qkv rows {(n + 2 * g) * self.head_dim} do not split over tp {T}"
                )
        elif tp_layout in ("hf", "fused") and g % T:
            raise AlpsError(
                f"layout {tp_layout}: {g} kv heads do not split over tp {T} (g % T != 0); "
                "use layout autotp (uneven kv groups) or megatron, or a TP size dividing the kv head count"
            )

    def tp_segments(self, tp_layout: str, module: str, tp: int, rank: int) -> tuple[Range, ...]:
        """Global rows of ``module`` held by TP rank ``rank`` under ``tp_layout``, in local order
        (concatenated they are the rank's local weight). ``module`` is one of the layout's modules."""
        total = self.in_layout(TP_LAYOUTS[tp_layout]).module_rows(module)
        if tp_layout == "autotp":
            g = self.num_kv_heads
            groups = balanced_split(g, tp)[rank]  # every module's rows are whole kv groups
            return ((total * groups.start // g, total * groups.stop // g),)
        if tp_layout == "fused":  # [Q_t; K_t; V_t]
            n, g, hd = self.num_heads, self.num_kv_heads, self.head_dim
            q, kv = n * hd // tp, g * hd // tp
            return (
                (rank * q, (rank + 1) * q),
                (n * hd + rank * kv, n * hd + (rank + 1) * kv),
                ((n + g) * hd + rank * kv, (n + g) * hd + (rank + 1) * kv),
            )
        size = total // tp  # hf, neox, megatron: the contiguous t-th 1/T
        return ((rank * size, (rank + 1) * size),)
