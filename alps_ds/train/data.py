"""Training data: rows from HF ``datasets`` -> prompt template -> token ids with prompt labels masked -> batches.

Formats: ``alpaca`` (instruction / input / output), ``messages`` (a chat: list of {role, content})
and ``prompt-completion``. Templates: the paper's Alpaca-style prompt or the tokenizer's own chat
template. Only response tokens carry labels; prompt tokens are -100. Batches are deterministic
in (seed, epoch, step): every optimizer step takes the next contiguous block of a seeded
permutation, cut into micro-batches, and each rank takes every ``world``-th micro-batch, so a
resumed run (on any number of ranks) runs the same micro-batches as an uninterrupted one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alps_ds.errors import AlpsError
from alps_ds.train.config import DataConfig, DatasetConfig

IGNORE = -100

# The paper's prompt (ALPS Table 9, Alpaca style).
ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """One training sequence: token ids and labels (-100 where no loss is taken)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class DataStats:
    rows: int
    examples: int
    dropped: int  # rows whose response did not fit max_length (no label left)
    truncated: int
    tokens: int
    label_tokens: int


# ---- loading ---------------------------------------------------------------------------------------------


def _local_builder(path: Path) -> tuple[str, list[str]]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_BUILDERS)
        kinds = {LOCAL_BUILDERS[p.suffix] for p in files}
        if len(kinds) != 1:
            raise AlpsError(f"{path}: expected data files of one kind (.json/.jsonl/.parquet/.csv) in this folder")
    elif path.suffix not in LOCAL_BUILDERS:
        raise AlpsError(f"{path}: unknown data file type {path.suffix!r}; use .json, .jsonl, .parquet or .csv")
    else:
        files = [path]
    for p in files:
        _check_not_blank(p)
    return LOCAL_BUILDERS[files[0].suffix], [str(p) for p in files]


def _check_not_blank(path: Path) -> None:
    """An empty or whitespace-only data file holds no rows: say so (datasets fails on it with no useful message)."""
    try:
        with open(path, "rb") as f:
            blank = not f.read(1 << 20).strip() and f.read(1) == b""
    except OSError as e:
        raise AlpsError(f"{path}: cannot read ({e.strerror or e})") from e
    if blank:
        raise AlpsError(f"{path}: empty data file (no rows); add rows or remove it from data.datasets")


def check_local_dataset(ds: DatasetConfig) -> None:
    """The checks :func:`load_rows` makes of a local dataset before reading it (``alps-ds check`` runs them too):
    it exists, is of a known type and is not blank; a hub name is not checked."""
    path = Path(ds.path).expanduser()
    if path.exists():
        _local_builder(path)
    elif ds.path.startswith((".", "/", "~")) or Path(ds.path).suffix in LOCAL_BUILDERS:
        raise AlpsError(f"{ds.path}: no such data file")


def _find_bad_json(files: list[str]) -> str | None:
    """The first unparsable line of a JSON Lines file, as 'FILE: line N: ...' (None if all parse)."""
    for name in files:
        text = Path(name).read_text(errors="replace")
        if text.lstrip().startswith("["):
            try:
                json.loads(text)
            except ValueError as e:
                return f"{name}: line {e.lineno}: not valid JSON ({e.msg})"
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    json.loads(line)
                except ValueError as e:
                    return f"{name}: line {lineno}: not valid JSON ({e.msg})"
    return None


def load_rows(ds: DatasetConfig):
    """The rows of one configured dataset as a ``datasets.Dataset``."""
    import datasets

    check_local_dataset(ds)
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # tokenize_all draws one bar per dataset instead
    verbosity = datasets.logging.get_verbosity()
    # datasets logs its own line before raising on a bad file; the AlpsError below is the one line users get.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 10)
    path = Path(ds.path).expanduser()
    try:
        if path.exists():
            builder, files = _local_builder(path)
            try:
                rows = datasets.load_dataset(builder, data_files=files, split="train")
                if builder == "csv":  # CSV has no types; a "2" answer is text, not an integer
                    rows = rows.cast(datasets.Features({c: datasets.Value("string") for c in rows.column_names}))
            except Exception as e:
                bad = _find_bad_json(files) if builder == "json" else None
                raise AlpsError(bad or f"{path}: cannot read as {builder} ({type(e).__name__}: {e})") from e
        else:
            try:
                rows = datasets.load_dataset(ds.path, ds.name, split=ds.split)
            except Exception as e:
                raise AlpsError(
                    f"{ds.path}: not a local file and loading it from the hub failed ({type(e).__name__}: {e}); "
                    "check the name, split and network"
                ) from e
    finally:
        datasets.logging.set_verbosity(verbosity)
        if was_enabled:
            datasets.enable_progress_bars()
    if ds.limit is not None:
        rows = rows.select(range(min(ds.limit, len(rows))))
    return rows


def detect_format(columns: Sequence[str], source: str) -> str:
    cols = set(columns)
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if "messages" in cols:
        return "messages"
    if {"prompt", "completion"} <= cols:
        return "prompt-completion"
    raise AlpsError(
        f"{source}: cannot tell the format from the columns {sorted(cols)}; expected instruction/output (alpaca), "
        "messages, or prompt/completion; set format in data.datasets"
    )


# ---- rows -> chats ------------------------------------------------------------------------------------------


def _text(row: dict[str, Any], key: str, where: str, *, optional: bool = False) -> str:
    value = row.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise AlpsError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def to_messages(row: dict[str, Any], fmt: str, where: str) -> list[dict[str, str]]:
    """Any supported row as a chat: [system?], user, assistant, user, assistant, ..."""
    if fmt == "alpaca":
        instruction = _text(row, "instruction", where)
        extra = _text(row, "input", where, optional=True)
        if not instruction.strip():
            raise AlpsError(f"{where}: 'instruction' is empty")
        content = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"role": "user", "content": content}, {"role": "assistant", "content": _text(row, "output", where)}]
    if fmt == "prompt-completion":
        prompt = _text(row, "prompt", where)
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "completion", where)}]
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise AlpsError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise AlpsError(
                f"{where}: messages[{j}] must be {{role: system|user|assistant, content: string}}, got {m!r}"[:300]
            )
        if m["role"] == "system" and j:
            raise AlpsError(f"{where}: messages[{j}]: a system message may only come first")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise AlpsError(f"{where}: 'messages' has no assistant message: nothing to train on")
    return out


# ---- chats -> (text, trained?) segments -------------------------------------------------------------------------


def alpaca_segments(messages: list[dict[str, str]], system: str | None, eos: str) -> list[tuple[str, bool]]:
    """The paper's Alpaca-style prompt: system line, '### Instruction: ...', '### Response:', the answer + eos."""
    sys_text = ALPACA_SYSTEM if system is None else system
    if messages[0]["role"] == "system":
        sys_text, messages = messages[0]["content"], messages[1:]
    segments: list[tuple[str, bool]] = []
    prompt = f"{sys_text}\n\n" if sys_text else ""
    for m in messages:
        if m["role"] == "user":
            prompt += f"### Instruction: {m['content']}\n### Response:\n"
        else:
            segments.append((prompt, False))
            segments.append((m["content"] + eos, True))
            prompt = "\n"
    return [(t, trained) for t, trained in segments if t]


def chat_segments(messages: list[dict[str, str]], system: str | None, tokenizer, where: str) -> list[tuple[str, bool]]:
    """The tokenizer's chat template; assistant turns are the text each one adds to the rendered prefix."""
    if system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    if not getattr(tokenizer, "chat_template", None):
        raise AlpsError("data.template: chat needs a tokenizer with a chat template; use template: alpaca")
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        after = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (before.startswith(done) and after.startswith(before)):
            raise AlpsError(
                f"{where}: the tokenizer's chat template does not render turns as prefixes of each other; "
                "use data.template: alpaca"
            )
        segments += [(before[len(done) :], False), (after[len(before) :], True)]
        done = after
    return [(t, trained) for t, trained in segments if t]


def encode(segments: list[tuple[str, bool]], tokenizer, *, bos: bool) -> tuple[list[int], list[int]]:
    """Token ids and labels (prompt segments -100), untruncated."""
    ids: list[int] = []
    labels: list[int] = []
    if bos and tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE)
    for text, trained in segments:
        part = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if trained else [IGNORE] * len(part)
    return ids, labels


def tokenize_all(cfg: DataConfig, tokenizer, *, progress: bool = False) -> tuple[list[Example], DataStats]:
    """Every configured dataset, formatted, templated, tokenized and (with ``packing``) packed."""
    from tqdm.auto import tqdm

    eos = tokenizer.eos_token or ""
    examples: list[Example] = []
    rows_total = dropped = truncated = 0
    stream: list[tuple[list[int], list[int]]] = []
    for ds in cfg.datasets:
        rows = load_rows(ds)
        fmt = ds.format if ds.format != "auto" else detect_format(rows.column_names, ds.path)
        for i, row in enumerate(tqdm(rows, desc=f"tokenize {Path(ds.path).name}", disable=not progress)):
            where = f"{ds.path}: row {i + 1}"
            messages = to_messages(row, fmt, where)
            if cfg.template == "alpaca":
                segments = alpaca_segments(messages, cfg.system, eos)
                ids, labels = encode(segments, tokenizer, bos=True)
            else:
                segments = chat_segments(messages, cfg.system, tokenizer, where)
                ids, labels = encode(segments, tokenizer, bos=False)
            rows_total += 1
            if cfg.packing:
                stream.append((ids, labels))
                continue
            if len(ids) > cfg.max_length:
                truncated += 1
                ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
            if not has_target(labels):
                dropped += 1
                continue
            examples.append(Example(tuple(ids), tuple(labels)))
    if cfg.packing:
        examples = pack(stream, cfg.max_length)
    if not examples:
        raise AlpsError("data.datasets: no usable example (every response was cut off by data.max_length?)")
    stats = DataStats(
        rows=rows_total,
        examples=len(examples),
        dropped=dropped,
        truncated=truncated,
        tokens=sum(len(e) for e in examples),
        label_tokens=sum(sum(x != IGNORE for x in e.labels) for e in examples),
    )
    return examples, stats


def has_target(labels: Sequence[int]) -> bool:
    """Whether a sequence gives the loss any target: HF causal LMs shift labels left, so position 0 is never one
    (a sequence whose only label sits there would make the mean loss 0/0 = NaN)."""
    return any(x != IGNORE for x in labels[1:])


def pack(stream: Sequence[tuple[list[int], list[int]]], max_length: int) -> list[Example]:
    """Concatenate examples (in order) and cut into full ``max_length`` blocks; the last partial block and
    blocks without a target (:func:`has_target`) are dropped.

    Attention is not masked at example boundaries (plain concatenation packing).
    """
    ids = [t for seq, _ in stream for t in seq]
    labels = [t for _, lab in stream for t in lab]
    out = []
    for start in range(0, len(ids) - max_length + 1, max_length):
        block_labels = labels[start : start + max_length]
        if has_target(block_labels):
            out.append(Example(tuple(ids[start : start + max_length]), tuple(block_labels)))
    return out


# ---- batching ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPlan:
    """Deterministic assignment of examples to (epoch, step, rank, micro-batch)."""

    num_examples: int
    micro_batch: int
    grad_accum: int
    world: int
    seed: int
    shuffle: bool = True

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_examples))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=g).tolist()

    def micro_batches(self, step: int, rank: int, order: list[int] | None = None) -> list[list[int]]:
        """The ``grad_accum`` micro-batches (example indices) that ``rank`` runs for global optimizer ``step``."""
        epoch, local = divmod(step, self.steps_per_epoch)
        order = self.order(epoch) if order is None else order
        block = order[local * self.global_batch : (local + 1) * self.global_batch]
        # The block's micro-batches do not depend on the world size (only on micro_batch); rank r runs
        # every world-th one. A resume on another number of ranks thus averages the same micro-batch losses.
        micro = [block[i * self.micro_batch : (i + 1) * self.micro_batch] for i in range(self.grad_accum * self.world)]
        return micro[rank :: self.world]

    def iterate(self, start_step: int, rank: int) -> Iterator[tuple[int, list[list[int]]]]:
        """(step, micro-batches) from ``start_step`` on, forever (epochs wrap)."""
        step = start_step
        cached: tuple[int, list[int]] | None = None
        while True:
            epoch = step // self.steps_per_epoch
            if cached is None or cached[0] != epoch:
                cached = (epoch, self.order(epoch))
            yield step, self.micro_batches(step, rank, cached[1])
            step += 1


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; padded labels are -100 and attention is masked."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
