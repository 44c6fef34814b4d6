"""The cuda executor's host-side logic, testable without a GPU: argument
conversion for CuPy's launcher, the availability reasons, the shared-memory
opt-in (through the recording stand-in of tests/fake_cuda.py), and which
program a kernel's first use loads (its family's where the cache has it, its
own otherwise)."""

from __future__ import annotations

import builtins
import warnings
from pathlib import Path

import numpy as np
import pytest
from fake_cuda import fake_cuda_fixture  # noqa: F401 - the fake_cuda fixture
from helpers import requires_nvrtc

from na_rtc._install import install_command
from na_rtc.runtime import cache, cuda, nvrtc
from na_rtc.runtime import plan as P
from na_rtc.runtime.families import fused_wg
from na_rtc.runtime.registry import Family


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
    from na_rtc import _install

    monkeypatch.setattr(_install, "_libcuda_probe", lambda: (13000, [90]))  # a CUDA 13 driver, here or not
    available, reason = cuda.availability()
    assert not available and install_command("cuda13") in reason


def test_launches_above_48_kib_opt_in_once_per_function(fake_cuda):
    """cudaFuncAttributeMaxDynamicSharedMemorySize is raised before the first launch that needs more than the
    default 48 KiB (the wgmma forward at head dim 128 takes 128 KiB), and only when a launch needs more.
    (Static shared memory counts too: tests/test_launch_glue.py.)"""
    name = fused_wg.kernel_name_of(128, "bfloat16", 1)
    x = fake_cuda.cupy_array(0, (4, 8))
    for shared in (16 * 1024, 48 * 1024, 64 * 1024, 64 * 1024, 32 * 1024, 96 * 1024):
        cuda.run(P.LaunchPlan(P.Kernel("na_fused_wg.cu", name), (1, 1, 1), (128, 1, 1), shared, (P.ptr(x),)))
    assert fake_cuda.attribute_sets == [(name, 64 * 1024), (name, 96 * 1024)]
    assert len(fake_cuda.launches()) == 6


KERNELS = Path(__file__).resolve().parent / "nvrtc_kernels"
TEST_FAMILY = Family(str(KERNELS / "kernels.cu"), ("scale<float, 2>", "na_test::block_sum<float>"))


def _compiles():
    return cache.cache_stats()["compiles"]


@requires_nvrtc
def test_a_first_use_compiles_its_kernel_alone(kernel_cache):
    """Without the family's program in the cache, a kernel's first use compiles that kernel only (a user's
    first call waits for what it runs, not for every instantiation of the family), once."""
    first = cuda.program_for(TEST_FAMILY, "scale<float, 2>", 90)
    assert set(first.lowered) == {"scale<float, 2>"} and _compiles() == 1
    assert cuda.program_for(TEST_FAMILY, "scale<float, 2>", 90) is first and _compiles() == 1
    other = cuda.program_for(TEST_FAMILY, "na_test::block_sum<float>", 90)
    assert set(other.lowered) == {"na_test::block_sum<float>"} and _compiles() == 2


@requires_nvrtc
def test_a_precompiled_family_serves_every_kernel_without_compiling(kernel_cache, monkeypatch):
    """Once the family's whole program is in the cache (python -m na_rtc precompile), every kernel's first
    use loads it, from memory or from disk, and NVRTC never runs."""
    cache.get_program(TEST_FAMILY.source, TEST_FAMILY.names, 90)  # what precompile does
    assert _compiles() == 1

    def no_nvrtc(*args, **kwargs):
        raise AssertionError("NVRTC called although the family's program is cached")

    monkeypatch.setattr(nvrtc, "compile_program", no_nvrtc)
    for name in TEST_FAMILY.names:
        assert set(cuda.program_for(TEST_FAMILY, name, 90).lowered) == set(TEST_FAMILY.names)
    cache.clear_memory_cache()
    assert set(cuda.program_for(TEST_FAMILY, "scale<float, 2>", 90).lowered) == set(TEST_FAMILY.names)
    assert cache.cache_stats()["disk_hits"] == 1


@requires_nvrtc
def test_a_damaged_family_entry_falls_back_to_the_kernel_alone_quietly(kernel_cache):
    """A damaged family entry is not used: the kernel is compiled alone, without the 'recompiling it'
    warning (nothing recompiles the family entry here; precompile does, and warns)."""
    cache.get_program(TEST_FAMILY.source, TEST_FAMILY.names, 90)
    (entry,) = sorted(kernel_cache.glob("sm_90/*.bin"))
    entry.write_bytes(entry.read_bytes()[:-7])
    cache.clear_memory_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        program = cuda.program_for(TEST_FAMILY, "scale<float, 2>", 90)
    assert set(program.lowered) == {"scale<float, 2>"} and _compiles() == 2
    with pytest.warns(cache.KernelCacheWarning, match="unusable"):
        cache.get_program(TEST_FAMILY.source, TEST_FAMILY.names, 90)
