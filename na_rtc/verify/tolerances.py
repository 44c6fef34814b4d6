"""The one table of how close a result must be to the float64 reference, per input dtype.

``forward``: outputs, logsumexp, attention logits and weights; ``grad``: every
gradient. A value passes when ``|got - want| <= atol + rtol * |want|``. The
test suite (``tests/helpers.py``) and first-use kernel verification
(:mod:`na_rtc.verify.canary`) both read this table, so a kernel the tests accept
is one the verification accepts.
"""

from __future__ import annotations

#: dtype -> kind -> (atol, rtol)
TOLERANCES: dict[str, dict[str, tuple[float, float]]] = {
    "float64": {"forward": (1e-10, 1e-10), "grad": (1e-9, 1e-9)},
    "float32": {"forward": (1e-4, 1e-4), "grad": (1e-3, 1e-3)},
    "float16": {"forward": (1e-2, 1e-2), "grad": (2e-2, 2e-2)},
    "bfloat16": {"forward": (5e-2, 5e-2), "grad": (1e-1, 5e-2)},
}
