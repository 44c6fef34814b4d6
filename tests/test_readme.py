"""The README's Python examples run as written (the front door must stay true)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("source", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(source):
    namespace: dict = {}
    exec(compile(source, str(README), "exec"), namespace)
    if "out2" in namespace:  # the split-op example claims it equals the fused output
        import numpy as np

        np.testing.assert_allclose(namespace["out2"], namespace["out"], rtol=1e-10, atol=1e-10)


def test_every_setting_is_documented():
    from na_rtc import config

    text = README.read_text()
    missing = [name for name in config.SETTINGS if f"`{name}`" not in text]
    assert not missing, f"settings missing from README's settings table: {missing}"
