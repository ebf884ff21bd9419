"""Head adapters: only the trained Q/K/V slices (safetensors) plus the selection and row ranges (json).

An adapter holds the trained rows only (for Llama-3.1-70B at 10 % of heads at most 1.6 B
elements, 3.2 GB in bf16, against 141 GB for the model; see docs/formats.md). It can be loaded
onto a base model (plain: rows are written into the weights; hooked: into the slice parameters,
to resume training), or merged into a base checkpoint shard by shard without loading the model
(``alps-ds merge``).

Layout of an adapter folder::

    adapter.json          format, version, kv policy, dtype, the heads.json selection, per module
                          the checkpoint key, row ranges and rows per kind, (when the model was loaded
                          from a local folder) the base's path and Q/K/V digest, and "others": the
                          parameters trained in full (train_others; version 2, absent when none)
    adapter.safetensors   "<module>.weight" [rows, in] (and "<module>.bias" [rows]) per module, and
                          each train_others parameter whole under its own name
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alps_ds.arch import AttentionSpec
from alps_ds.errors import AlpsError
from alps_ds.fsutil import atomic_dir
from alps_ds.hooked import HeadRows, hook_state, hooked_modules, unwrap
from alps_ds.selection import HeadSelection
from alps_ds.sparse.module import gathered, row_index

FORMAT = "alps-ds/adapter"
VERSION = 2  # 2: "others" (train_others tensors); an adapter without them is still written as version 1
JSON_NAME = "adapter.json"
TENSORS_NAME = "adapter.safetensors"


@dataclass(frozen=True)
class AdapterModule:
    """One re-parametrized projection: its dotted module name, trained row ranges and rows per kind."""

    module: str
    ranges: tuple[tuple[int, int], ...]
    kinds: tuple[tuple[str, int], ...]
    in_features: int
    bias: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "ranges": [list(r) for r in self.ranges],
            "kinds": dict(self.kinds),
            "in_features": self.in_features,
            "bias": self.bias,
        }


@dataclass(frozen=True)
class Adapter:
    """An adapter folder in memory: the selection, kv policy, dtype, modules and their row tensors."""

    selection: HeadSelection
    kv: str
    dtype: str
    modules: tuple[AdapterModule, ...]
    tensors: dict[str, torch.Tensor]
    base: dict[str, Any] | None = None  # alps_ds.digest.base_record of the base it was trained on
    others: tuple[str, ...] = ()  # parameters trained in full (train_others), stored whole in ``tensors``

    @classmethod
    def read(cls, adapter_dir: str | os.PathLike) -> Adapter:
        """Read and validate ``adapter_dir``; every problem is one AlpsError naming the file."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        root = Path(adapter_dir)
        meta_path, tensor_path = root / JSON_NAME, root / TENSORS_NAME
        if not meta_path.is_file() or not tensor_path.is_file():
            raise AlpsError(f"{root}: not an alps-ds adapter (needs {JSON_NAME} and {TENSORS_NAME}); see save_adapter")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep
            raise AlpsError(f"{meta_path}: not valid JSON ({e}); save the adapter again") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise AlpsError(f"{meta_path}: 'format' is not {FORMAT!r}; not an alps-ds adapter")
        if not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
            raise AlpsError(f"{meta_path}: adapter version {meta.get('version')!r} unsupported; upgrade alps-ds")
        selection = HeadSelection.from_dict(meta.get("selection"), source=f"{meta_path}: selection")
        try:
            modules = tuple(
                AdapterModule(
                    m["module"],
                    tuple((int(a), int(b)) for a, b in m["ranges"]),
                    tuple((str(k), int(v)) for k, v in m["kinds"].items()),
                    int(m["in_features"]),
                    bool(m["bias"]),
                )
                for m in meta["modules"]
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise AlpsError(f"{meta_path}: 'modules' entry malformed ({type(e).__name__}: {e})") from e
        for m in modules:
            stops = [0] + [b for _, b in m.ranges]
            if not m.ranges or any(not prev <= a < b for prev, (a, b) in zip(stops, m.ranges)):
                raise AlpsError(
                    f"{meta_path}: {m.module} row ranges {[list(r) for r in m.ranges]} are not sorted, disjoint "
                    "[start, stop) pairs with 0 <= start < stop; save the adapter again"
                )
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError) as e:
            raise AlpsError(f"{tensor_path}: unreadable safetensors file ({e}); save the adapter again") from e
        for m in modules:
            rows = sum(b - a for a, b in m.ranges)
            w = tensors.get(f"{m.module}.weight")
            if w is None or tuple(w.shape) != (rows, m.in_features):
                raise AlpsError(f"{tensor_path}: tensor {m.module}.weight missing or not [{rows}, {m.in_features}]")
            if m.bias and tuple(getattr(tensors.get(f"{m.module}.bias"), "shape", ())) != (rows,):
                raise AlpsError(f"{tensor_path}: tensor {m.module}.bias missing or not [{rows}]")
        base = meta.get("base")
        if base is not None and not isinstance(base, dict):
            raise AlpsError(f"{meta_path}: 'base' is not an object; save the adapter again")
        others = meta.get("others", [])
        if not isinstance(others, list) or not all(isinstance(n, str) and n in tensors for n in others):
            raise AlpsError(f"{meta_path}: 'others' must list tensors of {TENSORS_NAME}; save the adapter again")
        return cls(selection, str(meta.get("kv")), str(meta.get("dtype")), modules, tensors, base, tuple(others))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, selection: HeadSelection | None = None) -> Path:
    """Write the trained slices of a hooked model (or a DeepSpeed engine around one) to ``out_dir``.

    Call on EVERY rank: under ZeRO-3 the slices are gathered (collective), so the adapter holds
    the real values; rank 0 writes (atomically: a crash leaves any previous adapter intact).
    ``selection`` defaults to the one :func:`alps_ds.apply` used. A model loaded from a local folder
    gets that base's Q/K/V digest recorded, so merging or loading onto another base is refused.
    """
    from alps_ds.digest import base_record, model_base_dir

    model = unwrap(model)
    state = hook_state(model)
    hooked = list(hooked_modules(model))
    if state is None or not hooked:
        raise AlpsError("save_adapter: model has no re-parametrized projections; call alps_ds.apply(model, ...) first")
    selection = selection or state[0]
    if any(mod.hooked is not None and mod.hooked.tp_size > 1 for _, mod in hooked):
        # Each rank holds rows local to its shard: rank 0 alone would write an adapter missing the others.
        raise AlpsError(
            "save_adapter: the model is tensor-parallel (alps_ds.parallel.autotp) and each rank holds only "
            "its shard's rows; gather the full rows first (alps_ds.train.tensor_parallel.gather_rows) and "
            "write them with write_adapter"
        )
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for name, mod in hooked:
        with gathered([mod.head_weight, mod.head_bias]):
            tensors[f"{name}.weight"] = mod.head_weight.detach().cpu().clone().contiguous()
            if mod.head_bias is not None:
                tensors[f"{name}.bias"] = mod.head_bias.detach().cpu().clone().contiguous()
        entries.append(AdapterModule(name, mod.ranges, mod.kinds, mod.in_features, mod.head_bias is not None))
    others = _trained_others(model, {name for name, _ in hooked})
    for name, p in others:
        with gathered([p]):
            tensors[name] = p.detach().cpu().clone().contiguous()
    out = Path(out_dir)
    if _rank() == 0:
        base_dir = model_base_dir(model)
        base = None if base_dir is None else base_record(base_dir)
        write_adapter(out, selection, state[1], entries, tensors, base=base, others=[name for name, _ in others])
    if _distributed():
        torch.distributed.barrier()
    return out


def write_adapter(
    out_dir: str | os.PathLike,
    selection: HeadSelection,
    kv: str,
    modules: list[AdapterModule],
    tensors: dict[str, torch.Tensor],
    *,
    base: dict | None = None,
    others: tuple[str, ...] | list[str] = (),
) -> Path:
    """Write an adapter folder (atomically) from full-model rows: ``tensors`` holds ``<module>.weight``
    [rows, in] (and ``.bias``) for each of ``modules``, plus each of ``others`` (train_others) whole by
    name; ``base`` is the base's digest record (:func:`alps_ds.digest.base_record`). One process writes;
    see :func:`save_adapter`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    meta = {
        "format": FORMAT,
        "version": VERSION if others else 1,
        "kv": kv,
        "dtype": "/".join(sorted(dtypes)),
        "selection": selection.to_dict(),
        "modules": [m.to_dict() for m in modules],
        "base": base,
    }
    if others:
        meta["others"] = list(others)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / TENSORS_NAME), metadata={"format": "pt"})
        (tmp / JSON_NAME).write_text(json.dumps(meta, indent=1) + "\n")
    return out


def _trained_others(model: nn.Module, hooked: set[str]) -> list[tuple[str, nn.Parameter]]:
    """The parameters trained in full (``train_others``): trainable and not a hooked module's head slice."""
    return [
        (name, p) for name, p in model.named_parameters() if p.requires_grad and name.rpartition(".")[0] not in hooked
    ]


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Put an adapter's rows into ``model`` (in place) and return it.

    Onto a plain base model the rows are written into the Q/K/V weights (the result is the
    merged fine-tuned model); onto a model hooked with the same selection they go into the
    slice parameters (to continue training). Under ZeRO-3 call on every rank. A model loaded from a
    local folder other than the base the adapter was trained on is refused (Q/K/V digest).
    """
    from alps_ds.digest import check_base, model_base_dir

    adapter = Adapter.read(adapter_dir)
    model = unwrap(model)
    if getattr(model, "config", None) is not None:
        adapter.selection.check_model(AttentionSpec.from_config(model.config), source=f"{adapter_dir}")
    base_dir = model_base_dir(model)
    if base_dir is not None:
        check_base(adapter.base, base_dir, owner=str(adapter_dir))
    hooked = {name: mod.ranges for name, mod in hooked_modules(model)}
    if hooked and hooked != {m.module: m.ranges for m in adapter.modules}:
        raise AlpsError(
            f"{adapter_dir}: the model is hooked for other rows than the adapter holds; "
            "hook the model with the adapter's selection and kv policy, or load onto a plain base model"
        )
    for m in adapter.modules:
        try:
            mod = model.get_submodule(m.module)
        except AttributeError:
            raise AlpsError(f"{adapter_dir}: model has no module {m.module}; adapter made for another model") from None
        w_rows = adapter.tensors[f"{m.module}.weight"]
        b_rows = adapter.tensors.get(f"{m.module}.bias")
        if isinstance(mod, HeadRows):
            with gathered([mod.head_weight, mod.head_bias], modify=True), torch.no_grad():
                mod.head_weight.data.copy_(w_rows)
                if mod.head_bias is not None and b_rows is not None:
                    mod.head_bias.data.copy_(b_rows)
            continue
        weight, bias = getattr(mod, "weight", None), getattr(mod, "bias", None)
        if weight is None:
            raise AlpsError(f"{adapter_dir}: {m.module} has no weight to load rows into")
        with gathered([weight, bias], modify=True), torch.no_grad():
            if weight.shape[1] != m.in_features or weight.shape[0] < m.ranges[-1][1]:
                raise AlpsError(f"{adapter_dir}: {m.module} weight {tuple(weight.shape)} does not fit the adapter rows")
            # index_copy needs index and rows on the weight's device (a GPU model, or ZeRO-3 gathered there)
            idx = row_index(m.ranges, weight.device)
            weight.data.index_copy_(0, idx, w_rows.to(weight.device, weight.dtype))
            if bias is not None and b_rows is not None:
                bias.data.index_copy_(0, idx, b_rows.to(bias.device, bias.dtype))
    for name in adapter.others:
        try:
            param = model.get_parameter(name)
        except AttributeError:
            raise AlpsError(f"{adapter_dir}: model has no parameter {name}; adapter made for another model") from None
        with gathered([param], modify=True), torch.no_grad():
            value = adapter.tensors[name]
            if tuple(param.shape) != tuple(value.shape):
                raise AlpsError(f"{adapter_dir}: {name} is {tuple(value.shape)}, the model's {tuple(param.shape)}")
            param.data.copy_(value.to(param.device, param.dtype))
    return model


def _shard_map(base: Path) -> dict[str, str]:
    """Tensor name -> shard file name of the safetensors files ``from_pretrained`` reads from ``base``."""
    from alps_ds.localize.reader import INDEX_FILE, SINGLE_FILE, weight_shards

    shard_of = weight_shards(base)
    if not shard_of:
        raise AlpsError(f"{base}: no {INDEX_FILE} or {SINGLE_FILE}; point --base to a safetensors HF checkpoint")
    return shard_of


def _unread_weights(base: Path, shard_of: dict[str, str]) -> set[str]:
    """Safetensors files in ``base`` that ``from_pretrained`` does not read (a stale index or shards beside
    model.safetensors): left out of a merged copy, where they would hold the untrained base."""
    from alps_ds.localize.reader import weights_entry

    read = set(shard_of.values()) | {weights_entry(base).name}
    return {p.name for p in base.iterdir() if p.name.endswith((".safetensors", ".safetensors.index.json"))} - read


# tensor key -> (row ranges, rows), or (None, the whole tensor) for a train_others parameter
_Rows = dict[str, tuple[tuple[tuple[int, int], ...] | None, torch.Tensor]]


def _merge_edits(adapter: Adapter, base: Path, shard_of: dict[str, str]) -> dict[str, _Rows]:
    """Shard file name -> the adapter rows merged into it; refuses a key or shard ``base`` lacks."""
    edits: dict[str, _Rows] = {}
    for m in adapter.modules:
        for leaf in ("weight", "bias") if m.bias else ("weight",):
            key = f"{m.module}.{leaf}"
            if key not in shard_of:
                raise AlpsError(f"{base}: checkpoint has no tensor {key}; adapter made for another model layout")
            edits.setdefault(shard_of[key], {})[key] = (m.ranges, adapter.tensors[key])
    for key in adapter.others:  # train_others: replaced whole
        if key not in shard_of:
            raise AlpsError(f"{base}: checkpoint has no tensor {key}; adapter made for another model layout")
        edits.setdefault(shard_of[key], {})[key] = (None, adapter.tensors[key])
    # Shards are matched by name while copying: one that is not there would leave its rows unmerged.
    missing = sorted(set(edits) - {entry.name for entry in base.iterdir() if entry.is_file()})
    if missing:
        raise AlpsError(
            f"{base}: shard {missing[0]} (holding {next(iter(edits[missing[0]]))}) is missing; "
            "copy the complete checkpoint"
        )
    return edits


def _merge_shard(entry: Path, target: Path, edits: _Rows) -> None:
    """Write shard ``entry`` to ``target`` with ``edits`` (key -> row ranges, rows) copied in; same names,
    shapes, dtypes and metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(entry), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    for key, (ranges, rows) in edits.items():
        t = tensors.get(key)
        if t is None:
            raise AlpsError(f"{entry}: no tensor {key}, though the index puts it here; re-save the base")
        if ranges is None:  # a train_others tensor, trained whole
            if t.shape != rows.shape:
                raise AlpsError(f"{entry}: tensor {key} {tuple(t.shape)} is not the adapter's {tuple(rows.shape)}")
            tensors[key] = rows.to(t.dtype).contiguous()
            continue
        if t.shape[0] < ranges[-1][1] or (t.dim() == 2 and t.shape[1] != rows.shape[1]):
            raise AlpsError(f"{entry}: tensor {key} {tuple(t.shape)} does not fit the adapter rows")
        tensors[key] = t.index_copy(0, row_index(ranges), rows.to(t.dtype))
    save_file(tensors, str(target), metadata=metadata)


def merge_adapter_into_checkpoint(
    base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = True
) -> Path:
    """Write ``out_dir``: ``base_dir`` with the adapter's rows merged in, one shard in memory at a time.

    Shards without Q/K/V tensors of the adapter, the index, config and tokenizer files are
    copied byte for byte; only shards holding adapted tensors are rewritten (same tensor names,
    shapes, dtypes, metadata), so the index stays valid. Written atomically. A base other than the
    one the adapter was trained on is refused (Q/K/V digest; adapters without one are merged as before).
    """
    from safetensors import SafetensorError
    from tqdm import tqdm

    from alps_ds.digest import check_base

    base, out = Path(base_dir), Path(out_dir)
    if out.resolve() == base.resolve():
        raise AlpsError(f"{out}: --out must differ from --base; the base checkpoint is never overwritten")
    adapter = Adapter.read(adapter_dir)
    spec = AttentionSpec.from_pretrained(base)
    adapter.selection.check_model(spec, source=str(adapter_dir))
    check_base(adapter.base, base, owner=str(adapter_dir))
    shard_of = _shard_map(base)
    edits = _merge_edits(adapter, base, shard_of)
    try:
        with atomic_dir(out, command="merge") as tmp:
            unread = _unread_weights(base, shard_of)
            entries = sorted(p for p in base.iterdir() if p.name not in unread)
            for entry in tqdm(entries, desc="merge", unit="file", disable=not progress):
                target = tmp / entry.name
                if entry.name in edits:
                    _merge_shard(entry, target, edits[entry.name])
                elif entry.is_dir():
                    shutil.copytree(entry, target)
                else:
                    shutil.copy2(entry, target)
    except (OSError, SafetensorError) as e:  # disk full, read-only, quota: the old --out is still in place
        raise AlpsError(
            f"{out}: cannot write the merged checkpoint ({e}); nothing there was changed: free space or pick a "
            "writable --out"
        ) from e
    return out
