"""NATTEN 0.17's API on na_rtc: replace ``from natten import ...`` /
``from natten.functional import ...`` with ``from na_rtc.compat.natten017 import ...``.

Split ops, heads-first (``[batch, heads, *spatial, dim]``, attention weights
``[batch, heads, *spatial, prod(kernel_size)]``)::

    na1d_qk(query, key, kernel_size, dilation=1, additional_keys=None, is_causal=False, rpb=None)
    na1d_av(attn, value, kernel_size, dilation=1, additional_values=None, is_causal=False)
    na2d_qk(...), na2d_av(...)                  # the same, 2D
    na3d_qk(...), na3d_av(attn, value, kernel_size, dilation, ...)  # 3D: na3d_av's dilation is required

Fused ops, heads-last (``[batch, *spatial, heads, dim]``)::

    na1d(query, key, value, kernel_size, dilation=1, is_causal=False, rpb=None, scale=None,
         additional_keys=None, additional_values=None, xformers_kwargs=None)
    na2d(...), na3d(...)

3D tensors are ``[batch, heads, depth, height, width, dim]`` (split) and
``[batch, depth, height, width, heads, dim]`` (fused); slot
``t = (tx * ky + ty) * kz + tz`` of the weights. NATTEN 0.14's ``natten1dqkrpb``
... ``natten2dav`` and 0.15's ``natten3dqkrpb(query, key, rpb, kernel_size_d,
kernel_size, dilation_d, dilation)``, ``natten3dqk``, ``natten3dav`` (still
present, deprecated, in 0.17.0-0.17.4; the 3D ones take one size for depth
and one for height and width). Modules ``NeighborhoodAttention1D/2D/3D(dim,
num_heads, kernel_size, dilation=1, is_causal=False, rel_pos_bias=False,
qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0,
use_experimental_ops=False)`` with NATTEN's state-dict keys (``qkv``,
``rpb``, ``proj``).

Inputs reach na_rtc's kernels as strided views (no copies); split-op results
are heads-first views of na_rtc's heads-last outputs (not contiguous).
``additional_keys``/``additional_values`` (extra tokens every query attends
to, besides its neighborhood) are supported on torch tensors: in the split
ops as NATTEN does (extra columns after the window slots, torch matmuls),
in the fused ops as the native ``na*d(..., additional_keys=,
additional_values=)`` computes them (one softmax over both, exact
gradients). ``xformers_kwargs`` is refused.
"""

from __future__ import annotations

import math
import numbers

from .. import _args, _arrays, functional
from ..modules import NeighborhoodAttention1D as _Native1D
from ..modules import NeighborhoodAttention2D as _Native2D
from ..modules import NeighborhoodAttention3D as _Native3D
from ._layout import check_av, check_qk, heads_first, heads_last
from .natten014 import natten1dav, natten1dqk, natten1dqkrpb, natten2dav, natten2dqk, natten2dqkrpb

__all__ = [
    "na1d_qk", "na1d_av", "na2d_qk", "na2d_av", "na3d_qk", "na3d_av", "na1d", "na2d", "na3d",
    "natten1dqkrpb", "natten1dqk", "natten1dav", "natten2dqkrpb", "natten2dqk", "natten2dav",
    "natten3dqkrpb", "natten3dqk", "natten3dav",
    "NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D",
]

_FUSED = {1: functional.na1d, 2: functional.na2d, 3: functional.na3d}
_QK = {1: functional.na1d_qk, 2: functional.na2d_qk, 3: functional.na3d_qk}
_AV = {1: functional.na1d_av, 2: functional.na2d_av, 3: functional.na3d_av}


def _slots(kernel_size, ndim) -> int:
    return math.prod(_args.per_axis_ints("kernel_size", kernel_size, ndim))


def _extra_tokens(name: str, extra, batch: int, heads: int, dim: int, heads_first_layout: bool) -> int:
    """Validate additional keys/values; the number of extra tokens."""
    if _arrays.kind_of(extra) != _arrays.TORCH:
        raise TypeError(f"{name} must be a torch tensor, got {type(extra).__qualname__}")
    layout = "[batch, heads, tokens, dim]" if heads_first_layout else "[batch, tokens, heads, dim]"
    if extra.dim() != 4:
        raise ValueError(f"{name} must have 4 dimensions {layout}, got shape {tuple(extra.shape)}")
    b, h, d = (extra.shape[0], extra.shape[1], extra.shape[3]) if heads_first_layout else \
        (extra.shape[0], extra.shape[2], extra.shape[3])
    if (b, h, d) != (batch, heads, dim):
        raise ValueError(f"{name} must be {layout} with batch={batch}, heads={heads}, dim={dim}, "
                         f"got shape {tuple(extra.shape)}")
    return int(extra.shape[2] if heads_first_layout else extra.shape[1])


# ---------------------------------------------------------------- split ops (heads-first)


def _qk(ndim, query, key, kernel_size, dilation, additional_keys, is_causal, rpb):
    check_qk(ndim, query, key, rpb, kernel_size, dilation)
    attn = heads_first(_QK[ndim](heads_last("query", query, ndim), heads_last("key", key, ndim), kernel_size,
                                 dilation, is_causal, rpb), ndim)
    if additional_keys is None:
        return attn
    import torch

    batch, heads, dim = query.shape[0], query.shape[1], query.shape[-1]
    tokens = _extra_tokens("additional_keys", additional_keys, batch, heads, dim, True)
    extra = torch.matmul(query.flatten(2, -2), additional_keys.transpose(-2, -1))
    return torch.cat([attn, extra.reshape(*attn.shape[:-1], tokens).to(attn.dtype)], dim=-1)


def _av(ndim, attn, value, kernel_size, dilation, additional_values, is_causal):
    window = attn
    if additional_values is not None:
        batch, heads, dim = value.shape[0], value.shape[1], value.shape[-1]
        tokens = _extra_tokens("additional_values", additional_values, batch, heads, dim, True)
        slots = _slots(kernel_size, ndim)
        if attn.shape[-1] != slots + tokens:
            raise ValueError(f"attn's last dimension must be prod(kernel_size) + additional tokens = "
                             f"{slots} + {tokens}, got {attn.shape[-1]}")
        window, extra = attn[..., :slots], attn[..., slots:]
    check_av(ndim, window, value, kernel_size, dilation)
    out = heads_first(_AV[ndim](heads_last("attn", window, ndim), heads_last("value", value, ndim), kernel_size,
                                dilation, is_causal), ndim)
    if additional_values is None:
        return out
    import torch

    added = torch.matmul(extra.flatten(2, -2), additional_values).reshape(out.shape)
    return out + added.to(out.dtype)


def na1d_qk(query, key, kernel_size, dilation=1, additional_keys=None, is_causal=False, rpb=None):
    """NATTEN 0.17's 1D logits, heads-first: ``[batch, heads, length, kernel_size (+ additional tokens)]``.

    ``query . key`` per window slot (the query is not scaled), plus ``rpb``;
    ``-inf`` in causal slots past the query. Extra keys add columns after the
    window's slots, as NATTEN computes them (a torch matmul).

    :param query: ``[batch, heads, length, dim]``: float16, bfloat16, float32 or
        float64; a torch tensor (or NumPy/CuPy array without additional keys).
    :param key: the query's shape, kind, device and dtype.
    :param kernel_size: an int ``>= 2`` (or a 1-tuple).
    :param dilation: an int ``>= 1``.
    :param additional_keys: ``[batch, heads, tokens, dim]`` torch tensor, or None.
    :param is_causal: causal windows.
    :param rpb: ``[heads, 2 * kernel_size - 1]`` (odd ``kernel_size``, not
        causal) or None.
    :returns: the logits, a heads-first view of na_rtc's output (not contiguous)
        or, with additional keys, a new tensor.
    :raises TypeError: an input that is not a NumPy/CuPy/torch array, inputs of
        different kinds or dtypes, a dtype that is not floating, window arguments
        that are not ints.
    :raises ValueError: a wrong number of dimensions, ``key`` not shaped as
        ``query``, an ``rpb`` of the wrong shape, with an even ``kernel_size``,
        ``kernel_size < 2``, ``dilation < 1``, ``kernel_size * dilation`` larger
        than an axis, inputs on different devices, an ``rpb`` with
        ``is_causal``, ``additional_keys`` of the wrong shape (not a torch
        tensor: ``TypeError``).
    """
    return _qk(1, query, key, kernel_size, dilation, additional_keys, is_causal, rpb)


def na1d_av(attn, value, kernel_size, dilation=1, additional_values=None, is_causal=False):
    """NATTEN 0.17's 1D weighted sum of neighbor (and additional) values, heads-first: ``[batch, heads, length, dim]``.

    :param attn: ``[batch, heads, length, kernel_size (+ tokens)]`` weights; the
        value's kind, device and dtype.
    :param value: ``[batch, heads, length, dim]``: float16, bfloat16, float32 or
        float64.
    :param kernel_size: an int ``>= 2``.
    :param dilation: an int ``>= 1``.
    :param additional_values: ``[batch, heads, tokens, dim]`` torch tensor (the
        weights' last ``tokens`` columns apply to it), or None.
    :param is_causal: causal windows (weights of slots past the query are
        ignored).
    :returns: ``[batch, heads, length, dim]``.
    :raises TypeError: an input that is not a NumPy/CuPy/torch array, inputs of
        different kinds or dtypes, a dtype that is not floating, window arguments
        that are not ints.
    :raises ValueError: a wrong number of dimensions, ``attn`` whose leading
        dimensions differ from ``value``'s or whose last is not the window's
        slots, ``kernel_size < 2``, ``dilation < 1``, ``kernel_size * dilation``
        larger than an axis, inputs on different devices, and with
        ``additional_values`` (a torch tensor, else ``TypeError``) of the
        wrong shape or an ``attn`` whose last dimension is not ``kernel_size
        + tokens``.
    """
    return _av(1, attn, value, kernel_size, dilation, additional_values, is_causal)


def na2d_qk(query, key, kernel_size, dilation=1, additional_keys=None, is_causal=False, rpb=None):
    """2D :func:`na1d_qk`: logits ``[batch, heads, height, width, kx * ky (+ additional tokens)]``.

    ``query``/``key`` ``[batch, heads, height, width, dim]``; ``kernel_size``,
    ``dilation`` and ``is_causal`` an int or a pair; ``rpb`` ``[heads, 2kx - 1,
    2ky - 1]``. Errors as :func:`na1d_qk`.
    """
    return _qk(2, query, key, kernel_size, dilation, additional_keys, is_causal, rpb)


def na2d_av(attn, value, kernel_size, dilation=1, additional_values=None, is_causal=False):
    """2D :func:`na1d_av`: ``[batch, heads, height, width, dim]``.

    ``attn`` ``[batch, heads, height, width, kx * ky (+ tokens)]``, ``value``
    ``[batch, heads, height, width, dim]``. Errors as :func:`na1d_av`.
    """
    return _av(2, attn, value, kernel_size, dilation, additional_values, is_causal)


def na3d_qk(query, key, kernel_size, dilation=1, additional_keys=None, is_causal=False, rpb=None):
    """3D :func:`na1d_qk`: logits ``[batch, heads, depth, height, width, kd * kh * kw (+ additional tokens)]``.

    ``query``/``key`` ``[batch, heads, depth, height, width, dim]``;
    ``kernel_size``, ``dilation`` and ``is_causal`` an int or a triple; ``rpb``
    ``[heads, 2kd - 1, 2kh - 1, 2kw - 1]``. Errors as :func:`na1d_qk`.
    """
    return _qk(3, query, key, kernel_size, dilation, additional_keys, is_causal, rpb)


def na3d_av(attn, value, kernel_size, dilation, additional_values=None, is_causal=False):
    """3D :func:`na1d_av`: ``[batch, heads, depth, height, width, dim]``.

    ``dilation`` has no default, as in NATTEN 0.17's ``na3d_av``. ``attn``
    ``[batch, heads, depth, height, width, kd * kh * kw (+ tokens)]``. Errors as
    :func:`na1d_av`.
    """
    return _av(3, attn, value, kernel_size, dilation, additional_values, is_causal)


# ---------------------------------------------------------------- 0.15's 3D ops (deprecated in 0.17.0-0.17.4)


def _depth_and_plane(kernel_size_d, kernel_size, dilation_d, dilation) -> tuple[tuple, tuple]:
    """NATTEN 0.15's 3D arguments (one value for depth, one for height and width) as per-axis triples."""
    for name, value in (("kernel_size_d", kernel_size_d), ("kernel_size", kernel_size),
                        ("dilation_d", dilation_d), ("dilation", dilation)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int in natten3dqkrpb/natten3dqk/natten3dav (depth takes "
                            f"kernel_size_d and dilation_d, height and width share kernel_size and dilation), "
                            f"got {value!r}; na3d_qk / na3d_av take per-axis tuples")
    return (kernel_size_d, kernel_size, kernel_size), (dilation_d, dilation, dilation)


def natten3dqkrpb(query, key, rpb, kernel_size_d, kernel_size, dilation_d, dilation):
    """NATTEN 0.15's 3D logits plus ``rpb``: ``[batch, heads, depth, height, width, dim]`` -> ``[..., kernel_size_d * kernel_size ** 2]``.

    As :func:`na3d_qk`, with one size and dilation for depth and one shared by
    height and width.

    :param rpb: ``[heads, 2kd - 1, 2k - 1, 2k - 1]`` or None.
    :param kernel_size_d: the depth window, an int.
    :param kernel_size: the height and width window, an int.
    :param dilation_d: the depth dilation, an int.
    :param dilation: the height and width dilation, an int.
    :raises TypeError: one of the four window arguments is not an int; else as
        :func:`na3d_qk`.
    :raises ValueError: as :func:`na3d_qk`.
    """
    kernel, dilations = _depth_and_plane(kernel_size_d, kernel_size, dilation_d, dilation)
    return _qk(3, query, key, kernel, dilations, None, False, rpb)


def natten3dqk(query, key, kernel_size_d, kernel_size, dilation_d, dilation):
    """:func:`natten3dqkrpb` without a bias: same arguments (less ``rpb``), returns and errors."""
    kernel, dilations = _depth_and_plane(kernel_size_d, kernel_size, dilation_d, dilation)
    return _qk(3, query, key, kernel, dilations, None, False, None)


def natten3dav(attn, value, kernel_size_d, kernel_size, dilation_d, dilation):
    """NATTEN 0.15's 3D weighted sum: ``attn [..., kernel_size_d * kernel_size ** 2]`` -> ``[batch, heads, depth, height, width, dim]``.

    Window arguments as :func:`natten3dqkrpb`; errors as :func:`na3d_av`, and
    ``TypeError`` for a window argument that is not an int.
    """
    kernel, dilations = _depth_and_plane(kernel_size_d, kernel_size, dilation_d, dilation)
    return _av(3, attn, value, kernel, dilations, None, False)


# ---------------------------------------------------------------- fused ops (heads-last)


def _fused(ndim, query, key, value, kernel_size, dilation, is_causal, rpb, scale, additional_keys,
           additional_values, xformers_kwargs):
    if xformers_kwargs:
        raise NotImplementedError("xformers_kwargs is not supported: na_rtc computes additional keys/values "
                                  "itself, without xFormers")
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values must be given together (or both left out)")
    scale = scale or query.shape[-1] ** -0.5  # NATTEN's rule: a falsy scale means the default
    if additional_keys is not None:  # NATTEN 0.17 took torch tensors only
        for name, extra in (("additional_keys", additional_keys), ("additional_values", additional_values)):
            if _arrays.kind_of(extra) != _arrays.TORCH:
                raise TypeError(f"{name} must be a torch tensor, got {type(extra).__qualname__}")
    # one softmax over the window and the extra tokens: the native op's (na_rtc.extra_tokens)
    return _FUSED[ndim](query, key, value, kernel_size, 1, dilation, is_causal, scale, rpb,
                        additional_keys=additional_keys, additional_values=additional_values)


def na1d(query, key, value, kernel_size, dilation=1, is_causal=False, rpb=None, scale=None, additional_keys=None,
         additional_values=None, xformers_kwargs=None):
    """NATTEN 0.17's fused 1D NA on heads-last ``[batch, length, heads, dim]``.

    :func:`na_rtc.na1d` with NATTEN 0.17's argument order (no stride); one
    softmax over the window and the extra tokens.

    :param query: ``[batch, length, heads, dim]``: float16, bfloat16, float32 or
        float64; NumPy, CuPy or torch.
    :param key: ``[batch, length, heads, dim]``, the query's kind, device and
        dtype.
    :param value: ``[batch, length, heads, dim]``, the same.
    :param kernel_size: as :func:`na_rtc.na1d`'s, as are ``dilation``,
        ``is_causal`` and ``rpb``.
    :param scale: default ``dim ** -0.5``; a falsy value means the default, as
        in NATTEN.
    :param additional_keys: ``[batch, tokens, heads, dim]`` torch tensor, with
        ``additional_values``, or None.
    :param additional_values: ``[batch, tokens, heads, dim]`` torch tensor.
    :param xformers_kwargs: refused (must be None or empty).
    :returns: ``[batch, length, heads, dim]``.
    :raises NotImplementedError: ``xformers_kwargs`` given.
    :raises TypeError: additional tokens that are not torch tensors; else as
        :func:`na_rtc.na1d`.
    :raises ValueError: only one of ``additional_keys``/``additional_values``;
        else as :func:`na_rtc.na1d`.
    """
    return _fused(1, query, key, value, kernel_size, dilation, is_causal, rpb, scale, additional_keys,
                  additional_values, xformers_kwargs)


def na2d(query, key, value, kernel_size, dilation=1, is_causal=False, rpb=None, scale=None, additional_keys=None,
         additional_values=None, xformers_kwargs=None):
    """NATTEN 0.17's fused 2D NA on heads-last ``[batch, height, width, heads, dim]``.

    As :func:`na1d` with :func:`na_rtc.na2d`'s shapes: window arguments an int
    or a pair, ``rpb`` ``[heads, 2kx - 1, 2ky - 1]``, additional tokens
    ``[batch, tokens, heads, dim]``. Returns ``[batch, height, width, heads,
    dim]``; errors as :func:`na1d`.
    """
    return _fused(2, query, key, value, kernel_size, dilation, is_causal, rpb, scale, additional_keys,
                  additional_values, xformers_kwargs)


def na3d(query, key, value, kernel_size, dilation=1, is_causal=False, rpb=None, scale=None, additional_keys=None,
         additional_values=None, xformers_kwargs=None):
    """NATTEN 0.17's fused 3D NA on heads-last ``[batch, depth, height, width, heads, dim]``.

    As :func:`na1d` with :func:`na_rtc.na3d`'s shapes: window arguments an int
    or a triple, ``rpb`` ``[heads, 2kd - 1, 2kh - 1, 2kw - 1]``. Returns
    ``[batch, depth, height, width, heads, dim]``; errors as :func:`na1d`.
    """
    return _fused(3, query, key, value, kernel_size, dilation, is_causal, rpb, scale, additional_keys,
                  additional_values, xformers_kwargs)


# ---------------------------------------------------------------- modules


class _Natten017Layer:
    """NATTEN 0.17's constructor and attributes on top of na_rtc's layer."""

    def _setup(self, native, dim, num_heads, kernel_size, dilation, is_causal, rel_pos_bias, qkv_bias, qk_scale,
               attn_drop, proj_drop, use_experimental_ops):
        native.__init__(self, dim, num_heads, kernel_size, dilation=dilation, is_causal=is_causal,
                        rel_pos_bias=rel_pos_bias, qkv_bias=qkv_bias, qk_scale=qk_scale or None,
                        attn_drop=attn_drop, proj_drop=proj_drop)
        self.attn_drop_rate = attn_drop
        # NATTEN's experimental (torch.compile-friendly) ops: na_rtc's ops
        # always are, so the flag changes nothing.
        self.use_experimental_ops = use_experimental_ops

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, is_causal={self.is_causal}, has_bias={self.rpb is not None}")


class NeighborhoodAttention1D(_Natten017Layer, _Native1D):
    """NATTEN 0.17's ``NeighborhoodAttention1D`` on ``[batch, length, dim]``: na_rtc's layer with 0.17's signature.

    State-dict keys are NATTEN's (``qkv``, ``rpb``, ``proj``). Calls, shapes
    and errors are :class:`na_rtc.NeighborhoodAttention1D`'s.

    :param dim: channels, divisible by ``num_heads``.
    :param num_heads: heads.
    :param kernel_size: window size, an int ``>= 2`` (or one per axis), as are
        ``dilation`` and ``is_causal``.
    :param rel_pos_bias: a learned relative positional bias ``rpb`` (odd
        ``kernel_size``, not causal).
    :param qkv_bias: a bias in the qkv projection.
    :param qk_scale: the logit scale; a falsy value means ``head_dim ** -0.5``.
    :param attn_drop: dropout on the attention weights in training, ``[0, 1)``.
    :param proj_drop: dropout after the output projection, ``[0, 1)``.
    :param use_experimental_ops: accepted and kept; changes nothing (na_rtc's
        ops always trace with torch.compile).
    :raises TypeError: what na_rtc's layer raises.
    :raises ValueError: what na_rtc's layer raises.
    """

    def __init__(self, dim, num_heads, kernel_size, dilation=1, is_causal=False, rel_pos_bias=False, qkv_bias=True,
                 qk_scale=None, attn_drop=0.0, proj_drop=0.0, use_experimental_ops=False):
        self._setup(_Native1D, dim, num_heads, kernel_size, dilation, is_causal, rel_pos_bias, qkv_bias, qk_scale,
                    attn_drop, proj_drop, use_experimental_ops)


class NeighborhoodAttention2D(_Natten017Layer, _Native2D):
    """NATTEN 0.17's ``NeighborhoodAttention2D`` on ``[batch, height, width, dim]``.

    As :class:`NeighborhoodAttention1D` (same arguments and errors; window
    arguments an int or a pair); ``rpb`` is ``[num_heads, 2kx - 1, 2ky - 1]``.
    """

    def __init__(self, dim, num_heads, kernel_size, dilation=1, is_causal=False, rel_pos_bias=False, qkv_bias=True,
                 qk_scale=None, attn_drop=0.0, proj_drop=0.0, use_experimental_ops=False):
        self._setup(_Native2D, dim, num_heads, kernel_size, dilation, is_causal, rel_pos_bias, qkv_bias, qk_scale,
                    attn_drop, proj_drop, use_experimental_ops)


class NeighborhoodAttention3D(_Natten017Layer, _Native3D):
    """NATTEN 0.17's ``NeighborhoodAttention3D`` on ``[batch, depth, height, width, dim]``.

    As :class:`NeighborhoodAttention1D` (same arguments and errors; window
    arguments an int or a triple); ``rpb`` is ``[num_heads, 2kd - 1, 2kh - 1,
    2kw - 1]``.
    """

    def __init__(self, dim, num_heads, kernel_size, dilation=1, is_causal=False, rel_pos_bias=False, qkv_bias=True,
                 qk_scale=None, attn_drop=0.0, proj_drop=0.0, use_experimental_ops=False):
        self._setup(_Native3D, dim, num_heads, kernel_size, dilation, is_causal, rel_pos_bias, qkv_bias, qk_scale,
                    attn_drop, proj_drop, use_experimental_ops)
