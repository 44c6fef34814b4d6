"""First-call compile time and cached-load time of the kernel families.

A kernel family (one source file, every instantiation the dispatcher can
pick; :data:`na_rtc.runtime.families.FAMILIES`) is compiled once per
architecture and cached on disk, so its cost is per family, not per problem:
a new shape never recompiles (DESIGN.md section 5). Measured here in a fresh,
empty cache folder, so "compile" really compiles whatever the user's cache
holds, and then again from that folder's disk entry with the in-memory cache
cleared ("cached load": what every later process pays).

The programs stay in this process's memory afterwards, so the entries that
follow reuse them instead of compiling a second time.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from pathlib import Path

_folders: list[Path] = []


def _scratch() -> Path:
    """A cache folder for this process, removed at exit (libraries stay mapped until then)."""
    folder = Path(tempfile.mkdtemp(prefix="na_rtc-bench-cache-"))
    _folders.append(folder)
    if len(_folders) == 1:
        atexit.register(lambda: [shutil.rmtree(f, ignore_errors=True) for f in _folders])
    return folder


def _cuda_family(family, device_index: int, root: Path) -> dict:
    import cupy

    from .._resources import cuda_src_dir
    from ..runtime import cache

    source = cuda_src_dir() / family.source
    arch = int(cupy.cuda.Device(device_index).compute_capability)

    def load() -> tuple[float, str]:
        started = time.perf_counter()
        program, origin = cache.lookup(source, family.names, arch, cache_root=root)
        image = program.binary + b"\x00" if program.kind == "ptx" else program.binary  # as runtime/cuda.py loads it
        with cupy.cuda.Device(device_index):
            cupy.cuda.function.Module().load(image)
        return time.perf_counter() - started, origin

    cache.clear_memory_cache()
    first, first_origin = load()
    cache.clear_memory_cache()
    cached, cached_origin = load()
    return {"compile_s": first, "cached_load_s": cached, "first_origin": first_origin,
            "cached_origin": cached_origin, "kernels": len(family.names), "arch": f"sm_{arch}"}


def _emulator_family(family, root: Path) -> dict:
    from .. import emulator
    from .._resources import cuda_src_dir

    source = cuda_src_dir() / family.source
    previous = os.environ.get("NA_RTC_CACHE_DIR")
    os.environ["NA_RTC_CACHE_DIR"] = str(root)  # the emulator's cache folder comes from the setting
    try:
        emulator.clear_memory_cache()
        before = emulator.cache_stats()
        started = time.perf_counter()
        emulator.load_module(source, family.names)
        first = time.perf_counter() - started
        compiled = emulator.cache_stats()["compiles"] > before["compiles"]
        emulator.clear_memory_cache()
        before = emulator.cache_stats()
        started = time.perf_counter()
        emulator.load_module(source, family.names)
        cached = time.perf_counter() - started
        disk_hit = emulator.cache_stats()["disk_hits"] > before["disk_hits"]
    finally:
        if previous is None:
            os.environ.pop("NA_RTC_CACHE_DIR", None)
        else:
            os.environ["NA_RTC_CACHE_DIR"] = previous
    return {"compile_s": first, "cached_load_s": cached, "first_origin": "compiled" if compiled else "unknown",
            "cached_origin": "disk" if disk_hit else "unknown", "kernels": len(family.names),
            "note": "the library is already mapped in this process: the cached load is the lookup, checksum and dlopen"}


def measure_families(names, backend: str, device_index: int = 0) -> dict:
    """``{family: {compile_s, cached_load_s, ...}}`` on ``backend`` (``cuda`` or ``emulator``).

    A family that fails is reported with its error, and the others still run.
    """
    from ..runtime.families import FAMILIES

    root = _scratch()
    out = {}
    for name in names:
        try:
            family = FAMILIES[name]
            out[name] = (_cuda_family(family, device_index, root) if backend == "cuda"
                         else _emulator_family(family, root))
        except Exception as error:  # noqa: BLE001 - reported in the results, the run goes on
            out[name] = {"error": f"{type(error).__name__}: {error}"[:400]}
    return out
