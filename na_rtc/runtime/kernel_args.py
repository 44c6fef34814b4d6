"""Kernel arguments as launch plans pass them: the Python side of ``cuda_src/na_args.cuh``.

``na_args.cuh`` declares the argument lists every kernel shares, and each
function here packs one of them, in the same order; a change to one is a
change to the other:

* ``NA_PROBLEM`` -> :func:`problem`: batch, query heads, query heads per
  key/value head (grouped-query attention; 1 without), the query's and key's
  head dim, the value's (and output's) head dim, then per axis
  length, kernel, stride, dilation and causal flag (x, y, then z);
* ``NA_TENSOR(t)`` -> :func:`tensor`: a ``[b, *spatial, h, last]`` array as
  its pointer and six int64 element strides (batch, x, y, z, head, last);
* ``NA_ROWS(t)`` -> :func:`rows`: a per-row table (logsumexp, delta) as its
  pointer and five strides (batch, x, y, z, head), or a null pointer;
* ``NA_BIAS(t)`` -> :func:`bias`: a bias table ``[h, rx, ry, rz]`` as its
  pointer and four strides, or a null pointer;
* ``NA_EXTRA(T)`` -> :func:`extra`: the extra key/value tokens of a fused
  forward (``[b, token, h, last]`` keys and values, each a pointer and four
  strides), then their count; null pointers and 0 without them.

Every kernel takes three axes. A problem of lower rank passes trivial axes
after its own (length 1, kernel 1: 1D has y and z trivial, 2D has z), and
every array gets a zero stride for them, so no data moves. The kernels' own
argument lists (which of these, in which order) are packed by the launchers,
with these pieces.
"""

from __future__ import annotations

from functools import lru_cache

from .. import _arrays
from .._args import Problem
from . import plan as P

__all__ = ["bias", "extra", "extra_grads", "problem", "rows", "tensor"]

_i64 = P.i64
#: the axes every kernel takes (x, y, z)
AXES = 3
#: a trivial axis, after a lower-rank problem's own: length 1, kernel 1, stride 1, dilation 1, not causal
_TRIVIAL_AXIS = (_i64(1), _i64(1), _i64(1), _i64(1), _i64(0))
_NULL_BIAS = (P.NULL, *(_i64(0),) * (1 + AXES))
_NULL_ROWS = (P.NULL, *(_i64(0),) * (2 + AXES))
_NO_EXTRA = (P.NULL, *(_i64(0),) * 4, P.NULL, *(_i64(0),) * 5)


@lru_cache(maxsize=256)  # a warm call repeats its problem: its 20 arguments are packed once
def problem(problem: Problem) -> tuple[P.Arg, ...]:
    """``NA_PROBLEM``."""
    args = [_i64(problem.batch), _i64(problem.heads), _i64(problem.group), _i64(problem.head_dim),
            _i64(problem.v_dim)]
    for axis in problem.axes:
        args += [_i64(axis.length), _i64(axis.kernel_size), _i64(axis.stride), _i64(axis.dilation),
                 _i64(axis.causal)]
    args += _TRIVIAL_AXIS * (AXES - len(problem.axes))
    return tuple(args)


def tensor(x, problem: Problem) -> tuple[P.Arg, ...]:
    """``T* t, NA_TENSOR(t)``: pointer + 6 element strides ``[b, x, y, z, h, last]`` of a ``[b, *spatial, h,
    last]`` array."""
    return (P.ptr(x), *_strides(_arrays.element_strides(x), problem.ndim, 2))


def bias(x, problem: Problem) -> tuple[P.Arg, ...]:
    """``NA_BIAS``: pointer + 4 element strides ``[h, rx, ry, rz]`` of a bias table, or a null pointer."""
    if x is None:
        return _NULL_BIAS
    return (P.ptr(x), *_strides(_arrays.element_strides(x), problem.ndim, 0))


def rows(x, problem: Problem) -> tuple[P.Arg, ...]:
    """``NA_ROWS``: pointer + 5 element strides ``[b, x, y, z, h]`` of a logsumexp-shaped array, or a null
    pointer."""
    if x is None:
        return _NULL_ROWS
    return (P.ptr(x), *_strides(_arrays.element_strides(x), problem.ndim, 1))


def extra(keys, values) -> tuple[P.Arg, ...]:
    """``NA_EXTRA``: the extra tokens' keys and values ``[b, token, h, last]`` (pointer + 4 element strides
    each) and the token count, or null pointers and 0 where ``keys`` is None."""
    if keys is None:
        return _NO_EXTRA
    return (P.ptr(keys), *map(_i64, _arrays.element_strides(keys)), P.ptr(values),
            *map(_i64, _arrays.element_strides(values)), _i64(int(keys.shape[1])))


def extra_grads(keys, values) -> tuple[P.Arg, ...]:
    """The extra tokens' gradients, as the tokens' dK/dV kernel writes them: ``[b, token, h, last]`` keys and
    values, each a pointer and 4 element strides (no count: the tokens' ``NA_EXTRA`` has it)."""
    return (P.ptr(keys), *map(_i64, _arrays.element_strides(keys)), P.ptr(values),
            *map(_i64, _arrays.element_strides(values)))


@lru_cache(maxsize=1024)  # layouts repeat from call to call: their arguments are packed once
def _strides(strides: tuple[int, ...], rank: int, trailing: int) -> tuple[P.Arg, ...]:
    """The int64 stride arguments of an array ``[lead, *spatial, *trailing]`` (lead: the batch, or a bias
    table's head; trailing: head and last, or the head): the trivial axes of a lower-rank problem get zero
    strides after its ``rank`` spatial ones."""
    if len(strides) != 1 + rank + trailing:
        raise ValueError(f"expected {1 + rank + trailing} strides of a {rank}D problem's array, got {strides}")
    return tuple(map(_i64, (*strides[:1 + rank], *(0,) * (AXES - rank), *strides[1 + rank:])))
