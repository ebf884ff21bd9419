"""`RunConfig`: the one typed configuration of ``alps-ds train``, loaded from YAML plus ``--set`` overrides.

Every key has a typed field with a default; the defaults are the paper's recipe (AdamW
0.9/0.999, weight decay 0.1, lr 2e-5, warmup 10 %, cosine to 10 % of lr, effective batch 128,
3 epochs). Unknown keys and ill-typed values fail with one line naming the file and the key,
e.g. ``run.yaml: train.lr: expected a number, got 'abc'``; a value outside an enum names the key
and its choices (``run.yaml: selection.metric: 'w2' is unknown; choose one of w1, ...``). Enums come
from their owners (choose, localize, layout), so the run config and the CLI accept the same words.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from alps_ds.choose import METHODS
from alps_ds.errors import AlpsError
from alps_ds.layout import KV_POLICIES
from alps_ds.localize.vocab import DEFAULT_DTYPE, DEFAULT_HEAD_REPR, DEFAULT_METRIC, HEAD_REPRS, METRICS, SCORE_DTYPES
from alps_ds.train.engines import Engine, validate_megatron

# ZeRO stages, and the one alps-ds uses when no DeepSpeed config says otherwise (train's default
# DS config, and the default of `alps-ds plan --zero` and `alps-ds check --zero`).
ZERO_STAGES: tuple[int, ...] = (0, 1, 2, 3)
DEFAULT_ZERO_STAGE = 2

DataFormat = Literal["auto", "alpaca", "messages", "prompt-completion"]
Template = Literal["alpaca", "chat"]
Schedule = Literal["cosine", "linear", "constant"]


@dataclass
class ModelConfig:
    """The base model: a Hugging Face folder or hub id, or ``tiny:<family>`` (a tiny random model built in code)."""

    path: str = ""
    tokenizer: str | None = None  # default: the model's own tokenizer (or the byte tokenizer for tiny:)
    seed: int = 0  # weights seed of a tiny: model


@dataclass
class SelectionConfig:
    """Which heads train: a heads.json, or how to make a selection before training."""

    heads: str | None = None  # a heads.json; when set, everything below is ignored
    method: Literal[METHODS] = "top-k"  # top-k localizes base (model.path) against task
    ratio: float = 0.1
    seed: int = 0  # of random / layer-consistent
    task: str | None = None  # task model for top-k
    metric: Literal[METRICS] = DEFAULT_METRIC  # top-k's localize settings, as alps-ds localize --metric ...
    head_repr: Literal[HEAD_REPRS] = DEFAULT_HEAD_REPR
    dtype: Literal[SCORE_DTYPES] = DEFAULT_DTYPE  # precision weights are cast to before scoring


@dataclass
class DatasetConfig:
    """One training dataset: a local json/jsonl/parquet/csv file (or folder) or a hub dataset name."""

    path: str = ""
    name: str | None = None  # hub dataset configuration
    split: str = "train"
    format: DataFormat = "auto"
    limit: int | None = None  # use the first N rows only


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = field(default_factory=list)
    template: Template = "alpaca"  # the paper's Alpaca-style prompt, or the tokenizer's chat template
    system: str | None = None  # system prompt; None: the paper's for alpaca, none for chat
    max_length: int = 1024
    packing: bool = False
    shuffle: bool = True


@dataclass
class TrainConfig:
    micro_batch: int = 4  # sequences per rank per forward
    batch: int = 128  # effective batch: micro_batch x gradient accumulation x data-parallel ranks
    lr: float = 2e-5
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Schedule = "cosine"
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.1  # cosine/linear decay ends at lr * min_lr_ratio
    epochs: float = 3.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    stop_after: int | None = None  # stop this invocation after N more steps (checkpointed; schedule unchanged)
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 42
    gradient_checkpointing: bool = False


@dataclass
class ParallelConfig:
    """Model parallelism: ``tp`` > 1 shards attention and MLP over ``tp`` ranks (engine deepspeed: DeepSpeed
    AutoTP training; engine megatron: megatron-core TP); data parallel runs over the remaining ``world / tp`` ranks."""

    tp: int = 1
    pp: int = 1  # pipeline stages (no engine runs a pipeline schedule yet)


@dataclass
class OutputConfig:
    dir: str = "runs/alps"
    checkpoint_every: int = 500  # optimizer steps; 0: only at the end
    keep_checkpoints: int = 2
    merged: bool = True
    adapter: bool = True


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    every: int = 1  # optimizer steps between scalar writes
    heatmap: bool = True
    progress: bool = True


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    kv: Literal[KV_POLICIES] = "group"
    train_others: list[str] = field(default_factory=list)  # module patterns trained in full; ["all"]: all but Q/K/V
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: str | dict[str, Any] | None = None  # JSON path or inline dict; None: ZeRO DEFAULT_ZERO_STAGE, fp32
    engine: Engine = "deepspeed"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = field(default="config", metadata={"internal": True})  # file name used in error messages
    overridden: frozenset[str] = field(default=frozenset(), metadata={"internal": True})  # keys given with --set

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        d.pop("overridden")
        d["train"]["betas"] = list(d["train"]["betas"])
        return d

    def where(self, key: str) -> str:
        """Where ``key``'s value came from, to start an error about it: ``--set`` or the YAML file."""
        key = key.replace("[", ".").replace("]", "")
        for given in self.overridden:
            if key == given or key.startswith(given + ".") or given.startswith(key + "."):
                return "--set"
        return self.source


# ---- coercion ------------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    return repr(value) if not isinstance(value, (dict, list)) else json.dumps(value)[:60]


def _coerce(value: Any, tp: Any, key: str, src: str) -> Any:
    """``value`` (from YAML or --set) as type ``tp``, or an AlpsError naming ``key``."""

    def bad(expected: str) -> AlpsError:
        return AlpsError(f"{src}: {key}: expected {expected}, got {_describe(value)}")

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, args, key, src, bad)
    if origin is Literal:
        if value not in args:
            raise AlpsError(f"{src}: {key}: {_describe(value)} is unknown; choose one of {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad("a mapping")
        return _build(tp, value, key, src)
    if origin is list:
        if not isinstance(value, list):
            raise bad("a list")
        return [_coerce(v, args[0], f"{key}[{i}]", src) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad(f"a list of {len(args)} values")
        return tuple(_coerce(v, a, f"{key}[{i}]", src) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        return value
    if tp not in _SCALARS:
        raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug in this file, not user input
    return _SCALARS[tp](value, bad)


def _coerce_union(value: Any, args: tuple, key: str, src: str, bad) -> Any:
    """The first option of ``A | B | None`` that takes ``value``; one option's own error when it is the only one."""
    if value is None and type(None) in args:
        return None
    options = [a for a in args if a is not type(None)]
    errors = []
    for option in options:
        try:
            return _coerce(value, option, key, src)
        except AlpsError as e:
            errors.append(e)
    if len(errors) == 1:
        raise errors[0]
    names = " or ".join(_type_name(o) for o in options)
    raise bad(names + (" or null" if type(None) in args else ""))


def _to_bool(value: Any, bad) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
        return value.lower() in ("true", "yes", "on")
    raise bad("true or false")


def _to_int(value: Any, bad) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise bad("an integer")


def _to_float(value: Any, bad) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out = float(value)
    elif isinstance(value, str):
        # YAML 1.1 reads 2e-5 (no dot) as a string; accept it as the number the user meant.
        try:
            out = float(value)
        except ValueError:
            raise bad("a number") from None
    else:
        raise bad("a number")
    if not math.isfinite(out):
        raise bad("a finite number")
    return out


def _to_str(value: Any, bad) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise bad("a string")


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is dict or tp is dict:
        return "a mapping"
    if typing.get_origin(tp) is list:
        return "a list"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, str(tp))


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, data: dict[str, Any], prefix: str, src: str) -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise AlpsError(f"{src}: {key}: unknown key; known keys here: {', '.join(names)}")
        kwargs[k] = _coerce(v, hints[k], key, src)
    return cls(**kwargs)


# ---- loading and overrides --------------------------------------------------------------------------------


def _normalize(data: dict[str, Any]) -> dict[str, Any]:
    """Shorthands: ``selection: heads.json``, ``train_others: all``, ``data.datasets: [file, ...]``."""
    data = dict(data)
    if isinstance(data.get("selection"), str):
        data["selection"] = {"heads": data["selection"]}
    if isinstance(data.get("train_others"), str):
        data["train_others"] = [data["train_others"]]
    if isinstance(data.get("model"), str):
        data["model"] = {"path": data["model"]}
    d = data.get("data")
    if isinstance(d, dict) and isinstance(d.get("datasets"), (list, str)):
        d = dict(d)
        items = d["datasets"] if isinstance(d["datasets"], list) else [d["datasets"]]
        d["datasets"] = [{"path": x} if isinstance(x, str) else x for x in items]
        data["data"] = d
    return data


class DuplicateKey(ValueError):
    """A mapping that names one key twice (PyYAML would keep the last value silently)."""

    def __init__(self, key: Any, first: int, again: int):
        super().__init__(f"key {key!r} is written twice (line {first} and line {again}); keep one")
        self.line = again


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping instead of keeping the last."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKey(key, seen[key], line)
                seen[key] = line
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
        return super().construct_mapping(node, deep)


def _parse_scalar(text: str, item: str) -> Any:
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except DuplicateKey as e:
        raise AlpsError(f"--set {item!r}: {e}") from None
    except yaml.YAMLError:
        return text


def _set_path(data: dict[str, Any], dotted: str, value: Any, src: str) -> None:
    """Set ``a.b.c`` (list items by index: ``data.datasets.0.path``) in the raw dict, creating mappings."""
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise AlpsError(f"{src}: {where}: no list item {part!r} (the list has {len(node)} items)")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise AlpsError(f"{src}: {where}: {'.'.join(parts[:i])} is not a mapping")
        if last:
            node[part] = value
        else:
            if node.get(part) is None:  # e.g. deepspeed: null, then --set deepspeed.bf16.enabled=true
                node[part] = {}
            node = node[part]


def _with_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """The raw dict with every missing mapping filled from the defaults, so --set can descend into it."""
    base = RunConfig().to_dict()
    for k, v in data.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and k != "deepspeed":
            merged = dict(base[k])
            merged.update(v)
            base[k] = merged
        else:
            base[k] = v
    return base


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a run YAML (or start from defaults when ``path`` is None) and apply ``key=value`` overrides."""
    src = str(path) if path is not None else "config"
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text()
        except FileNotFoundError:
            raise AlpsError(f"{p}: no such file; pass --config RUN.yaml (see configs/tiny.yaml)") from None
        except OSError as e:
            raise AlpsError(f"{p}: cannot read ({e})") from e
        try:
            loaded = yaml.load(text, Loader=UniqueKeyLoader)
        except DuplicateKey as e:
            raise AlpsError(f"{p}: line {e.line}: {e}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise AlpsError(f"{p}: not valid YAML{where}; fix the syntax") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise AlpsError(f"{p}: expected a mapping of keys (model, selection, data, train, ...)")
        data = _normalize(loaded)
    # Validate the file alone first so its errors name the file, not an override.
    _build(RunConfig, data, "", src)
    given = set()
    if overrides:
        data = _with_defaults(data)
        for item in overrides:
            key, eq, text = item.partition("=")
            key = key.strip()
            if not eq or not key:
                raise AlpsError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
            given.add(key)
            _set_path(data, key, _parse_scalar(text, item), "--set")
            try:
                data = _normalize(data)
                _build(RunConfig, data, "", "--set")
            except AlpsError as e:
                raise AlpsError(str(e)) from None
    cfg = _build(RunConfig, data, "", src)
    cfg.source = src
    cfg.overridden = frozenset(given)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Value checks beyond types; each error names the key."""
    t = cfg.train

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise AlpsError(f"{cfg.where(key)}: {key}: {msg}")

    need(bool(cfg.model.path), "model.path", "required: a Hugging Face model folder, hub id, or tiny:llama")
    if cfg.model.path.startswith("tiny:"):
        from alps_ds.arch import SUPPORTED_MODEL_TYPES

        family = cfg.model.path.removeprefix("tiny:") or "llama"
        need(
            family in SUPPORTED_MODEL_TYPES,
            "model.path",
            f"no tiny model family {family!r}; use tiny:<family>, one of {', '.join(SUPPORTED_MODEL_TYPES)}",
        )
    need(bool(cfg.data.datasets), "data.datasets", "required: at least one dataset (a local file or hub name)")
    for i, ds in enumerate(cfg.data.datasets):
        need(bool(ds.path), f"data.datasets[{i}].path", "required")
        need(ds.limit is None or ds.limit > 0, f"data.datasets[{i}].limit", "must be positive")
    need(cfg.data.max_length >= 8, "data.max_length", "must be at least 8 tokens")
    need(t.micro_batch >= 1, "train.micro_batch", "must be at least 1")
    need(t.batch >= t.micro_batch, "train.batch", f"must be at least train.micro_batch ({t.micro_batch})")
    need(t.lr > 0, "train.lr", "must be positive")
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(all(0 <= b < 1 for b in t.betas), "train.betas", "each beta must be in [0, 1)")
    need(t.eps > 0, "train.eps", "must be positive")
    need(0 <= t.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
    need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
    need(t.epochs > 0, "train.epochs", "must be positive")
    need(t.max_steps is None or t.max_steps > 0, "train.max_steps", "must be positive (or null: use epochs)")
    need(t.stop_after is None or t.stop_after > 0, "train.stop_after", "must be positive (or null)")
    need(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
    need(cfg.parallel.tp >= 1, "parallel.tp", "must be at least 1 (1: no tensor parallelism)")
    need(cfg.parallel.pp >= 1, "parallel.pp", "must be at least 1 (1: no pipeline)")
    sel = cfg.selection
    if sel.heads is None:
        if sel.method not in ("all", "none"):
            need(0 < sel.ratio <= 1, "selection.ratio", "must be in (0, 1], e.g. 0.1 for 10 % of heads")
        need(
            sel.method != "top-k" or bool(sel.task),
            "selection.task",
            "selection.method top-k localizes base against a task model: set selection.task, "
            "or selection.heads to a heads.json, or a baseline method (random, layer-consistent, all, none)",
        )
    need(bool(cfg.output.dir.strip()), "output.dir", "required: the run's folder, e.g. runs/alps")
    need(cfg.output.checkpoint_every >= 0, "output.checkpoint_every", "must be >= 0 (0: only at the end)")
    need(cfg.output.keep_checkpoints >= 1, "output.keep_checkpoints", "must be at least 1")
    need(cfg.logging.every >= 1, "logging.every", "must be at least 1")
    _validate_engine(cfg, need)


def _validate_engine(cfg: RunConfig, need) -> None:
    """The engine's own limits on the parallel layout and on what may train."""
    if cfg.engine == "megatron":
        validate_megatron(cfg, need)
    else:
        need(cfg.parallel.pp == 1, "parallel.pp", "engine deepspeed runs no pipeline schedule here; set it to 1")
        need(
            cfg.parallel.tp == 1 or not cfg.train_others,
            "train_others",
            f"not supported with parallel.tp {cfg.parallel.tp} (modules trained in full would need AutoTP's gradient "
            "all-reduce of replicated parameters); train heads only, or use parallel.tp 1",
        )


def output_dir(cfg: RunConfig) -> Path:
    """``output.dir``, checked before anything runs (on every rank, as ``alps-ds check`` does): never an input,
    a file, or a non-empty folder that ``alps-ds train`` did not write."""
    from alps_ds.fsutil import check_output_dir

    datasets = [d.path for d in cfg.data.datasets]
    ds_json = cfg.deepspeed if isinstance(cfg.deepspeed, str) else None
    inputs = (cfg.model.path, cfg.model.tokenizer, cfg.selection.heads, cfg.selection.task, ds_json, *datasets)
    try:
        return check_output_dir(cfg.output.dir, flag="output.dir", command="train", inputs=inputs, whole=False)
    except AlpsError as e:
        raise AlpsError(f"{cfg.where('output.dir')}: {e}") from None


def gradient_accumulation(cfg: RunConfig, world_size: int) -> int:
    """Micro-steps per optimizer step so that micro_batch x steps x data-parallel ranks equals the
    effective batch (the ranks of one tensor-parallel group share their batch)."""
    t = cfg.train
    dp = world_size // cfg.parallel.tp
    per_step = t.micro_batch * dp
    if t.batch % per_step:
        ranks = f"data-parallel ranks, {world_size} / parallel.tp {cfg.parallel.tp}" if cfg.parallel.tp > 1 else "ranks"
        raise AlpsError(
            f"{cfg.where('train.batch')}: train.batch: {t.batch} is not a multiple of train.micro_batch x {ranks} "
            f"({t.micro_batch} x {dp} = {per_step}); pick a batch divisible by {per_step}"
        )
    return t.batch // per_step
