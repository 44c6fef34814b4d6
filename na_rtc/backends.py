"""Backend registry and selection.

A backend is a table of ops (``fused_forward``, ``fused_backward``,
``qk_forward``, ...; see :data:`na_rtc.reference.OPS`) plus what it can serve.
Selection order for a call: ``use_backend(...)`` if active, else the
``NA_RTC_BACKEND`` environment variable, else the default for the array kind
and device (``cuda`` for CuPy arrays and torch tensors on NVIDIA GPUs;
``blocked`` for NumPy arrays, CPU and meta tensors and torch's other devices:
Apple MPS, Intel XPU, AMD GPUs under ROCm builds of torch). The ``reference``
backend is the executable spec every backend is tested against, chosen by
name. Each backend also lists the ranks (1D, 2D, 3D) it serves
(today every backend serves all three): where the default lacks the
problem's rank, automatic selection takes the reference backend, which
serves every rank and torch tensors on any device; a forced backend without
the rank is an error. Every backend serves grouped key/value heads (GQA/MQA).
Arrays are never copied to another device to fit a backend: a
mismatch is an error that says what to do. Meta tensors (shapes without data,
used to initialize and trace large models) are served by every backend: they
only reach the custom ops' fake implementations, which compute shapes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

from . import _arrays, config
from ._args import Problem


@dataclass
class Backend:
    """One way of executing the ops: a named table of ops and what it can serve.

    :func:`names` lists the registered ones (``cuda``, ``emulator``,
    ``reference``, ``blocked``); :func:`describe` says which are available here.
    """

    #: what :func:`use_backend` and ``backend=`` take
    name: str
    #: one line on what it runs and where
    summary: str
    #: which (array kind, device type) pairs it can run, e.g. ("numpy", "cpu")
    serves: frozenset
    #: () -> (available, reason); reason explains unavailability or what it serves
    probe: Callable[[], tuple[bool, str]]
    #: op name -> callable(problem, *arrays); filled lazily by ``load``
    load: Callable[[], dict] = field(repr=False, default=dict)
    #: numbers of spatial axes it runs
    ranks: frozenset = frozenset({1, 2, 3})
    _ops: dict | None = field(default=None, repr=False)

    @property
    def ops(self) -> dict:
        """The op table (``fused_forward``, ``fused_backward``, ``qk_forward``, ...), loaded on first use.

        :raises RuntimeError: the backend is not available here (its probe's
            reason: no GPU, no CuPy or NVRTC, no C++ compiler, ...).
        """
        if self._ops is None:
            available, reason = self.probe()
            if not available:
                raise RuntimeError(f"the {self.name} backend is not available here: {reason}")
            self._ops = self.load()
        return self._ops


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def names() -> tuple[str, ...]:
    """The registered backends' names, in registration order (a tuple of str)."""
    return tuple(_REGISTRY)


def get(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(_REGISTRY)}") from None


def describe() -> list[tuple[str, bool, str]]:
    """``(name, available, reason)`` for every registered backend, as ``python -m na_rtc info`` lists them.

    Probes each backend (cheap checks: imports, a GPU, a compiler); raises
    nothing. ``reason`` says what is missing or what the backend serves.
    """
    return [(b.name, *b.probe()) for b in _REGISTRY.values()]


# ---------------------------------------------------------------- choosing one

# A plain module global, not a ContextVar or thread-local: torch.compile traces
# (and guards on) globals, and a process-wide choice matches how backends are
# used (like torch's default dtype).
_forced: str | None = None


class use_backend:
    """Force a backend for subsequent calls (process-wide).

    ``na_rtc.use_backend("emulator")`` sets it until changed;
    ``with na_rtc.use_backend("emulator"): ...`` restores the previous choice on
    exit. ``use_backend(None)`` returns to automatic selection. A call's own
    ``backend=`` still wins over it.

    :param name: a name from :func:`names` (``"cuda"``, ``"emulator"``,
        ``"reference"``, ``"blocked"``), or None.
    :raises ValueError: an unknown name (raised here, not at the next call).
    """

    def __init__(self, name: str | None):
        global _forced
        if name is not None:
            get(name)  # unknown names fail here, not at the next call
        self.name, self._previous = name, _forced
        _forced = name

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        global _forced
        _forced = self._previous
        return False

    def __repr__(self):
        return f"use_backend({self.name!r})"


def current_backend_name() -> str | None:
    """The forced backend (``use_backend`` or ``NA_RTC_BACKEND``), or None for automatic selection.

    :returns: a backend name (str) or None; raises nothing.
    """
    return _forced or config.backend_override()


def _default_name(kind: str, device: str) -> str:
    """``cuda`` for CuPy arrays and torch tensors on NVIDIA GPUs; ``blocked`` for everything else: NumPy arrays,
    torch tensors on the CPU, Apple MPS, Intel XPU, meta, and on AMD GPUs, which ROCm builds of torch call
    ``cuda`` devices but which cannot run the kernels' PTX."""
    if kind == _arrays.CUPY:
        return "cuda"
    if device.split(":")[0] == "cuda" and not _rocm_torch():
        return "cuda"
    return "blocked"


def _rocm_torch() -> bool:
    """Whether torch is a ROCm (HIP) build: its ``cuda`` devices are AMD GPUs."""
    import torch

    return getattr(torch.version, "hip", None) is not None


#: the backend automatic selection falls back on for a rank the default lacks: it serves every rank
_EVERY_RANK = "reference"


def _rank_error(chosen: Backend, problem: Problem, forced: bool) -> ValueError:
    ndim = problem.ndim
    served = "/".join(f"{r}D" for r in sorted(chosen.ranks))
    if problem.kind == _arrays.CUPY:  # the reference backend reads no CuPy arrays
        remedy = (f"CuPy arrays have no other backend in {ndim}D: pass torch tensors instead "
                  f"(torch.from_dlpack(array) shares the memory, no copy) or NumPy arrays")
    elif forced:
        remedy = (f"choose the {_EVERY_RANK} backend for these calls with backend={_EVERY_RANK!r} or "
                  f"na_rtc.use_backend({_EVERY_RANK!r}) (or leave the backend to automatic selection)")
    else:
        remedy = "choose another backend with na_rtc.use_backend"
    return ValueError(f"the {chosen.name} backend's kernels serve {served} neighborhood attention only, not "
                      f"{ndim}D; {remedy}")


def select(problem: Problem, name: str | None = None) -> Backend:
    """The backend that runs ``problem``: ``name`` if given, else the forced one, else the default
    (the reference backend where the default lacks the problem's rank)."""
    forced = name or current_backend_name()
    chosen = get(forced) if forced else get(_default_name(problem.kind, problem.device))
    placement = (problem.kind, problem.device.split(":")[0])
    if problem.ndim not in chosen.ranks:
        fallback = get(_EVERY_RANK)
        if forced or placement not in fallback.serves:
            raise _rank_error(chosen, problem, bool(forced))
        chosen = fallback
    if placement not in chosen.serves:
        where = {"cpu": "CPU", "cuda": "CUDA"}.get(placement[1], f"the {placement[1]} device")
        raise ValueError(
            f"the {chosen.name} backend cannot run {problem.kind} arrays on {where} "
            f"({chosen.summary}); move the inputs or choose another backend with na_rtc.use_backend"
        )
    # torch calls probe inside their custom ops (Backend.ops), which torch.compile
    # does not trace; probing here would make it trace the compiler/GPU checks
    if problem.kind != _arrays.TORCH:
        available, reason = chosen.probe()
        if not available:
            raise RuntimeError(f"the {chosen.name} backend is not available here: {reason}")
    return chosen


# ---------------------------------------------------------------- the backends

# every backend serves meta tensors: no backend code runs for them, only the fake implementations
_META = (_arrays.TORCH, "meta")


def _load_reference() -> dict:
    from . import reference

    return reference.OPS


def _load_blocked() -> dict:
    from . import blocked, query_box

    return query_box.on_every_query(blocked.OPS)


def executor(name: str):
    """The function that runs a launch plan on backend ``name`` (``cuda`` or ``emulator``)."""
    from .runtime import cuda, emulated

    return {"cuda": cuda.run, "emulator": emulated.run}[name]


def _kernel_ops(name: str) -> Callable[[], dict]:
    def load() -> dict:
        from . import query_box
        from .runtime import ops

        return query_box.on_every_query(ops.make_ops(executor(name), name))

    return load


@functools.lru_cache(maxsize=None)  # a compiler or a GPU does not come or go within a process
def _probe(name: str) -> tuple[bool, str]:
    from .runtime import cuda, emulated

    return {"cuda": cuda.availability, "emulator": emulated.availability}[name]()


register(
    Backend(
        "reference",
        "vectorized NumPy/torch math; NumPy arrays and torch tensors, differentiable",
        frozenset({(_arrays.NUMPY, "cpu"), (_arrays.TORCH, "cpu"), (_arrays.TORCH, "cuda"), _META}),
        lambda: (True, "NumPy arrays and torch tensors (CPU; CUDA tensors when forced)"),
        _load_reference,
    )
)
register(
    Backend(
        "blocked",
        "block-sparse dense attention on the array library's matrix products; NumPy arrays and torch tensors on "
        "any device",
        frozenset({(_arrays.NUMPY, "cpu"), (_arrays.TORCH, "cpu"), (_arrays.TORCH, "cuda"), (_arrays.TORCH, "mps"),
                   (_arrays.TORCH, "xpu"), _META}),
        lambda: (True, "NumPy arrays and torch tensors on any device"),
        _load_blocked,
    )
)
register(
    Backend(
        "cuda",
        "NVRTC-compiled kernels on the GPU; CuPy arrays and CUDA torch tensors, 1D, 2D and 3D",
        frozenset({(_arrays.CUPY, "cuda"), (_arrays.TORCH, "cuda"), _META}),
        lambda: _probe("cuda"),
        _kernel_ops("cuda"),
    )
)
register(
    Backend(
        "emulator",
        "the CUDA kernels executed on the CPU; CPU arrays only, 1D, 2D and 3D",
        frozenset({(_arrays.NUMPY, "cpu"), (_arrays.TORCH, "cpu"), _META}),
        lambda: _probe("emulator"),
        _kernel_ops("emulator"),
    )
)
