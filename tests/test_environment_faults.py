"""Environment faults (issue 8, part 5): each state of a machine that cannot
run a backend, simulated by replacing modules and probes, with the message
the user gets from the call and from ``python -m na_rtc info``.

The states: cupy missing, NVRTC library missing, no GPU, a GPU newer than
NVRTC knows (PTX), a GPU too old for NVRTC 13, a driver too old for the
NVRTC, no C++ compiler for the emulator. Nothing here needs a GPU.
"""

from __future__ import annotations

import re
import sys
import types

import numpy as np
import pytest

import na_rtc
from na_rtc import _environment as env
from na_rtc import _install
from na_rtc import backends
from na_rtc.__main__ import main
from na_rtc._install import install_command
from na_rtc.emulator import build
from na_rtc.runtime.registry import Family
from na_rtc.runtime import cuda, device, nvrtc

ARCHS_13 = [75, 80, 86, 87, 89, 90, 100, 103, 110, 120, 121]


class CUDARuntimeError(RuntimeError):
    pass


class CUDADriverError(RuntimeError):
    pass


def fake_cupy(*, devices=(90,), driver=13000, count_error=None, load_error=None) -> types.ModuleType:
    """A cupy stand-in: GPUs of the given archs, a driver version, optionally
    failing device queries (no driver) or module loads (a refused image)."""

    def get_device_count():
        if count_error is not None:
            raise count_error
        return len(devices)

    def properties(index):
        arch = devices[index]
        return {"name": b"Test GPU", "major": arch // 10, "minor": arch % 10, "totalGlobalMem": 16 * 2**30}

    class Module:
        def load(self, image):
            if load_error is not None:
                raise load_error
            self.image = image

        def get_function(self, name):
            return name

    class Device:
        def __init__(self, index=0):
            self.compute_capability = str(devices[index])

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            return False

    def attribute(which, index):  # cudaDevAttrComputeCapabilityMajor (75) and Minor (76)
        return {75: devices[index] // 10, 76: devices[index] % 10}[which]

    module = types.ModuleType("cupy")
    module.__version__ = "14.0.0"
    runtime = types.SimpleNamespace(getDeviceCount=get_device_count, driverGetVersion=lambda: driver,
                                    getDeviceProperties=properties, CUDARuntimeError=CUDARuntimeError,
                                    deviceGetAttribute=attribute, deviceAttributeComputeCapabilityMajor=75,
                                    deviceAttributeComputeCapabilityMinor=76)
    module.cuda = types.SimpleNamespace(runtime=runtime, Device=Device,
                                        function=types.SimpleNamespace(Module=Module))
    return module


def fake_nvrtc_bindings(version=(13, 0), archs=ARCHS_13, broken=False) -> dict[str, types.ModuleType]:
    """``cuda.bindings.nvrtc`` reporting ``version`` and ``archs``, or whose
    library does not load (``broken``)."""
    module = types.ModuleType("cuda.bindings.nvrtc")

    def version_of():
        if broken:
            raise RuntimeError("Failed to dlopen libnvrtc.so.13")
        return (0, *version)

    module.nvrtcVersion = version_of
    module.nvrtcGetSupportedArchs = lambda: (0, list(archs))
    bindings = types.ModuleType("cuda.bindings")
    bindings.nvrtc = module
    package = types.ModuleType("cuda")
    package.bindings = bindings
    return {"cuda": package, "cuda.bindings": bindings, "cuda.bindings.nvrtc": module}


def _forget_probes():
    for cached in (nvrtc._module, nvrtc.nvrtc_version, nvrtc._supported_archs, backends._probe, build._compiler_version):
        cached.cache_clear()


@pytest.fixture(autouse=True)
def fresh_probes(monkeypatch):
    """Every test starts and ends with no remembered probe result."""
    _forget_probes()
    monkeypatch.setattr(_install, "_libcuda_probe", lambda: (None, []))  # this machine has no driver either way
    monkeypatch.setattr(device, "_capabilities", {})  # the fake GPUs' archs stay in this test
    yield
    monkeypatch.undo()
    _forget_probes()


def install(monkeypatch, *, cupy=None, nvrtc_modules=None, block=()):
    if cupy is not None:
        monkeypatch.setitem(sys.modules, "cupy", cupy)
    for name, module in (nvrtc_modules or {}).items():
        monkeypatch.setitem(sys.modules, name, module)
    for name in block:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` fails as if not installed


def dispatch_cuda(kind="torch"):
    """Dispatch a CUDA torch tensor or CuPy array as a call would, up to the
    kernels (torch calls probe the backend when their op runs)."""
    return backends.select(types.SimpleNamespace(kind=kind, device="cuda:0", ndim=2, group=1)).ops


# ---------------------------------------------------------------- cupy missing


EXTRA_CASES = {
    "cuda13-driver": ((13000, [90]), f"{install_command('cuda13')} (driver CUDA 13.0, sm_90)", "cuda12"),
    "cuda12-driver": ((12040, [90]), f"{install_command('cuda12')} (driver CUDA 12.4 is older than CUDA 13)", "cuda13"),
    "v100": ((13000, [70]), f"{install_command('cuda12')} (NVRTC 13 does not compile for sm_70", "cuda13"),
    "no-driver": ((None, []), f"{install_command('cuda13')} (CUDA 13 driver, sm_75+) or {install_command('cuda12')}",
                  None),
}


@pytest.mark.parametrize("probe, expected, absent", EXTRA_CASES.values(), ids=EXTRA_CASES.keys())
def test_cupy_missing_names_the_extra_for_this_machine(monkeypatch, probe, expected, absent):
    install(monkeypatch, block=["cupy"])
    monkeypatch.setattr(_install, "_libcuda_probe", lambda: probe)
    available, reason = cuda.availability()
    assert not available and "cupy is not importable" in reason and expected in reason
    assert absent is None or absent not in reason
    assert expected in env.gpus().text
    with pytest.raises(RuntimeError, match=r"the cuda backend is not available here: cupy is not importable") as info:
        dispatch_cuda()
    assert expected in str(info.value)


# ---------------------------------------------------------------- NVRTC missing


def test_nvrtc_library_missing(monkeypatch):
    install(monkeypatch, cupy=fake_cupy(), nvrtc_modules=fake_nvrtc_bindings(broken=True))
    with pytest.raises(nvrtc.NvrtcUnavailable, match=r"libnvrtc\) could not be loaded .*" + re.escape(install_command("cuda13"))):
        nvrtc.nvrtc_version()
    available, reason = cuda.availability()
    assert not available and reason.startswith("NVRTC is not usable") and "libnvrtc" in reason
    verdict = env.hardware_verdict()
    assert not verdict.ok and "GPU found but NVRTC is not usable" in verdict.text


def test_nvrtc_bindings_missing(monkeypatch):
    install(monkeypatch, cupy=fake_cupy(), block=["cuda", "cuda.bindings", "cuda.bindings.nvrtc"])
    with pytest.raises(nvrtc.NvrtcUnavailable, match=r"cuda.bindings\) are not installed .*" + re.escape(install_command("cuda12"))):
        nvrtc.compile_program("na_naive.cu", ["x"], 90)
    assert "not installed" in env.nvrtc_version().text


# ---------------------------------------------------------------- no GPU


def test_no_gpu_for_a_cuda_request(monkeypatch):
    error = CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
    install(monkeypatch, cupy=fake_cupy(count_error=error), nvrtc_modules=fake_nvrtc_bindings())
    available, reason = cuda.availability()
    assert not available and "no usable GPU or CUDA driver (CUDARuntimeError: cudaErrorNoDevice" in reason
    with pytest.raises(RuntimeError, match=r"cuda backend is not available here: no usable GPU"):
        dispatch_cuda("cupy")
    verdict = env.hardware_verdict()
    assert verdict.text.startswith("no GPU: CPU arrays run on the blocked backend")


def test_zero_devices_for_a_cuda_request(monkeypatch):
    install(monkeypatch, cupy=fake_cupy(devices=()), nvrtc_modules=fake_nvrtc_bindings())
    available, reason = cuda.availability()
    assert not available and "no GPU found" in reason and "CUDA_VISIBLE_DEVICES" in reason


def test_forcing_cuda_on_cpu_arrays_names_the_mismatch():
    q = np.zeros((1, 8, 1, 4), np.float32)
    with na_rtc.use_backend("cuda"), pytest.raises(ValueError, match=r"the cuda backend cannot run numpy arrays on CPU"):
        na_rtc.na1d(q, q, q, 3)


# ---------------------------------------------------------------- GPU arch vs NVRTC


def test_a_gpu_newer_than_nvrtc_gets_ptx(monkeypatch):
    assert nvrtc.target_for(130, ARCHS_13) == ("ptx", "compute_121")
    install(monkeypatch, cupy=fake_cupy(devices=(130,), driver=13050), nvrtc_modules=fake_nvrtc_bindings((13, 5)))
    verdict = env.hardware_verdict()
    assert verdict.ok and "supported through PTX (sm_130 is newer than NVRTC 13.5 knows" in verdict.text


def test_a_gpu_too_old_for_nvrtc_13_points_to_cuda12(monkeypatch):
    with pytest.raises(nvrtc.ArchUnsupported, match=r"cannot compile for sm_70.*" + re.escape(install_command("cuda12"))):
        nvrtc.target_for(70, ARCHS_13)
    install(monkeypatch, cupy=fake_cupy(devices=(70,)), nvrtc_modules=fake_nvrtc_bindings((13, 0)))
    verdict = env.hardware_verdict()
    assert not verdict.ok and f"unsupported with NVRTC 13.0 (sm_75+ only): {install_command('cuda12')}" in verdict.text


# ---------------------------------------------------------------- driver too old


def test_a_driver_older_than_nvrtc_is_named_by_info(monkeypatch):
    install(monkeypatch, cupy=fake_cupy(driver=12040), nvrtc_modules=fake_nvrtc_bindings((13, 0)))
    verdict = env.hardware_verdict()
    assert not verdict.ok and "driver supports CUDA 12.4, older than NVRTC 13" in verdict.text


def test_a_driver_too_old_for_the_ptx_of_this_nvrtc(monkeypatch):
    install(monkeypatch, cupy=fake_cupy(devices=(130,), driver=13000), nvrtc_modules=fake_nvrtc_bindings((13, 5)))
    verdict = env.hardware_verdict()
    assert not verdict.ok and "needs PTX from NVRTC 13.5, but the driver supports CUDA 13.0" in verdict.text


def _program(kind="ptx", target="compute_120"):
    return nvrtc.CompiledProgram(binary=b"// ptx", kind=kind, lowered={"k": "k"}, log="", compile_seconds=0.0,
                                 arch=130, target=target, options=())


@pytest.mark.parametrize("code", ["CUDA_ERROR_UNSUPPORTED_PTX_VERSION", "CUDA_ERROR_NO_BINARY_FOR_GPU"])
def test_a_module_the_driver_refuses_says_why(monkeypatch, code):
    refused = CUDADriverError(f"{code}: the provided PTX was compiled with an unsupported toolchain.")
    install(monkeypatch, cupy=fake_cupy(devices=(130,), driver=12040, load_error=refused))
    monkeypatch.setattr(cuda, "program_for", lambda *args, **kwargs: _program())
    monkeypatch.setattr(nvrtc, "nvrtc_version", lambda: (13, 0))
    monkeypatch.setattr(cuda, "_modules", {})
    with pytest.raises(RuntimeError, match=r"the CUDA driver \(CUDA 12.4\) cannot load the ptx that NVRTC 13.0 "
                                           r"compiled for compute_120 on GPU 0 .*Update the driver") as info:
        cuda._module(0, Family("fake.cu", ("k",)), "k")
    assert code in str(info.value) and info.value.__cause__ is refused


def test_other_load_errors_pass_through(monkeypatch):
    out_of_memory = CUDADriverError("CUDA_ERROR_OUT_OF_MEMORY: out of memory")
    install(monkeypatch, cupy=fake_cupy(load_error=out_of_memory))
    monkeypatch.setattr(cuda, "program_for", lambda *args, **kwargs: _program("cubin", "sm_90"))
    monkeypatch.setattr(cuda, "_modules", {})
    with pytest.raises(CUDADriverError) as info:
        cuda._module(0, Family("fake.cu", ("k",)), "k")
    assert info.value is out_of_memory


# ---------------------------------------------------------------- no C++ compiler


def test_no_cxx_compiler_for_the_emulator(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    available, reason = build.available()
    assert not available and "found none on PATH; install one (e.g. `apt install g++`) or set CXX" in reason
    q = np.zeros((1, 8, 1, 4), np.float32)
    with na_rtc.use_backend("emulator"), pytest.raises(RuntimeError, match=r"emulator backend is not available here: "
                                                                          r"the emulator needs a C\+\+ compiler"):
        na_rtc.na1d(q, q, q, 3)


def test_cxx_naming_no_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    available, reason = build.available()
    assert not available and "CXX='/nonexistent/g++' is not an executable" in reason


# ---------------------------------------------------------------- `python -m na_rtc info` shows each state


def _state_cupy_missing(monkeypatch):
    install(monkeypatch, block=["cupy"])
    monkeypatch.setattr(_install, "_libcuda_probe", lambda: (12040, [80]))


def _state_nvrtc_missing(monkeypatch):
    install(monkeypatch, cupy=fake_cupy(), nvrtc_modules=fake_nvrtc_bindings(broken=True))


def _state_no_gpu(monkeypatch):
    error = CUDARuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")
    install(monkeypatch, cupy=fake_cupy(count_error=error), nvrtc_modules=fake_nvrtc_bindings())


def _state_newer_arch(monkeypatch):
    install(monkeypatch, cupy=fake_cupy(devices=(130,), driver=13050), nvrtc_modules=fake_nvrtc_bindings((13, 5)))


def _state_too_old_arch(monkeypatch):
    install(monkeypatch, cupy=fake_cupy(devices=(70,)), nvrtc_modules=fake_nvrtc_bindings((13, 0)))


def _state_old_driver(monkeypatch):
    install(monkeypatch, cupy=fake_cupy(driver=12040), nvrtc_modules=fake_nvrtc_bindings((13, 0)))


def _state_no_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")


INFO_STATES = {
    "cupy-missing": (_state_cupy_missing, ["CuPy not installed", f"{install_command('cuda12')} (driver CUDA 12.4",
                                           "cuda no"]),
    "nvrtc-missing": (_state_nvrtc_missing, ["bindings present, library not loadable", "libnvrtc",
                                             "GPU found but NVRTC is not usable"]),
    "no-gpu": (_state_no_gpu, ["no GPU or no CUDA driver (CUDARuntimeError: cudaErrorInsufficientDriver",
                               "no GPU: CPU arrays run on the blocked backend"]),
    "newer-arch": (_state_newer_arch, ["sm_130", "supported through PTX"]),
    "too-old-arch": (_state_too_old_arch, ["sm_70", f"unsupported with NVRTC 13.0 (sm_75+ only): {install_command('cuda12')}"]),
    "old-driver": (_state_old_driver, ["driver CUDA 12.4", "older than NVRTC 13: update the driver"]),
    "no-compiler": (_state_no_compiler, ["emulator no", "CXX='/nonexistent/c++' is not an executable"]),
}


@pytest.mark.parametrize("state, expected", INFO_STATES.values(), ids=INFO_STATES.keys())
def test_info_shows_the_state(monkeypatch, capsys, state, expected):
    state(monkeypatch)
    assert main(["info"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # columns are padded: compare words
    missing = [text for text in expected if text not in out]
    assert not missing, f"info lacks {missing}:\n{out}"
