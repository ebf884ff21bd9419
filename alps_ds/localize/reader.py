"""Lazy reads of one layer's Q/K/V tensors from a Hugging Face safetensors checkpoint.

The safetensors format is an 8-byte header length, a JSON header (dtype, shape, byte
offsets of every tensor) and the raw data. We parse the header ourselves and ``readinto``
only the byte ranges of the tensors asked for, instead of memory-mapping whole shards:
mapped pages that were touched count towards the process's resident memory until the map
is closed, so a 70B single-file checkpoint would look like a 140 GB process. With plain
reads, memory holds exactly the tensors the caller keeps.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from alps_ds.arch import AttentionSpec, looks_local
from alps_ds.errors import AlpsError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX_FILE = "pytorch_model.bin.index.json"
_PICKLE_FILES = (PICKLE_FILE, PICKLE_INDEX_FILE)
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live inside a shard."""

    shard: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int


def resolve_model_dir(name: str) -> Path:
    """A local model folder as given, or a hub id downloaded (config, index and only the
    shards holding Q/K/V) into the Hugging Face cache."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if looks_local(name):  # the same rule config.json lookups use
        raise AlpsError(f"{name}: no such model folder; pass a folder written by save_pretrained or a hub id")
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(name, allow_patterns=["config.json", INDEX_FILE]))
        if (local / INDEX_FILE).is_file():
            spec = AttentionSpec.from_pretrained(local)
            index = read_index(local / INDEX_FILE)
            wanted = {spec.weight_name(layer, m) for layer in range(spec.num_layers) for m in spec.modules}
            shards = sorted({index[t] for t in wanted if t in index})
            local = Path(snapshot_download(name, allow_patterns=["config.json", INDEX_FILE, *shards]))
        else:
            local = Path(snapshot_download(name, allow_patterns=["config.json", SINGLE_FILE]))
    except AlpsError:
        raise
    except Exception as e:  # network, authentication, missing repository
        raise AlpsError(
            f"{name}: not a local folder and the hub download failed ({type(e).__name__}: {e}); "
            "pass a local path or check the model id, token and network"
        ) from e
    return local


def read_index(path: Path) -> dict[str, str]:
    """Tensor name -> shard file name from a Hugging Face shard index; errors name the file."""
    try:
        data = json.loads(path.read_text())
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not an object of shard file names")
        # Shards live beside the index: a path ("../x", "/etc/y") would read files outside the model.
        outside = next((v for v in weight_map.values() if v in ("", ".", "..") or Path(v).name != v), None)
        if outside is not None:
            raise ValueError(f"shard {outside!r} is not a file name in the model folder")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:  # RecursionError: JSON nested too deep
        raise AlpsError(f"{path}: unreadable shard index ({e}); re-save the model with save_pretrained") from e
    return weight_map


def weights_entry(model_dir: Path) -> Path | None:
    """The safetensors file ``from_pretrained`` loads a local folder from, so that localize, train and merge read
    the same weights it does: config.json's ``transformers_weights`` when set, else ``model.safetensors``, else
    the shard index (transformers 5 prefers the single file when both exist); None without safetensors."""
    explicit = None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        explicit = json.loads((model_dir / "config.json").read_text()).get("transformers_weights")
    if explicit is not None:
        name = str(explicit)
        if Path(name).name != name or not name.endswith((".safetensors", ".safetensors.index.json")):
            raise AlpsError(
                f"{model_dir / 'config.json'}: transformers_weights {explicit!r} is not a safetensors file in the "
                "model folder; fix or remove the key"
            )
        return model_dir / name
    for name in (SINGLE_FILE, INDEX_FILE):
        if (model_dir / name).is_file():
            return model_dir / name
    return None


def weight_shards(model_dir: Path) -> dict[str, str]:
    """Tensor name -> shard file name of the checkpoint :func:`weights_entry` picks, every shard's header checked
    (a missing or truncated shard is one error naming it); {} without safetensors."""
    entry = weights_entry(model_dir)
    if entry is None:
        return {}
    if entry.name.endswith(".index.json"):
        shard_of = read_index(entry)
        for shard in sorted(set(shard_of.values())):
            read_header(model_dir / shard)
        return shard_of
    return dict.fromkeys(read_header(entry), entry.name)


def read_header(shard: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header; errors name the file."""
    try:
        with open(shard, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
    except FileNotFoundError:
        raise AlpsError(f"{shard}: shard file is missing; download or copy the complete checkpoint") from None
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep
        raise AlpsError(f"{shard}: unreadable safetensors shard ({e}); re-download or re-save it") from e
    out = {}
    base = 8 + n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (base + int(x) for x in meta["data_offsets"])
            info = TensorInfo(shard, str(meta["dtype"]), tuple(int(s) for s in meta["shape"]), begin, end)
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise AlpsError(f"{shard}: malformed header entry for {name!r}; re-save the checkpoint") from e
        if end > size or end < begin or begin < base:
            raise AlpsError(f"{shard}: tensor {name!r} runs past the end of the file (truncated?); re-download it")
        out[name] = info
    return out


class CheckpointReader:
    """Reads Q/K/V tensors of a local safetensors checkpoint (single file or sharded).

    Only headers are read up front; :meth:`layer` reads one layer's tensors on demand.
    """

    def __init__(self, model_dir: Path, spec: AttentionSpec, *, label: str, allow_pickle: bool = False):
        self.dir = model_dir
        self.spec = spec
        self.label = label
        self.allow_pickle = allow_pickle
        self._loaded: dict[str, torch.Tensor] = {}  # Q/K/V weights of a pickle checkpoint (--allow-pickle)
        self.bytes_read = 0
        self._tensors: dict[str, TensorInfo] = {}
        self._slots: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {})
        self._next = 0
        self._locate()

    @classmethod
    def open(cls, name: str, *, label: str, allow_pickle: bool = False) -> CheckpointReader:
        """A reader for a local folder or hub id; ``label`` (base, task) starts its error messages."""
        model_dir = resolve_model_dir(name)
        spec = AttentionSpec.from_pretrained(model_dir)
        return cls(model_dir, spec, label=label, allow_pickle=allow_pickle)

    def _locate(self) -> None:
        """Map every needed tensor name to its shard and byte range, reading headers only."""
        if weights_entry(self.dir) is None:  # no safetensors: a pickle checkpoint, or nothing to read
            pickled = [p for p in _PICKLE_FILES if (self.dir / p).exists()]
            if pickled and self.allow_pickle:
                self._load_pickle()
                return
            if pickled:
                raise AlpsError(
                    f"{self.label} {self.dir}: only a pickle checkpoint ({pickled[0]}) is there; alps-ds reads "
                    "safetensors only (pickle can run code): re-save with save_pretrained(safe_serialization=True), "
                    "or allow pickle (allow_pickle=True; alps-ds localize --allow-pickle) to load its tensors with "
                    "torch.load(weights_only=True)"
                )
        wanted = {
            self.spec.weight_name(layer, m): m for layer in range(self.spec.num_layers) for m in self.spec.modules
        }
        self._tensors = locate_tensors(self.dir, list(wanted), label=self.label)
        for name, module in wanted.items():
            info = self._tensors[name]
            expected = (self.spec.module_rows(module), self.spec.hidden_size)
            if info.shape != expected:
                raise AlpsError(
                    f"{self.label} {info.shard}: tensor {name!r} has shape {list(info.shape)} but config.json implies "
                    f"{list(expected)}; config and weights do not match"
                )

    def _load_pickle(self) -> None:
        """Q/K/V weights of pytorch_model.bin (or its shards) via ``torch.load(weights_only=True)``.

        weights_only unpickles tensors and plain containers only and refuses anything else, so a
        checkpoint cannot run code. Memory: one shard at a time, keeping only the Q/K/V weights.
        """
        index = self.dir / PICKLE_INDEX_FILE
        files = sorted(set(read_index(index).values())) if index.is_file() else [PICKLE_FILE]
        spec = self.spec
        wanted = {spec.weight_name(layer, m): m for layer in range(spec.num_layers) for m in spec.modules}
        codes = {dtype: code for code, dtype in _DTYPES.items()}
        for name in files:
            path = self.dir / name
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except FileNotFoundError:
                raise AlpsError(f"{self.label} {path}: shard file is missing; copy the complete checkpoint") from None
            except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for refused or broken files
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                raise AlpsError(
                    f"{self.label} {path}: refused or unreadable pickle ({type(e).__name__}: {first}); "
                    "weights_only loads plain tensors only: re-save the model as safetensors"
                ) from e
            if not isinstance(state, dict):
                raise AlpsError(f"{self.label} {path}: not a state dict; re-save the model as safetensors")
            for key in wanted.keys() & state.keys():
                tensor = state[key]
                if not isinstance(tensor, torch.Tensor):
                    raise AlpsError(f"{self.label} {path}: {key!r} is not a tensor; re-save the model as safetensors")
                self._loaded[key] = tensor
        for key, module in wanted.items():
            tensor = self._loaded.get(key)
            if tensor is None:
                raise AlpsError(f"{self.label} {self.dir}: tensor {key!r} is missing; is this a complete checkpoint?")
            expected = (self.spec.module_rows(module), self.spec.hidden_size)
            if tuple(tensor.shape) != expected:
                raise AlpsError(
                    f"{self.label} {self.dir}: tensor {key!r} has shape {list(tensor.shape)} but config.json "
                    f"implies {list(expected)}; config and weights do not match"
                )
            nbytes = tensor.numel() * tensor.element_size()
            code = codes.get(tensor.dtype, str(tensor.dtype).removeprefix("torch.").upper())
            self._tensors[key] = TensorInfo(self.dir / PICKLE_FILE, code, tuple(tensor.shape), 0, nbytes)

    def layer(self, layer: int) -> dict[str, torch.Tensor]:
        """Module name -> Q/K/V projection weight of ``layer``, in the checkpoint's dtype.

        The tensors live in one of two buffer sets used in turn, so they stay valid until
        the second next call (enough for reading one layer ahead while scoring this one).
        Reusing buffers matters: touching freshly mapped memory costs a page fault per 4 KiB,
        which on virtual machines took longer than the read itself. Biases are not read:
        neither head representation uses them (see docs/localize.md).
        """
        slot = self._slots[self._next]
        self._next ^= 1
        out = {}
        for module in self.spec.modules:
            name = self.spec.weight_name(layer, module)
            out[module] = self._read(name, self._tensors[name], slot, module)
        return out

    def _read(self, name: str, info: TensorInfo, slot: dict[str, torch.Tensor], key: str) -> torch.Tensor:
        dtype = _DTYPES.get(info.dtype)
        if dtype is None:
            raise AlpsError(
                f"{self.label} {info.shard}: tensor {name!r} has dtype {info.dtype}; "
                f"supported: {', '.join(_DTYPES)} (dequantize the checkpoint first)"
            )
        if name in self._loaded:  # already in memory (a pickle checkpoint read with --allow-pickle)
            self.bytes_read += info.end - info.begin
            return self._loaded[name]
        numel = 1
        for s in info.shape:
            numel *= s
        nbytes = info.end - info.begin
        if nbytes != numel * dtype.itemsize:
            raise AlpsError(f"{self.label} {info.shard}: tensor {name!r} byte size does not match its shape")
        buf = slot.get(key)
        if buf is None or buf.numel() != nbytes:
            buf = slot[key] = torch.empty(nbytes, dtype=torch.uint8)
        try:
            with open(info.shard, "rb", buffering=0) as f:
                f.seek(info.begin)
                view = memoryview(buf.numpy())
                got = 0
                while got < nbytes:
                    k = f.readinto(view[got:])
                    if not k:
                        raise OSError("unexpected end of file")
                    got += k
        except OSError as e:
            raise AlpsError(f"{self.label} {info.shard}: cannot read tensor {name!r} ({e}); re-download it") from e
        self.bytes_read += nbytes
        return buf.view(dtype).view(info.shape)


def locate_tensors(model_dir: Path, names: list[str], *, label: str) -> dict[str, TensorInfo]:
    """Name -> where its bytes live, for ``names`` of a safetensors checkpoint (headers only).

    The file choice of every reader here is :func:`weights_entry`'s (the one ``from_pretrained`` loads);
    every missing file or tensor is one AlpsError naming it.
    """
    entry = weights_entry(model_dir)
    if entry is None:
        raise AlpsError(f"{label} {model_dir}: no {SINGLE_FILE} or {INDEX_FILE}; not a safetensors checkpoint")
    index_path = single = entry
    index = read_index(entry) if entry.name.endswith(".index.json") else None
    headers: dict[Path, dict[str, TensorInfo]] = {}
    out = {}
    for name in names:
        if index is not None and name not in index:
            raise AlpsError(f"{label} {index_path}: tensor {name!r} is missing from the index")
        shard = single if index is None else model_dir / index[name]
        if shard not in headers:
            headers[shard] = read_header(shard)
        info = headers[shard].get(name)
        if info is None:
            raise AlpsError(f"{label} {shard}: tensor {name!r} is missing; is this a complete checkpoint?")
        out[name] = info
    return out


def read_rows(info: TensorInfo, ranges: tuple[tuple[int, int], ...] | list[tuple[int, int]]) -> torch.Tensor:
    """Rows ``[start, stop)`` of each range of one tensor (first dimension), read straight from its
    shard: ``[sum of rows, *shape[1:]]`` in the checkpoint's dtype. Only those bytes are read."""
    dtype = _DTYPES.get(info.dtype)
    if dtype is None:
        raise AlpsError(
            f"{info.shard}: a tensor has dtype {info.dtype}; supported: {', '.join(_DTYPES)} (dequantize the "
            "checkpoint first)"
        )
    row_elems = 1
    for s in info.shape[1:]:
        row_elems *= s
    row_bytes = row_elems * dtype.itemsize
    if not info.shape or info.end - info.begin != info.shape[0] * row_bytes:
        raise AlpsError(f"{info.shard}: a tensor's byte size does not match its shape {list(info.shape)}; re-save it")
    total = sum(b - a for a, b in ranges)
    buf = torch.empty(total * row_bytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    got = 0
    try:
        with open(info.shard, "rb", buffering=0) as f:
            for a, b in ranges:
                if not 0 <= a < b <= info.shape[0]:
                    raise AlpsError(f"{info.shard}: rows [{a}, {b}) outside a tensor of {info.shape[0]} rows")
                f.seek(info.begin + a * row_bytes)
                stop = got + (b - a) * row_bytes
                while got < stop:
                    k = f.readinto(view[got:stop])
                    if not k:
                        raise OSError("unexpected end of file")
                    got += k
    except OSError as e:
        raise AlpsError(f"{info.shard}: cannot read rows ({e}); re-download or re-save the checkpoint") from e
    return buf.view(dtype).view(total, *info.shape[1:])
