"""Hugging Face llama / mistral / qwen2 <-> megatron-core ``GPTModel`` (local layer spec), sharded over TP.

Every tensor maps one to one except ``linear_qkv``: HF's separate q/k/v rows are interleaved
into megatron-core's grouped layout (per kv group j: [q of its heads; k_j; v_j]) with the rows
:meth:`alps_ds.arch.AttentionSpec.rows` gives for the ``separate`` and ``grouped`` layouts, and a
TP rank holds the rows :meth:`~alps_ds.arch.AttentionSpec.tp_segments` names. The MLP's fused
``linear_fc1`` holds, per rank, [gate_t; up_t]; row-parallel layers are cut on their input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from alps_ds.arch import KINDS, MEGATRON_MODULE, AttentionSpec
from alps_ds.errors import AlpsError

FAMILIES = ("llama", "mistral", "qwen2")
Rule = Literal["qkv", "rows", "cols", "fc1", "replicated"]


@dataclass(frozen=True)
class Tensor:
    """One megatron-core parameter, the HF tensors it is made of, and how TP cuts it."""

    name: str  # megatron-core parameter name in GPTModel
    hf: tuple[str, ...]
    rule: Rule


def check_config(cfg: dict, source: str) -> None:
    """Refuse HF configs megatron-core's GPTModel cannot reproduce exactly (one line naming the key)."""
    if cfg.get("model_type") not in FAMILIES:
        raise AlpsError(f"{source}: engine megatron supports {', '.join(FAMILIES)}, not {cfg.get('model_type')!r}")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise AlpsError(f"{source}: rope scaling {rope.get('rope_type')!r} is not supported by engine megatron")
    if cfg.get("mlp_bias") or (cfg.get("model_type") == "llama" and cfg.get("attention_bias")):
        raise AlpsError(f"{source}: o_proj/MLP biases are not supported by engine megatron (attention_bias/mlp_bias)")
    window = cfg.get("sliding_window")
    if window is not None and cfg.get("use_sliding_window", True) and window < cfg["max_position_embeddings"]:
        raise AlpsError(f"{source}: sliding_window {window} attention is not supported by engine megatron")
    if cfg.get("hidden_act", "silu") != "silu":
        raise AlpsError(f"{source}: hidden_act {cfg.get('hidden_act')!r}: engine megatron supports silu (SwiGLU)")


def transformer_config(cfg: dict, spec: AttentionSpec, *, tp: int, dtype: torch.dtype):
    """megatron-core ``TransformerConfig`` of a HF config dict (RMSNorm, SwiGLU, RoPE, GQA, q/k/v bias)."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_heads,
        num_query_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim,
        ffn_hidden_size=cfg["intermediate_size"],
        normalization="RMSNorm",
        layernorm_epsilon=cfg.get("rms_norm_eps", 1e-6),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        attention_dropout=float(cfg.get("attention_dropout", 0.0)),
        hidden_dropout=0.0,
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
        perform_initialization=False,  # every weight is loaded from the HF checkpoint
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
    )


def build_gpt(cfg: dict, spec: AttentionSpec, *, tp: int, dtype: torch.dtype):
    """An (uninitialized) ``GPTModel`` of the HF config on this TP rank (model parallel state initialized)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    vocab = cfg["vocab_size"]
    if vocab % tp:
        raise AlpsError(
            f"model: vocab_size {vocab} does not split over parallel.tp {tp} (megatron-core cuts the vocabulary "
            "evenly); use a TP size dividing it or a checkpoint with a padded vocabulary"
        )
    rope = cfg.get("rope_parameters") or {}
    return GPTModel(
        config=transformer_config(cfg, spec, tp=tp, dtype=dtype),
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=vocab,
        max_sequence_length=cfg["max_position_embeddings"],
        share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_base=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
    )


def tensor_map(spec: AttentionSpec, tied: bool) -> list[Tensor]:
    """Every GPTModel parameter and its HF source tensors (HF names from the family table of arch.py)."""
    fam = spec.family
    out = [Tensor("embedding.word_embeddings.weight", (f"{fam.embed}.weight",), "rows")]
    for i in range(spec.num_layers):
        m, h = f"decoder.layers.{i}", f"{spec.layers_path}.{i}"
        out += [
            Tensor(f"{m}.input_layernorm.weight", (f"{h}.{fam.layer_norms[0]}.weight",), "replicated"),
            Tensor(
                f"{m}.self_attention.{MEGATRON_MODULE}.weight", tuple(spec.tensor_names(i)[:: 1 + spec.qkv_bias]), "qkv"
            ),
            Tensor(f"{m}.self_attention.linear_proj.weight", (f"{spec.module_path(i, fam.out_proj)}.weight",), "cols"),
            Tensor(f"{m}.pre_mlp_layernorm.weight", (f"{h}.{fam.layer_norms[1]}.weight",), "replicated"),
            Tensor(f"{m}.mlp.linear_fc1.weight", tuple(f"{h}.mlp.{n}.weight" for n, _ in fam.mlp), "fc1"),
            Tensor(f"{m}.mlp.linear_fc2.weight", (f"{h}.mlp.{fam.mlp_down}.weight",), "cols"),
        ]
        if spec.qkv_bias:
            out.append(Tensor(f"{m}.self_attention.{MEGATRON_MODULE}.bias", tuple(spec.tensor_names(i)[1::2]), "qkv"))
    out.append(Tensor("decoder.final_layernorm.weight", (f"{fam.final_norm}.weight",), "replicated"))
    if not tied:
        out.append(Tensor("output_layer.weight", ("lm_head.weight",), "rows"))
    return out


def to_grouped(spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HF q/k/v (weights or biases) interleaved into megatron-core's grouped ``linear_qkv`` rows."""
    grouped, parts = spec.in_layout("grouped"), dict(zip(KINDS, (q, k, v)))
    out = q.new_empty((grouped.module_rows(MEGATRON_MODULE), *q.shape[1:]))
    for kind in KINDS:
        for i in range(spec.num_heads if kind == "q" else spec.num_kv_heads):
            src, dst = spec.rows(kind, i), grouped.rows(kind, i)
            out[dst.start : dst.stop] = parts[kind][src.start : src.stop]
    return out


def from_grouped(spec: AttentionSpec, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The inverse of :func:`to_grouped`: HF (q, k, v) of a full grouped ``linear_qkv`` tensor."""
    grouped = spec.in_layout("grouped")
    parts = {kind: qkv.new_empty((spec.module_rows(f"{kind}_proj"), *qkv.shape[1:])) for kind in KINDS}
    for kind in KINDS:
        for i in range(spec.num_heads if kind == "q" else spec.num_kv_heads):
            src, dst = spec.rows(kind, i), grouped.rows(kind, i)
            parts[kind][src.start : src.stop] = qkv[dst.start : dst.stop]
    return tuple(parts[k] for k in KINDS)


def shard(spec: AttentionSpec, t: Tensor, hf: list[torch.Tensor], tp: int, rank: int) -> torch.Tensor:
    """This TP rank's part of megatron tensor ``t`` made from its HF tensors ``hf``."""
    if t.rule == "qkv":
        full = to_grouped(spec, *hf)
        return torch.cat([full[a:b] for a, b in spec.tp_segments("megatron", MEGATRON_MODULE, tp, rank)])
    if t.rule == "rows":
        return hf[0].chunk(tp, dim=0)[rank]
    if t.rule == "cols":
        return hf[0].chunk(tp, dim=1)[rank]
    if t.rule == "fc1":
        return torch.cat([x.chunk(tp, dim=0)[rank] for x in hf])
    return hf[0]


def unshard(spec: AttentionSpec, t: Tensor, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """The HF tensors of megatron tensor ``t`` from every TP rank's part (rank order)."""
    tp = len(parts)
    if t.rule == "qkv":
        full = parts[0].new_empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]))
        for rank, part in enumerate(parts):
            local = 0
            for a, b in spec.tp_segments("megatron", MEGATRON_MODULE, tp, rank):
                full[a:b] = part[local : local + b - a]
                local += b - a
        return list(from_grouped(spec, full))
    if t.rule == "rows":
        return [torch.cat(parts, dim=0)]
    if t.rule == "cols":
        return [torch.cat(parts, dim=1)]
    if t.rule == "fc1":
        halves = [p.chunk(len(t.hf), dim=0) for p in parts]
        return [torch.cat([h[j] for h in halves]) for j in range(len(t.hf))]
    return [parts[0]]


def load_hf(model, model_dir: Path, spec: AttentionSpec, tied: bool) -> None:
    """Fill this rank's ``GPTModel`` parameters from the HF safetensors checkpoint in ``model_dir``."""
    from safetensors import safe_open

    tp, rank = _tp()
    params = dict(model.named_parameters())
    handles = {f: safe_open(str(f), "pt") for f in sorted(model_dir.glob("*.safetensors"))}
    shard_of = {key: f for f, h in handles.items() for key in h.keys()}  # noqa: SIM118 (safe_open is not iterable)
    for t in tensor_map(spec, tied):
        if t.name not in params:
            raise AlpsError(f"megatron convert: GPTModel has no parameter {t.name}; megatron-core changed its names")
        hf = []
        for key in t.hf:
            if key not in shard_of:
                raise AlpsError(f"{model_dir}: checkpoint has no tensor {key}; is this a {spec.model_type} model?")
            hf.append(handles[shard_of[key]].get_tensor(key))
        local = shard(spec, t, hf, tp, rank)
        p = params[t.name]
        if tuple(local.shape) != tuple(p.shape):
            raise AlpsError(
                f"megatron convert: {t.name} is {tuple(p.shape)} on tp rank {rank}, HF gives {tuple(local.shape)}"
            )
        with torch.no_grad():
            p.copy_(local.to(p.dtype))


def _tp() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()


def gather_hf(model, spec: AttentionSpec, tied: bool, names=None) -> dict[str, torch.Tensor]:
    """HF name -> full tensor of ``model``'s current weights (trained rows written in); collective
    over the TP group, every rank gets the dict. ``names`` limits it to those megatron tensors."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from alps_ds.hooked import HeadRows

    group = parallel_state.get_tensor_model_parallel_group()
    hooked = {name: mod for name, mod in model.named_modules() if isinstance(mod, HeadRows)}
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for t in tensor_map(spec, tied):
        if names is not None and t.name not in names:
            continue
        module, _, leaf = t.name.rpartition(".")
        if module in hooked:
            local = hooked[module].merged_weight()[0 if leaf == "weight" else 1]
        else:
            local = params[t.name].detach()
        parts = [torch.empty_like(local) for _ in range(group.size())]
        dist.all_gather(parts, local.contiguous(), group=group)
        out.update(zip(t.hf, (x.cpu() for x in unshard(spec, t, parts))))
    return out
