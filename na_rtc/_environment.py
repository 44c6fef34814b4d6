"""Probes of the environment na_rtc runs in: versions, GPUs, NVRTC, cache.

Each probe is a small function that never raises: it returns a :class:`Probe`
whose ``text`` is either the found value, formatted for people, or the reason
it was not found. ``value`` carries the machine-readable result (``None``
when not found), so ``python -m na_rtc info``, ``check``, ``bench`` and
bug reports share one set of probes.

Nothing here imports cupy, torch or the CUDA bindings at module import time;
each probe imports what it needs, so a broken optional dependency only turns
its own line into a reason.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any, NamedTuple

__all__ = [
    "GpuInfo",
    "Probe",
    "na_rtc_version",
    "python_version",
    "numpy_version",
    "torch_version",
    "cupy_version",
    "gpus",
    "nvrtc_version",
    "backends",
    "selected_backend",
    "cache_dir",
    "settings",
    "hardware_verdict",
    "cuda_extra",
    "cuda_install_hint",
    "nvrtc_install_hint",
]


class Probe(NamedTuple):
    """Result of one probe: ``ok`` with ``value``, or not ok with a reason."""

    ok: bool
    value: Any
    text: str

    def __str__(self) -> str:
        return self.text


class GpuInfo(NamedTuple):
    index: int
    name: str
    arch: str  # "sm_90"
    memory_bytes: int

    def __str__(self) -> str:
        gib = self.memory_bytes / 2**30
        return f"{self.index}: {self.name}, {self.arch}, {gib:.1f} GiB"


def _found(value: Any, text: str | None = None) -> Probe:
    return Probe(True, value, str(value) if text is None else text)


def _missing(reason: str) -> Probe:
    return Probe(False, None, reason)


def _describe_error(error: BaseException) -> str:
    """One line naming the error: multi-line messages (cupy's) are cut."""
    message = str(error).strip().splitlines()
    first = message[0] if message else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def na_rtc_version() -> Probe:
    try:
        from na_rtc import __version__
    except Exception as error:  # noqa: BLE001 - a probe reports, never raises
        return _missing(f"unknown ({_describe_error(error)})")
    return _found(__version__)


def python_version() -> Probe:
    version = platform.python_version()
    return _found(version, f"{version} ({platform.python_implementation()}, {sys.executable})")


def numpy_version() -> Probe:
    try:
        import numpy
    except Exception as error:  # noqa: BLE001
        return _missing(f"not importable ({_describe_error(error)})")
    return _found(numpy.__version__)


def torch_version() -> Probe:
    """torch version and what it was built for; torch is optional."""
    try:
        import torch
    except ImportError as error:
        if getattr(error, "name", None) == "torch":
            return _missing("not installed (optional: pip install torch)")
        return _missing(f"not importable ({_describe_error(error)})")
    except Exception as error:  # noqa: BLE001
        return _missing(f"not importable ({_describe_error(error)})")
    try:
        built_cuda = torch.version.cuda
        if built_cuda is None:
            detail = "CPU build"
        elif torch.cuda.is_available():
            detail = f"CUDA {built_cuda}, {torch.cuda.device_count()} device(s) visible"
        else:
            detail = f"CUDA {built_cuda}, no device visible"
    except Exception as error:  # noqa: BLE001
        detail = f"CUDA state unknown ({_describe_error(error)})"
    return _found(torch.__version__, f"{torch.__version__} ({detail})")


# what to install for this machine's driver: in _install, which the cuda executor asks too (this module reports
# on the backends, so the executor importing it would make the two import each other)
from ._install import _libcuda_probe, cuda_extra, cuda_install_hint, nvrtc_install_hint  # noqa: E402, F401


def _import_cupy():
    """cupy module, or a Probe saying why not."""
    try:
        import cupy
    except ImportError as error:
        if getattr(error, "name", None) == "cupy" or "No module named 'cupy'" in str(error):
            return _missing(f"cupy not installed ({cuda_install_hint()})")
        return _missing(f"cupy not importable ({_describe_error(error)})")
    except Exception as error:  # noqa: BLE001
        return _missing(f"cupy not importable ({_describe_error(error)})")
    return cupy


def cupy_version() -> Probe:
    cupy = _import_cupy()
    if isinstance(cupy, Probe):
        return _missing("not installed") if cupy.text.startswith("cupy not installed") else cupy
    return _found(cupy.__version__)


def gpus() -> Probe:
    """Visible CUDA devices through cupy: a list of :class:`GpuInfo`."""
    cupy = _import_cupy()
    if isinstance(cupy, Probe):
        return cupy
    try:
        runtime = cupy.cuda.runtime
        count = runtime.getDeviceCount()
    except Exception as error:  # noqa: BLE001 - CUDARuntimeError: no driver or device
        return _missing(f"no GPU or no CUDA driver ({_describe_error(error)})")
    if count == 0:
        return _missing("no GPU visible (CUDA reports 0 devices)")
    devices = []
    try:
        driver = runtime.driverGetVersion()
        for index in range(count):
            props = runtime.getDeviceProperties(index)
            name = props["name"]
            if isinstance(name, bytes):
                name = name.decode(errors="replace")
            arch = f"sm_{props['major']}{props['minor']}"
            devices.append(GpuInfo(index, name, arch, int(props["totalGlobalMem"])))
    except Exception as error:  # noqa: BLE001
        return _missing(f"{count} device(s), properties unreadable ({_describe_error(error)})")
    lines = "; ".join(str(device) for device in devices)
    driver_text = f"driver CUDA {driver // 1000}.{driver % 1000 // 10}"
    return _found(devices, f"{lines} ({driver_text})")


def _nvrtc_module():
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        try:  # cuda-python before 12.6 exposed the bindings here
            from cuda import nvrtc  # type: ignore[no-redef]
        except Exception:  # noqa: BLE001
            return _missing(f"not installed (cuda.bindings missing: {nvrtc_install_hint()})")
    except Exception as error:  # noqa: BLE001
        return _missing(f"cuda.bindings not importable ({_describe_error(error)})")
    return nvrtc


def _nvrtc_archs(nvrtc) -> list[int]:
    """Architectures the NVRTC library compiles for (e.g. [75, 80, ...]); [] if unknown."""
    try:
        result = nvrtc.nvrtcGetSupportedArchs()
        error, archs = result[0], result[1]
        if int(error) != 0:
            return []
        return [int(arch) for arch in archs]
    except Exception:  # noqa: BLE001
        return []


def nvrtc_version() -> Probe:
    """NVRTC version as ``(major, minor)`` through cuda.bindings."""
    nvrtc = _nvrtc_module()
    if isinstance(nvrtc, Probe):
        return nvrtc
    try:
        error, major, minor = nvrtc.nvrtcVersion()
    except Exception as error:  # noqa: BLE001 - the library itself may be missing
        return _missing(f"bindings present, library not loadable ({_describe_error(error)})")
    if int(error) != 0:
        return _missing(f"nvrtcVersion failed ({error})")
    text = f"{major}.{minor}"
    archs = _nvrtc_archs(nvrtc)
    if archs:
        text += f" (sm_{min(archs)} .. sm_{max(archs)})"
    return _found((int(major), int(minor)), text)


def backends() -> Probe:
    """``na_rtc.backends.describe()``: a list of (name, available, reason)."""
    try:
        from na_rtc import backends as backends_module

        table = [(str(name), bool(available), str(reason)) for name, available, reason in backends_module.describe()]
    except Exception as error:  # noqa: BLE001
        return _missing(f"backend table unavailable ({_describe_error(error)})")
    names = ", ".join(name for name, available, _ in table if available)
    return _found(table, f"available: {names or 'none'}")


def selected_backend() -> Probe:
    """The backend forced by ``NA_RTC_BACKEND`` / ``use_backend``, or automatic."""
    try:
        from na_rtc import backends as backends_module

        name = backends_module.current_backend_name()
    except Exception as error:  # noqa: BLE001
        return _missing(f"unknown ({_describe_error(error)})")
    if name is None:
        return Probe(True, None, f"automatic (cuda for NVIDIA GPU arrays, {_cpu_default()} for CPU arrays and "
                                 "torch's other devices)")
    return _found(name)


def _cpu_default() -> str:
    """The backend NumPy arrays and CPU tensors get when none is forced (the dispatcher's own rule)."""
    try:
        from na_rtc import _arrays, backends as backends_module

        return backends_module._default_name(_arrays.NUMPY, "cpu")
    except Exception as error:  # noqa: BLE001 - a probe reports, never raises
        return f"unknown ({_describe_error(error)})"


def _cpu_arrays_run_on() -> str:
    """Which backend runs CPU arrays here, as the dispatcher decides it (forced, or the default)."""
    try:
        from na_rtc import _arrays, backends as backends_module

        forced = backends_module.current_backend_name()
        if forced and (_arrays.NUMPY, "cpu") not in backends_module.get(forced).serves:
            return f"the forced {forced} backend does not run CPU arrays (NA_RTC_BACKEND / use_backend)"
    except Exception as error:  # noqa: BLE001
        return f"backend for CPU arrays unknown ({_describe_error(error)})"
    if forced:
        return f"CPU arrays run on the {forced} backend (forced by NA_RTC_BACKEND / use_backend)"
    name = _cpu_default()
    if name == "emulator":
        return "CPU arrays run on the emulator backend (the CUDA kernels, emulated)"
    return f"CPU arrays run on the {name} backend (NA_RTC_BACKEND=emulator runs the CUDA kernels, emulated)"


def cache_dir() -> Probe:
    """Kernel cache directory and whether it exists yet."""
    try:
        from na_rtc import config

        path = config.cache_dir()
    except Exception as error:  # noqa: BLE001
        return _missing(f"unknown ({_describe_error(error)})")
    if not path.exists():
        state = "not created yet"
    elif os.access(path, os.W_OK):
        state = "writable"
    else:
        state = "read-only: compiled kernels are kept in memory only"
    return _found(path, f"{path} ({state})")


def verdicts() -> Probe:
    """The recorded verdicts of first-use kernel verification, the latest per (device, kernel): a list of
    :class:`na_rtc.verify.verdicts.Verdict`, failures first."""
    try:
        from na_rtc.verify.gate import store

        found = store().recorded()
        folder = store().folder
    except Exception as error:  # noqa: BLE001
        return _missing(f"unreadable ({_describe_error(error)})")
    latest: dict = {}
    for verdict in sorted(found, key=lambda v: v.utc):  # older builds' verdicts stay on disk until replaced
        latest[verdict.device, verdict.kernel] = verdict
    found = sorted(latest.values(), key=lambda v: (v.ok, v.device, v.kernel))
    if not found:
        return Probe(True, [], f"none recorded yet ({folder}); kernels are verified at their first use on a GPU")
    failed = [v for v in found if not v.ok]
    return Probe(True, found, f"{len(found)} kernels verified, {len(failed)} gave wrong results ({folder})")


def settings() -> Probe:
    """``NA_RTC_*`` environment variables that are set."""
    found = {key: value for key, value in sorted(os.environ.items()) if key.startswith("NA_RTC_")}
    if not found:
        return Probe(True, {}, "none set")
    return _found(found, ", ".join(f"{key}={value}" for key, value in found.items()))


def _driver_version() -> int | None:
    """CUDA driver version as an int (13000 = 13.0), or None."""
    cupy = _import_cupy()
    if isinstance(cupy, Probe):
        return None
    try:
        return int(cupy.cuda.runtime.driverGetVersion())
    except Exception:  # noqa: BLE001
        return None


def _fused_path(arch: int) -> str:
    """Which kernels serve fp16/bf16 fused ops on this arch (runtime/dispatch.py's tables and policy), for the verdict."""
    if arch < 80:
        return "fp16/bf16 fused ops on the SIMT kernels (tensor-core kernels need sm_80+)"
    if arch == 90:
        return ("fp16/bf16 fused ops on mma.sync tensor cores; the Hopper wgmma kernels with NA_RTC_WGMMA=1 "
                "(opt-in until GPU runs have measured them)")
    return "fp16/bf16 fused ops on mma.sync tensor cores"


def _device_verdict(arch: int, nvrtc: tuple[int, int], archs: list[int], driver: int | None) -> str:
    """The supported-hardware table (docs/getting-started.md), applied to one device."""
    if arch < 70:
        return f"unsupported: na_rtc needs sm_70 or newer, this is sm_{arch}"
    from ._install import install_command

    if (nvrtc[0] >= 13 and arch < 75) or (archs and arch < min(archs)):
        return (f"unsupported with NVRTC {nvrtc[0]}.{nvrtc[1]} (sm_{min(archs) if archs else 75}+ only): "
                f"{install_command('cuda12')}")
    driver_text = "" if driver is None else f"{driver // 1000}.{driver % 1000 // 10}"
    if driver is not None and driver // 1000 < nvrtc[0]:
        return (f"driver supports CUDA {driver_text}, older than NVRTC {nvrtc[0]}: "
                f"update the driver, or use NVRTC 12 ({install_command('cuda12')})")
    if archs and arch not in archs:
        # PTX is JIT-compiled by the driver, which must know the PTX version of this very NVRTC release
        if driver is not None and driver < nvrtc[0] * 1000 + nvrtc[1] * 10:
            return (f"sm_{arch} needs PTX from NVRTC {nvrtc[0]}.{nvrtc[1]}, but the driver supports CUDA {driver_text} "
                    f"and cannot JIT it: update the driver to CUDA {nvrtc[0]}.{nvrtc[1]}+")
        return (f"supported through PTX (sm_{arch} is newer than NVRTC {nvrtc[0]}.{nvrtc[1]} knows; the driver JITs "
                f"it); {_fused_path(arch)}")
    return f"supported: cubin for sm_{arch}; {_fused_path(arch)}"


def hardware_verdict() -> Probe:
    """Can the kernels run here, per GPU, and if not what to install."""
    devices = gpus()
    nvrtc = nvrtc_version()
    if not devices.ok:
        compile_note = ("precompile/check work here" if nvrtc.ok
                        else f"NVRTC missing for precompile/check: {nvrtc_install_hint()}")
        return Probe(True, [], f"no GPU: {_cpu_arrays_run_on()}; {compile_note}")
    if not nvrtc.ok:
        return _missing(f"GPU found but NVRTC is not usable ({nvrtc.text})")
    module = _nvrtc_module()
    archs = [] if isinstance(module, Probe) else _nvrtc_archs(module)
    driver = _driver_version()
    verdicts = [(device.index, _device_verdict(int(device.arch[3:]), nvrtc.value, archs, driver))
                for device in devices.value]
    ok = all(text.startswith("supported") for _, text in verdicts)
    return Probe(ok, verdicts, "; ".join(f"GPU {index}: {text}" for index, text in verdicts))
