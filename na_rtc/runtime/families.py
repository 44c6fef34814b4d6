"""Kernel families: one source file in ``cuda_src/`` and every instantiation of
it the dispatcher can pick (one NVRTC program / emulator library per family).

``check`` and ``precompile`` iterate over :data:`FAMILIES`; the ops modules
take their kernel names from here, so a kernel that is launched is always one
that CI compiles and checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: our element types: dtype name -> C++ type in cuda_src/na_types.cuh
CTYPES = {"float32": "float", "float64": "double", "float16": "fp16_t", "bfloat16": "bf16_t"}


def accumulator_dtype(dtype: str) -> str:
    """Kernels accumulate in float32, or float64 for float64 inputs."""
    return "float64" if dtype == "float64" else "float32"


@dataclass(frozen=True)
class Family:
    source: str
    names: tuple[str, ...]
    #: threads per block at launch, per name (for check's fit test)
    launch_threads: dict = field(default_factory=dict)
    #: dynamic shared memory bytes at the largest launch, per name
    launch_shared_bytes: dict = field(default_factory=dict)


NAIVE_THREADS = 256  # one thread per output element; NA_RPB_THREADS in na_naive.cu matches


def naive_names() -> tuple[str, ...]:
    names = []
    for dtype, element in CTYPES.items():
        acc = CTYPES[accumulator_dtype(dtype)]
        names += [
            f"na_qk_fwd<{element}, {element}>", f"na_qk_fwd<{element}, {acc}>",
            f"na_av_fwd<{element}, {element}>", f"na_av_fwd<{acc}, {element}>",
            f"na_inv_fwd<{element}, {element}>", f"na_inv_fwd<{acc}, {element}>",
            f"na_rpb_bwd<{element}>",
        ]
    for acc in ("float", "double"):
        names += [f"na_rpb_bwd<{acc}>", f"na_softmax_fwd<{acc}>", f"na_softmax_bwd<{acc}>"]
    return tuple(dict.fromkeys(names))


def _family(source: str, names: tuple[str, ...], threads: int) -> Family:
    return Family(source, names, {n: threads for n in names}, {n: 0 for n in names})


FAMILIES: dict[str, Family] = {
    "naive": _family("na_naive.cu", naive_names(), NAIVE_THREADS),
    "selftest": _family("na_selftest.cu", ("na_selftest_convert",), 256),
}


def family_of(kernel_name: str) -> Family:
    for family in FAMILIES.values():
        if kernel_name in family.names:
            return family
    raise KeyError(f"kernel {kernel_name!r} is in no family of na_rtc.runtime.families")
