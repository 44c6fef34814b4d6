"""Locate the kernel sources (``cuda_src``).

The kernels live in one folder, ``cuda_src/`` at the repository root. A wheel
ships that folder inside the package as ``na_rtc/cuda_src`` (package data), so
an installed na_rtc finds it next to its modules. Running from a checkout (an
editable install or ``PYTHONPATH=.``) there is no ``na_rtc/cuda_src``; the
folder is then found at the repository root, one level above the package.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

__all__ = ["cuda_src_dir"]


def cuda_src_dir() -> Path:
    """Return the directory holding the CUDA C kernel sources."""
    installed = importlib.resources.files(__package__) / "cuda_src"
    # A zipped install gives a non-filesystem Traversable: compilers need a path.
    if isinstance(installed, Path) and installed.is_dir():
        return installed
    checkout = Path(__file__).resolve().parent.parent / "cuda_src"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(
        "na_rtc kernel sources not found: looked for "
        f"{installed} (installed package) and {checkout} (source checkout). "
        "Reinstall na_rtc from a wheel, or run from a full checkout."
    )
