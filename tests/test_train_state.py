"""A run's on-disk state, piece by piece (in process, no launch): the checkpoint pointer and the
world size it records, the step log after a kill mid-write, and what the merged export copies."""

from __future__ import annotations

import json

import pytest

from alps_ds.errors import AlpsError
from alps_ds.tiny import build_model, tiny_config
from alps_ds.train.checkpoint import LATEST, check_world_size, read_latest
from alps_ds.train.export import write_merged
from alps_ds.train.report import TrainLog


def test_resume_on_another_world_size_is_one_line(tmp_path):
    (tmp_path / LATEST).write_text(json.dumps({"tag": "step-00000004", "step": 4, "world_size": 2}))
    latest = read_latest(tmp_path)
    check_world_size(tmp_path, latest, 2)
    with pytest.raises(AlpsError, match="written by 2 ranks, this run has 4; resume with 2 ranks") as e:
        check_world_size(tmp_path, latest, 4)
    assert "\n" not in str(e.value) and str(tmp_path / LATEST) in str(e.value)
    # a pointer from before the world size was recorded resumes as before
    (tmp_path / LATEST).write_text(json.dumps({"tag": "step-00000004", "step": 4}))
    check_world_size(tmp_path, read_latest(tmp_path), 4)


def test_a_half_written_log_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / "train_log.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 9)) + '{"step": 9, "lo')
    TrainLog(path, keep_until=6).close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_merged_export_copies_no_stale_weights(tmp_path):
    base = tmp_path / "base"
    build_model(tiny_config("llama", layers=1, hidden=16, heads=2, vocab=32)).save_pretrained(base)
    # a base folder that also holds the pickle weights of the same (untrained) model
    (base / "pytorch_model.bin").write_bytes(b"untrained weights")
    (base / "pytorch_model.bin.index.json").write_text("{}")
    (base / "tokenizer.json").write_text("{}")
    write_merged(base, tmp_path / "merged", {})
    names = sorted(p.name for p in (tmp_path / "merged").iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
