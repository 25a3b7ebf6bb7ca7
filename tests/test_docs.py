"""The repository stands alone: every document a docstring or comment points to is in it."""

from __future__ import annotations

import re

from conftest import REPO_ROOT

# a path with at least one folder, ending in a document suffix (generated outputs like results.md have none)
CITED = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)+[\w.-]+\.(?:md|txt|rst))")


def cited_paths() -> list[tuple[str, str]]:
    out = []
    for py in sorted((REPO_ROOT / "semiseg").rglob("*.py")):
        for m in CITED.finditer(py.read_text()):
            out.append((str(py.relative_to(REPO_ROOT)), m.group(1)))
    return out


def test_every_cited_document_exists_in_the_repository():
    cited = cited_paths()
    assert ("semiseg/algorithms/crossmatch.py", "docs/algorithms.md") in cited  # the pattern finds citations
    missing = [(src, path) for src, path in cited
               if not (REPO_ROOT / path).exists() and not (REPO_ROOT / "benchmarks" / path).exists()]
    assert missing == []


def test_no_reference_notes_outside_the_repository_are_named():
    for py in (REPO_ROOT / "semiseg").rglob("*.py"):
        text = py.read_text()
        for name in ("ALGORITHMS.md", "DESIGN.md", "crossmatch-paper"):
            assert name not in text, f"{py} names {name}, which a clone does not have; cite docs/ instead"
