"""The engine hook under deepspeed.initialize on 2 real ranks: ZeRO 0/1/2/3 (+ zero.Init), fp32/bf16.

One torchrun launch runs the whole matrix (tests/scripts/sparse_matrix.py); each test below
asserts one property per case, so a failure names the case and what broke.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from dist import run_ranks  # noqa: E402
from scripts.sparse_matrix import CASES  # noqa: E402

IDS = [c["id"] for c in CASES]
TRAINED = [c["id"] for c in CASES if c["dtype"] != "fp16"]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("matrix") / "results.json"
    run_ranks(Path(__file__).parent / "scripts" / "sparse_matrix.py", str(out), timeout=900)
    return {r["id"]: r for r in json.loads(out.read_text())}


def get(results, cid):
    r = results[cid]
    assert r["ok"], f"{cid} failed on the ranks: {r['error']}\n{r.get('trace', '')}"
    return r


@pytest.mark.parametrize("cid", TRAINED)
def test_frozen_parameters_and_rows_bit_identical(results, cid):
    r = get(results, cid)
    assert r["frozen_identical"] and r["nonselected_rows_identical"], r["problems"]


@pytest.mark.parametrize("cid", TRAINED)
def test_trained_slices_started_from_the_base_rows(results, cid):
    r = get(results, cid)  # the slices hold the base's rows when training starts (under zero.Init too)
    assert r["slices_started_from_base"], r["problems"]


@pytest.mark.parametrize("cid", TRAINED)
def test_every_selected_row_changed(results, cid):
    r = get(results, cid)
    assert r["selected_rows_changed"], r["problems"]
    assert r["others_changed"], "train_others modules did not train"


@pytest.mark.parametrize("cid", TRAINED)
def test_loss_fell_on_a_learnable_batch(results, cid):
    losses = get(results, cid)["losses"]
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("cid", TRAINED)
def test_optimizer_holds_exactly_the_slice_elements(results, cid):
    r = get(results, cid)
    per_rank, analytic = r["optimizer_elements_per_rank"], r["analytic_elements"]
    assert r["report_trainable"] == analytic
    if r["stage"] == 0:  # no partitioning: every rank updates everything trainable
        assert per_rank == [analytic] * len(per_rank)
    else:  # ZeRO partitions the fp32 master/Adam state: each rank a part, together exactly the slices
        assert sum(per_rank) == analytic and all(0 < n < analytic for n in per_rank), per_rank


@pytest.mark.parametrize("cid", TRAINED)
def test_adapter_saved_from_the_engine_holds_the_trained_rows(results, cid):
    assert get(results, cid)["adapter_matches"]


@pytest.mark.parametrize("cid", [c["id"] for c in CASES if c["ckpt"]])
def test_activation_checkpointing_was_active(results, cid):
    r = get(results, cid)  # a checkpointed layer runs forward twice per pass (once more in backward)
    assert r["forward_calls"] == 2 * r["forward_passes"]


def test_bf16_cases_trained_in_bf16(results):
    for c in CASES:
        if c["dtype"] == "bf16":
            assert get(results, c["id"])["dtype_after"] == "torch.bfloat16", c["id"]


def test_fp16(results):
    r = results["z2-fp16"]
    if not r["ok"] and "fp16 is not supported on your device" in r["error"]:
        pytest.skip(f"DeepSpeed's CPU accelerator refuses fp16: {r['error']}")
    assert r["ok"], r.get("error")
    assert r["frozen_identical"] and r["nonselected_rows_identical"] and r["selected_rows_changed"], r["problems"]
