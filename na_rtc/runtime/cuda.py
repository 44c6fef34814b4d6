"""The ``cuda`` executor: launch plans on the GPU through CuPy.

Kernels are compiled by NVRTC (through the disk cache) for the device's
architecture and loaded as CuPy modules: a family's whole program where the
cache holds it (``precompile``), otherwise each kernel's own, compiled at its
first use (:func:`program_for`).
Inputs may be CuPy arrays or CUDA torch tensors; torch launches go on torch's
current stream of the tensor's device, so they order with the surrounding
torch work without any synchronization.
"""

from __future__ import annotations

import functools
import sys
import threading

import numpy as np

from .. import _arrays
from .._resources import cuda_src_dir
from . import plan as P
from .families import family_of

_NUMPY_SCALARS = {"i64": np.int64, "i32": np.int32, "f32": np.float32, "f64": np.float64}
_modules: dict = {}
_lock = threading.Lock()


def availability() -> tuple[bool, str]:
    """Whether CuPy, a GPU and NVRTC are usable here, and why not."""
    from .._environment import cuda_install_hint

    try:
        import cupy
    except Exception as error:  # ImportError, or a broken CUDA install
        return False, f"cupy is not importable ({error}); {cuda_install_hint()}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        return False, (f"no usable GPU or CUDA driver ({type(error).__name__}: {first_line}); "
                       "CPU arrays run on the reference or emulator backend")
    if count == 0:
        return False, "no GPU found (CUDA reports 0 devices; check CUDA_VISIBLE_DEVICES)"
    try:
        from . import nvrtc

        nvrtc.nvrtc_version()
    except Exception as error:
        return False, f"NVRTC is not usable ({error})"
    return True, f"{count} GPU(s); CuPy arrays and CUDA torch tensors"


def _device_index(array) -> int:
    if _arrays.kind_of(array) == _arrays.TORCH:
        return array.device.index if array.device.index is not None else sys.modules["torch"].cuda.current_device()
    return array.device.id


@functools.lru_cache(maxsize=None)  # a device's architecture does not change within a process
def _arch(index: int) -> int:
    import cupy

    return int(cupy.cuda.Device(index).compute_capability)  # "90" -> 90


def arch_of(device: str) -> int:
    """Compute capability (80 for sm_80) of a torch-style device string (``"cuda:1"``, ``"cuda"``)."""
    _, _, index = device.partition(":")
    if not index:
        import cupy

        return _arch(cupy.cuda.runtime.getDevice())
    return _arch(int(index))


def program_for(family, name: str, arch: int):
    """The compiled program to load for kernel ``name`` of ``family`` on ``sm_<arch>``: the whole family's
    where the cache holds it (``precompile`` fills it), otherwise ``name``'s alone, compiled now if the
    cache lacks it too. So a first call compiles the kernels it runs (a few seconds each), not every
    instantiation of their families (tens of seconds for the tensor-core ones)."""
    from . import cache

    source = cuda_src_dir() / family.source
    whole, _ = cache.lookup(source, family.names, arch, arch_specific=family.arch_specific, compile=False)
    if whole is not None:
        return whole
    return cache.get_program(source, (name,), arch, arch_specific=family.arch_specific)


def _module(device: int, family, name: str):
    """The loaded CuPy module holding kernel ``name`` of ``family`` on ``device``: the family's, or the
    kernel's own (:func:`program_for`), memoized per (device, family) or per (device, family, kernel)."""
    whole, alone = (device, family.source), (device, family.source, name)
    with _lock:
        for key in (whole, alone):
            if key in _modules:
                return _modules[key]
        import cupy

        arch = int(cupy.cuda.Device(device).compute_capability)  # "90" -> 90, "120" -> 120
        if not family.builds_for(arch):  # the dispatcher checks first; this is the last line of defense
            raise RuntimeError(f"the kernels of {family.source} are built for "
                               f"{', '.join(f'sm_{a}' for a in family.archs)} only, not for GPU {device} (sm_{arch})")
        program = program_for(family, name, arch)
        # cuModuleLoadData reads PTX as a C string: it needs the terminator the cache strips
        image = program.binary + b"\x00" if program.kind == "ptx" else program.binary
        with cupy.cuda.Device(device):
            module = cupy.cuda.function.Module()
            try:
                module.load(image)
            except Exception as error:
                raise _load_error(error, program, device) from error
        key = whole if all(n in program.lowered for n in family.names) else alone
        _modules[key] = (module, program.lowered, {})
        return _modules[key]


#: driver errors that mean "this driver is too old for what NVRTC produced"
_TOO_NEW_FOR_THE_DRIVER = ("UNSUPPORTED_PTX_VERSION", "INVALID_PTX", "NO_BINARY_FOR_GPU", "INVALID_IMAGE",
                           "INVALID_SOURCE")


def _load_error(error: Exception, program, device: int) -> Exception:
    """A precise error for a module the driver refuses; other errors unchanged."""
    text = f"{type(error).__name__}: {error}"
    if not any(code in text for code in _TOO_NEW_FOR_THE_DRIVER):
        return error
    import cupy

    from . import nvrtc

    try:
        driver = cupy.cuda.runtime.driverGetVersion()
        driver_text = f"CUDA {driver // 1000}.{driver % 1000 // 10}"
    except Exception:  # noqa: BLE001 - only for the message
        driver_text = "unknown"
    major, minor = nvrtc.nvrtc_version()
    return RuntimeError(
        f"the CUDA driver ({driver_text}) cannot load the {program.kind} that NVRTC {major}.{minor} compiled for "
        f"{program.target} on GPU {device} ({text}): the driver is older than the NVRTC. Update the driver to "
        f"CUDA {major}.{minor} or newer, or install the NVRTC that matches it (pip install 'na_rtc[cuda12]' for "
        "CUDA 12 drivers). `python -m na_rtc info` shows both versions."
    )


#: dynamic shared memory a launch gets without opting in (cudaFuncAttributeMaxDynamicSharedMemorySize)
DEFAULT_DYNAMIC_SHARED = 48 * 1024


def _function(device: int, kernel: P.Kernel, shared_bytes: int):
    module, lowered, functions = _module(device, family_of(kernel.name), kernel.name)
    if kernel.name not in functions:
        functions[kernel.name] = [module.get_function(lowered[kernel.name]), DEFAULT_DYNAMIC_SHARED]
    entry = functions[kernel.name]
    if shared_bytes > entry[1]:  # opt in once per function, to the largest launch seen so far
        from cupy_backends.cuda.api import driver

        attribute = getattr(driver, "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES", 8)
        driver.funcSetAttribute(entry[0].ptr, attribute, int(shared_bytes))
        entry[1] = shared_bytes
    return entry[0]


def _stream(array):
    """The stream to launch on: torch's current stream for torch tensors, CuPy's otherwise."""
    import cupy

    if _arrays.kind_of(array) == _arrays.TORCH:
        torch = sys.modules["torch"]
        return cupy.cuda.ExternalStream(torch.cuda.current_stream(array.device).cuda_stream, _device_index(array))
    return cupy.cuda.get_current_stream()


def _argument(arg: P.Arg):
    if arg.kind == "ptr":
        return np.uint64(0 if arg.value is None else _arrays.data_ptr(arg.value))
    return _NUMPY_SCALARS[arg.kind](arg.value)


def run(plan: P.LaunchPlan) -> None:
    """Launch ``plan`` on the device of its first array argument."""
    import cupy

    anchor = next(a.value for a in plan.args if a.kind == "ptr" and a.value is not None)
    device = _device_index(anchor)
    function = _function(device, plan.kernel, plan.shared_bytes)
    with cupy.cuda.Device(device):
        function(plan.grid, plan.block, tuple(_argument(a) for a in plan.args),
                 shared_mem=plan.shared_bytes, stream=_stream(anchor))
