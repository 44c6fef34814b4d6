"""pytest configuration: markers and shared fixtures.

Shared helpers (tolerance table, ``assert_close``, ``make_inputs``) live in
``tests/helpers.py``; import them with ``from helpers import ...``.
"""

import pytest


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
