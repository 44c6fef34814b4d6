"""The ``cuda`` executor: launch plans on the GPU through CuPy.

Kernels are compiled by NVRTC (through the disk cache) for the device's
architecture and loaded as CuPy modules: a family's whole program where the
cache holds it (``precompile``), otherwise each kernel's own, compiled at its
first use (:func:`program_for`).
Inputs may be CuPy arrays or CUDA torch tensors; torch launches go on torch's
current stream of the tensor's device, so they order with the surrounding
torch work without any synchronization. Which device is current, which
stream a launch takes and whether it is being captured into a CUDA graph is
:mod:`na_rtc.runtime.device`'s business: nothing here touches another GPU.
"""

from __future__ import annotations

import threading

import numpy as np

from .. import _arrays
from .._resources import cuda_src_dir
from . import device as _device
from . import plan as P
from . import families  # noqa: F401 - registers every kernel family (the registry imports none)
from .registry import family_of

_NUMPY_SCALARS = {"i64": np.int64, "i32": np.int32, "f32": np.float32, "f64": np.float64}
#: (device, family source) or (device, family source, kernel) -> (CuPy module, lowered names)
_modules: dict = {}
#: (device, kernel name) -> [CuPy function, dynamic shared bytes it may take now]
_functions: dict = {}
# One lock for both tables: a module load and a function's opt-in each happen once, never half-seen by
# another thread (the opt-in's recorded size must never exceed the driver's attribute).
_lock = threading.Lock()


def availability() -> tuple[bool, str]:
    """Whether CuPy, a GPU and NVRTC are usable here, and why not."""
    from .._install import cuda_install_hint

    try:
        import cupy
    except Exception as error:  # ImportError, or a broken CUDA install
        return False, f"cupy is not importable ({error}); {cuda_install_hint()}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        return False, (f"no usable GPU or CUDA driver ({type(error).__name__}: {first_line}); "
                       "CPU arrays run on the blocked, reference or emulator backend")
    if count == 0:
        return False, "no GPU found (CUDA reports 0 devices; check CUDA_VISIBLE_DEVICES)"
    try:
        from . import nvrtc

        nvrtc.nvrtc_version()
    except Exception as error:
        return False, f"NVRTC is not usable ({error})"
    return True, f"{count} GPU(s); CuPy arrays and CUDA torch tensors"


def arch_of(device: str) -> int:
    """Compute capability (80 for sm_80) of a torch-style device string (``"cuda:1"``, ``"cuda"``)."""
    _, _, index = device.partition(":")
    if not index:
        import cupy

        return _device.compute_capability(cupy.cuda.runtime.getDevice())
    return _device.compute_capability(int(index))


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
    """The loaded CuPy module holding kernel ``name`` of ``family`` on ``device``, with its lowered names:
    the family's, or the kernel's own (:func:`program_for`), memoized per (device, family) or per (device,
    family, kernel). The caller holds :func:`na_rtc.runtime.device.guard` of ``device``: the module loads
    into the current device's context."""
    whole, alone = (device, family.source), (device, family.source, name)
    with _lock:
        for key in (whole, alone):
            if key in _modules:
                return _modules[key]
        import cupy

        arch = _device.compute_capability(device)
        if not family.runs_on(arch):  # the dispatcher checks first; this is the last line of defense
            raise RuntimeError(f"the kernels of {family.source} run on {family.arch_text()} only, not on GPU {device} "
                               f"(sm_{arch})")
        program = program_for(family, name, arch)
        # cuModuleLoadData reads PTX as a C string: it needs the terminator the cache strips
        image = program.binary + b"\x00" if program.kind == "ptx" else program.binary
        module = cupy.cuda.function.Module()
        try:
            module.load(image)
        except Exception as error:
            raise _load_error(error, program, device) from error
        key = whole if all(n in program.lowered for n in family.names) else alone
        _modules[key] = (module, program.lowered)
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

    from .._install import install_command
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
        f"CUDA {major}.{minor} or newer, or install the NVRTC that matches it ({install_command('cuda12')} for "
        "CUDA 12 drivers). `python -m na_rtc info` shows both versions."
    )


#: shared memory (static + dynamic) a launch gets without opting in; above it, a function needs
#: cudaFuncAttributeMaxDynamicSharedMemorySize raised first
DEFAULT_DYNAMIC_SHARED = 48 * 1024


def _dynamic_limit(driver, function) -> int:
    """The dynamic shared memory ``function`` may take before any opt-in: its attribute, which the driver
    sets to 48 KiB less the function's static shared memory (taking the smaller also covers a driver
    that reports 48 KiB)."""
    static = driver.funcGetAttribute(driver.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, function.ptr)
    allowed = driver.funcGetAttribute(driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, function.ptr)
    return min(int(allowed), DEFAULT_DYNAMIC_SHARED - int(static))


def _function(device: int, kernel: P.Kernel, shared_bytes: int):
    """The CuPy function of ``kernel`` on ``device``, opted in to ``shared_bytes`` of dynamic shared memory.

    The caller holds :func:`na_rtc.runtime.device.guard` of ``device``. Each function opts in once per
    larger launch, to the largest launch seen so far, under the lock: two threads opting in to different
    sizes leave the attribute at the larger one.
    """
    entry = _functions.get((device, kernel.name))
    if entry is not None and shared_bytes <= entry[1]:  # no lock: entry[1] grows only after the driver's limit
        return entry[0]
    module, lowered = _module(device, family_of(kernel.name), kernel.name)
    from cupy_backends.cuda.api import driver

    with _lock:
        entry = _functions.get((device, kernel.name))
        if entry is None:
            function = module.get_function(lowered[kernel.name])
            entry = _functions[device, kernel.name] = [function, _dynamic_limit(driver, function)]
        if shared_bytes > entry[1]:
            driver.funcSetAttribute(entry[0].ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                    int(shared_bytes))
            entry[1] = max(entry[1], int(shared_bytes))
    return entry[0]


def _capture_error(kernel: P.Kernel, device: int) -> RuntimeError:
    return RuntimeError(
        f"the first call of kernel {kernel.name} on GPU {device} happens while its stream is being captured "
        "into a CUDA graph, and loading a kernel (NVRTC compile, cuModuleLoadData) is not allowed during "
        "capture. Run the same call once eagerly, outside the capture (a warm-up iteration), then capture."
    )


def _argument(arg: P.Arg):
    if arg.kind == "ptr":
        return np.uint64(0 if arg.value is None else _arrays.data_ptr(arg.value))
    return _NUMPY_SCALARS[arg.kind](arg.value)


def run(plan: P.LaunchPlan) -> None:
    """Launch ``plan`` on the device of its first array argument, on the stream its library uses there.

    A kernel's first use on a device loads it; inside CUDA graph capture that would break the capture, so
    it raises instead (a kernel loaded by an earlier eager call launches, and is captured, as usual).
    """
    anchor = next(a.value for a in plan.args if a.kind == "ptr" and a.value is not None)
    index = _device.device_index(anchor)
    with _device.guard(anchor):
        stream = _device.launch_stream(anchor)
        if (index, plan.kernel.name) not in _functions and _device.is_capturing(anchor):
            raise _capture_error(plan.kernel, index)
        function = _function(index, plan.kernel, plan.shared_bytes)
        function(plan.grid, plan.block, tuple(_argument(a) for a in plan.args),
                 shared_mem=plan.shared_bytes, stream=stream)
