"""Run launch plans on a compiled emulator library.

:class:`EmulatedModule` executes a :class:`~na_rtc.runtime.plan.LaunchPlan`:
each argument becomes a C value of the kernel parameter's type (checked
against the kernel's signature), pointers are the data addresses of NumPy
arrays or CPU torch tensors (the address of the view's first element; kernels
index with element strides), and the launch runs all blocks on the worker
threads. Launches are serialized process-wide: one runs at a time and uses
every core (``NA_RTC_EMULATOR_THREADS``).

Checked mode (``launch(plan, checked=True)`` or ``NA_RTC_EMULATOR_CHECKED=1``)
gives the kernel, for every pointer argument, an exact-size copy of the bytes
its view spans, placed so that its end abuts an inaccessible guard page (and
with another one before its first page). An access just past the end faults
and is reported as ``EmulatorError`` naming the argument and the byte offset;
writes in the bytes below the start (between the guard page and the buffer)
are found afterwards by a fill pattern, and so are writes between the
elements of a strided view. Reads below the start are only caught once they
reach the guard page before it (up to a page away). Elements the kernel
changed are copied back after a successful launch (only those, so views of
one tensor passed as separate arguments work); a failed checked launch leaves
the arrays untouched. Arguments that alias each other see separate copies.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import config

__all__ = ["EmulatedModule", "EmulatorError"]


class EmulatorError(RuntimeError):
    """A kernel failed in the emulator (divergence, out-of-bounds access, fault, ...)."""


#: one launch at a time in the process: launches install signal handlers and use every core
_LAUNCH_LOCK = threading.Lock()


def _reset_lock_in_child() -> None:  # a fork during another thread's launch must not leave it held
    global _LAUNCH_LOCK
    _LAUNCH_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_in_child)

_LAUNCH_ARGTYPES = [
    ctypes.POINTER(ctypes.c_uint),
    ctypes.POINTER(ctypes.c_uint),
    ctypes.c_size_t,
    ctypes.POINTER(ctypes.c_void_p),
    ctypes.c_char_p,
    ctypes.c_size_t,
]

#: plan argument kind -> signature letters it may bind to
_KIND_LETTERS = {"ptr": "p", "i64": "qQ", "i32": "iI", "f32": "f", "f64": "d"}
_LETTER_TYPES = {
    "p": "a pointer",
    "i": "int",
    "I": "unsigned int",
    "q": "a 64-bit integer (long long)",
    "Q": "an unsigned 64-bit integer",
    "f": "float",
    "d": "double",
    "?": "a type plans cannot pass (struct, bool, char, short, ...)",
}
# unsigned parameters take their signed bit pattern too (i32(-1) is 0xffffffff)
_INT_RANGES = {"i": (-(2**31), 2**31 - 1), "I": (-(2**31), 2**32 - 1), "q": (-(2**63), 2**63 - 1), "Q": (-(2**63), 2**64 - 1)}
_INT_CTYPES = {"i": ctypes.c_int, "I": ctypes.c_uint, "q": ctypes.c_longlong, "Q": ctypes.c_ulonglong}
_CANARY = 0xA5

_RC_KERNEL, _RC_INVALID, _RC_INTERRUPTED, _RC_RESOURCES = 1, 2, 3, 4


@dataclass
class _Pointer:
    """A pointer argument: the view's first element, its shape and byte strides."""

    index: int
    address: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # bytes
    itemsize: int
    writeable: bool

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    def bounds(self) -> tuple[int, int]:
        """The byte span [lo, hi) of the view."""
        if self.size == 0:
            return self.address, self.address
        lo = hi = self.address
        for n, s in zip(self.shape, self.strides):
            if s < 0:
                lo += (n - 1) * s
            else:
                hi += (n - 1) * s
        return lo, hi + self.itemsize

    def contiguous_span(self) -> bool:
        lo, hi = self.bounds()
        return hi - lo == self.size * self.itemsize


def _describe(value) -> str:
    from .._arrays import describe

    return describe(value)


def _pointer(value, index: int, kernel: str) -> _Pointer | None:
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject or not value.dtype.isnative:
            raise TypeError(
                f"argument {index} of {kernel} has dtype {value.dtype}; kernels take native-byte-order numbers"
            )
        return _Pointer(index, value.ctypes.data, tuple(value.shape), tuple(value.strides), value.itemsize,
                        bool(value.flags.writeable))
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise TypeError(
                f"argument {index} of {kernel} is a torch.Tensor on {value.device}; the emulator runs on the CPU and "
                "needs NumPy arrays or CPU tensors"
            )
        size = value.element_size()
        return _Pointer(index, value.data_ptr(), tuple(value.shape), tuple(s * size for s in value.stride()), size, True)
    raise TypeError(
        f"argument {index} of {kernel} is a {_describe(value)}; the emulator needs a NumPy array or a CPU torch "
        "tensor (or None for a null pointer)"
    )


def _raw(address: int, nbytes: int) -> np.ndarray:
    """A writable uint8 array over raw memory."""
    if nbytes == 0:
        return np.zeros(0, np.uint8)
    return np.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), np.uint8)


def _elements(raw: np.ndarray, offset: int, p: _Pointer) -> np.ndarray:
    """The view's elements over ``raw`` (which starts at the view's low bound), as bytes."""
    return np.lib.stride_tricks.as_strided(raw[offset:], p.shape + (p.itemsize,), p.strides + (1,))


class _Guarded:
    """Checked mode: guarded copies of the pointer arguments of one launch."""

    def __init__(self, library, pointers: list[_Pointer]):
        self.library = library
        self.page = library.na_emu_page_size()
        self.copies: list[tuple[_Pointer, int, int, int]] = []  # (pointer, lo, nbytes, start)
        for p in pointers:
            lo, hi = p.bounds()
            start = library.na_emu_guard_alloc(hi - lo)
            if not start:
                self.free()
                raise MemoryError(f"checked mode could not map a guarded copy of argument {p.index} ({hi - lo} bytes)")
            ctypes.memmove(start, lo, hi - lo)
            self.copies.append((p, lo, hi - lo, start))

    def address(self, p: _Pointer) -> int:
        for q, lo, _, start in self.copies:
            if q is p:
                return start + (p.address - lo)
        raise KeyError(p.index)

    def register(self) -> None:
        n = len(self.copies)
        starts = (ctypes.c_void_p * max(n, 1))(*[c[3] for c in self.copies])
        sizes = (ctypes.c_size_t * max(n, 1))(*[c[2] for c in self.copies])
        labels = (ctypes.c_int * max(n, 1))(*[c[0].index for c in self.copies])
        if self.library.na_emu_set_guards(n, starts, sizes, labels) != 0:
            raise EmulatorError(f"checked mode supports at most 256 pointer arguments, got {n}")

    def unregister(self) -> None:
        self.library.na_emu_set_guards(0, None, None, None)

    def problems(self) -> list[str]:
        """Writes the guard pages cannot catch: below the start, between strided elements, to read-only arrays."""
        found = []
        for p, lo, nbytes, start in self.copies:
            gap = start % self.page
            if gap:
                below = _raw(start - gap, gap)
                bad = np.flatnonzero(below != _CANARY)
                if bad.size:
                    first, last = int(bad[0]) - gap, int(bad[-1]) - gap
                    found.append(
                        f"out-of-bounds write to argument {p.index} at byte offsets {first}..{last} "
                        f"(before the start of its {nbytes}-byte buffer)"
                    )
            if nbytes and not p.contiguous_span():
                covered = np.zeros(nbytes, bool)
                _elements(covered.view(np.uint8), p.address - lo, p)[...] = 1
                changed = (_raw(start, nbytes) != _raw(lo, nbytes)) & ~covered
                if changed.any():
                    offset = int(np.flatnonzero(changed)[0]) - (p.address - lo)
                    found.append(
                        f"argument {p.index} is a strided view and the kernel wrote between its elements "
                        f"(byte offset {offset} from its first element)"
                    )
        return found

    def copy_back(self) -> list[str]:
        """Copy changed elements back (after comparing all arguments, so aliasing views work)."""
        updates, found = [], []
        for p, lo, nbytes, start in self.copies:
            if nbytes == 0:
                continue
            new = _elements(_raw(start, nbytes), p.address - lo, p)
            old = _elements(_raw(lo, nbytes), p.address - lo, p)
            changed = (new != old).any(axis=-1)
            if changed.any():
                if not p.writeable:
                    found.append(f"argument {p.index} is a read-only array, but the kernel wrote to it")
                    continue
                updates.append((old, new, changed))
        if not found:
            for old, new, changed in updates:
                old[changed] = new[changed]
        return found

    def free(self) -> None:
        for _, _, nbytes, start in self.copies:
            self.library.na_emu_guard_free(start, nbytes)
        self.copies = []


class EmulatedModule:
    """The kernels of one source file compiled for the emulator.

    ``names`` are the name expressions it was built with, ``path`` its
    library; :meth:`launch` runs a plan, :meth:`signature` tells a kernel's
    parameter types.
    """

    def __init__(self, source: Path, names: tuple[str, ...], path: Path, library: ctypes.CDLL):
        self.source = Path(source)
        self.names = tuple(names)
        self.path = Path(path)
        self.compile_seconds = 0.0
        #: tensor-core instructions the last launch executed, one per warp: {"mma.sync": n, "wgmma": n} (a
        #: warpgroup's wgmma counts four); tests check the work a kernel does with them
        self.last_op_counts: dict[str, int] = {}
        self._library = library
        try:
            abi = library.na_emu_abi_version
            abi.restype = ctypes.c_int
            if abi() != 1:
                raise EmulatorError(f"{path} has emulator ABI {abi()}, expected 1")
            library.na_emu_page_size.restype = ctypes.c_size_t
            library.na_emu_guard_alloc.restype = ctypes.c_void_p
            library.na_emu_guard_alloc.argtypes = [ctypes.c_size_t]
            library.na_emu_guard_free.restype = None
            library.na_emu_guard_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            library.na_emu_set_guards.restype = ctypes.c_int
            library.na_emu_set_guards.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
            library.na_emu_set_threads.restype = None
            library.na_emu_set_threads.argtypes = [ctypes.c_int]
            library.na_emu_set_schedule.restype = None
            library.na_emu_set_schedule.argtypes = [ctypes.c_int]
            library.na_emu_op_counts.restype = None
            library.na_emu_op_counts.argtypes = [ctypes.POINTER(ctypes.c_ulonglong), ctypes.c_int]
            self._launchers = {}
            self._signatures = {}
            for i, name in enumerate(self.names):
                launcher = getattr(library, f"na_emu_launch_{i}")
                launcher.restype = ctypes.c_int
                launcher.argtypes = _LAUNCH_ARGTYPES
                signature = getattr(library, f"na_emu_signature_{i}")
                signature.restype = ctypes.c_char_p
                self._launchers[name] = launcher
                self._signatures[name] = signature().decode()
        except AttributeError as error:
            raise EmulatorError(f"{path} is not a complete emulator library ({error})") from None

    def __repr__(self) -> str:
        return f"EmulatedModule({self.source.name!r}, {len(self.names)} kernels)"

    def signature(self, name: str) -> str:
        """One letter per parameter of kernel ``name``: p pointer, i int, I unsigned,
        q int64, Q uint64, f float, d double, ? other."""
        self._check_name(name)
        return self._signatures[name]

    def _check_name(self, name: str) -> None:
        if name not in self._launchers:
            listed = ", ".join(self.names[:8]) + (", ..." if len(self.names) > 8 else "")
            raise ValueError(f"kernel {name!r} is not in the emulator module of {self.source.name} (it has {listed})")

    # ------------------------------------------------------------ launching

    def _arguments(self, plan) -> tuple[list, list[_Pointer], list[tuple[int, _Pointer]]]:
        """C values of the plan's arguments, its pointer arguments, and where each pointer sits in the values."""
        name = plan.kernel.name
        signature = self._signatures[name]
        if len(plan.args) != len(signature):
            raise TypeError(f"{name} takes {len(signature)} arguments, the plan passes {len(plan.args)}")
        storage, pointers, slots = [], [], []
        for i, (arg, letter) in enumerate(zip(plan.args, signature)):
            if letter not in _KIND_LETTERS[arg.kind]:
                raise TypeError(
                    f"argument {i} of {name}: the plan passes {arg.kind} but the kernel parameter is {_LETTER_TYPES[letter]}"
                )
            if arg.kind == "ptr":
                p = _pointer(arg.value, i, name)
                value = ctypes.c_void_p(p.address if p is not None else None)
                if p is not None:
                    pointers.append(p)
                    slots.append((len(storage), p))
            elif arg.kind in ("i32", "i64"):
                low, high = _INT_RANGES[letter]
                if not low <= arg.value <= high:
                    raise ValueError(f"argument {i} of {name}: {arg.value} does not fit in {_LETTER_TYPES[letter]}")
                value = _INT_CTYPES[letter](arg.value)  # ctypes wraps negative values of unsigned types
            elif arg.kind == "f32":
                value = ctypes.c_float(arg.value)
            else:
                value = ctypes.c_double(arg.value)
            storage.append(value)
        return storage, pointers, slots

    def launch(self, plan, checked: bool = False) -> None:
        """Run ``plan`` (a :class:`~na_rtc.runtime.plan.LaunchPlan` naming one of
        this module's kernels) to completion; :class:`EmulatorError` when the
        kernel fails. ``checked`` (or ``NA_RTC_EMULATOR_CHECKED=1``) runs it on
        guarded copies of every buffer (see the module docstring)."""
        name = plan.kernel.name
        self._check_name(name)
        checked = checked or config.emulator_checked()
        storage, pointers, slots = self._arguments(plan)
        grid = (ctypes.c_uint * 3)(*plan.grid)
        block = (ctypes.c_uint * 3)(*plan.block)
        error = ctypes.create_string_buffer(4096)
        threads = config.emulator_threads()
        reverse = int(config.emulator_schedule() == "reverse")
        library = self._library
        with _LAUNCH_LOCK:
            guarded = _Guarded(library, pointers) if checked else None
            try:
                if guarded is not None:
                    for position, p in slots:
                        storage[position] = ctypes.c_void_p(guarded.address(p))
                args = (ctypes.c_void_p * max(len(storage), 1))(*[ctypes.addressof(v) for v in storage])
                library.na_emu_set_threads(threads)
                library.na_emu_set_schedule(reverse)
                if guarded is not None:
                    guarded.register()
                counts = (ctypes.c_ulonglong * 2)()
                library.na_emu_op_counts(counts, 1)  # from zero for this launch (the lock keeps others out)
                try:
                    rc = self._launchers[name](grid, block, plan.shared_bytes, args, error, len(error))
                    library.na_emu_op_counts(counts, 1)
                    self.last_op_counts = {"mma.sync": counts[0], "wgmma": counts[1]}
                finally:
                    if guarded is not None:
                        guarded.unregister()
                message = error.value.decode(errors="replace")
                problems = guarded.problems() if guarded is not None else []
                if rc == 0 and not problems and guarded is not None:
                    problems = guarded.copy_back()
            finally:
                if guarded is not None:
                    guarded.free()
        # rc == _RC_INTERRUPTED: the library re-raised SIGINT, so Python's handler raises
        # KeyboardInterrupt at its next check; EmulatorError only if that handler does not
        if rc != 0:
            if problems:
                message += "; also: " + "; ".join(problems)
            raise EmulatorError(message if rc == _RC_KERNEL else f"{message} (emulator error code {rc})")
        if problems:
            raise EmulatorError(f"in {name} (checked mode): " + "; ".join(problems))
