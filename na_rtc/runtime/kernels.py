"""The kernel dispatcher: tiled kernels where their tables cover a problem,
the straightforward ones otherwise (each ``choice(problem, op)`` says which)."""

from __future__ import annotations

from .tiled import TiledKernels
from .tiled_bwd import TiledBackwardMixin


class Kernels(TiledBackwardMixin, TiledKernels):
    """qk/av: :class:`~na_rtc.runtime.tiled.TiledKernels`; inverse/bias_grad:
    :class:`~na_rtc.runtime.tiled_bwd.TiledBackwardMixin`; softmax and every
    fallback: :class:`~na_rtc.runtime.naive.NaiveKernels`."""
