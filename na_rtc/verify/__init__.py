"""First-use verification of kernels and primitive self-tests.

Before a kernel serves a call on a GPU, it runs once on a small canary problem
against a float64 reference (:mod:`~na_rtc.verify.gate`,
:mod:`~na_rtc.verify.canary`); verdicts are recorded per GPU, driver and
compiled program (:mod:`~na_rtc.verify.verdicts`). ``python -m na_rtc
selftest`` (:mod:`~na_rtc.verify.selftest`) runs the primitive self-tests
(:mod:`~na_rtc.verify.primitives`) and the canaries on demand.
"""

from .gate import KernelVerificationWarning
from .verdicts import VerdictStoreWarning

__all__ = ["KernelVerificationWarning", "VerdictStoreWarning"]
