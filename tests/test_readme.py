"""The documentation's Python examples run as written (the front door and the pages must stay true).

Every ```python block of README.md and of docs/**/*.md runs, each in a fresh namespace. A block that
cannot run here says so on its first line: ``# gpu-only`` (needs an NVIDIA GPU) or ``# not run:
<reason>``; keep such marks rare. Blocks fenced otherwise (plain ``` for shell commands, ```python with
a title or other attributes) are not Python examples and are not run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README] + sorted(DOCS.rglob("*.md"))
SETTINGS_PAGE = DOCS / "settings.md"
SKIP_MARKS = ("# gpu-only", "# not run:")


def _blocks():
    for page in PAGES:
        for i, source in enumerate(re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)):
            yield page.relative_to(ROOT).as_posix(), i, source


BLOCKS = list(_blocks())


def test_readme_and_docs_have_python_examples():
    assert sum(1 for page, _, _ in BLOCKS if page == "README.md") >= 2
    assert sum(1 for page, _, _ in BLOCKS if page.startswith("docs/")) >= 8
    marked = [f"{page}#{i}" for page, i, source in BLOCKS if source.lstrip().startswith(SKIP_MARKS)]
    assert len(marked) <= 3, f"keep the blocks that do not run rare: {marked}"


@pytest.mark.parametrize("page,index,source", BLOCKS, ids=[f"{page}#{i}" for page, i, _ in BLOCKS])
def test_documented_block_runs(page, index, source):
    first = source.lstrip().splitlines()[0] if source.strip() else ""
    if first.startswith(SKIP_MARKS):
        pytest.skip(f"{page} block {index}: {first.lstrip('# ')}")
    namespace: dict = {}
    exec(compile(source, f"{page} (python block {index})", "exec"), namespace)
    if "out2" in namespace:  # the split-op example claims it equals the fused output
        import numpy as np

        np.testing.assert_allclose(namespace["out2"], namespace["out"], rtol=1e-10, atol=1e-10)


def _generated_docs():
    """docs/_ext/generated.py, the MkDocs hook that writes what the site shows from the code."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_generated", DOCS / "_ext" / "generated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_setting_is_documented():
    """The settings page's table is generated from na_rtc.config.SETTINGS at every build: the page holds the
    marker the hook replaces, and the table has one row per setting, nothing else."""
    from na_rtc import config

    generated = _generated_docs()
    assert generated.SETTINGS_MARKER in SETTINGS_PAGE.read_text(), "docs/settings.md lost its table marker"
    table = generated.settings_table()
    documented = re.findall(r"^\| `(\w+)` \| .+ \|$", table, flags=re.M)
    assert documented == list(config.SETTINGS), documented
    assert all(text.strip() for text in config.SETTINGS.values())


def test_the_mkdocs_nav_names_every_page_and_only_pages_that_exist():
    """mkdocs.yml's nav lists every page under docs/ (the design notes included), and every page it lists
    exists; `mkdocs build --strict` checks the same where mkdocs is installed."""
    nav = re.findall(r"^\s*-\s+(?:[^:\n]+:\s+)?([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert set(nav) - pages == set(), f"nav lists missing pages: {sorted(set(nav) - pages)}"
    unlisted = sorted(pages - set(nav))
    assert not unlisted, f"pages not in mkdocs.yml's nav: {unlisted}"
