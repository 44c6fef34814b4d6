"""The ``emulator`` executor: launch plans on the CPU (see :mod:`na_rtc.emulator`).

Each kernel family is built once into a shared library (cached on disk like
cubins) holding every instantiation, then plans launch from it.
"""

from __future__ import annotations

from .._resources import cuda_src_dir
from . import families  # noqa: F401 - registers every kernel family (the registry imports none)
from . import plan as P
from .registry import family_of


def availability() -> tuple[bool, str]:
    try:
        from .. import emulator
    except ImportError as error:  # a broken install: say so instead of failing every call
        return False, f"the emulator package is not importable ({error})"
    return emulator.available()


def run(plan: P.LaunchPlan) -> dict[str, int]:
    """Run ``plan``; returns the tensor-core instructions it executed (``EmulatedModule.last_op_counts``)."""
    from .. import emulator

    family = family_of(plan.kernel.name)  # the registered family: a family swapped in by a test is the one that runs
    module = emulator.load_module(cuda_src_dir() / family.source, family.names)
    module.launch(plan)  # checked mode when NA_RTC_EMULATOR_CHECKED=1 (the module reads config)
    return module.last_op_counts
