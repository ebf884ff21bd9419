"""A synthetic task family the demo generates itself: small sequence tasks where attention does the work.

Each example is a prompt/completion row, e.g. ``{"prompt": "reverse c a f", "completion": "f a c"}``:
a task word, random input symbols (``a`` .. ``x``), and an answer that is a deterministic function
of the input. Solving a task means attending to the right earlier positions (the i-th symbol for
copy, the (k-i)-th for reverse, the value after a matching key for lookup, ...), so the tasks
differ mostly in their attention patterns, which is what ALPS localizes.

The rows go through ``alps-ds train``'s own data pipeline (prompt-completion format, ``chat``
template), with a word-level tokenizer saved next to the model (:func:`save_tokenizer`): one
token per word, a compact template ``<s> PROMPT | COMPLETION </s>``, loss on the completion.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alps_ds.errors import AlpsError
from alps_ds.fsutil import atomic_write_text

SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: what alps_ds.tiny.tiny_config sets as pad/bos/eos
SEP, QUERY = "|", "?"
SYMBOLS = tuple("abcdefghijklmnopqrstuvwx")
TASKS: tuple[str, ...] = ("copy", "reverse", "sort", "rotate", "successor", "lookup")
VOCAB: tuple[str, ...] = (*SPECIALS, SEP, QUERY, *TASKS, *SYMBOLS)
VOCAB_SIZE = len(VOCAB)
MIN_LEN, MAX_LEN = 4, 8


@dataclass(frozen=True)
class Distribution:
    """Where a dataset's inputs come from: their lengths (inclusive) and the symbols they draw from."""

    min_len: int = MIN_LEN
    max_len: int = MAX_LEN
    symbols: int = len(SYMBOLS)  # the first ``symbols`` of a .. x

    def describe(self) -> str:
        return f"lengths {self.min_len}-{self.max_len}, symbols a-{SYMBOLS[self.symbols - 1]}"


PRETRAIN = Distribution()
# The transfer dataset: the same task on longer inputs over half the alphabet, a shift the heads
# localized on the default distribution have to carry over to.
TRANSFER = Distribution(min_len=8, max_len=10, symbols=12)

# The whole conversation on one line: no role tags, so a sequence is BOS, prompt, SEP, answer, EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }} | "
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
)


def check_task(name: str) -> str:
    if name not in TASKS:
        raise AlpsError(f"--task {name!r} is unknown; choose one of {', '.join(TASKS)}")
    return name


def _answer(task: str, x: list[str], rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """(prompt symbols, answer symbols) of one example with input ``x``."""
    if task == "copy":
        return x, x
    if task == "reverse":
        return x, x[::-1]
    if task == "sort":
        return x, sorted(x)
    if task == "rotate":  # second half first: position i reads (i + k/2) mod k
        h = len(x) // 2
        return x, x[h:] + x[:h]
    if task == "successor":  # copy plus a per-token map
        return x, [SYMBOLS[(SYMBOLS.index(s) + 1) % len(SYMBOLS)] for s in x]
    if task == "lookup":  # associative recall: pairs "k v", then "?" and two keys; answer their values
        n = len(x) // 2 + 1
        keys = [SYMBOLS[i] for i in rng.choice(len(SYMBOLS), size=n, replace=False)]
        values = [SYMBOLS[i] for i in rng.integers(0, len(SYMBOLS), size=n)]
        asked = rng.choice(n, size=2, replace=False)
        prompt = [t for kv in zip(keys, values) for t in kv] + [QUERY] + [keys[i] for i in asked]
        return prompt, [values[i] for i in asked]
    raise AssertionError(task)


def generate(
    tasks: Sequence[str],
    count: int,
    seed: int,
    *,
    weights: Sequence[float] | None = None,
    dist: Distribution = PRETRAIN,
) -> list[dict]:
    """``count`` rows ``{"prompt", "completion", "task"}`` drawn from ``tasks`` (by ``weights``), seeded."""
    for t in tasks:
        check_task(t)
    rng = np.random.default_rng(seed)
    p = None if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
    rows = []
    for t in rng.choice(len(tasks), size=count, p=p):
        task = tasks[t]
        k = int(rng.integers(dist.min_len, dist.max_len + 1))
        x = [SYMBOLS[i] for i in rng.integers(0, dist.symbols, size=k)]
        prompt, answer = _answer(task, x, rng)
        rows.append({"prompt": " ".join([task, *prompt]), "completion": " ".join(answer), "task": task})
    return rows


def max_tokens(max_len: int = max(MAX_LEN, TRANSFER.max_len)) -> int:
    """Longest sequence in tokens (BOS, task word, prompt, SEP, answer, EOS): lookup or a ``max_len`` task."""
    pairs = max_len // 2 + 1
    return max(2 + 2 * pairs + 1 + 2 + 1 + 2 + 1, 2 + max_len + 1 + max_len + 1)


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict]) -> Path:
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def tokenizer():
    """The demo's word-level tokenizer (a ``PreTrainedTokenizerFast``): one id per entry of :data:`VOCAB`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIALS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=max_tokens()
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(path: str | os.PathLike) -> Path:
    """Write the tokenizer into a model folder (``alps-ds train`` loads it from there)."""
    path = Path(path)
    tokenizer().save_pretrained(path)
    return path
