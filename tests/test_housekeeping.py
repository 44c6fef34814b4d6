"""What a developer meets around the code: the test run's skip summary, files git should not see, and the
environment ``make venv`` builds (only what ``make test`` needs; the rest where it is used)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_skips_are_counted_by_reason(tmp_path):
    """A bare "410 skipped" hides a missing package; the summary gives one line per reason, most first."""
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.parametrize("i", range(3))
        def test_needs_a_thing(i):
            pytest.skip("needs a thing")

        @pytest.mark.skipif(True, reason="no usable GPU")
        def test_gpu():
            pass

        def test_runs():
            pass
    """))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    [start] = [i for i, line in enumerate(lines) if "4 skipped, by reason" in line]
    assert lines[start + 1:start + 3] == ["  3  needs a thing", "  1  no usable GPU"], done.stdout


def test_demo_example_and_docs_outputs_are_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    outputs = ["na_rtc_demo.png", "nat_digits_nat.png", "nat_digits_dinat.png", "site/index.html"]
    done = subprocess.run(["git", "check-ignore", "--no-index", *outputs], cwd=ROOT, capture_output=True, text=True)
    assert done.stdout.split() == outputs, done.stdout + done.stderr


def _make_dry_run(target: str, tmp_path: Path) -> str:
    """The commands ``make TARGET`` would run to set up a .venv that does not exist yet."""
    if shutil.which("make") is None:
        pytest.skip("no make")
    done = subprocess.run(["make", "-n", target, f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _installs(commands: str) -> list[str]:
    return [line for line in commands.splitlines() if re.search(r"pip install (?!--upgrade pip)", line)]


def test_make_venv_installs_what_the_tests_need_and_no_more(tmp_path):
    """make venv: the tests' tools and the docs site's (small, pure Python: make docs runs on the same .venv);
    nothing heavier."""
    installs = _installs(_make_dry_run("venv", tmp_path))
    assert any('-e ".[tests,docs]"' in line for line in installs), installs
    assert not any(word in line for line in installs for word in ("nvrtc", "examples", "build")), installs


@pytest.mark.parametrize("target, extra", [("check-all", '-e ".[nvrtc]"'), ("venv-nvrtc", '-e ".[nvrtc]"'),
                                           ("venv-examples", '-e ".[examples]"'), ("wheel", "pip install build")])
def test_the_rest_is_installed_by_the_targets_that_use_it(tmp_path, target, extra):
    installs = _installs(_make_dry_run(target, tmp_path))
    assert any(extra in line for line in installs), installs


def test_ci_adds_the_extras_before_the_tests_that_use_them():
    """CI's own steps need NVRTC (check) and scikit-learn (the examples' test): it installs both before
    ``make test``, so that nothing it can run is skipped there."""
    script = (ROOT / ".ci" / "run").read_text()
    extras, tests = script.index("make venv-nvrtc venv-examples"), script.index("\nmake test\n")
    assert script.index("\nmake venv\n") < extras < tests
    assert "make wheel" in script  # the wheel step installs its build tool through the Makefile


#: the documents that cite tests as ``tests/<file>.py::<test>``
CITING = ("README.md", "benchmarks/README.md", "cuda_src/README.md") + tuple(
    p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "docs").rglob("*.md")))


def test_every_test_the_documents_cite_exists():
    """A row of docs/reliability.md is only as good as the test it names: a renamed or removed test leaves the row
    citing nothing. Every cited ``file::test`` must be a test function (or class) defined in that file."""
    cited = set()
    for document in CITING:
        cited |= set(re.findall(r"(tests/test_\w+\.py)::(\w+)", (ROOT / document).read_text()))
    assert len(cited) > 50  # the pattern still finds the citations
    missing = sorted(f"{path}::{name}" for path, name in cited
                     if not re.search(rf"^(?:def|class|async def) {name}\b", (ROOT / path).read_text()
                                      if (ROOT / path).exists() else "", re.MULTILINE))
    assert not missing, "documents cite tests that do not exist:\n" + "\n".join(missing)
