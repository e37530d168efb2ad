"""Every relative link in the user docs and the results notes points at a file or folder in the tree.

Checked: README.md, CHANGELOG.md, docs/*.md and every .md under benchmarks/results/. Links to web
pages (a scheme such as https:) and in-page anchors (#...) are skipped; a link's own #anchor is
dropped before the path is checked.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted({*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md"), *(ROOT / "benchmarks" / "results").rglob("*.md")})
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")   # [text](target "title")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)                                 # links inside code are not links


def relative_links(path: Path) -> list[str]:
    text = CODE.sub("", path.read_text(encoding="utf-8"))
    return [t for t in LINK.findall(text) if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t) and not t.startswith("#")]


def test_the_docs_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in DOCS}
    assert {"README.md", "docs/results.md", "docs/config.md", "docs/architecture.md",
            "benchmarks/results/README.md"} <= names


@pytest.mark.parametrize("path", DOCS, ids=[p.relative_to(ROOT).as_posix() for p in DOCS])
def test_relative_links_resolve(path):
    missing = [t for t in relative_links(path) if not (path.parent / t.split("#", 1)[0]).exists()]
    assert not missing, f"{path.relative_to(ROOT)}: links to nothing: {missing}"
