"""The launchers: a planned :class:`~na_rtc.runtime.registry.Launch` and the call's arrays become launch plans.

One function per kernel signature: it allocates the outputs with the inputs'
library (torch outputs come from torch's allocator, on the inputs' device),
packs the arguments in the kernel's order (:mod:`na_rtc.runtime.kernel_args`,
the mirror of ``cuda_src/na_args.cuh``) and hands each
:class:`~na_rtc.runtime.plan.LaunchPlan` to the executor (``cuda`` or
``emulator``). Which kernel, grid and shared memory a launch takes is the
family's planner's business; which family serves is the dispatcher's. Nothing
is launched for an empty output (batch or heads 0).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

from .. import _arrays
from .._args import Problem
from . import kernel_args as A
from . import plan as P
from .registry import Launch
from .tiling import accumulator_dtype

__all__ = ["BackwardLaunches", "Executor", "bias_grad", "bias_grad_two_pass", "fused_backward", "fused_forward",
           "inverse", "qk", "softmax", "softmax_backward", "weighted"]

Executor = Callable[[P.LaunchPlan], object]


# ---------------------------------------------------------------- fused ops


def fused_forward(run: Executor, launch: Launch, problem: Problem, query, key, value, rpb_acc=None,
                  extra_keys=None, extra_values=None):
    """``(out, lse)`` of a fused forward kernel (SIMT, mma.sync or wgmma: one argument list): out in the problem
    dtype, lse float32 ``[batch, *spatial, heads]``. ``rpb_acc``: the bias table in float32, or None;
    ``extra_keys``/``extra_values``: the extra tokens (for a kernel that streams them), or None."""
    out = _arrays.empty(query, problem.out_shape, problem.dtype)
    lse = _arrays.empty(query, problem.lse_shape, "float32")
    if launch.blocks == 0 or math.prod(problem.out_shape) == 0:
        return out, lse
    args = (A.tensor(query, problem) + A.tensor(key, problem) + A.tensor(value, problem) + A.bias(rpb_acc, problem)
            + A.extra(extra_keys, extra_values) + A.tensor(out, problem) + A.rows(lse, problem) + (P.f64(problem.scale),) + A.problem(problem))
    run(launch.plan(args))
    return out, lse


class BackwardLaunches(NamedTuple):
    """The launches of one fused backward: ``delta = rowsum(dOut * out) - dlse``, the dq and dK/dV kernels (any pair
    of paths: they share one argument list), the bias partials' reduction (None without a bias), and the extra
    tokens' dK/dV kernel (None without extra tokens; the dq kernel then streams them too)."""

    delta: Launch
    dq: Launch
    dkdv: Launch
    rpb_reduce: Launch | None
    tokens: Launch | None = None

    def kernel_names(self, has_rpb: bool) -> tuple[str, ...]:
        names = (self.delta.name, self.dq.name, self.dkdv.name)
        names = (*names, self.rpb_reduce.name) if has_rpb else names
        return names if self.tokens is None else (*names, self.tokens.name)


def fused_backward(run: Executor, launches: BackwardLaunches, problem: Problem, grad_out, query, key, value, rpb_acc,
                   output, lse, grad_lse=None, extra_keys=None, extra_values=None):
    """``(dq, dk, dv, drpb)``: dq/dk/dv in the problem dtype, drpb float32 ``[heads, *(2k-1)]`` (None without
    ``rpb_acc``). ``output`` and ``lse`` are the forward's (``lse`` float32 ``[b, *spatial, heads]``);
    ``grad_lse``, the logsumexp's gradient (lse-shaped, or None: none), enters through ``delta``. With extra
    tokens (``launches.tokens`` set), ``(dq, dk, dv, drpb, d_extra_keys, d_extra_values)``: the dq kernel
    streams them after each tile's neighborhood, and their own kernel writes their gradients; with an empty
    neighborhood (``na_rtc.attention``) dk and dv are None and no dK/dV kernel of the neighborhood runs.

    The dq kernel writes, with a bias, per-tile partial sums of the logit gradient per relative offset
    (float32 ``[heads, tiles, entries]``), which the reduction sums in a fixed order: no atomics, bitwise
    deterministic."""
    if output is None or lse is None:
        raise ValueError("the fused backward needs the forward's output and logsumexp")
    dtype = problem.dtype
    tokens = launches.tokens is not None
    if math.prod(problem.qkv_shape) == 0:  # batch or heads 0: nothing to launch; a bias gets a zero gradient
        grads = tuple(_arrays.empty(query, shape, dtype) for shape in (problem.qkv_shape, problem.kv_shape,
                                                                       problem.v_shape))
        grads = (*grads, None if rpb_acc is None else _arrays.zeros(query, problem.rpb_shape, "float32"))
        if tokens:
            grads += (_arrays.zeros(query, problem.extra_keys_shape, dtype),
                      _arrays.zeros(query, problem.extra_values_shape, dtype))
        return grads
    lse = _arrays.cast(lse, "float32")
    if rpb_acc is not None:
        rpb_acc = _arrays.cast(rpb_acc, "float32")
    problem_args = A.problem(problem)

    if grad_lse is not None:
        grad_lse = _arrays.cast(grad_lse, "float32")
    delta = _arrays.empty(query, problem.lse_shape, "float32")
    args = (A.tensor(grad_out, problem) + A.tensor(output, problem) + A.rows(grad_lse, problem)
            + A.rows(delta, problem) + problem_args)
    run(launches.delta.plan(args))

    inputs = (A.tensor(query, problem) + A.tensor(key, problem) + A.tensor(value, problem)
              + A.tensor(grad_out, problem) + A.rows(lse, problem) + A.rows(delta, problem) + A.bias(rpb_acc, problem))

    dq = _arrays.empty(query, problem.qkv_shape, dtype)
    tiles, entries = launches.dq.tiles, math.prod(problem.rpb_shape[1:])
    partial = drpb = None
    if rpb_acc is not None:
        partial = _arrays.empty(query, (problem.heads * tiles * entries,), "float32")
        drpb = _arrays.empty(query, problem.rpb_shape, "float32")
    extra = A.extra(extra_keys, extra_values) if tokens else A.extra(None, None)
    args = inputs + extra + A.tensor(dq, problem) + (P.ptr(partial), P.f64(problem.scale)) + problem_args
    run(launches.dq.plan(args))

    dk = dv = None  # an empty neighborhood (dense attention over the tokens) has no keys of its own
    if not problem.empty_neighborhood:
        dk = _arrays.empty(query, problem.kv_shape, dtype)  # per key/value head: its query heads summed in the kernel
        dv = _arrays.empty(query, problem.v_shape, dtype)
        args = inputs + A.tensor(dk, problem) + A.tensor(dv, problem) + (P.f64(problem.scale),) + problem_args
        run(launches.dkdv.plan(args))

    if drpb is not None:
        run(launches.rpb_reduce.plan(_reduce_args(partial, tiles, drpb, problem)))
    if not tokens:
        return dq, dk, dv, drpb
    d_keys = _arrays.empty(query, problem.extra_keys_shape, dtype)
    d_values = _arrays.empty(query, problem.extra_values_shape, dtype)
    if problem.extra_tokens:
        args = (A.tensor(query, problem) + A.tensor(grad_out, problem) + A.rows(lse, problem) + A.rows(delta, problem)
                + extra + A.extra_grads(d_keys, d_values) + (P.f64(problem.scale),) + problem_args)
        run(launches.tokens.plan(args))
    return dq, dk, dv, drpb, d_keys, d_values


def _reduce_args(partial, tiles: int, drpb, problem: Problem) -> tuple[P.Arg, ...]:
    """The bias partials' reductions (``na_fused_rpb_reduce``, ``na_tiled_rpb_reduce``): partials, tiles per
    head, the gradient table, heads and the kernel size per axis (a trivial axis: kernel 1)."""
    kernels = (*problem.kernel_size, 1, 1)[:A.AXES]
    return (P.ptr(partial), P.i64(tiles), *A.bias(drpb, problem), P.i64(problem.heads), *map(P.i64, kernels))


# ---------------------------------------------------------------- split kernels (straightforward and tiled)


def qk(run: Executor, launch: Launch, problem: Problem, query, key, bias, out_dtype: str, scale: float, fill: float):
    """Logits (or any QK-shaped product) ``[b, *spatial, h, slots]`` in ``out_dtype``; ``fill`` in the slots
    outside a causal window."""
    attn = _arrays.empty(query, problem.attn_shape, out_dtype)
    if launch.blocks and math.prod(problem.attn_shape):
        args = (A.tensor(query, problem) + A.tensor(key, problem) + A.bias(bias, problem) + A.tensor(attn, problem)
                + (P.f64(scale), P.f64(fill)) + A.problem(problem))
        run(launch.plan(args))
    return attn


def weighted(run: Executor, launch: Launch, problem: Problem, weights, source, scale: float = 1.0):
    """``av``: ``scale * sum_t weights[.., t] * source[key(t)]`` per query, ``source`` with the key/value heads."""
    return _weighted(run, launch, problem, weights, source, scale, problem.qkv_shape)


def inverse(run: Executor, launch: Launch, problem: Problem, weights, source, scale: float = 1.0):
    """``inverse``: ``scale * sum over query heads h reading the key's head and queries i seeing key j of
    weights[i, h, slot] * source[i, h]`` per key (``[b, *spatial, kv_heads, head_dim]``): av's argument list."""
    return _weighted(run, launch, problem, weights, source, scale, problem.kv_shape)


def _weighted(run: Executor, launch: Launch, problem: Problem, weights, source, scale: float, shape):
    out = _arrays.empty(source, shape, problem.dtype)
    if launch.blocks and math.prod(shape):
        args = (A.tensor(weights, problem) + A.tensor(source, problem) + A.tensor(out, problem) + (P.f64(scale),)
                + A.problem(problem))
        run(launch.plan(args))
    return out


def bias_grad(run: Executor, launch: Launch, problem: Problem, grad_logits):
    """``[heads, *(2k-1)]`` sums of logit gradients per relative offset, accumulator dtype: one block per entry."""
    drpb = _arrays.empty(grad_logits, problem.rpb_shape, accumulator_dtype(problem.dtype))
    if launch.blocks:
        run(launch.plan(A.tensor(grad_logits, problem) + A.bias(drpb, problem) + A.problem(problem)))
    return drpb


def bias_grad_two_pass(run: Executor, launch: Launch, problem: Problem, grad_logits):
    """:func:`bias_grad` in two passes: per-tile partial sums (``launch``), then a fixed-order sum over the tiles
    (``launch.extra``, the reduction's launch); ``launch.tiles`` tiles per head. Its planner serves only
    problems with logits (an empty batch gets its zeros from :func:`bias_grad`)."""
    drpb = _arrays.empty(grad_logits, problem.rpb_shape, accumulator_dtype(problem.dtype))
    entries = math.prod(problem.rpb_shape[1:])
    partial = _arrays.empty(grad_logits, (problem.heads * launch.tiles * entries,), "float32")
    run(launch.plan(A.tensor(grad_logits, problem) + (P.ptr(partial),) + A.problem(problem)))
    run(launch.extra.plan(_reduce_args(partial, launch.tiles, drpb, problem)))
    return drpb


def softmax(run: Executor, launch: Launch, problem: Problem, logits, lse=None) -> None:
    """Softmax over the slots, in place; fills ``lse`` when given."""
    if launch.blocks:
        run(launch.plan(A.tensor(logits, problem) + A.rows(lse, problem) + A.problem(problem)))


def softmax_backward(run: Executor, launch: Launch, problem: Problem, probs, grad) -> None:
    """``grad <- probs * (grad - rowsum(probs * grad))``, in place."""
    if launch.blocks:
        run(launch.plan(A.tensor(probs, problem) + A.tensor(grad, problem) + A.problem(problem)))
