"""Architecture facts: the one place that knows where each attention head's rows live.

Everything else in alps_ds (scoring, the engine hook, tensor-parallel layout, the memory
planner) asks an :class:`AttentionSpec` instead of reading configs or module names itself.

Weights are in the Hugging Face ``[out, in]`` layout. Three row layouts occur:

- ``separate``: ``q_proj`` [n*hd, d], ``k_proj`` and ``v_proj`` [g*hd, d] (llama, mistral,
  qwen2/3, gemma/gemma2).
- ``fused``: one ``qkv_proj`` [(n + 2g)*hd, d] holding [Q; K; V] (phi3).
- ``neox``: one ``query_key_value`` [3*n*hd, d], per head [q_h; k_h; v_h] (gpt_neox, g = n).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from alps_ds.errors import AlpsError

Layout = Literal["separate", "fused", "neox"]
Kind = Literal["q", "k", "v"]
KINDS: tuple[Kind, ...] = ("q", "k", "v")


@dataclass(frozen=True)
class _Family:
    layout: Layout
    layers_path: str
    attn_path: str
    modules: tuple[str, ...]
    bias: bool | None  # fixed value, or None: read the config's ``attention_bias``
    bias_default: bool = False
    head_dim_default: int | None = None  # None: hidden_size // num_heads


_SEPARATE = ("q_proj", "k_proj", "v_proj")
_FAMILIES: dict[str, _Family] = {
    "llama": _Family("separate", "model.layers", "self_attn", _SEPARATE, None),
    "mistral": _Family("separate", "model.layers", "self_attn", _SEPARATE, False),
    "qwen2": _Family("separate", "model.layers", "self_attn", _SEPARATE, True),
    "qwen3": _Family("separate", "model.layers", "self_attn", _SEPARATE, None, head_dim_default=128),
    "gemma": _Family("separate", "model.layers", "self_attn", _SEPARATE, None, head_dim_default=256),
    "gemma2": _Family("separate", "model.layers", "self_attn", _SEPARATE, None, head_dim_default=256),
    "phi3": _Family("fused", "model.layers", "self_attn", ("qkv_proj",), False),
    "gpt_neox": _Family("neox", "gpt_neox.layers", "attention", ("query_key_value",), None, bias_default=True),
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_FAMILIES))


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
        family = _FAMILIES.get(model_type)
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
