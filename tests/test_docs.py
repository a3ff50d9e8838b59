"""The README and docs/: short, every link and picture there, no project history in them."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
#: Words about how the project was made, not what it does (a stale table says "before ...").
HISTORY = re.compile(
    r"this session|before this (change|session|measurement)|the previous default|"
    r"earlier measurements|previous results|we changed|used to be",
    re.IGNORECASE,
)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_readme_is_short_and_names_both_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "./start" in text and "./test" in text
    assert "docs/img/" in text  # at least one picture of the app


def test_every_link_and_picture_in_the_readme_and_docs_exists():
    for doc in [ROOT / "README.md", *DOCS]:
        for target in LINK.findall(doc.read_text()):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"


def test_the_pictures_are_small():
    pictures = sorted((ROOT / "docs" / "img").glob("*.png"))
    assert pictures
    for p in pictures:
        assert p.stat().st_size <= 200_000, f"{p.name}: {p.stat().st_size} bytes"


def test_no_document_tells_how_the_project_was_made():
    for doc in [ROOT / "README.md", *DOCS]:
        found = HISTORY.search(doc.read_text())
        assert found is None, f"{doc.name}: {found.group(0)!r}"
