"""No function in alps_ds/ longer than 60 lines without a written reason (the developers' guide: ~60).

A function's length is ``def`` line to last line, docstring and nested functions included (a
nested function is also measured on its own). A function may be longer when the line right
above its ``def`` (above its first decorator, if any) is a comment ``# long: <why>``; the
reason must not be empty. Anything else over the limit is listed, file:line name (lines).
"""

from __future__ import annotations

import ast
from pathlib import Path

import alps_ds

ROOT = Path(alps_ds.__file__).parent
LIMIT = 60
MARK = "# long:"


def long_functions(source: str, filename: str = "<source>") -> list[str]:
    """``filename:line name (N lines)`` for each function over LIMIT lines lacking a ``# long: reason`` above it."""
    lines = source.splitlines()
    out = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        length = node.end_lineno - node.lineno + 1
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        above = lines[first - 2].strip() if first >= 2 else ""
        if length > LIMIT and not (above.startswith(MARK) and above[len(MARK) :].strip()):
            out.append(f"{filename}:{node.lineno} {node.name} ({length} lines)")
    return out


def test_no_function_over_the_limit_without_a_reason():
    found = [
        hit
        for path in sorted(ROOT.rglob("*.py"))
        for hit in long_functions(path.read_text(), str(path.relative_to(ROOT.parent)))
    ]
    assert not found, "split these into named steps, or put '# long: <why>' above the def:\n" + "\n".join(found)


def _function(name: str, body_lines: int, above: str = "", decorator: str = "") -> str:
    body = "".join(f"    x{i} = {i}\n" for i in range(body_lines))
    head = "".join(f"{line}\n" for line in (above, decorator) if line)
    return f"\n{head}def {name}():\n{body}"


def test_the_scan_finds_long_functions_and_honours_only_a_real_reason():
    src = "".join(
        [
            _function("short", LIMIT - 1),
            _function("long_bare", LIMIT),
            _function("long_reasoned", LIMIT, above="# long: one table, read top to bottom"),
            _function("long_empty_reason", LIMIT, above="# long:"),
            _function("long_decorated", LIMIT, above="# long: a reason", decorator="@staticmethod"),
            "def outer():\n" + "".join("    " + line + "\n" for line in _function("inner", LIMIT).splitlines()),
        ]
    )
    names = {hit.split()[1] for hit in long_functions(src)}
    # outer holds inner, so it is over the limit too; inner is measured on its own.
    assert names == {"long_bare", "long_empty_reason", "outer", "inner"}
