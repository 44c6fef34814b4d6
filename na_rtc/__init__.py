"""na_rtc: neighborhood attention for Python, compiled at run time.

Public API: fused ``na1d``/``na2d``/``na3d``, split
``na1d_qk``/``na1d_av``/``na2d_qk``/``na2d_av``/``na3d_qk``/``na3d_av``, their backward functions,
:func:`merge_attentions` (one softmax over several branches' keys, from their outputs and logsumexps),
:func:`attention` (dense attention with the same conventions, for queries that see every key), and
backend selection with :func:`use_backend` or ``NA_RTC_BACKEND``, :func:`explain` (which kernels a call would
run, and why the others were passed over),
:class:`LayoutWarning` (a tensor whose shape suggests heads-first),
:class:`KernelVerificationWarning` (a kernel that gave wrong results on this
GPU and is not used), and the torch layers ``NeighborhoodAttention1D``/``2D``/``3D``. Importing
na_rtc never imports torch or cupy: the torch names are resolved on first
access (module ``__getattr__``). The historical NATTEN APIs live in
``na_rtc.compat.natten014`` and ``na_rtc.compat.natten017``.
"""

__version__ = "0.1.0"

from ._layouts import LayoutWarning
from ._explain import explain
from .backends import use_backend
from .verify.gate import KernelVerificationWarning
from .merging import merge_attentions
from .dense_attention import attention
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
    na3d,
    na3d_av,
    na3d_av_backward,
    na3d_backward,
    na3d_qk,
    na3d_qk_backward,
)

__all__ = [
    "__version__",
    "use_backend",
    "explain",
    "LayoutWarning",
    "KernelVerificationWarning",
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
    "na3d",
    "na3d_qk",
    "na3d_av",
    "na3d_backward",
    "na3d_qk_backward",
    "na3d_av_backward",
    "merge_attentions",
    "attention",
]
# The torch layers (NeighborhoodAttention1D/2D/3D) are left out of __all__ on
# purpose: `from na_rtc import *` must neither import torch nor fail without
# it. Import them by name.

# name -> submodule that defines it; those submodules import torch, so they
# are loaded only when one of their names is first used.
_LAZY = {
    "NeighborhoodAttention1D": "modules",
    "NeighborhoodAttention2D": "modules",
    "NeighborhoodAttention3D": "modules",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
