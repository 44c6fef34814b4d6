"""pytest configuration: marker registration only.

Shared helpers (tolerance table, ``assert_close``, ``make_inputs``) live in
``tests/helpers.py``; import them with ``from helpers import ...``.
"""


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")
