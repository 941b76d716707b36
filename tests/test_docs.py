"""Every method-note citation in the shipped files names a file and a section that exist in this repository."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITATION = re.compile(r"docs/methods/([a-z_]+)\.md`{0,2}(?:\s*§(\d+)(?:\.(\d+))?)?")


def _tracked(*patterns):
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / p for p in out.stdout.split()]


def _sections(note: Path) -> set[str]:
    """'4' for '## 4. ...', '1.7' for '### 1.7 ...'."""
    found = set()
    for line in note.read_text().splitlines():
        m = re.match(r"#{2,3} (\d+)(?:\.(\d+))?[. ]", line)
        if m:
            found.add(m.group(1) if m.group(2) is None else f"{m.group(1)}.{m.group(2)}")
    return found


def test_every_citation_points_at_a_note_and_section_that_exist():
    files = _tracked("*.py", "*.md", "*.yaml", "*.ipynb")
    cited = 0
    for path in files:
        for m in CITATION.finditer(path.read_text(errors="replace")):
            note = ROOT / "docs" / "methods" / f"{m.group(1)}.md"
            assert note.is_file(), f"{path.relative_to(ROOT)} cites {note.relative_to(ROOT)}, which does not exist"
            if m.group(2):
                section = m.group(2) if m.group(3) is None else f"{m.group(2)}.{m.group(3)}"
                assert section in _sections(note) or m.group(2) in _sections(note), (
                    f"{path.relative_to(ROOT)} cites §{section} of {note.name}, which has {sorted(_sections(note))}"
                )
            cited += 1
    assert cited >= 25  # the strategies, configs, tests and README all cite the notes


def test_no_shipped_file_cites_notes_users_do_not_have():
    bare = re.compile(r"(?<![\w/])(?:shared/|\.\./shared|(?<!docs/)methods/[a-z_]+\.md)")
    offenders = [
        str(p.relative_to(ROOT))
        for p in _tracked("*.py", "*.md", "*.yaml", "*.ipynb", "*.cu", "*.cpp", "*.cfg", "*.toml")
        if p != Path(__file__).resolve() and bare.search(p.read_text(errors="replace"))  # this file holds the pattern
    ]
    assert offenders == []


def test_one_note_per_method_with_what_the_issue_asks():
    for method in ("fsa", "mos", "mamba_fscil", "zscl", "dkvb"):
        text = (ROOT / "docs" / "methods" / f"{method}.md").read_text()
        assert "github.com/" in text and "commit" in text, method  # the official code it follows
        assert re.search(r"`[\w/]+\.py:\d+", text), method  # a file and line of it
        assert "differences that remain" in text.lower(), method
