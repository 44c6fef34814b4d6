"""Kernel arguments as launch plans pass them: the Python side of ``cuda_src/na_args.cuh``.

``na_args.cuh`` declares the argument lists every kernel shares, and each
function here packs one of them, in the same order; a change to one is a
change to the other:

* ``NA_PROBLEM`` -> :func:`problem`: batch, heads, head dim, then per axis
  length, kernel, stride, dilation and causal flag (x, then y; a 1D problem
  passes a trivial y axis);
* ``NA_STRIDES5(t)`` -> :func:`tensor`: a ``[b, *spatial, h, last]`` array as
  its pointer and five int64 element strides (batch, x, y, head, last);
* ``NA_STRIDES4(t)`` -> :func:`rows`: a per-row table (logsumexp, delta) as its
  pointer and four strides (batch, x, y, head), or a null pointer;
* a bias table ``[h, rx, ry]`` -> :func:`bias`: its pointer and three strides,
  or a null pointer.

1D problems run as 2D ones with a second axis of length 1 and kernel 1: every
tensor gets a zero stride for that axis, so no data moves. The kernels' own
argument lists (which of these, in which order) are packed by the launchers,
with these pieces.
"""

from __future__ import annotations

from functools import lru_cache

from .. import _arrays
from .._args import Problem
from . import plan as P

__all__ = ["bias", "problem", "rows", "tensor"]

_i64 = P.i64
#: the trivial y axis of a 1D problem: length 1, kernel 1, stride 1, dilation 1, not causal
_TRIVIAL_AXIS = (_i64(1), _i64(1), _i64(1), _i64(1), _i64(0))
_NULL_BIAS = (P.NULL, _i64(0), _i64(0), _i64(0))
_NULL_ROWS = (P.NULL, _i64(0), _i64(0), _i64(0), _i64(0))


@lru_cache(maxsize=256)  # a warm call repeats its problem: its 13 arguments are packed once
def problem(problem: Problem) -> tuple[P.Arg, ...]:
    """``NA_PROBLEM``."""
    args = [_i64(problem.batch), _i64(problem.heads), _i64(problem.head_dim)]
    for axis in problem.axes:
        args += [_i64(axis.length), _i64(axis.kernel_size), _i64(axis.stride), _i64(axis.dilation),
                 _i64(axis.causal)]
    if len(problem.axes) == 1:
        args += _TRIVIAL_AXIS
    return tuple(args)


def tensor(x, problem: Problem) -> tuple[P.Arg, ...]:
    """``T* t, NA_STRIDES5(t)``: pointer + 5 element strides ``[b, x, y, h, last]`` of a ``[b, *spatial, h,
    last]`` array."""
    return (P.ptr(x), *_strides(_arrays.element_strides(x), problem.ndim == 1, 5))


def bias(x, problem: Problem) -> tuple[P.Arg, ...]:
    """Pointer + 3 element strides ``[h, rx, ry]`` of a bias table, or a null pointer."""
    if x is None:
        return _NULL_BIAS
    return (P.ptr(x), *_strides(_arrays.element_strides(x), problem.ndim == 1, 3))


def rows(x, problem: Problem) -> tuple[P.Arg, ...]:
    """``NA_STRIDES4``: pointer + 4 element strides ``[b, x, y, h]`` of a logsumexp-shaped array, or a null
    pointer."""
    if x is None:
        return _NULL_ROWS
    return (P.ptr(x), *_strides(_arrays.element_strides(x), problem.ndim == 1, 4))


@lru_cache(maxsize=1024)  # layouts repeat from call to call: their arguments are packed once
def _strides(strides: tuple[int, ...], one_d: bool, count: int) -> tuple[P.Arg, ...]:
    """``count`` int64 stride arguments; a 1D problem's arrays get a zero stride for the trivial y axis, which
    comes after the batch and x strides (a bias table has no batch: after its head and x strides)."""
    if one_d:
        strides = (*strides[:2], 0, *strides[2:])
    if len(strides) != count:
        raise ValueError(f"expected {count} strides of a {'1D' if one_d else '2D'} problem's array, got {strides}")
    return tuple(map(_i64, strides))
