"""na_rtc: neighborhood attention for Python, compiled at run time.

Public API (DESIGN.md section 3): fused ``na1d``/``na2d``, split
``na1d_qk``/``na1d_av``/``na2d_qk``/``na2d_av``, their backward functions, and
backend selection with :func:`use_backend` or ``NA_RTC_BACKEND``. Importing
na_rtc never imports torch or cupy.
"""

__version__ = "0.1.0"

from .backends import use_backend
from .functional import (
    na1d,
    na1d_av,
    na1d_av_backward,
    na1d_backward,
    na1d_qk,
    na1d_qk_backward,
    na2d,
    na2d_av,
    na2d_av_backward,
    na2d_backward,
    na2d_qk,
    na2d_qk_backward,
)

__all__ = [
    "__version__",
    "use_backend",
    "na1d",
    "na2d",
    "na1d_qk",
    "na2d_qk",
    "na1d_av",
    "na2d_av",
    "na1d_backward",
    "na2d_backward",
    "na1d_qk_backward",
    "na2d_qk_backward",
    "na1d_av_backward",
    "na2d_av_backward",
]
