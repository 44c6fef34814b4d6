"""The wgmma self-test (``cuda_src/na_selftest_wgmma.cu``, sm_90a): ``m64nNk16`` products of each element type
and N, checked by :mod:`na_rtc.verify.primitives` before the wgmma kernels are trusted. Not dispatched."""

from __future__ import annotations

from ..registry import Family, register

NAME = "selftest_wgmma"
SOURCE = "na_selftest_wgmma.cu"
#: the N of m64nNk16 each element type is tested with
N = (32, 64, 128)
#: the largest block: two warpgroups, as the kernels with two
THREADS = 256
ARCH = 90


def name(ctype: str, n: int) -> str:
    return f"na_selftest_wgmma<{ctype}, {n}>"


def shared_bytes(n: int) -> int:
    """A (64 x 32 per warpgroup, two of them) and two copies of B (32 x n), 16-bit, then room for what a
    misread descriptor reaches (the diagnosis)."""
    return 2 * 64 * 32 * 2 + 2 * 32 * n * 2 + 2 * n * n + 1024


def _names() -> tuple[str, ...]:
    return tuple(name(t, n) for t in ("fp16_t", "bf16_t") for n in N)


FAMILY = register(Family(SOURCE, _names(), dict.fromkeys(_names(), THREADS),
                         {name(t, n): shared_bytes(n) for t in ("fp16_t", "bf16_t") for n in N}, archs=(ARCH,),
                         arch_specific=True, name=NAME))
