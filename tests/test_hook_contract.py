"""One hook contract and one source of layout truth (issue 12).

Every engine's ``apply`` has the same signature and returns a ``HookReport`` (the AutoTP and
Megatron runs compare their reports with the HF engine's in tests/test_autotp.py and
tests/test_megatron.py); no module outside ``alps_ds/arch.py`` does row-layout arithmetic.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from alps_ds.hooked import HookReport

PACKAGE = Path(__file__).resolve().parents[1] / "alps_ds"
ENGINES = ["alps_ds.sparse.hook", "alps_ds.parallel.autotp", "alps_ds.parallel.megatron"]


@pytest.mark.parametrize("engine", ENGINES)
def test_every_engine_apply_has_the_one_signature(engine):
    import importlib

    from alps_ds.sparse.hook import apply as reference

    apply = importlib.import_module(engine).apply
    want = inspect.signature(reference)
    got = inspect.signature(apply)
    assert list(got.parameters) == list(want.parameters) == ["model", "selection", "kv", "train_others", "spec"]
    for name, p in want.parameters.items():
        assert (got.parameters[name].kind, got.parameters[name].default) == (p.kind, p.default), name
    assert got.return_annotation in (HookReport, "HookReport")


# Attributes whose arithmetic places rows: only arch.py may compute with them.
ROW_FACTS = {"head_dim", "group_size", "num_kv_heads"}
# Modules that use these sizes for something other than rows, with the reason.
NOT_ROWS = {
    "plan.py": "parameter and activation counts of the memory model, not row positions",
    "localize/score.py": "a head vector's entry count (d * hd) and the kv head of a query head",
}


def _row_arithmetic(source: str, where: str) -> list[str]:
    hits = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.BinOp):
            continue
        for side in (node.left, node.right):
            name = side.attr if isinstance(side, ast.Attribute) else side.id if isinstance(side, ast.Name) else None
            if name in ROW_FACTS or name == "hd":
                hits.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return hits


def test_no_layout_arithmetic_outside_arch():
    """Row positions come from AttentionSpec (rows, tp_segments, module_rows), never from sums of
    head_dim and head counts spread over the code base."""
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        if rel == "arch.py" or rel in NOT_ROWS:
            continue
        hits += _row_arithmetic(path.read_text(), rel)
    assert not hits, "row arithmetic outside arch.py:\n" + "\n".join(hits)


def test_the_check_finds_row_arithmetic():
    """The check above is not vacuous: the mapping's old grouped-layout formula is caught."""
    assert _row_arithmetic("def rows(spec, j, m):\n    return j * (m + 2) * spec.head_dim\n", "probe")
