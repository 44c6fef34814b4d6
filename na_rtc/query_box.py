"""Query boxes on backends that compute every position.

A fused problem with a query box (``Problem.query_box``: the query, output and logsumexp cover a box of
positions, keys and values every position; context parallelism's slab queries against slab and halo) runs on a
backend without native boxes by padding the query-side arrays with zeros to every position, computing, and
keeping the box. Padded queries' outputs are dropped; in the backward their output gradient is zero (and so is
their logsumexp gradient), so they add nothing to dK, dV or the bias gradient.
"""

from __future__ import annotations

import functools
from collections.abc import MutableMapping

from . import _arrays


def pad(problem, x):
    """``x`` (``[batch, *box, ...]``) inside zeros of ``[batch, *spatial, ...]``."""
    if x is None:
        return None
    widths = [(0, 0)] + [(first, length - stop) for (first, stop), length in zip(problem.query_box, problem.spatial)]
    widths += [(0, 0)] * (len(x.shape) - len(widths))
    if _arrays.kind_of(x) == _arrays.TORCH:
        import torch

        return torch.nn.functional.pad(x, [w for pair in reversed(widths) for w in pair])
    if _arrays.kind_of(x) == _arrays.CUPY:
        import cupy

        return cupy.pad(x, widths)
    import numpy

    return numpy.pad(x, widths)


def crop(problem, x):
    """The box of ``x`` (``[batch, *spatial, ...]``), in arrays of its own (an op returns no views: torch's
    custom ops compare storage offsets with their fake implementations)."""
    if x is None:
        return None
    box = x[(slice(None), *(slice(first, stop) for first, stop in problem.query_box))]
    return box.clone() if _arrays.kind_of(x) == _arrays.TORCH else box.copy()


class _OnEveryQuery(MutableMapping):
    """A backend's op table whose fused forward and backward take query boxes by padding. Every op is looked
    up in the backend's own table at each call, and entries set here are set there (unwrapped), so that a
    replaced entry (a test's spy) is the one that runs."""

    def __init__(self, ops):
        self._ops = ops

    def __getitem__(self, name):
        op = self._ops[name]
        wrap = _WRAPS.get(name)
        return op if wrap is None else functools.partial(wrap, op)

    def __setitem__(self, name, op):
        if isinstance(op, functools.partial) and op.func in _WRAPS.values():
            op = op.args[0]
        self._ops[name] = op

    def __delitem__(self, name):
        del self._ops[name]

    def __iter__(self):
        return iter(self._ops)

    def __len__(self):
        return len(self._ops)


def _forward(forward, problem, query, key, value, rpb=None, *extra, **kwargs):
    if problem.query_box is None:
        return forward(problem, query, key, value, rpb, *extra, **kwargs)
    out, lse = forward(problem.every_query(), pad(problem, query), key, value, rpb, *extra, **kwargs)
    return crop(problem, out), crop(problem, lse)


def _backward(backward, problem, grad_out, query, key, value, rpb=None, output=None, logsumexp=None, grad_lse=None,
              *extra):
    if problem.query_box is None:
        return backward(problem, grad_out, query, key, value, rpb, output, logsumexp, grad_lse, *extra)
    grads = backward(problem.every_query(), *(pad(problem, x) for x in (grad_out, query)), key, value, rpb,
                     *(pad(problem, x) for x in (output, logsumexp, grad_lse)), *extra)
    return (crop(problem, grads[0]), *grads[1:])


_WRAPS = {"fused_forward": _forward, "fused_backward": _backward}


def on_every_query(ops) -> MutableMapping:
    """``ops`` (a backend's op table) with fused forward and backward that take problems with a query box by
    padding."""
    return _OnEveryQuery(ops)
