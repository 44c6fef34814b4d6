"""Ops built of split kernels: the fused op composed (qk, softmax, av) and the split ops themselves.

The composed fused forward and backward are the fused kernels' fallback
(stride 1 only: the split kernels take no stride); the split ops
(``na*_qk``, ``na*_av`` and their gradients) have no other kernels. Each
function takes ``kernels``, the dispatcher of one call
(:class:`na_rtc.runtime.dispatch.Dispatcher`), whose ``qk``, ``av``,
``inverse``, ``bias_grad``, ``softmax`` and ``softmax_backward`` pick the
tiled or the straightforward kernel per launch.

:func:`launches` lists the split-kernel launches of each op with the dtypes
that pick their kernels, for ``na_rtc.explain``; a test holds it to what the
functions launch.
"""

from __future__ import annotations

import math

from .. import _arrays
from .._args import Problem
from .tiling import accumulator_dtype

__all__ = ["SPLIT", "av", "av_backward", "backward", "forward", "launches", "qk", "qk_backward"]

SPLIT = "split"  # the composed split kernels, as a path name


def bias_in_accumulator(problem: Problem, rpb):
    """The bias table in the accumulator dtype, as the kernels read it (None without one)."""
    return None if rpb is None else _arrays.cast(rpb, accumulator_dtype(problem.dtype))


def _probabilities(kernels, problem: Problem, query, key, rpb, lse=None):
    logits = kernels.qk(problem, query, key, bias_in_accumulator(problem, rpb), accumulator_dtype(problem.dtype),
                        problem.scale, -math.inf)
    kernels.softmax(problem, logits, lse)
    return logits


def forward(kernels, problem: Problem, query, key, value, rpb=None):
    """``(out, lse)`` of the fused op, composed."""
    lse = _arrays.empty(query, problem.lse_shape, accumulator_dtype(problem.dtype))
    probs = _probabilities(kernels, problem, query, key, rpb, lse)
    return kernels.av(problem.values_problem(), probs, value), lse


def backward(kernels, problem: Problem, grad_out, query, key, value, rpb=None, output=None, logsumexp=None,
             grad_lse=None):
    """``(dq, dk, dv, drpb)`` of the fused op, composed (the probabilities recomputed: cheaper than storing);
    ``grad_lse``, the logsumexp's gradient or None, adds ``p * grad_lse`` to the logits' gradient (d lse / d
    logit = p)."""
    acc = accumulator_dtype(problem.dtype)
    probs = _probabilities(kernels, problem, query, key, rpb)
    values = problem.values_problem()  # dOut . V and dV reduce over or write the value's head dims
    grad_logits = kernels.qk(values, grad_out, value, None, acc, 1.0, 0.0)
    kernels.softmax_backward(problem, probs, grad_logits)
    if grad_lse is not None:
        grad_logits += probs * _arrays.cast(grad_lse, acc)[..., None]
    dq = kernels.av(problem, grad_logits, key, problem.scale)
    dk = kernels.inverse(problem, grad_logits, query, problem.scale)
    dv = kernels.inverse(values, probs, grad_out)
    drpb = None if rpb is None else _arrays.cast(kernels.bias_grad(problem, grad_logits), _arrays.dtype_name(rpb))
    return dq, dk, dv, drpb


def qk(kernels, problem: Problem, query, key, rpb=None):
    return kernels.qk(problem, query, key, bias_in_accumulator(problem, rpb), problem.dtype, 1.0, -math.inf)


def qk_backward(kernels, problem: Problem, grad_attn, query, key, rpb=None):
    dq = kernels.av(problem, grad_attn, key)
    dk = kernels.inverse(problem, grad_attn, query)
    drpb = None if rpb is None else _arrays.cast(kernels.bias_grad(problem, grad_attn), _arrays.dtype_name(rpb))
    return dq, dk, drpb


def av(kernels, problem: Problem, attn, value):
    return kernels.av(problem, attn, value)


def av_backward(kernels, problem: Problem, grad_out, attn, value):
    dattn = kernels.qk(problem, grad_out, value, None, problem.dtype, 1.0, 0.0)
    return dattn, kernels.inverse(problem, attn, grad_out)


def launches(op: str, problem: Problem, weights: str | None = None) -> list[tuple[str, tuple[str, ...]]]:
    """The split-kernel launches of ``op`` (``forward``, ``backward``: the fused op composed; ``qk``,
    ``qk_backward``, ``av``, ``av_backward``) as ``(role, dtype arguments)``, in launch order. ``weights``:
    the dtype of the attention weights an ``av`` op or a ``qk`` gradient is given (default: the problem's)."""
    dtype, acc, weights = problem.dtype, accumulator_dtype(problem.dtype), weights or problem.dtype
    plans = {
        "forward": [("qk", (acc,)), ("softmax", (acc,)), ("av", (acc,))],
        "backward": [("qk", (acc,)), ("softmax", (acc,)), ("qk", (acc,)), ("softmax_backward", (acc,)),
                     ("av", (acc,)), ("inverse", (acc, dtype)), ("inverse", (acc, dtype))]
                    + ([("bias_grad", (acc,))] if problem.has_rpb else []),
        "qk": [("qk", (dtype,))],
        "qk_backward": [("av", (weights,)), ("inverse", (weights, dtype))]
                       + ([("bias_grad", (weights,))] if problem.has_rpb else []),
        "av": [("av", (weights,))],
        "av_backward": [("qk", (dtype,)), ("inverse", (weights, dtype))],
    }
    return plans[op]
