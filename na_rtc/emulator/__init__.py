"""The CPU emulator: run the CUDA C kernels of ``cuda_src/`` without a GPU.

``load_module(source, names)`` compiles a kernel source with the system C++
compiler against ``cuda_emu.h`` (the CUDA execution model: blocks on worker
threads, the threads of a block as fibers, shared memory, barriers, warp
collectives, atomics, fp16/bf16 conversions, deferred cp.async) and caches
the library on disk; ``EmulatedModule.launch(plan)`` runs a
:class:`~na_rtc.runtime.plan.LaunchPlan` on NumPy arrays or CPU torch tensors.
``launch(plan, checked=True)`` (or ``NA_RTC_EMULATOR_CHECKED=1``) runs on
guarded copies of every buffer and reports out-of-bounds accesses.

It is a test and debugging tool: slow is fine, wrong is not. See
``cuda_emu.h`` for the spellings kernels use and what is checked.
"""

from .build import (
    FLAGS,
    EmulatorBuildError,
    EmulatorCacheWarning,
    available,
    cache_stats,
    clear_memory_cache,
    compiler_command,
    library_path,
    load_module,
    reset_cache_stats,
)
from .module import EmulatedModule, EmulatorError

__all__ = [
    "FLAGS",
    "EmulatedModule",
    "EmulatorBuildError",
    "EmulatorCacheWarning",
    "EmulatorError",
    "available",
    "cache_stats",
    "clear_memory_cache",
    "compiler_command",
    "library_path",
    "load_module",
    "reset_cache_stats",
]
