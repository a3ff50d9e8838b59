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


def results_sections() -> dict[str, str]:
    from bench.results import sections_of

    return sections_of((ROOT / "docs" / "RESULTS.md").read_text())


def tables_and_stamps(text: str) -> list[str]:
    """Each table's header row, and "stamp" where a stamp line stands, in order."""
    from bench.tables import STAMP

    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if STAMP.match(line):
            out.append("stamp")
        elif line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            out.append(line)
    return out


def test_every_results_table_carries_its_benchmarks_stamp():
    """Every table in docs/RESULTS.md sits in a section of bench/results.py's, under a stamp line
    (commit, date, machine, torch, command) that its benchmark printed."""
    from bench.results import SECTION, SECTIONS
    from bench.tables import STAMP

    text = (ROOT / "docs" / "RESULTS.md").read_text()
    sections = results_sections()
    assert list(sections) == [s.key for s in SECTIONS]
    assert not tables_and_stamps(SECTION.sub("", text)), "a table outside the sections"
    runs = {s.key: len(s.runs) for s in SECTIONS}
    measured = 0
    for key, body in sections.items():
        seen = tables_and_stamps(body)
        if seen:
            assert seen[0] == "stamp", f"{key}: a table above the first stamp"
            assert seen.count("stamp") == runs[key], f"{key}: one stamp per command"
            measured += 1
        for line in body.splitlines():
            assert not line.startswith("*Measured") or STAMP.match(line), f"{key}: {line}"
        for m in STAMP.finditer(body):
            assert m["command"].startswith(".venv/bin/python bench/"), m[0]
    assert sections["headline"] and measured >= 1


def test_the_readmes_headline_is_the_results_headline():
    from bench.results import HEADLINE, headline_tables

    readme = HEADLINE.search((ROOT / "README.md").read_text())
    assert readme is not None
    assert readme[2] == headline_tables(results_sections()["headline"])
    assert "stamp" in tables_and_stamps(readme[2]) and len(tables_and_stamps(readme[2])) >= 3


def test_results_command_writes_stamped_sections_and_the_headline(tmp_path):
    """bench/results.py --quick, one section, into copies: the section holds each command's
    stamp and tables, the other sections are kept, and the README copy gets the headline."""
    import shutil
    import subprocess
    import sys

    from bench.results import HEADLINE, sections_of

    out, readme = tmp_path / "RESULTS.md", tmp_path / "README.md"
    shutil.copy(ROOT / "docs" / "RESULTS.md", out)
    shutil.copy(ROOT / "README.md", readme)
    before = sections_of(out.read_text())
    cmd = [sys.executable, "bench/results.py", "--quick", "--only", "headline"]
    done = subprocess.run(
        [*cmd, "--out", str(out), "--readme", str(readme)], cwd=ROOT, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    after = sections_of(out.read_text())
    assert {k: v for k, v in after.items() if k != "headline"} == {
        k: v for k, v in before.items() if k != "headline"
    }
    seen = tables_and_stamps(after["headline"])
    assert seen.count("stamp") == 2 and len(seen) >= 4  # two commands, each with its table
    assert "--quick --iters 0" in after["headline"]
    copied = HEADLINE.search(readme.read_text())[2]
    assert tables_and_stamps(copied) == seen
