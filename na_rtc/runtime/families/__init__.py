"""Every kernel family, one module each; importing this package registers them all.

A family module (``naive.py``, ``fused_tc.py``, ...) holds one source file's
table: instantiations, the threads and shared memory of each, the
architectures it is built for, and per role a coverage rule and a planner
(:class:`~na_rtc.runtime.registry.Family`). It registers the table in
:mod:`na_rtc.runtime.registry`, which imports no family module; this package
is what imports them all, in the order ``check`` and ``precompile`` list
them. ``FAMILIES`` (name -> table, the registry's read-only view) is what
``check --family-module`` expects of a family module.
"""

from __future__ import annotations

from ..registry import FAMILIES, Family, family_of  # noqa: F401 - the tables, their type and the kernel lookup
from . import naive, selftest, selftest_wgmma, tiled, tiled_bwd  # noqa: F401 - each registers its family
from . import fused_bwd, fused, fused_tc, fused_tc_bwd, fused_wg, fused_wg_bwd  # noqa: F401, I001 - same; this order
from . import tokens_bwd  # noqa: F401 - same
