"""Compile time and cached-load time of the kernel families.

A kernel family (one source file, every instantiation the dispatcher can
pick; :data:`na_rtc.runtime.families.FAMILIES`) is compiled as one program
by ``python -m na_rtc precompile`` and by the emulator's first call; on a GPU
a first call without that program in the cache compiles only the kernels it
runs, each alone (``runtime/cuda.py``'s ``program_for``). Its cost is per
family and architecture, not per problem: a new shape never recompiles
(sizes, kernel size, dilation and stride are run-time arguments). Measured here in a fresh, empty cache folder, so
"compile" really compiles whatever the user's cache holds, and then again
from that folder's disk entry with the in-memory cache cleared ("cached
load": what every later process pays).

Families compile in parallel threads when the machine has cores to spare
(NVRTC and the C++ compiler are single-threaded; each family's time is its
own wall time), so a GPU machine spends about the slowest family's compile on
this, not the sum. The programs stay in this process's memory afterwards:
the entries that follow reuse them instead of compiling a second time.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_folders: list[Path] = []


def _scratch() -> Path:
    """A cache folder for this process, removed at exit (libraries stay mapped until then)."""
    folder = Path(tempfile.mkdtemp(prefix="na_rtc-bench-cache-"))
    _folders.append(folder)
    if len(_folders) == 1:
        atexit.register(lambda: [shutil.rmtree(f, ignore_errors=True) for f in _folders])
    return folder


class _Cuda:
    """NVRTC through the disk cache (``cache_root``), then a CuPy module load, as runtime/cuda.py does."""

    def __init__(self, root: Path, device_index: int):
        from ..runtime import device

        self.root, self.device_index = root, device_index
        self.arch = device.compute_capability(device_index)  # an attribute query: no context on other GPUs

    @contextlib.contextmanager
    def session(self):
        yield

    def clear(self) -> None:
        from ..runtime import cache

        cache.clear_memory_cache()

    def load(self, family) -> tuple[float, str]:
        import cupy

        from .._resources import cuda_src_dir
        from ..runtime import cache, device

        if not family.runs_on(self.arch):
            raise RuntimeError(f"not built for sm_{self.arch} ({family.source} runs on {family.arch_text()})")
        started = time.perf_counter()
        program, origin = cache.lookup(cuda_src_dir() / family.source, family.names, self.arch, cache_root=self.root,
                                       arch_specific=family.arch_specific)
        image = program.binary + b"\x00" if program.kind == "ptx" else program.binary  # as runtime/cuda.py loads it
        with device.guard(self.device_index):  # switches back only to a GPU that has a context already
            cupy.cuda.function.Module().load(image)
        return time.perf_counter() - started, origin

    def describe(self) -> dict:
        return {"arch": f"sm_{self.arch}"}


class _Emulator:
    """The system C++ compiler through the emulator's build cache (its folder comes from NA_RTC_CACHE_DIR)."""

    def __init__(self, root: Path):
        self.root = root

    @contextlib.contextmanager
    def session(self):
        previous = os.environ.get("NA_RTC_CACHE_DIR")
        os.environ["NA_RTC_CACHE_DIR"] = str(self.root)
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("NA_RTC_CACHE_DIR", None)
            else:
                os.environ["NA_RTC_CACHE_DIR"] = previous

    def clear(self) -> None:
        from .. import emulator

        emulator.clear_memory_cache()

    def load(self, family) -> tuple[float, str]:
        from .. import emulator
        from .._resources import cuda_src_dir

        source = cuda_src_dir() / family.source
        existed = emulator.library_path(source, family.names).exists()
        started = time.perf_counter()
        emulator.load_module(source, family.names)
        return time.perf_counter() - started, "disk" if existed else "compiled"

    def describe(self) -> dict:
        return {"note": "the cached load of a library already mapped in this process is the lookup, "
                        "checksum and dlopen"}


def measure_families(names, backend: str, device_index: int = 0, jobs: int | None = None) -> dict:
    """``{family: {compile_s, cached_load_s, ...}}`` on ``backend`` (``cuda`` or ``emulator``).

    A family that fails is reported with its error, and the others still run.
    """
    from ..runtime.families import FAMILIES

    root = _scratch()
    try:
        tool = _Cuda(root, device_index) if backend == "cuda" else _Emulator(root)
    except Exception as error:  # noqa: BLE001 - no device to ask for its architecture, say so per family
        return {name: {"error": f"{type(error).__name__}: {error}"[:400]} for name in names}
    jobs = jobs or min(len(names), max(1, (os.cpu_count() or 1) // 2))
    out: dict = {}

    def timed(name):
        try:
            return tool.load(FAMILIES[name])
        except Exception as error:  # noqa: BLE001 - reported in the results, the run goes on
            return f"{type(error).__name__}: {error}"[:400]

    with tool.session():
        tool.clear()
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            first = dict(zip(names, pool.map(timed, names)))
        tool.clear()
        for name in names:  # one at a time: loads are short and would only measure each other
            if isinstance(first[name], str):
                out[name] = {"error": first[name]}
                continue
            cached = timed(name)
            if isinstance(cached, str):
                out[name] = {"error": cached}
                continue
            out[name] = {"compile_s": first[name][0], "first_origin": first[name][1], "cached_load_s": cached[0],
                         "cached_origin": cached[1], "kernels": len(FAMILIES[name].names), "parallel_jobs": jobs,
                         **tool.describe()}
    return out


def warm_emulator_families(names, jobs: int | None = None) -> None:
    """Build (or load) the emulator libraries of ``names`` in the user's cache, in parallel threads.

    On a CPU machine the first emulator call of each family would otherwise
    build it inside a timed entry, one family after another; building them
    together up front takes about the slowest family's time on spare cores.
    A family that fails to build is left for its entry to report.
    """
    from .. import emulator
    from .._resources import cuda_src_dir
    from ..runtime.families import FAMILIES

    def build(name):
        try:
            emulator.load_module(cuda_src_dir() / FAMILIES[name].source, FAMILIES[name].names)
        except Exception:  # noqa: BLE001 - the entry that needs it reports the error
            pass

    names = list(names)
    with ThreadPoolExecutor(max_workers=max(1, jobs or min(len(names), os.cpu_count() or 1))) as pool:
        list(pool.map(build, names))
