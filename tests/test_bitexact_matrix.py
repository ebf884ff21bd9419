"""The bit-exact guarantee as a matrix: ZeRO 0/1/2/3 x fp32/bf16 x gradient accumulation x activation
checkpointing x kv policy, with every PAIR of values covered (all 5 x 5 factor pairs).

The cases run in ONE 2-rank torchrun launch, tests/scripts/sparse_matrix.py, whose results
tests/test_sparse_engine.py asserts case by case (frozen modules and non-selected rows bit-identical
after merge, every selected row changed, loss fell, the optimizer holds exactly the slice elements
per rank, the adapter holds the trained rows, checkpointing really recomputed). This file proves that
the case list covers every pair and that each case is one of those asserted; it launches nothing, so
the matrix costs one launch in CI, not two.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from scripts.sparse_matrix import CASES  # noqa: E402
from test_sparse_engine import TRAINED  # noqa: E402

FACTORS = {
    "stage": (0, 1, 2, 3),
    "dtype": ("fp32", "bf16"),
    "accum": (1, 2),
    "ckpt": (None, "reentrant", "non-reentrant"),
    "kv": ("group", "none"),
}


def uncovered_pairs(cases: list[dict], factors: dict[str, tuple]) -> list[tuple]:
    """Every (factor a = x, factor b = y) that no case has: empty means pairwise coverage."""
    return [
        (a, x, b, y)
        for a, b in itertools.combinations(factors, 2)
        for x in factors[a]
        for y in factors[b]
        if not any(c[a] == x and c[b] == y for c in cases)
    ]


def bit_exact_cases() -> list[dict]:
    return [c for c in CASES if c["dtype"] in FACTORS["dtype"]]


def test_the_matrix_covers_every_pair_of_settings():
    missing = uncovered_pairs(bit_exact_cases(), FACTORS)
    assert not missing, f"pairs no case covers: {missing}"


def test_the_coverage_check_can_fail():
    cases = bit_exact_cases()
    dropped = [c for c in cases if not (c["stage"] == 0 and c["ckpt"] == "non-reentrant")]
    assert ("stage", 0, "ckpt", "non-reentrant") in uncovered_pairs(dropped, FACTORS)


def test_every_case_is_asserted_by_the_engine_tests():
    ids = [c["id"] for c in bit_exact_cases()]
    assert len(ids) == len(set(ids)) and set(ids) <= set(TRAINED)


def test_the_matrix_also_spans_zero_init_and_every_weight_layout():
    cases = bit_exact_cases()
    zinit = {c["dtype"] for c in cases if c["zinit"]}
    assert zinit == {"fp32", "bf16"}, "zero.Init must be covered in both dtypes"
    models = {c["model"] for c in cases}
    assert {"llama", "phi3", "gpt_neox"} <= models, "separate q/k/v, fused qkv_proj and neox interleaved layouts"
    assert any(c["others"] for c in cases), "train_others next to the head slices"
