"""Array-kind detection that never imports torch or cupy.

A torch tensor or CuPy array can only exist if its library is already
imported, so we look the library up in ``sys.modules`` instead of importing it:
``import na_rtc`` stays free of both.
"""

from __future__ import annotations

import sys

import numpy as np

NUMPY = "numpy"
TORCH = "torch"
CUPY = "cupy"

#: dtype names the kernels and the reference accept, in the order shown to users.
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def kind_of(x) -> str | None:
    """``numpy``, ``torch`` or ``cupy`` for a supported array, else None."""
    if isinstance(x, np.ndarray):
        return NUMPY
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return TORCH
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        return CUPY
    return None


def device_of(x) -> str:
    """``cpu`` or ``cuda:N``."""
    kind = kind_of(x)
    if kind == TORCH:
        return str(x.device) if x.device.type != "cuda" else f"cuda:{x.device.index or 0}"
    if kind == CUPY:
        return f"cuda:{x.device.id}"
    return "cpu"


def dtype_name(x) -> str:
    """Library-independent dtype name, e.g. ``float32`` or ``bfloat16``."""
    if kind_of(x) == TORCH:
        return str(x.dtype).removeprefix("torch.")
    return np.dtype(x.dtype).name


def describe(x) -> str:
    """Short human description used in error messages."""
    kind = kind_of(x)
    if kind == NUMPY:
        return "numpy.ndarray"
    if kind == TORCH:
        return f"torch.Tensor on {device_of(x)}"
    if kind == CUPY:
        return f"cupy.ndarray on {device_of(x)}"
    return type(x).__qualname__
