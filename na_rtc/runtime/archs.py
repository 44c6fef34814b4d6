"""GPU architectures: per-block limits, and the classes of GPU the kernels are checked for.

One table serves ``python -m na_rtc check`` (does a compiled kernel fit its
largest launch?) and the kernel families (may a coverage rule admit a launch
of this size on every architecture the family can be sent to?). Architectures
are compute capabilities as integers: 80 for sm_80, 120 for sm_120. No torch
or cupy here: the launch path and the GPU-less ``check`` both import it.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

__all__ = [
    "CI_ARCHS",
    "CLASSES",
    "FALLBACK_LIMITS",
    "KIB",
    "LIMITS",
    "STATIC_SHARED_MAX",
    "ArchLimits",
    "fits",
    "limits_for",
    "rotating_class",
    "shared_limit",
]

KIB = 1024
#: static shared memory a kernel may declare on every architecture (more needs dynamic memory and the opt-in)
STATIC_SHARED_MAX = 48 * KIB


class ArchLimits(NamedTuple):
    """Per-block limits of one architecture (CUDA C++ Programming Guide, "Technical Specifications per
    Compute Capability")."""

    registers_per_block: int = 65536
    max_threads_per_block: int = 1024
    max_registers_per_thread: int = 255
    register_unit_per_warp: int = 256  # registers are allocated to warps in units of this many
    max_shared_per_block: int = 99 * KIB  # opt-in maximum, static + dynamic
    static_shared_max: int = STATIC_SHARED_MAX
    known: bool = True  # False: not in the table, conservative values assumed


#: compute capability -> limits; above 48 KiB of shared memory a launch must opt in
#: (``cudaFuncAttributeMaxDynamicSharedMemorySize``)
LIMITS: dict[int, ArchLimits] = {
    70: ArchLimits(max_shared_per_block=96 * KIB),  # V100
    72: ArchLimits(max_shared_per_block=96 * KIB),  # Xavier
    75: ArchLimits(max_shared_per_block=64 * KIB),  # T4, RTX 20
    80: ArchLimits(max_shared_per_block=163 * KIB),  # A100
    86: ArchLimits(max_shared_per_block=99 * KIB),  # RTX 30, A10, A40
    87: ArchLimits(max_shared_per_block=163 * KIB),  # Orin
    89: ArchLimits(max_shared_per_block=99 * KIB),  # RTX 40, L4, L40
    90: ArchLimits(max_shared_per_block=227 * KIB),  # H100, H200
    100: ArchLimits(max_shared_per_block=227 * KIB),  # B200
    103: ArchLimits(max_shared_per_block=227 * KIB),  # B300
    120: ArchLimits(max_shared_per_block=99 * KIB),  # RTX 50, RTX PRO 6000
    121: ArchLimits(max_shared_per_block=99 * KIB),  # GB10
}
#: an architecture missing from the table: the smallest opt-in shared memory of sm_80 and newer
FALLBACK_LIMITS = ArchLimits(max_shared_per_block=99 * KIB, known=False)

#: The classes of GPU the kernels are checked for, one representative each: what sets a class apart is
#: what the dispatcher may send there (sm_75: no tensor-core kernels; sm_90: the wgmma kernels too) and
#: what ptxas and the limits make of a kernel there (register allocation, shared memory per block).
CLASSES: dict[int, str] = {
    75: "sm_75 (T4, RTX 20): SIMT and split kernels only, 64 KiB shared memory",
    80: "sm_80 and sm_87 (A100, Orin): 163 KiB",
    86: "sm_86 and sm_89 (RTX 30/40, A10, L4, L40): 99 KiB",
    90: "sm_90 (H100, H200) and its arch-specific sm_90a (the wgmma kernels): 227 KiB",
    100: "sm_100 and sm_103 (B200, B300): 227 KiB",
    120: "sm_120 and sm_121 (RTX 50, RTX PRO 6000, GB10): 99 KiB",
}
#: the classes every CI run checks in full; one of the others is added per run (rotating_class)
CI_ARCHS = (80, 90)

def limits_for(arch: int) -> ArchLimits:
    """The table's limits of ``arch``, or :data:`FALLBACK_LIMITS` (``known`` False) for one it lacks."""
    return LIMITS.get(arch, FALLBACK_LIMITS)


def shared_limit(arch: int) -> int:
    """The most shared memory (static + dynamic, after the opt-in) a block may use on ``arch``."""
    return limits_for(arch).max_shared_per_block


def fits(arch: int, static_bytes: int, dynamic_bytes: int) -> bool:
    """Whether a launch with this static and dynamic shared memory can run on ``arch``."""
    limits = limits_for(arch)
    return (0 <= static_bytes <= limits.static_shared_max and dynamic_bytes >= 0
            and static_bytes + dynamic_bytes <= limits.max_shared_per_block)


def rotating_class(key: str) -> int:
    """The class beyond :data:`CI_ARCHS` that a CI run checks, picked by a hash of ``key`` (the commit):
    the same commit always gets the same class, and commits spread over all of them."""
    others = [arch for arch in CLASSES if arch not in CI_ARCHS]
    digest = hashlib.sha256(key.strip().encode()).digest()
    return others[int.from_bytes(digest[:8], "big") % len(others)]
