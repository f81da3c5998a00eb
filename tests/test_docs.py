"""The repository stands on its own: every document it cites exists inside it.

Docstrings and docs cite the project's design document as ``docs/design.md §N``; this checks
that each cited section exists there, that every relative Markdown link in README.md and
docs/ resolves to a file of the repository, and that nothing cites a design document or
folder outside the repository.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT_FILES = sorted(
    p for p in ROOT.rglob("*")
    if p.suffix in {".py", ".md", ".yaml", ".sh", ".cpp", ".toml"} and ".git" not in p.parts
    and "__pycache__" not in p.parts and not any(part.endswith(".egg-info") for part in p.parts)
)


def _sections():
    text = (ROOT / "docs" / "design.md").read_text()
    return set(re.findall(r"^## §(\d+)", text, flags=re.M))


def test_design_doc_has_sections():
    assert {"1", "2", "3", "4", "5"} <= _sections()


@pytest.mark.parametrize("path", TEXT_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_citations_resolve(path):
    text = path.read_text(errors="replace")
    rel = path.relative_to(ROOT)
    if path != Path(__file__).resolve():
        assert "DESIGN" + ".md" not in text, f"{rel} cites a design file outside the repository"
        assert "../" + "shared" not in text, f"{rel} cites a folder outside the repository"
    sections = _sections()
    for m in re.finditer(r"docs/design\.md\)?\s*§(\d+)", text):
        assert m.group(1) in sections, f"{rel} cites docs/design.md §{m.group(1)}, which is missing"
    if path.suffix == ".md":
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                continue
            assert (path.parent / target).exists(), f"{rel} links to {target}, which does not exist"
