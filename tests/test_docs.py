"""Documentation that code points at exists: every "SPEC x.y" citation names a section of docs/spec.md."""

from __future__ import annotations

import re

from conftest import REPO_ROOT

CITATION = re.compile(r"SPEC (\d+(?:\.\d+[a-z]?)?)")
HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+[a-z]?)?)\.? ", re.MULTILINE)
CITING_SUFFIXES = {".py", ".md", ".yaml", ".tpl", ".txt"}
SOURCE_FOLDERS = ("dynamix_core", "services", "pipelines", "tests", "docs", "recipes", "helm", "benchmarks", "deploy")


def test_every_spec_citation_resolves_to_a_section():
    sections = set(HEADING.findall((REPO_ROOT / "docs" / "spec.md").read_text()))
    assert {"1.1", "1.2", "1.3", "1.4", "2.3a", "2.3b", "2.3c", "2.5b", "3", "4"} <= sections
    cited = {}
    paths = [REPO_ROOT / "README.md", *(p for folder in SOURCE_FOLDERS for p in (REPO_ROOT / folder).rglob("*"))]
    for path in paths:
        rel = path.relative_to(REPO_ROOT)
        if path.suffix in CITING_SUFFIXES and path.is_file():
            for number in CITATION.findall(path.read_text(errors="replace")):
                cited.setdefault(number, rel.as_posix())
    assert len(cited) >= 10
    assert {n: where for n, where in cited.items() if n not in sections} == {}


def test_the_repository_does_not_point_outside_itself():
    """A reader of the repository has no sibling ``shared`` folder: what the project relies on is in
    docs/ (docs/stack.md, docs/spec.md) or vendored (tests/schemas)."""
    sibling = "../" + "shared"
    paths = [REPO_ROOT / name for name in ("README.md", "Makefile", "requirements.lock", "pyproject.toml")]
    paths += [p for folder in SOURCE_FOLDERS for p in (REPO_ROOT / folder).rglob("*")
              if p.is_file() and p.suffix in CITING_SUFFIXES | {".toml", ".json", ".cfg"}]
    outside = [p.relative_to(REPO_ROOT).as_posix() for p in paths
               if p.is_file() and sibling in p.read_text(errors="replace")]
    assert outside == []
