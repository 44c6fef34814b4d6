"""The self-tests of the primitives (``cuda_src/na_selftest.cu``), run by ``python -m na_rtc selftest`` and
:mod:`na_rtc.verify.primitives`: conversions, mma.sync, ldmatrix, shuffles, division, exp2, cp.async and the
group window. Not dispatched: only compiled, checked and launched by the self-test."""

from __future__ import annotations

from ..registry import Family, register

NAME = "selftest"
SOURCE = "na_selftest.cu"
#: kernel -> its block size
THREADS = {"na_selftest_convert": 256, "na_selftest_mma<fp16_t>": 32, "na_selftest_mma<bf16_t>": 32,
           "na_selftest_ldmatrix": 32, "na_selftest_shuffle": 64, "na_selftest_divide": 256,
           "na_selftest_exp2": 256, "na_selftest_cp_async": 128, "na_selftest_group_window": 64}

FAMILY = register(Family(SOURCE, tuple(THREADS), THREADS, dict.fromkeys(THREADS, 0), name=NAME))
