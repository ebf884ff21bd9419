"""The files a run writes into output.dir once every input checked out (both engines)."""

from __future__ import annotations

import json
from pathlib import Path

from alps_ds.fsutil import atomic_write_text, claim_dir
from alps_ds.train.config import RunConfig


def write_run_files(out: Path, cfg: RunConfig, selection) -> None:
    """Rank 0, once training can start: claim output.dir (train's marker), then OUT/heads.json and
    OUT/run_config.json (both engines)."""
    claim_dir(out, "train")
    selection.save(out / "heads.json")
    atomic_write_text(out / "run_config.json", json.dumps(cfg.to_dict(), indent=1) + "\n")
