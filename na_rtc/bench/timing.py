"""Timing with spread, and peak memory, for one callable.

GPU: CUDA events around each call, after warm-up (launches are asynchronous,
so host clocks would time the launch, not the kernel). CPU: ``perf_counter``.
The first call is timed on its own with a host clock and a sync: it holds the
one-time work (kernel compile or cache load, torch.compile tracing, autotune)
that the steady-state figures leave out.

Peak memory is measured on a separate call, not on a timed one, so the
allocator bookkeeping and syncs it needs never land inside a timed region.
:class:`na_rtc.demo.PeakMemory` does the measuring (torch's CUDA allocator
peak on GPUs; process RSS growth on Linux CPUs), one definition for both tools.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Settings:
    #: untimed calls after the first one
    warmup: int = 2
    #: most timed calls per measurement
    repeat: int = 20
    #: fewest timed calls per measurement
    min_repeat: int = 3
    #: timed calls are added until about this many seconds are covered (up to ``repeat``)
    min_time: float = 0.5


class Clock:
    """CUDA events on a GPU device, ``perf_counter`` on the CPU."""

    def __init__(self, device: str):
        self.device = device
        self.cuda = device.startswith("cuda")
        self.method = "CUDA events" if self.cuda else "time.perf_counter"

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def wall(self, fn: Callable[[], Any]) -> float:
        """Seconds of one call including everything it waits for (host clock, synced)."""
        self.sync()
        started = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - started

    def samples(self, fn: Callable[[], Any], count: int) -> list[float]:
        """Seconds of ``count`` back-to-back calls, one sample per call."""
        if not self.cuda:
            out = []
            for _ in range(count):
                started = time.perf_counter()
                fn()
                out.append(time.perf_counter() - started)
            return out
        import torch

        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]
        self.sync()
        for start, end in events:
            start.record()
            fn()
            end.record()
        self.sync()
        return [start.elapsed_time(end) / 1e3 for start, end in events]


def summarize(seconds: list[float]) -> dict:
    """Median and spread (min, max, quartiles) in milliseconds."""
    ms = sorted(s * 1e3 for s in seconds)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "max_ms": ms[-1], "q1_ms": q1, "q3_ms": q3,
            "repeats": len(ms)}


def measure(fn: Callable[[], Any], clock: Clock, settings: Settings, memory=None) -> dict:
    """First-call time, steady-state timing with spread, and (optionally) peak memory of ``fn``.

    ``memory``: a :class:`na_rtc.demo.PeakMemory`, or None to skip memory.
    """
    first = clock.wall(fn)
    for _ in range(settings.warmup):
        fn()
    peak = None
    if memory is not None and memory.method is not None:
        memory.start()
        fn()
        peak = memory.stop()
    estimate = clock.samples(fn, 1)[0]
    wanted = math.ceil(settings.min_time / estimate) if estimate > 0 else settings.repeat
    count = max(settings.min_repeat, min(settings.repeat, wanted))
    result = summarize(clock.samples(fn, count))
    result["first_call_ms"] = first * 1e3
    if peak is not None:
        result["peak_extra_mb"] = peak / 2**20
    return result
