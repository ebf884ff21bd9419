"""An offline byte-level tokenizer for tiny models (tests, the demo): nothing to download, any text encodes.

Ids 0/1/2 are ``<pad>``/``<s>``/``</s>`` (matching :func:`alps_ds.tiny.tiny_config`), then the 256
bytes, so a tiny model needs ``vocab >= BYTE_VOCAB``. It is a ``PreTrainedTokenizerFast`` with a
small chat template, saved next to the model like any Hugging Face tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path

SPECIALS = ("<pad>", "<s>", "</s>")
BYTE_VOCAB = len(SPECIALS) + 256

# A minimal role-tagged chat template so the "chat" prompt template works offline.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% endif %}"
)


def byte_tokenizer():
    """A byte-level BPE with no merges: every UTF-8 byte is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    # Order the byte symbols by the byte they stand for, so ids are stable across versions.
    for symbol in sorted(alphabet, key=_byte_of):
        vocab[symbol] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=1 << 20
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _byte_of(symbol: str) -> int:
    """The byte a ByteLevel alphabet symbol stands for (GPT-2's printable remapping, inverted)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {chr(b): b for b in printable}
    n = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + n)] = b
            n += 1
    return table[symbol]


def save_byte_tokenizer(path: str | os.PathLike) -> Path:
    """Write the byte tokenizer into ``path`` (a model folder) and return it."""
    path = Path(path)
    byte_tokenizer().save_pretrained(path)
    return path
