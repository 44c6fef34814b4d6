"""The registry of kernel families: every family module registers its table here.

A kernel family is one source file in ``cuda_src/`` and every instantiation
of it the dispatcher can pick (one NVRTC program, one emulator library). Its
module (``runtime/families/<name>.py``) declares one :class:`Family` table:
the source, the instantiations, the threads and shared memory of each at its
largest launch (what ``check`` holds it to), the architectures it is built
for, and per role (a kind of launch: ``forward``, ``dq``, ``qk``, ...) a
coverage rule and a planner (:class:`Role`).

This module imports no family module: the families import it, and
``runtime/families/__init__.py`` imports every family, so whoever needs them
all (``check``, ``precompile``, the executors, the dispatcher) imports that
package once and then looks families up here. Lookups by family name and by
kernel name are dictionary reads.

A family serves the ranks in :attr:`Family.ranks`. 3D instantiations live in a
family of their own, the *3D twin* ``<name>_3d`` of the family ``<name>``
(same source file, its own instantiations), so that the emulator builds and
``check`` of the 1D/2D family do not grow with them; the dispatcher's tables
name the 1D/2D family and :func:`for_rank` finds the twin for a 3D call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple

from . import plan as P

__all__ = ["FAMILIES", "RANK3_SUFFIX", "Family", "Launch", "Role", "families", "family_of", "for_rank", "get", "names",
           "register", "replace", "source_of"]

#: the name of a family's 3D twin is the family's name and this
RANK3_SUFFIX = "_3d"


class Launch(NamedTuple):
    """One launch a planner chose: the kernel, its blocks (grid.x), threads per block and dynamic shared memory.
    ``tiles`` is what a launch with per-tile partial sums reports (the bias partials' middle dimension);
    ``extra`` holds what else a launch shape needs (a planner's own values), or None."""

    kernel: P.Kernel
    blocks: int
    threads: int
    shared: int
    tiles: int = 0
    extra: Any = None

    @property
    def name(self) -> str:
        return self.kernel.name

    def plan(self, args) -> P.LaunchPlan:
        return P.LaunchPlan(self.kernel, (self.blocks, 1, 1), (self.threads, 1, 1), self.shared, tuple(args))


class Role(NamedTuple):
    """What a family offers the dispatcher for one kind of launch.

    ``covers(problem, policy, *args) -> (ok, why)``: whether the family's kernels serve the problem (``why``
    says why not, in words a user can act on; empty when ``ok``). ``plan(problem, policy, *args) ->``
    :class:`Launch`: the instantiation and launch shape, for a problem the rule admits. ``args`` are the
    role's own (the weights' dtype of a split kernel); the fused roles take none. ``run``: the launcher of
    :mod:`na_rtc.runtime.launch` that turns the launch and the arrays into plans (None where the dispatcher
    combines several roles' launches into one op, as the fused backward's dq and dK/dV). ``requires``:
    ``(family, role)`` rules that must hold first; ``covers`` assumes they do (the dispatcher evaluates each
    rule once per call, so a rule never calls another). ``extra_tokens``: see the field.
    """

    covers: Callable[..., tuple[bool, str]]
    plan: Callable[..., Launch]
    run: Callable[..., Any] | None = None
    requires: tuple[tuple[str, str], ...] = ()
    #: a fused forward or dq role whose kernels stream the extra key/value tokens after each query tile's
    #: neighborhood (``NA_EXTRA``); elsewhere the op table merges dense attention over them (forward) or adds
    #: their part as matrix products (backward)
    extra_tokens: bool = False


@dataclass(frozen=True)
class Family:
    source: str
    names: tuple[str, ...]
    #: threads per block at launch, per name (for check's fit test)
    launch_threads: dict = field(default_factory=dict)
    #: dynamic shared memory bytes at the largest launch, per name
    launch_shared_bytes: dict = field(default_factory=dict)
    #: the only architectures it is built for (empty: no such list), for arch-specific builds
    archs: tuple[int, ...] = ()
    #: built for the arch-specific target ``sm_<arch>a`` (Hopper's wgmma: sm_90a), whose cubin runs on
    #: exactly that architecture
    arch_specific: bool = False
    #: the oldest architecture the dispatcher sends it to (0: any); newer ones, including those newer than
    #: the installed NVRTC knows (PTX), run it too. The tensor-core kernels need sm_80.
    min_arch: int = 0
    #: the registry's key ("fused_tc"); empty for a family that is only compiled (check's --family-module)
    name: str = ""
    #: role -> :class:`Role`: what the dispatcher may launch from it
    roles: Mapping[str, Role] = field(default_factory=dict)
    #: the numbers of spatial axes its kernels serve (a 3D twin: {3})
    ranks: frozenset = frozenset({1, 2})

    def runs_on(self, arch: int) -> bool:
        """Whether the dispatcher may run this family on ``sm_<arch>``: what ``check`` and ``precompile``
        compile, and what the launcher loads."""
        return arch >= self.min_arch and (not self.archs or arch in self.archs)

    def arch_text(self) -> str:
        """The architectures it runs on, in words: "sm_90", "sm_80 and newer", "every architecture"."""
        if self.archs:
            return ", ".join(f"sm_{a}" for a in self.archs if a >= self.min_arch)
        return f"sm_{self.min_arch} and newer" if self.min_arch else "every architecture"


_FAMILIES: dict[str, Family] = {}
_BY_KERNEL: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add ``family`` under ``family.name``; a kernel name may belong to one family only."""
    if not family.name:
        raise ValueError("a registered family needs a name")
    if family.name in _FAMILIES:
        raise ValueError(f"kernel family {family.name!r} is registered twice")
    for kernel in family.names:
        if kernel in _BY_KERNEL:
            raise ValueError(f"kernel {kernel!r} is in two families: {_BY_KERNEL[kernel].name} and {family.name}")
    _FAMILIES[family.name] = family
    _BY_KERNEL.update(dict.fromkeys(family.names, family))
    return family


def replace(family: Family) -> Family:
    """Put ``family`` in place of the registered family of its name; returns the one it replaces (tests swap
    in deliberately broken builds of a family this way, and put the original back)."""
    previous = _FAMILIES[family.name]
    for kernel in previous.names:
        _BY_KERNEL.pop(kernel, None)
    _FAMILIES[family.name] = family
    _BY_KERNEL.update(dict.fromkeys(family.names, family))
    return previous


def get(name: str) -> Family:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise KeyError(f"no kernel family {name!r} is registered (known: {', '.join(_FAMILIES)})") from None


def for_rank(name: str, ndim: int) -> Family | None:
    """The family that serves ``ndim``-D calls for the dispatcher's family ``name``: the family itself where it
    serves the rank, else its 3D twin ``<name>_3d`` where that is registered and serves it, else None."""
    family = get(name)
    if ndim in family.ranks:
        return family
    twin = _FAMILIES.get(name + RANK3_SUFFIX)
    return twin if twin is not None and ndim in twin.ranks else None


def source_of(name: str) -> str:
    """The source file of the registered family ``name`` (launch plans take it from here, so a family swapped
    in with :func:`replace` is the one that runs)."""
    return _FAMILIES[name].source


def family_of(kernel_name: str) -> Family:
    """The registered family that holds the instantiation ``kernel_name``."""
    try:
        return _BY_KERNEL[kernel_name]
    except KeyError:
        raise KeyError(f"kernel {kernel_name!r} is in no registered kernel family") from None


def names() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def families() -> dict[str, Family]:
    """Every registered family by name, in registration order (a copy)."""
    return dict(_FAMILIES)


#: every registered family by name, read-only and always current (:func:`replace` shows through)
FAMILIES = MappingProxyType(_FAMILIES)
