"""Training data: templates, label masking, packing, deterministic rank sharding, bad rows, the byte tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alps_ds.errors import AlpsError
from alps_ds.train.config import DataConfig, DatasetConfig
from alps_ds.train.data import (
    ALPACA_SYSTEM,
    IGNORE,
    Example,
    StepPlan,
    alpaca_segments,
    collate,
    pack,
    to_messages,
    tokenize_all,
)
from alps_ds.train.tokenizer import BYTE_VOCAB, byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def trained_text(tok, example: Example) -> str:
    return tok.decode([t for t, lab in zip(example.input_ids, example.labels) if lab != IGNORE])


def prompt_text(tok, example: Example) -> str:
    return tok.decode([t for t, lab in zip(example.input_ids, example.labels) if lab == IGNORE])


def test_byte_tokenizer_round_trips_any_text(tok, tmp_path):
    text = "Grüße, 世界!\n\ttabs"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text.encode()) and max(ids) < BYTE_VOCAB
    assert tok.decode(ids) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False).input_ids == ids


def test_alpaca_uses_the_paper_prompt_and_masks_it(tok, tmp_path):
    rows = [{"instruction": "Add.", "input": "2 and 3", "output": "5"}]
    cfg = DataConfig(datasets=[DatasetConfig(path=jsonl(tmp_path / "a.jsonl", rows))])
    [ex], stats = tokenize_all(cfg, tok)
    assert ex.input_ids[0] == tok.bos_token_id
    assert prompt_text(tok, ex) == f"<s>{ALPACA_SYSTEM}\n\n### Instruction: Add.\n\n2 and 3\n### Response:\n"
    assert trained_text(tok, ex) == "5</s>"
    assert stats.label_tokens == 2 and stats.rows == 1


def test_messages_multi_turn_trains_every_assistant_turn(tok, tmp_path):
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "ciao"},
        ]
    }
    path = jsonl(tmp_path / "m.jsonl", [chat])
    [ex], _ = tokenize_all(DataConfig(datasets=[DatasetConfig(path=path)]), tok)
    assert trained_text(tok, ex) == "hello</s>ciao</s>"
    assert prompt_text(tok, ex).startswith("<s>Be brief.\n\n### Instruction: hi\n### Response:\n")
    [ex], _ = tokenize_all(DataConfig(datasets=[DatasetConfig(path=path)], template="chat"), tok)
    assert trained_text(tok, ex) == "hello</s>\nciao</s>\n"
    assert prompt_text(tok, ex) == "<|system|>\nBe brief.\n<|user|>\nhi\n<|assistant|>\n<|user|>\nbye\n<|assistant|>\n"


def test_prompt_completion_and_csv_parquet(tok, tmp_path):
    import datasets

    rows = [{"prompt": "Q: 1+1?", "completion": "2"}, {"prompt": "Q: 2+2?", "completion": "4"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "p.csv"), index=False)
    for name in ("p.parquet", "p.csv"):
        cfg = DataConfig(datasets=[DatasetConfig(path=str(tmp_path / name))], system="")
        exs, _ = tokenize_all(cfg, tok)
        assert [trained_text(tok, e) for e in exs] == ["2</s>", "4</s>"]
        assert prompt_text(tok, exs[0]) == "<s>### Instruction: Q: 1+1?\n### Response:\n"


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [
                {"instruction": "a", "output": "b"},
                {"instruction": "a", "output": "b"},
                {"instruction": "a", "output": 3},
            ],
            "b.jsonl: row 3: 'output' must be a string, got int",
        ),
        (
            [{"instruction": "a", "output": "b"}, '{"instruction": "a", "output": '],
            "b.jsonl: line 2: not valid JSON",
        ),
        ([{"text": "x"}], "cannot tell the format from the columns ['text']"),
        ([{"messages": [{"role": "user", "content": "x"}]}], "b.jsonl: row 1: 'messages' has no assistant message"),
        (
            [{"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}],
            "b.jsonl: row 1: messages[1] must be {role: system|user|assistant",
        ),
    ],
)
def test_bad_rows_name_the_file_and_row(tok, tmp_path, rows, message):
    cfg = DataConfig(datasets=[DatasetConfig(path=jsonl(tmp_path / "b.jsonl", rows))])
    with pytest.raises(AlpsError) as e:
        tokenize_all(cfg, tok)
    assert message in str(e.value).replace(str(tmp_path) + "/", "")


def test_missing_file_and_unknown_suffix(tok, tmp_path):
    with pytest.raises(AlpsError, match="no such data file"):
        tokenize_all(DataConfig(datasets=[DatasetConfig(path=str(tmp_path / "nope.jsonl"))]), tok)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(AlpsError, match="unknown data file type '.txt'"):
        tokenize_all(DataConfig(datasets=[DatasetConfig(path=str(tmp_path / "x.txt"))]), tok)


def test_truncation_and_rows_without_labels(tok, tmp_path):
    rows = [{"instruction": "x" * 50, "output": "long answer"}, {"instruction": "y", "output": "ok"}]
    cfg = DataConfig(datasets=[DatasetConfig(path=jsonl(tmp_path / "t.jsonl", rows))], system="", max_length=40)
    exs, stats = tokenize_all(cfg, tok)
    assert stats.dropped == 1 and stats.examples == 1 and len(exs) == 1
    assert all(len(e) <= 40 for e in exs)
    prompt = len("<s>") - 2 + len("### Instruction: " + "x" * 50 + "\n### Response:\n")  # <s> is one token
    cfg.max_length = prompt + 4
    exs, stats = tokenize_all(cfg, tok)
    assert stats.truncated == 1 and stats.dropped == 0
    assert len(exs[0]) == prompt + 4 and trained_text(tok, exs[0]) == "long"


def test_packing_keeps_tokens_and_labels_aligned(tok, tmp_path):
    rows = [{"instruction": f"say {i}", "output": f"number {i}"} for i in range(20)]
    cfg = DataConfig(datasets=[DatasetConfig(path=jsonl(tmp_path / "p.jsonl", rows))], system="", packing=True)
    cfg.max_length = 32
    packed, _ = tokenize_all(cfg, tok)
    cfg.packing, cfg.max_length = False, 1000
    plain, _ = tokenize_all(cfg, tok)
    stream_ids = [t for e in plain for t in e.input_ids]
    stream_labels = [t for e in plain for t in e.labels]
    assert all(len(e) == 32 for e in packed)
    blocks = [(stream_ids[i : i + 32], stream_labels[i : i + 32]) for i in range(0, len(stream_ids) - 31, 32)]
    expected = [b for b in blocks if any(x != IGNORE for x in b[1][1:])]  # prompt-only blocks carry no loss
    assert 0 < len(expected) < len(blocks)
    assert [(list(e.input_ids), list(e.labels)) for e in packed] == expected
    assert pack([([1, 2], [IGNORE, IGNORE])] * 4, 4) == []  # blocks with no label are dropped
    # The model shifts labels left: a block whose only label is its first token has no target (its loss is NaN).
    ids, labels = [10, 11, 12, 13, 14, 15, 16, 17], [IGNORE, IGNORE, 12, 13, 14, IGNORE, IGNORE, IGNORE]
    assert pack([(ids, labels)], 4) == [Example((10, 11, 12, 13), (IGNORE, IGNORE, 12, 13))]


def test_step_plan_is_deterministic_disjoint_and_world_size_independent():
    plan2 = StepPlan(num_examples=50, micro_batch=2, grad_accum=3, world=2, seed=7)
    assert plan2.steps_per_epoch == 50 // 12
    again = StepPlan(num_examples=50, micro_batch=2, grad_accum=3, world=2, seed=7)
    for step in range(10):
        r0, r1 = plan2.micro_batches(step, 0), plan2.micro_batches(step, 1)
        assert r0 == again.micro_batches(step, 0)
        assert len(r0) == 3 and all(len(mb) == 2 for mb in r0)
        flat0, flat1 = {i for mb in r0 for i in mb}, {i for mb in r1 for i in mb}
        assert not flat0 & flat1
        # one rank with 2x the accumulation runs the same micro-batches (an elastic resume averages the same losses)
        plan1 = StepPlan(num_examples=50, micro_batch=2, grad_accum=6, world=1, seed=7)
        assert sorted(plan1.micro_batches(step, 0)) == sorted(r0 + r1)
    epoch0 = [i for s in range(plan2.steps_per_epoch) for r in (0, 1) for mb in plan2.micro_batches(s, r) for i in mb]
    assert len(set(epoch0)) == len(epoch0) == plan2.steps_per_epoch * 12
    assert plan2.order(0) != plan2.order(1)  # reshuffled every epoch
    assert StepPlan(50, 2, 3, 2, seed=8).order(0) != plan2.order(0)
    it = plan2.iterate(5, rank=1)
    assert [next(it) for _ in range(4)] == [(s, plan2.micro_batches(s, 1)) for s in range(5, 9)]


def test_collate_pads_right_and_masks(tok):
    batch = collate([Example((1, 5, 6), (IGNORE, 5, 6)), Example((1, 7), (IGNORE, 7))], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 5, 6], [IGNORE, 7, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_alpaca_segments_without_system_and_to_messages_errors():
    assert alpaca_segments([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "", "</s>") == [
        ("### Instruction: q\n### Response:\n", False),
        ("a</s>", True),
    ]
    with pytest.raises(AlpsError, match="row 4: 'instruction' is empty"):
        to_messages({"instruction": " ", "output": "x"}, "alpaca", "f.jsonl: row 4")
