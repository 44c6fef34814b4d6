"""pytest configuration: markers, shared fixtures, and a summary of why tests were skipped.

Shared helpers (tolerance table, ``assert_close``, ``make_inputs``) live in
``tests/helpers.py``; import them with ``from helpers import ...``.
"""

from collections import Counter

import pytest

#: a skip reason longer than this is cut in the summary (the full text is in ``-rs``'s output)
SKIP_REASON_CHARS = 200


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    """A fresh, empty NVRTC kernel cache for the test (disk and memory)."""
    from na_rtc.runtime import cache

    root = tmp_path / "kernel_cache"
    monkeypatch.setenv("NA_RTC_CACHE_DIR", str(root))
    cache.clear_memory_cache()
    cache.reset_cache_stats()
    yield root
    cache.clear_memory_cache()


def _skip_reason(report) -> str:
    """The reason a skipped test report gives (pytest keeps it as (file, line, "Skipped: reason"))."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    reason = " ".join(reason.removeprefix("Skipped: ").split())
    return reason if len(reason) <= SKIP_REASON_CHARS else reason[:SKIP_REASON_CHARS - 3] + "..."


def skip_summary(reports) -> list[str]:
    """One line per distinct skip reason, most frequent first: ``  <count>  <reason>``."""
    counts = Counter(_skip_reason(report) for report in reports)
    width = len(str(max(counts.values(), default=0)))
    return [f"  {count:>{width}}  {reason}" for reason, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def pytest_terminal_summary(terminalreporter):
    """Say why tests were skipped, one line per reason (a bare count of skips hides a missing package)."""
    skipped = [report for report in terminalreporter.stats.get("skipped", []) if report.skipped]
    if skipped:
        terminalreporter.write_sep("-", f"{len(skipped)} skipped, by reason")
        for line in skip_summary(skipped):
            terminalreporter.write_line(line)
