"""HF Trainer with a ZeRO-3 DeepSpeed config on 2 real ranks trains a hooked model (one launch)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from dist import run_ranks  # noqa: E402


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("trainer")
    run_ranks(Path(__file__).parent / "scripts" / "trainer_zero3.py", str(out), timeout=900)
    return json.loads((out / "result.json").read_text())


def test_trainer_ran_deepspeed_zero3(result):
    assert result["engine"] == "DeepSpeedEngine" and result["zero_stage"] == 3


def test_loss_fell(result):
    assert result["losses"][-1] < result["losses"][0], result["losses"]


def test_merged_model_is_bit_exact_outside_the_selected_rows(result):
    assert result["problems"] == []


def test_adapter_is_not_empty_and_holds_the_trained_rows(result):
    assert result["adapter_elements"] == result["expected_elements"]
    assert result["adapter_nonzero"] and result["adapter_matches"]


def test_optimizer_partitions_hold_exactly_the_slices(result):
    per_rank = result["optimizer_elements_per_rank"]
    assert sum(per_rank) == result["expected_elements"] and all(0 < n < result["expected_elements"] for n in per_rank)
