"""NATTEN 0.14's API on na_rtc: replace ``from natten import ...`` /
``from natten.functional import ...`` with ``from na_rtc.compat.natten014 import ...``.

Functions (heads-first, ``[batch, heads, *spatial, dim]``; attention weights
``[batch, heads, *spatial, kernel_size ** ndim]``; every argument positional
and required, as in NATTEN 0.14)::

    natten1dqkrpb(query, key, rpb, kernel_size, dilation)
    natten1dqk(query, key, kernel_size, dilation)
    natten1dav(attn, value, kernel_size, dilation)
    natten2dqkrpb / natten2dqk / natten2dav   # the same, 2D

They run na_rtc's split ops on heads-last *views* of the inputs (no copies)
and return heads-first views of na_rtc's outputs: values and shapes are
NATTEN's, but the results are not contiguous (use ``reshape``, not ``view``,
on them directly). ``natten*qk`` does not scale the query (NATTEN's modules
pre-scale it).

Modules ``NeighborhoodAttention1D/2D(dim, num_heads, kernel_size, dilation=1,
bias=True, qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0)``: the
relative positional bias is on by default (``bias``) and the state-dict keys
are NATTEN's (``qkv.weight``, ``qkv.bias``, ``rpb``, ``proj.weight``,
``proj.bias``), so 0.14 checkpoints (NAT, DiNAT) load as they are. They run
na_rtc's layer (:mod:`na_rtc.modules`): fused kernels unless attention
dropout is active in training.
"""

from __future__ import annotations

import numbers

from .. import functional
from ..modules import NeighborhoodAttention1D as _Native1D
from ..modules import NeighborhoodAttention2D as _Native2D
from ._layout import check_av, check_qk, heads_first, heads_last

__all__ = [
    "natten1dqkrpb", "natten1dqk", "natten1dav",
    "natten2dqkrpb", "natten2dqk", "natten2dav",
    "NeighborhoodAttention1D", "NeighborhoodAttention2D",
]

_QK = {1: functional.na1d_qk, 2: functional.na2d_qk}
_AV = {1: functional.na1d_av, 2: functional.na2d_av}


def _qk(ndim, query, key, rpb, kernel_size, dilation):
    check_qk(ndim, query, key, rpb, kernel_size, dilation)
    attn = _QK[ndim](heads_last("query", query, ndim), heads_last("key", key, ndim), kernel_size, dilation,
                     rpb=rpb)
    return heads_first(attn, ndim)


def _av(ndim, attn, value, kernel_size, dilation):
    check_av(ndim, attn, value, kernel_size, dilation)
    out = _AV[ndim](heads_last("attn", attn, ndim), heads_last("value", value, ndim), kernel_size, dilation)
    return heads_first(out, ndim)


def natten1dqkrpb(query, key, rpb, kernel_size, dilation):
    """NATTEN 0.14's 1D logits: ``query . key`` per window slot plus ``rpb``, heads-first.

    The query is not scaled (NATTEN's modules pre-scale it). Runs
    :func:`na_rtc.na1d_qk` on heads-last views (no copies).

    :param query: ``[batch, heads, length, dim]``: float16, bfloat16, float32 or
        float64; a torch tensor (or NumPy/CuPy array).
    :param key: the query's shape, kind, device and dtype.
    :param rpb: ``[heads, 2 * kernel_size - 1]`` (odd ``kernel_size``) or None.
    :param kernel_size: window size, an int ``>= 2``.
    :param dilation: an int ``>= 1``.
    :returns: ``[batch, heads, length, kernel_size]``, a heads-first view of
        na_rtc's output (not contiguous: ``reshape``, not ``view``).
    :raises TypeError: an input that is not a NumPy/CuPy/torch array, inputs of
        different kinds or dtypes, a dtype that is not floating, window arguments
        that are not ints.
    :raises ValueError: a wrong number of dimensions, ``key`` not shaped as
        ``query``, an ``rpb`` of the wrong shape, with an even ``kernel_size``,
        ``kernel_size < 2``, ``dilation < 1``, ``kernel_size * dilation`` larger
        than an axis, inputs on different devices.
    """
    return _qk(1, query, key, rpb, kernel_size, dilation)


def natten1dqk(query, key, kernel_size, dilation):
    """:func:`natten1dqkrpb` without a bias: same arguments (less ``rpb``), returns and errors."""
    return _qk(1, query, key, None, kernel_size, dilation)


def natten1dav(attn, value, kernel_size, dilation):
    """NATTEN 0.14's 1D weighted sum of neighbor values, heads-first.

    :param attn: ``[batch, heads, length, kernel_size]`` attention weights; the
        value's kind, device and dtype.
    :param value: ``[batch, heads, length, dim]``: float16, bfloat16, float32 or
        float64.
    :param kernel_size: window size, an int ``>= 2``.
    :param dilation: an int ``>= 1``.
    :returns: ``[batch, heads, length, dim]``, a heads-first view (not
        contiguous).
    :raises TypeError: an input that is not a NumPy/CuPy/torch array, inputs of
        different kinds or dtypes, a dtype that is not floating, window arguments
        that are not ints.
    :raises ValueError: a wrong number of dimensions, ``attn`` whose leading
        dimensions differ from ``value``'s or whose last is not the window's
        slots, ``kernel_size < 2``, ``dilation < 1``, ``kernel_size * dilation``
        larger than an axis, inputs on different devices.
    """
    return _av(1, attn, value, kernel_size, dilation)


def natten2dqkrpb(query, key, rpb, kernel_size, dilation):
    """2D :func:`natten1dqkrpb`: ``[batch, heads, height, width, dim]`` -> ``[batch, heads, height, width, kernel_size ** 2]``.

    ``rpb`` is ``[heads, 2k - 1, 2k - 1]`` or None; ``kernel_size`` and
    ``dilation`` one int for both axes. Errors as :func:`natten1dqkrpb`.
    """
    return _qk(2, query, key, rpb, kernel_size, dilation)


def natten2dqk(query, key, kernel_size, dilation):
    """:func:`natten2dqkrpb` without a bias: same arguments (less ``rpb``), returns and errors."""
    return _qk(2, query, key, None, kernel_size, dilation)


def natten2dav(attn, value, kernel_size, dilation):
    """2D :func:`natten1dav`: ``attn [batch, heads, height, width, kernel_size ** 2]`` and ``value [batch, heads, height, width, dim]``.

    Returns ``[batch, heads, height, width, dim]`` (a heads-first view); errors
    as :func:`natten1dav`.
    """
    return _av(2, attn, value, kernel_size, dilation)


# ---------------------------------------------------------------- modules


class _Natten014Layer:
    """NATTEN 0.14's constructor and attributes on top of na_rtc's layer."""

    def _setup(self, native, dim, num_heads, kernel_size, dilation, bias, qkv_bias, qk_scale, attn_drop,
               proj_drop):
        dilation = dilation or 1  # 0.14 accepted dilation=None for 1
        for name, value in (("kernel_size", kernel_size), ("dilation", dilation)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int in NATTEN 0.14's modules (one value for every axis), "
                                f"got {value!r}; na_rtc.NeighborhoodAttention{self.ndim}D takes per-axis tuples")
        native.__init__(self, dim, num_heads, kernel_size, dilation=dilation, rel_pos_bias=bias,
                        qkv_bias=qkv_bias, qk_scale=qk_scale or None, attn_drop=attn_drop, proj_drop=proj_drop)
        # 0.14 kept plain ints here and code (FLOP counters, DiNAT's dilation
        # schedules) reads them.
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.window_size = kernel_size * dilation

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, rel_pos_bias={self.rpb is not None}")


class NeighborhoodAttention1D(_Natten014Layer, _Native1D):
    """NATTEN 0.14's ``NeighborhoodAttention1D`` on ``[batch, length, dim]``: na_rtc's layer with 0.14's signature.

    State-dict keys are NATTEN's (``qkv``, ``rpb``, ``proj``), so 0.14
    checkpoints load as they are; ``kernel_size``, ``dilation`` and
    ``window_size`` stay plain ints. Calls, shapes and call errors are
    :class:`na_rtc.NeighborhoodAttention1D`'s.

    :param dim: channels, divisible by ``num_heads``.
    :param num_heads: heads.
    :param kernel_size: window size, one int ``>= 2`` (odd with ``bias``).
    :param dilation: one int ``>= 1`` (None means 1, as in 0.14).
    :param bias: the relative positional bias ``rpb`` (on by default, as in
        0.14).
    :param qkv_bias: a bias in the qkv projection.
    :param qk_scale: the logit scale; a falsy value means ``head_dim ** -0.5``.
    :param attn_drop: dropout on the attention weights in training, ``[0, 1)``.
    :param proj_drop: dropout after the output projection, ``[0, 1)``.
    :raises TypeError: ``kernel_size`` or ``dilation`` not an int (na_rtc's own
        layer takes per-axis tuples), or what na_rtc's layer raises.
    :raises ValueError: what na_rtc's layer raises.
    """

    def __init__(self, dim, num_heads, kernel_size, dilation=1, bias=True, qkv_bias=True, qk_scale=None,
                 attn_drop=0.0, proj_drop=0.0):
        self._setup(_Native1D, dim, num_heads, kernel_size, dilation, bias, qkv_bias, qk_scale, attn_drop,
                    proj_drop)


class NeighborhoodAttention2D(_Natten014Layer, _Native2D):
    """NATTEN 0.14's ``NeighborhoodAttention2D`` on ``[batch, height, width, dim]``.

    As :class:`NeighborhoodAttention1D` (same arguments, one int for both axes,
    same errors); ``rpb`` is ``[num_heads, 2k - 1, 2k - 1]``.
    """

    def __init__(self, dim, num_heads, kernel_size, dilation=1, bias=True, qkv_bias=True, qk_scale=None,
                 attn_drop=0.0, proj_drop=0.0):
        self._setup(_Native2D, dim, num_heads, kernel_size, dilation, bias, qkv_bias, qk_scale, attn_drop,
                    proj_drop)


_LATER_3D = {"natten3dqkrpb", "natten3dqk", "natten3dav", "NeighborhoodAttention3D", "na3d", "na3d_qk", "na3d_av"}


def __getattr__(name):
    if name in _LATER_3D:  # code written for a later NATTEN imported from the wrong module
        raise AttributeError(f"{name} is not in NATTEN 0.14, which had no 3D neighborhood attention: NATTEN "
                             f"0.15-0.17's 3D API is in na_rtc.compat.natten017 (with {name}), na_rtc's own in "
                             f"na_rtc.na3d / na_rtc.NeighborhoodAttention3D")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
