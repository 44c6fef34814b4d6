"""What users read names features, never the project's work items or files they do not have.

Users read the command line's help and reports, error and warning messages,
docstrings and the documentation; none of them has the issue tracker, nor the
internal design document the design notes were first kept in (they are now
the pages under ``docs/design/``, which user-facing text may link). The rule:
no text a user can see says "issue 9", "issues 4, 5 and 9", "the issue(s)", a
pull request by number, or cites that internal document by name or section
number. What is scanned:

- every string literal of the package (``na_rtc/**/*.py``): docstrings,
  messages, help texts, report labels; comments are not scanned,
- the documentation a user gets: README.md, the pages under docs/ (the site `make docs`
  builds, the design notes included), benchmarks/README.md, cuda_src/README.md and the Markdown
  shipped inside the wheel,
- what the command line prints: ``--help`` of every command, ``bench --list``
  and ``python -m na_rtc.gpu_check --help``.

(``tests/test_design_links.py`` checks that every ``docs/...`` page and
heading such text cites exists.)
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FORBIDDEN = {
    "a work item by number": re.compile(r"\b(?:issues?|PRs?|pull requests?)\s*#?\d", re.IGNORECASE),
    "the issue tracker": re.compile(r"\bthe\s+issues?\b", re.IGNORECASE),
    "the design notes": re.compile(r"\bDESIGN(?:\.md|\s+section)", re.IGNORECASE),
}

DOCUMENTS = ("README.md", "benchmarks/README.md", "cuda_src/README.md") + tuple(
    p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "docs").rglob("*.md")))
#: the internal document's name and file name, spelled in pieces: the tests below are the only text that may
#: cite it, and tests/test_design_links.py fails on any file that does
OLD_NAME = "DESIGN"
OLD_NOTES = OLD_NAME + ".md"


def violations(text: str, where: str) -> list[str]:
    """``where: what (the words around it)`` for every forbidden phrase in ``text``."""
    found = []
    for what, pattern in FORBIDDEN.items():
        for match in pattern.finditer(text):
            context = " ".join(text[max(0, match.start() - 50):match.end() + 50].split())
            found.append(f"{where}: {what} ({context!r})")
    return found


def _package_strings():
    for path in sorted((ROOT / "na_rtc").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=relative)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                yield f"{relative}:{node.lineno}", node.value


def test_the_rule_catches_what_it_is_for():
    assert violations("print issue 9's acceptance targets", "x")
    assert violations("the exact target shapes of issues 4, 5 and 9", "x")
    assert violations("preset issues: the issues' target shapes", "x")
    assert violations(f"the split ops take no stride ({OLD_NOTES} section 3)", "x")
    assert violations(f"see the design notes, {OLD_NAME} section 2", "x")
    assert not violations("the forward issues the next chunk's products; a product issued twice", "x")
    assert not violations("PTX ISA, section 9.7.3.21", "x")
    assert not violations("the split ops take no stride ([API](docs/design/api.md#functions))", "x")


def test_package_strings_name_no_work_items_or_missing_files():
    found = [hit for where, text in _package_strings() for hit in violations(text, where)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("document", DOCUMENTS + tuple(
    p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "na_rtc").rglob("*.md"))))
def test_documents_name_no_work_items_or_missing_files(document):
    found = violations((ROOT / document).read_text(), document)
    assert not found, "\n".join(found)


def _help(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_command_line_help_and_lists_name_no_work_items(capsys):
    from na_rtc import gpu_check
    from na_rtc.__main__ import COMMANDS, main

    printed = {"python -m na_rtc --help": _help(main, ["--help"], capsys)}
    for name in COMMANDS:
        printed[f"python -m na_rtc {name} --help"] = _help(main, [name, "--help"], capsys)
    assert main(["bench", "--list"]) == 0
    printed["python -m na_rtc bench --list"] = capsys.readouterr().out
    printed["python -m na_rtc.gpu_check --help"] = _help(gpu_check.main, ["--help"], capsys)
    found = [hit for command, text in printed.items() for hit in violations(text, command)]
    assert not found, "\n".join(found)
    assert "targets" in printed["python -m na_rtc bench --list"]
