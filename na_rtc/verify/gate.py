"""First-use verification: a kernel proves itself on the user's GPU before na_rtc trusts it.

The dispatcher (``runtime/dispatch.py``) offers its candidate kernel paths
in order (wgmma, mma.sync, SIMT, the composed split kernels) and asks
:meth:`Gate.trusted` about each; the first trusted one runs. The split ops have one path each,
which serves only once trusted. A path is trusted when every kernel
instantiation it launches has a passing verdict. A kernel without a verdict
gets one now: its path runs a canary (:mod:`na_rtc.verify.canary`) and the
results are compared with the float64 reference, per output, so a wrong dq
condemns the dq kernel and not the dK/dV kernel beside it. Verdicts are kept
per device in memory and on disk (:mod:`na_rtc.verify.verdicts`), so the
next process does not run the canary again.

A kernel that gives wrong results is disabled for that GPU, with one warning
naming it and the mismatch; the dispatcher then tries its next candidate.
Launch errors and out-of-memory during a canary are raised, not recorded.

When it runs: on the ``cuda`` backend (the emulator runs the same kernels
in CI, where the tests hold them to the reference), unless ``NA_RTC_VERIFY=0``;
never while a CUDA graph is being captured or torch.compile is tracing (a
recorded verdict is used; without one the call goes ahead and the launcher
says whether a kernel that was never loaded can run under capture).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

from .. import _diskcache, config
from .._args import Problem
from . import canary
from .verdicts import Verdict, VerdictStore, now_utc, verdict_key

__all__ = ["Candidate", "Gate", "KernelVerificationWarning", "store", "verifies_automatically",
           "verify_automatically_on"]


class KernelVerificationWarning(UserWarning):
    """A kernel gave wrong results on this GPU and is not used (once per kernel and device per process)."""


@dataclass(frozen=True)
class Candidate:
    """One way a dispatcher can serve an op: the kernels it launches and how to run it.

    ``op``: a name of ``canary.OPS``; ``kernels(problem)``: name expression -> the outputs that kernel
    computes (``canary.OUTPUTS``), for the kernels this path launches for ``problem``; ``run``: the op on this
    path (see ``canary.Runner``); ``canary(problem)``: the canary problem that runs the same kernels.
    """

    op: str
    path: str
    kernels: Callable[[Problem], Mapping[str, tuple[str, ...]]]
    run: canary.Runner
    canary: Callable[[Problem], Problem] = canary.canary_problem


#: backends whose dispatchers verify automatically; tests add the emulator (verify_automatically_on)
_AUTOMATIC = {"cuda"}
_store = VerdictStore()


def store() -> VerdictStore:
    """The process's verdict store (``<cache dir>/verdicts``)."""
    return _store


@contextlib.contextmanager
def verify_automatically_on(backend: str) -> Iterator[None]:
    """Verify automatically on ``backend`` too while inside (the emulator, for tests of this machinery)."""
    added = backend not in _AUTOMATIC
    _AUTOMATIC.add(backend)
    try:
        yield
    finally:
        if added:
            _AUTOMATIC.discard(backend)


def verifies_automatically(backend: str) -> bool:
    """Whether ``backend``'s dispatcher verifies kernels before their first use (``cuda``; tests add the
    emulator)."""
    return backend in _AUTOMATIC


def _device_index(problem: Problem) -> int:
    return int(problem.device.partition(":")[2] or 0)  # problems name their GPU ("cuda:1")


# ---------------------------------------------------------------- identities (what a verdict's key covers)


def device_identity(backend: str, problem: Problem) -> tuple[str, str]:
    """``(key part, description)`` of the device a verdict holds for: the GPU's name, compute capability and
    driver version on ``cuda``; the C++ compiler on the emulator."""
    if backend == "cuda":
        import cupy

        index = _device_index(problem)
        properties = cupy.cuda.runtime.getDeviceProperties(index)
        name = properties["name"]
        name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        driver = int(cupy.cuda.runtime.driverGetVersion())
        arch = f"sm_{properties['major']}{properties['minor']}"
        return f"{name}|{arch}|driver {driver}", f"GPU {index} ({name}, {arch})"
    from ..emulator import build

    return f"emulator|{' '.join(build.compiler_command())}", "the emulator"


def program_identity(backend: str, problem: Problem, kernel: str) -> str:
    """The compiled-program identity of ``kernel`` alone: the kernel cache's key (sources, options, arch,
    NVRTC and na_rtc versions) on ``cuda``, the emulator's build key on the CPU. Kernels of no family (the
    composed split path's pseudo-names) are keyed with the straightforward kernels' source: every key
    covers all of ``cuda_src`` anyway."""
    from .._resources import cuda_src_dir
    from ..runtime import families, registry  # noqa: F401 - importing the families registers them

    try:
        family = registry.family_of(kernel)
    except KeyError:
        family = registry.get("naive")
    if backend == "cuda":
        from ..runtime import cache, device

        arch = device.compute_capability(_device_index(problem))
        return cache.cache_key(family.source, (kernel,), arch, arch_specific=family.arch_specific)
    from ..emulator import build

    return build.library_path(cuda_src_dir() / family.source, (kernel,)).stem


# ---------------------------------------------------------------- when not to run a canary


def _tracing() -> bool:
    torch = sys.modules.get("torch")
    compiler = getattr(torch, "compiler", None) if torch is not None else None
    return bool(compiler is not None and compiler.is_compiling())


def _capturing(problem: Problem) -> bool:
    """Whether the stream the call's launches go on is being captured into a CUDA graph."""
    if not problem.device.startswith("cuda"):
        return False
    from ..runtime import device

    return device.stream_capturing(problem.kind, _device_index(problem))


# ---------------------------------------------------------------- the gate


class Gate:
    """The trust policy of one backend's dispatchers (see the module docstring)."""

    _current: dict[str, "Gate"] = {}

    def __init__(self, backend: str):
        Gate._current[backend] = self  # the op table's gate (one table per backend and process)
        self.backend = backend
        self._verdicts: dict[tuple[str, str], Verdict] = {}  # (device, kernel) -> verdict
        self._identities: dict[str, tuple[str, str]] = {}  # device -> device_identity
        self._lock = threading.RLock()
        self._warned: set[tuple[str, str]] = set()
        self.stats = {"canaries": 0, "recorded_verdicts_read": 0}

    @classmethod
    def of(cls, backend: str) -> "Gate":
        """The gate of ``backend``'s op table (a new one when the table has not been built)."""
        return cls._current.get(backend) or cls(backend)

    def active(self) -> bool:
        return self.backend in _AUTOMATIC and config.verify()

    def trusted(self, problem: Problem, candidate: Candidate, active: bool | None = None) -> bool:
        """Whether ``candidate`` may serve ``problem``: every kernel it launches has passed (verified now
        if it has no verdict yet). Always True when verification is off for this backend. ``active``: whether
        it is on, as the caller's dispatch policy read it for this call (default: :meth:`active`)."""
        if not (self.active() if active is None else active):
            return True
        names = tuple(candidate.kernels(problem))
        known = {name: self._known(problem, name) for name in names}
        if any(verdict is None for verdict in known.values()):
            if _tracing() or _capturing(problem):
                return True  # never a canary under capture or tracing; the launcher refuses unloaded kernels
            with self._lock:  # one canary at a time; a thread that waited finds the verdicts recorded
                known = {name: self._known(problem, name) for name in names}
                if any(verdict is None for verdict in known.values()):
                    known.update(self.verify(problem, candidate))
        failed = [verdict for verdict in known.values() if not verdict.ok]
        for verdict in failed:
            self._warn_once(problem, verdict)
        return not failed

    def distrusted(self, problem: Problem, candidates, active: bool | None = None) -> list[Verdict]:
        """The failing verdicts, among ``candidates``' kernels, for an error that says why none served."""
        if not (self.active() if active is None else active):
            return []
        found = []
        for candidate in candidates:
            for name in candidate.kernels(problem):
                verdict = self._known(problem, name)
                if verdict is not None and not verdict.ok and verdict not in found:
                    found.append(verdict)
        return found

    def known(self, problem: Problem, candidate: Candidate) -> dict[str, Verdict | None]:
        """The verdicts of ``candidate``'s kernels recorded so far (None: not verified yet), without running a
        canary: what ``na_rtc.explain`` reports."""
        return {name: self._known(problem, name) for name in candidate.kernels(problem)}

    def verify(self, problem: Problem, candidate: Candidate) -> dict[str, Verdict]:
        """Run ``candidate``'s canary now and record a verdict for each of its kernels (for ``problem``'s
        device): passing when every output the kernel computes is within the tolerance."""
        expected = dict(candidate.kernels(problem))
        test = candidate.canary(problem)
        actual = dict(candidate.kernels(test))
        # a canary must run the very instantiations it vouches for (and may run more: one with extra tokens also
        # runs their kernels, which it vouches for too)
        if any(actual.get(name) != outputs for name, outputs in expected.items()):
            raise RuntimeError(f"na_rtc internal error: the canary of {candidate.path} runs {sorted(actual)}, not "
                               f"{sorted(expected)}; please report this (NA_RTC_VERIFY=0 skips verification)")
        started = time.perf_counter()
        results = canary.check(candidate.op, test, candidate.run)
        seconds = time.perf_counter() - started
        self.stats["canaries"] += 1
        device_key, description = self._device(problem)
        shape = "x".join(str(a.length) for a in test.axes)
        verdicts = {}
        for name, outputs in actual.items():
            wrong = [results[output] for output in outputs if results.get(output)]
            detail = "; ".join(wrong) if wrong else (
                f"{', '.join(outputs)} within the {test.dtype} tolerance of the float64 reference on a canary of "
                f"{shape} positions ({seconds:.2f} s)")
            verdict = Verdict(name, not wrong, description, detail, candidate.op, candidate.path, now_utc())
            key = verdict_key(program_identity(self.backend, problem, name), device_key, name)
            _store.put(key, verdict)
            with self._lock:
                self._verdicts[problem.device, name] = verdict
            verdicts[name] = verdict
        return verdicts

    def forget(self) -> None:
        """Drop the verdicts this gate remembers (the recorded ones stay on disk)."""
        with self._lock:
            self._verdicts.clear()
            self._warned.clear()

    def _device(self, problem: Problem) -> tuple[str, str]:
        identity = self._identities.get(problem.device)
        if identity is None:
            identity = self._identities[problem.device] = device_identity(self.backend, problem)
        return identity

    def _known(self, problem: Problem, name: str) -> Verdict | None:
        verdict = self._verdicts.get((problem.device, name))
        if verdict is not None:
            return verdict
        key = verdict_key(program_identity(self.backend, problem, name), self._device(problem)[0], name)
        verdict = _store.get(key)
        if verdict is not None:
            self.stats["recorded_verdicts_read"] += 1
            with self._lock:
                self._verdicts[problem.device, name] = verdict
        return verdict

    def _warn_once(self, problem: Problem, verdict: Verdict) -> None:
        with self._lock:
            if (problem.device, verdict.kernel) in self._warned:
                return
            self._warned.add((problem.device, verdict.kernel))
        _diskcache.warn(
            f"na_rtc: kernel {verdict.kernel} gave wrong results on {verdict.device} ({verdict.detail}); it is not "
            f"used on this GPU, and the next kernel that passes this check serves the call instead. "
            f"`python -m na_rtc selftest` checks every kernel and primitive on this GPU; NA_RTC_VERIFY=0 turns "
            "the check off.", KernelVerificationWarning)

