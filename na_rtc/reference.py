"""Reference backend: neighborhood attention in vectorized NumPy / torch math.

This is the executable specification (:mod:`na_rtc.window` defines the windows) and the CPU
backend. Every op works on tokens flattened row-major over the spatial axes
with the slot table of :mod:`na_rtc.window` (which key each window slot holds,
whether the slot is inside the window, which bias entry it uses), so one
implementation serves 1D and 2D. Queries are processed in chunks whose
gathered keys/values fit ``NA_RTC_REFERENCE_CHUNK_MB``, and the backward
recomputes the gathers instead of storing them, so memory stays bounded by
the inputs plus one chunk. fp16/bf16 are computed in float32, float64 in
float64.

The same algorithm runs on NumPy arrays and torch tensors through a small
math shim (:class:`_NumpyMath`, :class:`_TorchMath`). The public functions
at the bottom (``na1d``, ``na2d_qk``, ``na1d_backward``, ...) have the
signatures of the top-level API and always use this backend.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from . import config
from ._arrays import dtype_name
from ._args import Problem
from .window import SlotTable, flat_slot_table

# ---------------------------------------------------------------- math shims
#
# Internally every tensor is heads-first, [batch, heads, tokens, last], so the
# per-slot contractions are batched matrix products over (batch, heads, query).


class _NumpyMath:
    """The few array operations the algorithm needs, for NumPy."""

    def compute_dtype(self, dtype_name: str):
        return np.float64 if dtype_name == "float64" else np.float32

    def heads_first(self, x, problem: Problem, dtype):
        """``[batch, *spatial, heads, last]`` -> contiguous ``[batch, heads, tokens, last]``."""
        flat = np.asarray(x).reshape(problem.batch, problem.tokens, *x.shape[-2:])
        return np.ascontiguousarray(flat.swapaxes(1, 2), dtype=dtype)

    def cast(self, x, dtype):
        return np.asarray(x, dtype=dtype)

    def tables(self, axes):
        return flat_slot_table(axes)

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype=dtype)

    def gather_tokens(self, x, index):
        """``x[:, :, index]`` for ``[B, H, N, D]`` (``np.take`` is ~3x faster than fancy indexing)."""
        return np.take(x, index, axis=2)

    def amax(self, x):
        return x.max(axis=-1, keepdims=True)

    def sum_last(self, x):
        return x.sum(axis=-1)

    exp = staticmethod(np.exp)
    log = staticmethod(np.log)
    where = staticmethod(np.where)

    def scatter_add(self, target, axis: int, index, source):
        """``target[..., index[m], ...] += source[..., m, ...]`` along ``axis``, deterministically.

        Sorting the contributions by destination and summing runs with
        ``reduceat`` is much faster than ``np.add.at`` and its order is fixed.
        """
        order = np.argsort(index, kind="stable")
        sorted_index = index[order]
        starts = np.flatnonzero(np.r_[True, sorted_index[1:] != sorted_index[:-1]])
        sums = np.add.reduceat(np.take(source, order, axis=axis), starts, axis=axis)
        target[(slice(None),) * axis + (sorted_index[starts],)] += sums

    def heads_last(self, x, dtype_name: str, shape):
        """``[batch, heads, tokens, ...]`` -> ``shape`` (heads-last) in ``dtype_name``."""
        return np.ascontiguousarray(x.swapaxes(1, 2).reshape(shape), dtype=dtype_name)

    def finish(self, x, dtype_name: str, shape):
        return x.reshape(shape).astype(dtype_name, copy=False)


class _TorchMath:
    """The same operations for torch tensors (any device; no autograd inside)."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = device

    def compute_dtype(self, dtype_name: str):
        return self.torch.float64 if dtype_name == "float64" else self.torch.float32

    def heads_first(self, x, problem: Problem, dtype):
        flat = x.reshape(problem.batch, problem.tokens, *x.shape[-2:])
        return flat.transpose(1, 2).to(dtype).contiguous()

    def cast(self, x, dtype):
        return x.to(dtype)

    def tables(self, axes):
        return _torch_slot_table(axes, str(self.device))

    def zeros(self, shape, dtype):
        return self.torch.zeros(shape, dtype=dtype, device=self.device)

    def gather_tokens(self, x, index):
        """``x[:, :, index]`` for ``[B, H, N, D]`` (``index_select`` is ~2.5x faster than advanced indexing)."""
        return x.index_select(2, index.reshape(-1)).view(*x.shape[:2], *index.shape, x.shape[-1])

    def amax(self, x):
        return x.amax(dim=-1, keepdim=True)

    def sum_last(self, x):
        return x.sum(dim=-1)

    def exp(self, x):
        return self.torch.exp(x)

    def log(self, x):
        return self.torch.log(x)

    def where(self, condition, x, y):
        return self.torch.where(condition, x, y)

    def scatter_add(self, target, axis: int, index, source):
        # index_add_ is deterministic on CPU; on CUDA it uses atomics, which only
        # matters if someone forces the reference there (benchmarks do, tests do not)
        target.index_add_(axis, index, source)

    def heads_last(self, x, dtype_name: str, shape):
        return x.transpose(1, 2).reshape(shape).to(getattr(self.torch, dtype_name)).contiguous()

    def finish(self, x, dtype_name: str, shape):
        return x.reshape(shape).to(getattr(self.torch, dtype_name))


@functools.lru_cache(maxsize=8)
def _torch_slot_table(axes, device: str) -> SlotTable:
    """The slot table as torch tensors on ``device``, converted once per problem shape."""
    import torch

    table = flat_slot_table(axes)
    return SlotTable(*(torch.tensor(a, device=device) for a in table))


def _math_for(problem: Problem, like):
    if problem.kind == "numpy":
        return _NumpyMath()
    if problem.kind == "torch":
        return _TorchMath(like.device)
    raise TypeError(f"the reference backend runs on NumPy arrays and torch tensors, not {problem.kind} arrays")


# ---------------------------------------------------------------- per-slot contractions


def _dots(rows_of_a, gathered):
    """``[B, H, C, D] . [B, H, C, K, D] -> [B, H, C, K]``."""
    return (gathered @ rows_of_a[..., None])[..., 0]


def _weighted_sum(weights, gathered):
    """``sum_t weights[..., t] * gathered[..., t, :]``: ``[B, H, C, K] x [B, H, C, K, D] -> [B, H, C, D]``."""
    return (weights[..., None, :] @ gathered)[..., 0, :]


def _outer(weights, rows_of_a):
    """Per-slot contributions ``weights[..., t] * a``: ``[B, H, C, K, D]``."""
    return weights[..., None] * rows_of_a[..., None, :]


# ---------------------------------------------------------------- chunked runner


class _Run:
    """State shared by the chunks of one op: math shim, slot tables, chunking."""

    def __init__(self, problem: Problem, like):
        self.problem = problem
        self.m = _math_for(problem, like)
        self.dtype = self.m.compute_dtype(problem.dtype)
        table = self.m.tables(problem.axes)
        self.keys, self.bias_index = table.keys, table.bias
        self.valid = None if flat_slot_table(problem.axes).all_valid else table.valid
        self.shape = (problem.batch, problem.heads, problem.tokens, problem.head_dim)
        self.weights_shape = (problem.batch, problem.heads, problem.tokens, problem.slots)
        itemsize = 8 if problem.dtype == "float64" else 4
        gathered_per_query = problem.slots * max(problem.batch, 1) * problem.heads * max(problem.head_dim, 1) * itemsize
        self.chunk = max(1, config.reference_chunk_bytes() // gathered_per_query)

    def chunks(self):
        for start in range(0, self.problem.tokens, self.chunk):
            yield slice(start, min(start + self.chunk, self.problem.tokens))

    def prepare(self, x):
        """Heads-first, compute dtype."""
        return self.m.heads_first(x, self.problem, self.dtype)

    def prepare_rpb(self, rpb):
        """``[heads, *(2k-1)]`` -> ``[heads, prod(2k-1)]`` in the compute dtype."""
        if rpb is None:
            return None
        return self.m.cast(rpb.reshape(self.problem.heads, -1), self.dtype)

    def gather(self, x, rows):
        """Keys/values of every slot of the chunk's queries: ``[B, H, C, K, D]``."""
        return self.m.gather_tokens(x, self.keys[rows])

    def mask(self, x, rows, fill):
        """Replace entries of out-of-window slots (``[B, H, C, K]``) by ``fill``."""
        if self.valid is None:
            return x
        return self.m.where(self.valid[rows], x, fill)

    def logits(self, q, k, bias, rows, scale):
        """``scale * q.k + bias`` for every slot, ``-inf`` outside the window: ``[B, H, C, K]``."""
        logits = _dots(q[:, :, rows], self.gather(k, rows))
        if scale != 1.0:
            logits = logits * scale
        if bias is not None:
            logits = logits + bias[:, self.bias_index[rows]]  # [H, C, K], broadcast over batch
        return self.mask(logits, rows, -np.inf)

    def scatter_to_keys(self, target, rows, contribution):
        """Add per-slot ``[B, H, C, K, D]`` contributions to the keys they came from."""
        b, h, c, kk, d = contribution.shape
        self.m.scatter_add(target, 2, self.keys[rows].reshape(-1), contribution.reshape(b, h, c * kk, d))

    def scatter_to_bias(self, target, rows, grad_logits):
        """Add ``[B, H, C, K]`` logit gradients to the ``[H, R]`` bias entries they used."""
        per_slot = grad_logits.sum(0)
        self.m.scatter_add(target, 1, self.bias_index[rows].reshape(-1), per_slot.reshape(per_slot.shape[0], -1))

    def output(self, x):
        return self.m.heads_last(x, self.problem.dtype, self.problem.qkv_shape)

    def weights_output(self, x):
        return self.m.heads_last(x, self.problem.dtype, self.problem.attn_shape)

    def rpb_output(self, x, rpb):
        return None if x is None else self.m.finish(x, dtype_name(rpb), self.problem.rpb_shape)

    def new_rpb_grad(self, rpb):
        if rpb is None:
            return None
        return self.m.zeros((self.problem.heads, math.prod(self.problem.rpb_shape[1:])), self.dtype)


def _softmax_stats(run: _Run, logits):
    """Probabilities and natural-log sum of exp over the slots."""
    m = run.m
    peak = m.amax(logits)
    weights = m.exp(logits - peak)
    total = m.sum_last(weights)
    return weights / total[..., None], peak[..., 0] + m.log(total)


# ---------------------------------------------------------------- ops (backend level)


def fused_forward(problem: Problem, query, key, value, rpb=None, *, keep_compute_dtype=False):
    """Output and logsumexp of fused neighborhood attention."""
    run = _Run(problem, query)
    q, k, v = (run.prepare(x) for x in (query, key, value))
    bias = run.prepare_rpb(rpb)
    out = run.m.zeros(run.shape, run.dtype)
    lse = run.m.zeros(run.shape[:3], run.dtype)
    for rows in run.chunks():
        probs, lse[:, :, rows] = _softmax_stats(run, run.logits(q, k, bias, rows, problem.scale))
        out[:, :, rows] = _weighted_sum(probs, run.gather(v, rows))
    if keep_compute_dtype:
        return out, lse
    lse_dtype = "float64" if problem.dtype == "float64" else "float32"
    return run.output(out), run.m.heads_last(lse, lse_dtype, problem.lse_shape)


def fused_backward(problem: Problem, grad_out, query, key, value, rpb=None, output=None, logsumexp=None):
    """Gradients ``(dq, dk, dv, drpb or None)`` of fused neighborhood attention."""
    run = _Run(problem, query)
    m = run.m
    if output is None:
        out, lse = fused_forward(problem, query, key, value, rpb, keep_compute_dtype=True)
    else:
        out, lse = run.prepare(output), run.prepare(logsumexp[..., None])[..., 0]
    q, k, v, dout = (run.prepare(x) for x in (query, key, value, grad_out))
    bias = run.prepare_rpb(rpb)
    delta = m.sum_last(dout * out)  # rowsum(dOut * out): [B, H, N]
    dq, dk, dv = (m.zeros(run.shape, run.dtype) for _ in range(3))
    drpb = run.new_rpb_grad(rpb)
    for rows in run.chunks():
        probs = m.exp(run.logits(q, k, bias, rows, problem.scale) - lse[:, :, rows][..., None])
        grad_probs = _dots(dout[:, :, rows], run.gather(v, rows))
        grad_logits = run.mask(probs * (grad_probs - delta[:, :, rows][..., None]), rows, 0.0)
        run.scatter_to_keys(dv, rows, _outer(probs, dout[:, :, rows]))
        dq[:, :, rows] = problem.scale * _weighted_sum(grad_logits, run.gather(k, rows))
        run.scatter_to_keys(dk, rows, _outer(problem.scale * grad_logits, q[:, :, rows]))
        if drpb is not None:
            run.scatter_to_bias(drpb, rows, grad_logits)
    return run.output(dq), run.output(dk), run.output(dv), run.rpb_output(drpb, rpb)


def qk_forward(problem: Problem, query, key, rpb=None):
    """Attention logits ``[B, *spatial, H, K]`` (unscaled; ``-inf`` in causal slots)."""
    run = _Run(problem, query)
    q, k = run.prepare(query), run.prepare(key)
    bias = run.prepare_rpb(rpb)
    attn = run.m.zeros(run.weights_shape, run.dtype)
    for rows in run.chunks():
        attn[:, :, rows] = run.logits(q, k, bias, rows, 1.0)
    return run.weights_output(attn)


def qk_backward(problem: Problem, grad_attn, query, key, rpb=None):
    """Gradients ``(dq, dk, drpb or None)`` of :func:`qk_forward`."""
    run = _Run(problem, query)
    q, k, grad = run.prepare(query), run.prepare(key), run.prepare(grad_attn)
    dq, dk = run.m.zeros(run.shape, run.dtype), run.m.zeros(run.shape, run.dtype)
    drpb = run.new_rpb_grad(rpb)
    for rows in run.chunks():
        grad_logits = run.mask(grad[:, :, rows], rows, 0.0)
        dq[:, :, rows] = _weighted_sum(grad_logits, run.gather(k, rows))
        run.scatter_to_keys(dk, rows, _outer(grad_logits, q[:, :, rows]))
        if drpb is not None:
            run.scatter_to_bias(drpb, rows, grad_logits)
    return run.output(dq), run.output(dk), run.rpb_output(drpb, rpb)


def av_forward(problem: Problem, attn, value):
    """``sum_t attn[..., t] * value[key of slot t]``; out-of-window slots are ignored."""
    run = _Run(problem, value)
    weights, v = run.prepare(attn), run.prepare(value)
    out = run.m.zeros(run.shape, run.dtype)
    for rows in run.chunks():
        out[:, :, rows] = _weighted_sum(run.mask(weights[:, :, rows], rows, 0.0), run.gather(v, rows))
    return run.output(out)


def av_backward(problem: Problem, grad_out, attn, value):
    """Gradients ``(dattn, dv)`` of :func:`av_forward` (zero in out-of-window slots)."""
    run = _Run(problem, value)
    weights, v, dout = run.prepare(attn), run.prepare(value), run.prepare(grad_out)
    dattn = run.m.zeros(run.weights_shape, run.dtype)
    dv = run.m.zeros(run.shape, run.dtype)
    for rows in run.chunks():
        dattn[:, :, rows] = run.mask(_dots(dout[:, :, rows], run.gather(v, rows)), rows, 0.0)
        run.scatter_to_keys(dv, rows, _outer(run.mask(weights[:, :, rows], rows, 0.0), dout[:, :, rows]))
    return run.weights_output(dattn), run.output(dv)


#: The reference backend's op table, keyed by op name (ndim is in the Problem).
OPS = {
    "fused_forward": fused_forward,
    "fused_backward": fused_backward,
    "qk_forward": qk_forward,
    "qk_backward": qk_backward,
    "av_forward": av_forward,
    "av_backward": av_backward,
}


# ---------------------------------------------------------------- public spec functions


def _pinned(function):
    """The top-level API ``function`` with ``backend="reference"``."""

    def call(*args, **kwargs):
        kwargs.setdefault("backend", "reference")
        return function(*args, **kwargs)

    functools.update_wrapper(call, function)
    return call


def __getattr__(name):
    # the spec functions come from functional, which imports this module's
    # backend lazily; resolving them on first use avoids an import cycle
    from . import functional

    if name in functional.__all__:
        pinned = _pinned(getattr(functional, name))
        globals()[name] = pinned
        return pinned
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
