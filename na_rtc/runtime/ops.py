"""The backend op table on the kernels, as :mod:`na_rtc.backends` loads it: :func:`make_ops` of the dispatch
(:mod:`na_rtc.runtime.dispatch`, where every op's candidate kernels and the fallback rule live)."""

from __future__ import annotations

from .dispatch import make_ops

__all__ = ["make_ops"]
