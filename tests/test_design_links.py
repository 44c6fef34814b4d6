"""Every citation of a documentation page names a page and a heading that exist.

Comments, docstrings, tests and the Markdown documents cite the design notes
by path: ``docs/design/definition.md``, or with a heading anchor,
``docs/design/definition.md#dilation-groups``. This test reads the repository's
text files (the files git tracks or would track: ``.py``, ``.md``, ``.cu``,
``.cuh``, ``.toml`` and the Makefile), finds every ``docs/<path>.md`` with an
optional ``#anchor``, and fails, listing ``file:line``, when the page does not
exist or the anchor is not one of the page's heading slugs. Relative links
between the pages under ``docs/`` (``[text](definition.md#logits-and-scale)``)
are checked the same way. Slugs are computed as MkDocs' Markdown ``toc``
extension computes them: the heading's text, lowercased, without characters
other than word characters, spaces and hyphens, runs of spaces and hyphens
made one hyphen (a repeated heading gets ``_1``, ``_2``, ...).

The old internal design document is not in the repository, so no text may
name it: any mention of it fails too (this file excepted).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUFFIXES = {".py", ".md", ".cu", ".cuh", ".toml"}
NAMES = {"Makefile"}
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()

#: docs/<path>.md, optionally #anchor, not part of a longer path (``foo/docs/x.md``) or word
REFERENCE = re.compile(r"(?<![\w./-])(docs/[\w./-]*?\.md)(?:#([\w-]+))?")
#: a relative Markdown link inside a page under docs/: ](page.md) or ](page.md#anchor)
RELATIVE_LINK = re.compile(r"\]\((?!https?:|/|#)([\w./-]+\.md)(?:#([\w-]+))?\)")
OLD_DOCUMENT = re.compile(r"DESIGN\.md|\bDESIGN\s+(?:section|notes)\b")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def slugify(text: str) -> str:
    """The anchor Python-Markdown's ``toc`` extension gives a heading with this text."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text only
    text = text.replace("`", "").replace("*", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def heading_slugs(markdown: str) -> set[str]:
    """Every heading anchor of a Markdown page (headings inside fenced code blocks are not headings)."""
    slugs: set[str] = set()
    fenced = False
    for line in markdown.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match:
            slug = base = slugify(match.group(2))
            count = 0
            while slug in slugs:
                count += 1
                slug = f"{base}_{count}"
            slugs.add(slug)
    return slugs


def text_files(root: Path) -> list[str]:
    """The repository's text files as git lists them (tracked, and new files git does not ignore)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    return sorted(path for path in set(listed)
                  if (Path(path).suffix in SUFFIXES or Path(path).name in NAMES) and (root / path).is_file())


def _problem(root: Path, page: str, anchor: str | None, slugs_of: dict) -> str | None:
    target = root / page
    if not target.is_file():
        return f"{page} does not exist"
    if anchor is None:
        return None
    if page not in slugs_of:
        slugs_of[page] = heading_slugs(target.read_text())
    if anchor not in slugs_of[page]:
        return f"{page} has no heading #{anchor}"
    return None


def broken_references(root: Path, files: list[str]) -> list[str]:
    """``file:line: what is wrong`` for every citation of a missing page or heading, and every mention
    of the old design document."""
    found: list[str] = []
    slugs_of: dict[str, set[str]] = {}
    for path in files:
        in_docs = path.startswith("docs/") and path.endswith(".md")
        for number, line in enumerate((root / path).read_text(errors="replace").splitlines(), 1):
            where = f"{path}:{number}"
            for match in REFERENCE.finditer(line):
                problem = _problem(root, match.group(1), match.group(2), slugs_of)
                if problem:
                    found.append(f"{where}: {problem}")
            if in_docs:
                for match in RELATIVE_LINK.finditer(line):
                    page = (Path(path).parent / match.group(1)).as_posix()
                    problem = _problem(root, page, match.group(2), slugs_of)
                    if problem:
                        found.append(f"{where}: {match.group(0)}: {problem}")
            if OLD_DOCUMENT.search(line):
                found.append(f"{where}: names the old design document, which is not in the repository: "
                             f"{line.strip()[:120]!r}")
    return found


def test_slugs_are_the_toc_extensions():
    assert slugify("The window, per axis") == "the-window-per-axis"
    assert slugify("GQA and MQA") == "gqa-and-mqa"
    assert slugify("Layers: `NeighborhoodAttention1D` / `NeighborhoodAttention2D`") == (
        "layers-neighborhoodattention1d-neighborhoodattention2d")
    assert slugify("A kernel's path: four files") == "a-kernels-path-four-files"
    assert heading_slugs("# A\n```\n# not a heading\n```\n## A\n### B c\n") == {"a", "a_1", "b-c"}


def test_the_check_catches_what_it_is_for(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## The window, per axis\n\n[x](other.md#nowhere)\n")
    (tmp_path / "docs" / "other.md").write_text("# Other\n")
    (tmp_path / "a.py").write_text(
        "# docs/page.md#the-window-per-axis is fine, docs/page.md too\n"
        "# docs/page.md#the-window\n"
        "# docs/missing.md\n"
        "# see DESIGN" ".md section 2\n")
    found = broken_references(tmp_path, ["a.py", "docs/page.md", "docs/other.md"])
    assert [f.split(": ")[0] for f in found] == ["a.py:2", "a.py:3", "a.py:4", "docs/page.md:5"], found


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_every_docs_reference_names_an_existing_page_and_heading():
    files = text_files(ROOT)
    assert "docs/design/definition.md" in files
    # this file's own examples (broken on purpose, and the old name) are not citations
    found = broken_references(ROOT, [path for path in files if path != THIS])
    assert not found, "\n".join(found)
