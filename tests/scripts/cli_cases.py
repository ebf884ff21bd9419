"""Run many ``alps-ds`` invocations through the real CLI (:func:`alps_ds.cli.main`) in ONE process.

Bad-input cases of ``alps-ds train`` fail only after DeepSpeed, transformers and a process
group are up (~10 s of imports); paying that once for all of them keeps the suite fast, and a
separate process keeps the process group out of pytest's. For each case the exit code, what
was printed to stderr, and any exception that escaped the CLI (with its traceback) are recorded.

usage: python tests/scripts/cli_cases.py CASES.json RESULTS.json
    CASES.json: [{"id": ..., "argv": [...]}, ...]
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback

from alps_ds.cli import main as cli_main


def run_one(argv: list[str]) -> dict:
    err, out = io.StringIO(), io.StringIO()
    escaped = None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = cli_main(argv)
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:  # what the user would have seen as a traceback
            rc, escaped = 1, traceback.format_exc()
    return {"rc": rc, "stderr": err.getvalue(), "stdout": out.getvalue()[-2000:], "traceback": escaped}


def main() -> int:
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    results = {c["id"]: run_one(c["argv"]) for c in cases}
    with open(sys.argv[2], "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
