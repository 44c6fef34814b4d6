"""The command that installs one of na_rtc's extras, for the way this copy of na_rtc was installed.

na_rtc is installed from a checkout (``pip install .``, ``pip install -e .``, or
run from the folder itself) or from a wheel built from one; it is not on a
package index, so ``pip install 'na_rtc[cuda13]'`` finds nothing. From a
checkout, the extra is installed from that folder (editable when the install
is); otherwise (a wheel) the hint names the extra's packages.

How a copy was installed is read from where it is imported from (a checkout
has ``pyproject.toml`` and ``cuda_src/`` beside the package) and from pip's
record of the install (``direct_url.json``, PEP 610: a folder, editable or
not, or an archive). Which extra a machine needs (``cuda13`` or ``cuda12``)
is read from its CUDA driver, straight from libcuda (:func:`cuda_extra`).
"""

from __future__ import annotations

import ctypes
import json
import shlex
from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote, urlparse

__all__ = ["EXTRAS", "Source", "cuda_extra", "cuda_install_hint", "install_command", "nvrtc_install_hint", "source"]

#: the packages of pyproject.toml's extras that install hints name (tests hold the two equal)
EXTRAS: dict[str, tuple[str, ...]] = {
    "cuda12": ("cupy-cuda12x>=13", "nvidia-cuda-nvrtc-cu12>=12.4", "cuda-bindings>=12.6,<13"),
    "cuda13": ("cupy-cuda13x>=14", "nvidia-cuda-nvrtc>=13", "cuda-bindings>=13,<14"),
    "nvrtc": ("nvidia-cuda-nvrtc>=13", "cuda-bindings>=13,<14"),
}

#: the folder of the na_rtc package that is running
PACKAGE = Path(__file__).resolve().parent


class Source(NamedTuple):
    """Where this na_rtc comes from: a checkout folder (``editable`` or not), or None for a wheel."""

    checkout: Path | None
    editable: bool = False


def is_checkout(folder: Path) -> bool:
    """Whether ``folder`` is a source checkout of na_rtc (its pyproject.toml, package and kernel sources)."""
    try:
        text = (folder / "pyproject.toml").read_text()
    except OSError:
        return False
    return ('name = "na_rtc"' in text and (folder / "na_rtc" / "__init__.py").is_file()
            and (folder / "cuda_src").is_dir())


def installed_from() -> dict | None:
    """pip's record of where the installed na_rtc came from (``direct_url.json``), None when there is none."""
    try:
        from importlib import metadata

        # the first distribution found may be a checkout's own na_rtc.egg-info (the current folder is on the
        # path), which has no record: take the first that has one
        for distribution in metadata.distributions(name="na_rtc"):
            text = distribution.read_text("direct_url.json")
            if text:
                return json.loads(text)
    except Exception:  # noqa: BLE001 - unreadable: the package's folder decides
        pass
    return None


def _recorded_folder(record: dict | None) -> tuple[Path | None, bool]:
    if not record or "dir_info" not in record or not str(record.get("url", "")).startswith("file:"):
        return None, False
    return Path(unquote(urlparse(record["url"]).path)), bool(record["dir_info"].get("editable"))


def _same(a: Path | None, b: Path) -> bool:
    try:
        return a is not None and a.resolve() == b.resolve()
    except OSError:
        return False


def source(package: Path = PACKAGE, record: dict | None = None, *, read_record: bool = True) -> Source:
    """Where the na_rtc in ``package`` comes from, from its location and pip's ``record`` of the install."""
    if record is None and read_record:
        record = installed_from()
    recorded, editable = _recorded_folder(record)
    root = package.parent
    if is_checkout(root):  # run from a checkout: an editable install, PYTHONPATH or the current folder
        return Source(root, editable and _same(recorded, root))
    if recorded is not None and is_checkout(recorded):  # `pip install .`: a copy whose checkout is still there
        return Source(recorded, editable)
    return Source(None)


def install_command(extra: str, where: Source | None = None) -> str:
    """``pip install ...`` that adds ``extra``'s packages to this installation (``where``: :func:`source`)."""
    if extra not in EXTRAS:
        raise ValueError(f"extra must be one of {', '.join(EXTRAS)}, got {extra!r}")
    where = source() if where is None else where
    if where.checkout is None:
        return "pip install " + " ".join(shlex.quote(requirement) for requirement in EXTRAS[extra])
    return "pip install " + ("-e " if where.editable else "") + shlex.quote(f"{where.checkout}[{extra}]")


# ---------------------------------------------------------------- what this machine needs


# CUdevice_attribute values of the driver API (cuda.h): compute capability
_CC_MAJOR, _CC_MINOR = 75, 76


def _libcuda_probe() -> tuple[int | None, list[int]]:
    """CUDA driver version (13000 = 13.0) and the GPUs' archs, straight from
    libcuda: what to install must be known before cupy is. ``(None, [])``
    without a driver."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return None, []
    try:
        version = ctypes.c_int()
        if lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None, []
        archs = []
        count = ctypes.c_int()
        if lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0:
            for index in range(count.value):
                device, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
                if (lib.cuDeviceGet(ctypes.byref(device), index) == 0
                        and lib.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, device) == 0
                        and lib.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, device) == 0):
                    archs.append(major.value * 10 + minor.value)
        return version.value, archs
    except Exception:  # noqa: BLE001 - a probe reports, never raises
        return None, []


def cuda_extra() -> tuple[str | None, str]:
    """Which extra serves this machine, ``"cuda13"`` or ``"cuda12"``, and why
    (the supported-hardware table of docs/getting-started.md); ``(None, reason)`` when the driver cannot tell."""
    driver, archs = _libcuda_probe()
    if driver is None:
        return None, "no CUDA driver found to choose by"
    driver_text = f"driver CUDA {driver // 1000}.{driver % 1000 // 10}"
    gpus = ", ".join(f"sm_{arch}" for arch in archs) or "no GPU visible"
    if driver < 13000:
        return "cuda12", f"{driver_text} is older than CUDA 13"
    old = [arch for arch in archs if arch < 75]
    if old:
        return "cuda12", f"NVRTC 13 does not compile for sm_{min(old)}; {driver_text}, {gpus}"
    return "cuda13", f"{driver_text}, {gpus}"


def cuda_install_hint() -> str:
    """The install command for the ``cuda`` backend, for this machine's driver and GPUs and for the way na_rtc
    was installed (a checkout or a wheel: :mod:`na_rtc._install`)."""
    extra, reason = cuda_extra()
    if extra is None:
        return (f"{install_command('cuda13')} (CUDA 13 driver, sm_75+) or {install_command('cuda12')} "
                "(older drivers, sm_70/72)")
    return f"{install_command(extra)} ({reason})"


def nvrtc_install_hint() -> str:
    """The install command for NVRTC: the ``cuda`` backend's extra on a machine with a CUDA driver, NVRTC
    alone (enough for ``precompile`` and ``check``) on one without."""
    if cuda_extra()[0] is not None:
        return cuda_install_hint()
    return f"{install_command('nvrtc')} (NVRTC alone: no CUDA driver found here)"
