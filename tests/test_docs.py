"""The docs stay in step with the code: the CLI reference and every link in README/docs."""

from __future__ import annotations

import re
from pathlib import Path

from alps_ds.cli import help_markdown

REPO = Path(__file__).resolve().parents[1]


def test_cli_reference_matches_help():
    expected = help_markdown()
    actual = (REPO / "docs" / "cli.md").read_text()
    assert actual == expected, (
        "docs/cli.md is out of date; regenerate it with: "
        "python -c 'from alps_ds.cli import help_markdown as h; print(h(), end=\"\")' > docs/cli.md"
    )


def test_every_command_is_documented():
    text = (REPO / "docs" / "cli.md").read_text()
    for name in ("localize", "heads", "layout", "train", "merge", "plan", "check", "launch", "demo"):
        assert f"## alps-ds {name}\n" in text


def test_relative_links_resolve():
    broken = []
    for md in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md.read_text()):
            if "://" in target:
                continue
            if not (md.parent / target).exists():
                broken.append(f"{md.relative_to(REPO)} -> {target}")
    assert not broken, broken
