"""The scripts in examples/ run and show what they claim."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(name: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_numpy_example_split_matches_fused():
    out = _run("numpy_na2d.py")
    difference = float(re.search(r"max \|difference\|: (\S+)", out).group(1))
    assert difference < 1e-10
    assert "(4, 13, 13)" in out  # drpb shape


def test_torch_example_loss_decreases():
    losses = [float(x) for x in re.findall(r"loss (\S+)", _run("torch_na2d_layer.py"))]
    assert len(losses) >= 2 and losses[-1] < 0.9 * losses[0]
