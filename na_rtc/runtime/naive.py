"""The straightforward kernels (``cuda_src/na_naive.cu``) as allocating calls.

Each call allocates its outputs with the inputs' library (torch outputs come
from torch's allocator) and describes its launches as
:class:`~na_rtc.runtime.plan.LaunchPlan`; the executor (``cuda`` or
``emulator``) runs them. They are the fallback of every faster kernel
(:mod:`na_rtc.runtime.kernels` picks), and the argument packing here is
shared by all kernel families.

1D problems run as 2D ones with a second axis of length 1 and kernel 1: every
tensor gets a zero stride for that axis, so no data moves.
"""

from __future__ import annotations

import math
from typing import Callable

from .. import _arrays
from .._args import Problem
from . import plan as P
from .families import CTYPES, FAMILIES, NAIVE_THREADS, accumulator_dtype

FAMILY = FAMILIES["naive"]
Executor = Callable[[P.LaunchPlan], None]


# ---------------------------------------------------------------- argument packing


def _problem_args(problem: Problem) -> list[P.Arg]:
    axes = list(problem.axes)
    args = [P.i64(problem.batch), P.i64(problem.heads), P.i64(problem.head_dim)]
    for axis in axes:
        args += [P.i64(axis.length), P.i64(axis.kernel_size), P.i64(axis.stride), P.i64(axis.dilation), P.i64(axis.causal)]
    if len(axes) == 1:  # the trivial second axis of a 1D problem
        args += [P.i64(1), P.i64(1), P.i64(1), P.i64(1), P.i64(0)]
    return args


def _tensor(x, problem: Problem) -> list[P.Arg]:
    """Pointer + 5 element strides ``[b, x, y, h, last]`` of a ``[b, *spatial, h, last]`` array."""
    strides = _arrays.element_strides(x)
    if problem.ndim == 1:
        strides = (strides[0], strides[1], 0, strides[2], strides[3])
    return [P.ptr(x), *(P.i64(s) for s in strides)]


def _bias(x, problem: Problem) -> list[P.Arg]:
    """Pointer + 3 element strides ``[h, rx, ry]`` of a bias table (or a null pointer)."""
    if x is None:
        return [P.Arg("ptr", None), P.i64(0), P.i64(0), P.i64(0)]
    strides = _arrays.element_strides(x)
    if problem.ndim == 1:
        strides = (*strides, 0)
    return [P.ptr(x), *(P.i64(s) for s in strides)]


def _rows(x, problem: Problem) -> list[P.Arg]:
    """Pointer + 4 element strides ``[b, x, y, h]`` of a logsumexp array (or a null pointer)."""
    if x is None:
        return [P.Arg("ptr", None)] + [P.i64(0)] * 4
    strides = _arrays.element_strides(x)
    if problem.ndim == 1:
        strides = (strides[0], strides[1], 0, strides[2])
    return [P.ptr(x), *(P.i64(s) for s in strides)]


def _launch(run: Executor, name: str, threads_total: int, args: list[P.Arg]) -> None:
    if threads_total == 0:
        return
    blocks = -(-threads_total // NAIVE_THREADS)
    if blocks > P.MAX_GRID[0]:
        raise ValueError(
            f"the problem needs {blocks} blocks of {NAIVE_THREADS} threads for {name}, more than CUDA's "
            f"grid limit {P.MAX_GRID[0]}; split the batch"
        )
    run(P.LaunchPlan(P.Kernel(FAMILY.source, name), (blocks, 1, 1), (NAIVE_THREADS, 1, 1), 0, tuple(args)))


# ---------------------------------------------------------------- the kernels, one function each


class NaiveKernels:
    """Allocating wrappers around each kernel of the family, for one executor."""

    def __init__(self, run: Executor):
        self.run = run

    def qk(self, problem, query, key, bias, out_dtype, scale, fill):
        """Logits (or any QK-shaped product) ``[b, *spatial, h, slots]`` in ``out_dtype``."""
        attn = _arrays.empty(query, problem.attn_shape, out_dtype)
        name = f"na_qk_fwd<{CTYPES[problem.dtype]}, {CTYPES[out_dtype]}>"
        args = _tensor(query, problem) + _tensor(key, problem) + _bias(bias, problem) + _tensor(attn, problem)
        args += [P.f64(scale), P.f64(fill)] + _problem_args(problem)
        _launch(self.run, name, math.prod(problem.attn_shape), args)
        return attn

    def _weighted(self, kernel, problem, weights, source, scale):
        out = _arrays.empty(source, problem.qkv_shape, problem.dtype)
        name = f"{kernel}<{CTYPES[_arrays.dtype_name(weights)]}, {CTYPES[problem.dtype]}>"
        args = _tensor(weights, problem) + _tensor(source, problem) + _tensor(out, problem)
        args += [P.f64(scale)] + _problem_args(problem)
        _launch(self.run, name, math.prod(problem.qkv_shape), args)
        return out

    def av(self, problem, weights, value, scale=1.0):
        """``scale * sum_t weights[.., t] * value[key(t)]``, per query."""
        return self._weighted("na_av_fwd", problem, weights, value, scale)

    def inverse(self, problem, weights, source, scale=1.0):
        """``scale * sum over queries i seeing key j of weights[i, slot] * source[i]``, per key."""
        return self._weighted("na_inv_fwd", problem, weights, source, scale)

    def bias_grad(self, problem, grad_logits):
        """``[heads, *(2k-1)]`` sums of logit gradients per relative offset, accumulator dtype."""
        acc = accumulator_dtype(problem.dtype)
        drpb = _arrays.empty(grad_logits, problem.rpb_shape, acc)
        name = f"na_rpb_bwd<{CTYPES[_arrays.dtype_name(grad_logits)]}>"
        args = _tensor(grad_logits, problem) + _bias(drpb, problem) + _problem_args(problem)
        blocks = math.prod(problem.rpb_shape)
        if blocks:
            self.run(P.LaunchPlan(P.Kernel(FAMILY.source, name), (blocks, 1, 1), (NAIVE_THREADS, 1, 1), 0, tuple(args)))
        return drpb

    def softmax(self, problem, logits, lse=None):
        """Softmax over the slots, in place; fills ``lse`` when given."""
        name = f"na_softmax_fwd<{CTYPES[_arrays.dtype_name(logits)]}>"
        args = _tensor(logits, problem) + _rows(lse, problem) + _problem_args(problem)
        _launch(self.run, name, math.prod(problem.lse_shape), args)

    def softmax_backward(self, problem, probs, grad):
        """``grad <- probs * (grad - rowsum(probs * grad))``, in place."""
        name = f"na_softmax_bwd<{CTYPES[_arrays.dtype_name(probs)]}>"
        args = _tensor(probs, problem) + _tensor(grad, problem) + _problem_args(problem)
        _launch(self.run, name, math.prod(problem.lse_shape), args)
