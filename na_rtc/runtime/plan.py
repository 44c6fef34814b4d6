"""Launch plans: one description of a kernel launch, executed by any backend.

The dispatcher (``na_rtc/runtime/dispatch.py``) picks the kernels of a
validated problem, the family modules plan their launches and
``na_rtc/runtime/launch.py`` turns them into :class:`LaunchPlan` s; the
``cuda`` backend runs them with CuPy on the GPU and
the ``emulator`` backend runs the same plans on the CPU. A plan names its
kernel by source file and C++ name expression (``na_qk_fwd<float>``), so the
same string selects the NVRTC lowered name and the emulator trampoline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

#: argument kinds a kernel parameter can have, with their C++ types
ARG_CTYPES = {
    "ptr": "void*",  # value: an array (NumPy, CuPy, torch); the backend passes its data pointer
    "i64": "long long",
    "i32": "int",
    "f32": "float",
    "f64": "double",
}

#: CUDA grid limits (x, y, z); plans fold work into grid.x to stay inside them
MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_BLOCK_THREADS = 1024


def within_grid_limit(blocks: int) -> tuple[bool, str]:
    """A coverage rule's verdict on a launch of ``blocks`` blocks: ``(True, "")`` within CUDA's grid limit (x),
    else ``(False, why)`` (the rule steps aside; the straightforward kernels say to split the batch)."""
    if blocks > MAX_GRID[0]:
        return False, f"{blocks} blocks, more than CUDA's grid limit {MAX_GRID[0]}"
    return True, ""


@dataclass(frozen=True)
class Kernel:
    """A kernel instantiation: ``source`` is a file in ``cuda_src/``."""

    source: str
    name: str


class _ArgFields(NamedTuple):
    kind: str
    value: Any


class Arg(_ArgFields):
    """One kernel argument: its kind (a key of :data:`ARG_CTYPES`) and value. A tuple, so the thousands a
    second that the launch path packs cost little; the helpers below skip the kind check they cannot fail."""

    __slots__ = ()

    def __new__(cls, kind: str, value: Any):
        if kind not in ARG_CTYPES:
            raise ValueError(f"unknown kernel argument kind {kind!r}")
        return _ArgFields.__new__(cls, kind, value)


_arg = tuple.__new__


def ptr(array) -> Arg:
    return _arg(Arg, ("ptr", array))


def i64(value: int) -> Arg:
    return _arg(Arg, ("i64", int(value)))


def i32(value: int) -> Arg:
    return _arg(Arg, ("i32", int(value)))


def f32(value: float) -> Arg:
    return _arg(Arg, ("f32", float(value)))


def f64(value: float) -> Arg:
    return _arg(Arg, ("f64", float(value)))


#: the null pointer (an absent bias or logsumexp)
NULL = ptr(None)


@dataclass(frozen=True)
class LaunchPlan:
    kernel: Kernel
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_bytes: int
    args: tuple[Arg, ...]

    def __post_init__(self):
        if any(g < 1 or g > limit for g, limit in zip(self.grid, MAX_GRID)):
            raise ValueError(f"grid {self.grid} is outside the CUDA limits {MAX_GRID}")
        threads = self.block[0] * self.block[1] * self.block[2]
        if not 1 <= threads <= MAX_BLOCK_THREADS:
            raise ValueError(f"block {self.block} has {threads} threads; 1..{MAX_BLOCK_THREADS} allowed")
