"""The cuda executor's host-side logic, testable without a GPU: argument
conversion for CuPy's launcher and the availability reasons."""

from __future__ import annotations

import builtins

import numpy as np

from na_rtc.runtime import cuda
from na_rtc.runtime import plan as P


def test_arguments_become_exact_width_numpy_scalars():
    array = np.zeros(4, np.float32)
    converted = [cuda._argument(a) for a in (P.ptr(array), P.Arg("ptr", None), P.i64(-3), P.i32(7), P.f32(0.5),
                                             P.f64(-np.inf))]
    assert converted[0] == np.uint64(array.ctypes.data) and converted[0].dtype == np.uint64
    assert converted[1] == 0 and converted[1].dtype == np.uint64  # null pointer for an absent tensor
    assert [c.dtype for c in converted[2:]] == [np.int64, np.int32, np.float32, np.float64]
    assert converted[2] == -3 and converted[5] == -np.inf


def test_unavailable_without_cupy_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_cupy(name, *args, **kwargs):
        if name == "cupy" or name.startswith("cupy."):
            raise ImportError("No module named 'cupy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cupy)
    from na_rtc import _environment

    monkeypatch.setattr(_environment, "_libcuda_probe", lambda: (13000, [90]))  # a CUDA 13 driver, here or not
    available, reason = cuda.availability()
    assert not available and "pip install 'na_rtc[cuda13]'" in reason
