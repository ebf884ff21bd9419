"""A run's on-disk state, piece by piece (in process, no launch): the checkpoint pointer and the resumes it
refuses, the elastic state's checks, the step log after a kill mid-write, and what the merged export copies."""

from __future__ import annotations

import json

import pytest

from alps_ds.errors import AlpsError
from alps_ds.tiny import build_model, tiny_config
from alps_ds.train import elastic
from alps_ds.train.checkpoint import LATEST, check_resume, read_latest
from alps_ds.train.export import write_merged
from alps_ds.train.report import TrainLog


def pointer(tmp_path, **fields):
    (tmp_path / LATEST).write_text(json.dumps({"tag": "step-00000004", "step": 4, **fields}))
    (tmp_path / "step-00000004").mkdir(exist_ok=True)
    return read_latest(tmp_path)


def test_resume_refusals_are_one_line(tmp_path):
    latest = pointer(tmp_path, world_size=2, zero_stage=2, batch=16)
    check_resume(tmp_path, latest, 2, 2, 16)
    with pytest.raises(AlpsError, match="train.batch 16, this run has 32; resume with --set train.batch=16") as e:
        check_resume(tmp_path, latest, 2, 2, 32)
    assert "\n" not in str(e.value) and str(tmp_path / LATEST) in str(e.value)
    # another world size or ZeRO stage needs the elastic state; a tag without it names what fits
    for world, stage in ((4, 2), (2, 3)):
        with pytest.raises(AlpsError, match=f"no {elastic.META} .* resumes only on 2 ranks with ZeRO-2") as e:
            check_resume(tmp_path, latest, world, stage, 16)
        assert "\n" not in str(e.value) and str(tmp_path / "step-00000004") in str(e.value)
    (tmp_path / "step-00000004" / elastic.META).write_text("{}")
    check_resume(tmp_path, latest, 4, 3, 16)
    # a pointer from before these were recorded resumes as before
    check_resume(tmp_path, pointer(tmp_path), 4, 3, 32)


def test_bad_elastic_state_is_one_line(tmp_path):
    meta = tmp_path / elastic.META
    for text, why in (
        ("{", "Expecting"),
        ('{"format": "other"}', "format 'other'"),
        (f'{{"format": "{elastic.FORMAT}"}}', "missing step"),
    ):
        meta.write_text(text)
        with pytest.raises(AlpsError, match=why) as e:
            elastic.read_meta(tmp_path)
        assert "\n" not in str(e.value) and str(meta) in str(e.value)
    saved = {"slices": {"m.q_proj.weight": {"rows": [[0, 4]]}, "m.o_proj.weight": {"rows": None}}}
    elastic.check_slices(tmp_path, saved, [(None, "m.q_proj.weight", ((0, 4),)), (None, "m.o_proj.weight", None)])
    with pytest.raises(AlpsError, match=r"slices differ from this run's \(m.o_proj.weight, m.q_proj.weight\)"):
        elastic.check_slices(tmp_path, saved, [(None, "m.q_proj.weight", ((0, 8),))])


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
