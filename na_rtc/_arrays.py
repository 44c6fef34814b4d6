"""Array-kind detection that never imports torch or cupy.

A torch tensor or CuPy array can only exist if its library is already
imported, so we look the library up in ``sys.modules`` instead of importing it:
``import na_rtc`` stays free of both.
"""

from __future__ import annotations

import sys

import numpy as np

from .runtime import device as _device

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


# ---------------------------------------------------------------- for kernel launches
# (each uses the array's own library, which is imported whenever such an array exists). CuPy allocates,
# copies and fills on the *current* device's current stream, so its arrays are made and filled under the
# array's device guard: on that device, on the stream a launch there uses. torch ops follow the tensor's
# own device and its current stream by themselves.


def element_strides(x) -> tuple[int, ...]:
    """Strides in elements (NumPy and CuPy report bytes, torch elements)."""
    if kind_of(x) == TORCH:
        return x.stride()  # a tuple of ints already
    itemsize = x.itemsize
    return tuple(int(s) // itemsize for s in x.strides)


def data_ptr(x) -> int:
    """Address of the first element of the view."""
    kind = kind_of(x)
    if kind == TORCH:
        return int(x.data_ptr())
    if kind == CUPY:
        return int(x.data.ptr)
    return int(x.ctypes.data)


def library_dtype(like, dtype: str):
    """``dtype`` (a name from FLOAT_DTYPES) as the dtype object of ``like``'s library."""
    if kind_of(like) == TORCH:
        return getattr(sys.modules["torch"], dtype)
    return np.dtype(dtype)


def empty(like, shape, dtype: str):
    """An uninitialized contiguous array of ``like``'s kind and device."""
    kind = kind_of(like)
    if kind == TORCH:
        return sys.modules["torch"].empty(tuple(shape), dtype=library_dtype(like, dtype), device=like.device)
    if kind == CUPY:
        with _device.guard(like):
            return sys.modules["cupy"].empty(tuple(shape), dtype=dtype)
    return np.empty(tuple(shape), dtype=dtype)


def zeros(like, shape, dtype: str):
    """A zero-filled contiguous array of ``like``'s kind and device."""
    out = empty(like, shape, dtype)
    if kind_of(out) == CUPY:
        with _device.guard(out):
            out[...] = 0
    else:
        out[...] = 0
    return out


def cast(x, dtype: str):
    """``x`` in ``dtype`` (no copy when it already is)."""
    if dtype_name(x) == dtype:
        return x
    kind = kind_of(x)
    if kind == TORCH:
        return x.to(library_dtype(x, dtype))
    if kind == CUPY:
        with _device.guard(x):
            return x.astype(dtype)
    return x.astype(dtype)
