"""Run many ``alps-ds`` invocations through the real CLI (:func:`alps_ds.cli.main`) in ONE process.

Bad-input cases of ``alps-ds train`` fail only after DeepSpeed, transformers and a process
group are up (~10 s of imports); paying that once for all of them keeps the suite fast, and a
separate process keeps the process group out of pytest's. For each case the exit code, what
was printed to stderr, and any exception that escaped the CLI (with its traceback) are recorded.
Output is captured at the file-descriptor level, so lines that third-party loggers or native code
write to the real stderr count too.

usage: python tests/scripts/cli_cases.py CASES.json RESULTS.json
    CASES.json: [{"id": ..., "argv": [...]}, ...]
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import traceback

from alps_ds.cli import main as cli_main


@contextlib.contextmanager
def captured(fd: int):
    """Everything written to ``fd`` (Python or native code) while inside; the text lands in the yielded list."""
    box: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(fd)
        os.dup2(tmp.fileno(), fd)
        try:
            yield box
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            box.append(tmp.read().decode(errors="replace"))


def run_one(argv: list[str]) -> dict:
    escaped = None
    with captured(2) as err, captured(1) as out:
        try:
            rc = cli_main(argv)
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:  # what the user would have seen as a traceback
            rc, escaped = 1, traceback.format_exc()
    return {"rc": rc, "stderr": err[0], "stdout": out[0][-2000:], "traceback": escaped}


def main() -> int:
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    results = {c["id"]: run_one(c["argv"]) for c in cases}
    with open(sys.argv[2], "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
