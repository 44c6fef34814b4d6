"""The cuda executor's host-side logic, testable without a GPU: argument
conversion for CuPy's launcher and the availability reasons."""

from __future__ import annotations

import builtins

import numpy as np

from na_rtc.runtime import cuda, fused_wg
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


def test_launches_above_48_kib_opt_in_once_per_function(monkeypatch):
    """cudaFuncAttributeMaxDynamicSharedMemorySize is raised before the first launch that needs more than the
    default 48 KiB (the wgmma forward at head dim 128 takes 128 KiB), and only when a launch needs more."""
    import sys
    import types

    calls = []
    driver = types.ModuleType("cupy_backends.cuda.api.driver")
    driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
    driver.funcSetAttribute = lambda function, attribute, value: calls.append((function, attribute, value))
    api = types.ModuleType("cupy_backends.cuda.api")
    api.driver = driver
    for name, module in (("cupy_backends", types.ModuleType("cupy_backends")),
                         ("cupy_backends.cuda", types.ModuleType("cupy_backends.cuda")),
                         ("cupy_backends.cuda.api", api), ("cupy_backends.cuda.api.driver", driver)):
        monkeypatch.setitem(sys.modules, name, module)
    name = fused_wg.kernel_name_of(128, "bfloat16", 1)
    module = types.SimpleNamespace(get_function=lambda mangled: types.SimpleNamespace(ptr=1234, name=mangled))
    functions: dict = {}
    monkeypatch.setattr(cuda, "_module", lambda device, family: (module, {name: "_Z3wg"}, functions))
    kernel = P.Kernel("na_fused_wg.cu", name)
    for shared in (16 * 1024, 48 * 1024, 64 * 1024, 64 * 1024, 32 * 1024, 96 * 1024):
        assert cuda._function(0, kernel, shared).name == "_Z3wg"
    assert calls == [(1234, 8, 64 * 1024), (1234, 8, 96 * 1024)]
