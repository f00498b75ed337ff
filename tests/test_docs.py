"""The text a reader meets (README, docs, module docstrings and comments, profiles) names features, not the
numbers of this project's internal issues, which mean nothing outside it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ISSUE_NUMBER = re.compile(r"\bissues?[ -]?#?\d+", re.IGNORECASE)


def _reader_files() -> list[Path]:
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    files += [p for p in (ROOT / "mim_nnunet").rglob("*") if p.suffix in (".py", ".json", ".md")]
    return files


def test_no_issue_numbers_in_reader_facing_text():
    files = _reader_files()
    assert len(files) > 20  # the walk found the package
    found = [
        f"{p.relative_to(ROOT)}:{i}: {m.group(0)}"
        for p in files
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if (m := ISSUE_NUMBER.search(line))
    ]
    assert found == []
