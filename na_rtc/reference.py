"""Reference backend: neighborhood attention in vectorized NumPy / torch math.

This is the executable specification (:mod:`na_rtc.window` defines the windows) and the CPU
backend. Every op works on tokens flattened row-major over the spatial axes
with the slot table of :mod:`na_rtc.window` (which key each window slot holds,
whether the slot is inside the window, which bias entry it uses), so one
implementation serves 1D, 2D and 3D. fp16/bf16 are computed in float32,
float64 in float64.

Memory. Queries are processed in chunks, and the backward recomputes the
gathers instead of storing them. Beyond its inputs and outputs an op holds

- working copies of its tensor inputs and results, heads-first in the compute
  dtype (float32 or float64): a small constant number of input-sized arrays
  (keys and values with grouped heads, GQA/MQA, are repeated to the query's
  heads: query-sized copies);
- per chunk of ``C`` queries with ``K = prod(kernel_size)`` window slots: the
  chunk's rows of the slot table (``17 * C * K`` bytes: int64 key and bias
  indices, a bool mask) plus the gathered keys or values and per-slot products
  (``[batch, heads, C, K, head_dim]`` buffers, up to three alive at once).
  ``C`` is chosen so that one such buffer plus the slot rows fits
  ``NA_RTC_REFERENCE_CHUNK_MB`` (default 32 MB), at least one query.

Nothing is proportional to ``tokens * K`` except the split ops' own
attention weights: no table over all (query, slot) pairs is built, which
matters in 3D, where a 7 x 7 x 7 window has 343 slots. So peak memory is
about the inputs' size times a small constant plus ``3 * NA_RTC_REFERENCE_CHUNK_MB``.

The same algorithm runs on NumPy arrays and torch tensors through a small
math shim (:mod:`na_rtc._array_math`). The public functions
at the bottom (``na1d``, ``na2d_qk``, ``na1d_backward``, ...) have the
signatures of the top-level API and always use this backend.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from . import config, extra_tokens
from ._arrays import dtype_name
from ._args import Problem
from ._array_math import math_for
from .window import SlotTable, all_slots_valid, slot_rows

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


#: bytes of slot-table rows per (query, slot): int64 key index, int64 bias index, bool validity
_SLOT_ROW_BYTES = 17


class _Chunk:
    """One chunk of queries: their rows (a slice of the flattened tokens) and their slot-table rows."""

    def __init__(self, rows: slice, table: SlotTable, all_valid: bool):
        self.rows = rows
        self.keys, self.bias_index = table.keys, table.bias
        # windows never cut short (the common case) need no masking at all
        self.valid = None if all_valid else table.valid


class _Run:
    """State shared by the chunks of one op: math shim, chunking."""

    def __init__(self, problem: Problem, like):
        self.problem = problem
        self.m = math_for(problem, like)
        self.dtype = self.m.compute_dtype(problem.dtype)
        self.all_valid = all_slots_valid(problem.axes)
        self.shape = (problem.batch, problem.heads, problem.query_tokens, problem.head_dim)
        self.shape_v = (*self.shape[:3], problem.v_dim)  # the values', output's and their gradients'
        self.weights_shape = (problem.batch, problem.heads, problem.tokens, problem.slots)
        itemsize = 8 if problem.dtype == "float64" else 4
        gathered = max(problem.batch, 1) * problem.heads * max(problem.max_head_dim, 1) * itemsize
        # extra tokens: each query's logits and weights over them, a few buffers of [B, H, C, T]
        per_query = (problem.slots * (gathered + _SLOT_ROW_BYTES)
                     + 4 * problem.extra_tokens * max(problem.batch, 1) * problem.heads * itemsize)
        self.chunk = max(1, config.reference_chunk_bytes() // per_query)

    def chunks(self):
        """The query chunks in order, each with its slot rows (built per chunk, never for all queries)."""
        axes, tokens, box = self.problem.axes, self.problem.query_tokens, self.problem.query_box
        for start in range(0, tokens, self.chunk):
            stop = min(start + self.chunk, tokens)
            yield _Chunk(slice(start, stop), self.m.table(slot_rows(axes, start, stop, box)), self.all_valid)

    def prepare(self, x):
        """Heads-first, compute dtype."""
        return self.m.heads_first(x, self.problem, self.dtype)

    def prepare_kv(self, x):
        """Keys or values heads-first, in the compute dtype, with the query's heads: GQA/MQA's query head h
        reads key/value head h // group, so each of those is repeated ``group`` times."""
        x = self.prepare(x)
        return x if self.problem.group == 1 else self.m.repeat_heads(x, self.problem.group)

    def kv_output(self, x):
        """A key/value gradient of every query head, ``[B, H, N, D]``: summed over each group's query heads
        (in head order), heads-last in the keys' shape (the values' head dim for a value gradient)."""
        group = self.problem.group
        if group > 1:
            b, h, n, d = x.shape
            x = x.reshape(b, h // group, group, n, d).sum(2)
        return self.m.heads_last(x, self.problem.dtype, (*self.problem.kv_shape[:-1], x.shape[-1]))

    def prepare_extra(self, x):
        """Extra tokens ``[B, T, H_kv, D]`` heads-first in the compute dtype with the query's heads:
        ``[B, H, T, D]``, each key/value head repeated for its group (as :meth:`prepare_kv`)."""
        x = self.m.tokens_heads_first(x, self.dtype)
        return x if self.problem.group == 1 else self.m.repeat_heads(x, self.problem.group)

    def prepare_rpb(self, rpb):
        """``[heads, *(2k-1)]`` -> ``[heads, prod(2k-1)]`` in the compute dtype."""
        if rpb is None:
            return None
        return self.m.cast(rpb.reshape(self.problem.heads, -1), self.dtype)

    def gather(self, x, chunk: _Chunk):
        """Keys/values of every slot of the chunk's queries: ``[B, H, C, K, D]``."""
        return self.m.gather_tokens(x, chunk.keys)

    def mask(self, x, chunk: _Chunk, fill):
        """Replace entries of out-of-window slots (``[B, H, C, K]``) by ``fill``."""
        if chunk.valid is None:
            return x
        return self.m.where(chunk.valid, x, fill)

    def logits(self, q, k, bias, chunk: _Chunk, scale):
        """``scale * q.k + bias`` for every slot, ``-inf`` outside the window: ``[B, H, C, K]``."""
        logits = _dots(q[:, :, chunk.rows], self.gather(k, chunk))
        if scale != 1.0:
            logits = logits * scale
        if bias is not None:
            logits = logits + bias[:, chunk.bias_index]  # [H, C, K], broadcast over batch
        return self.mask(logits, chunk, -np.inf)

    def scatter_to_keys(self, target, chunk: _Chunk, contribution):
        """Add per-slot ``[B, H, C, K, D]`` contributions to the keys they came from."""
        b, h, c, kk, d = contribution.shape
        self.m.scatter_add(target, 2, chunk.keys.reshape(-1), contribution.reshape(b, h, c * kk, d))

    def scatter_to_bias(self, target, chunk: _Chunk, grad_logits):
        """Add ``[B, H, C, K]`` logit gradients to the ``[H, R]`` bias entries they used."""
        per_slot = grad_logits.sum(0)
        self.m.scatter_add(target, 1, chunk.bias_index.reshape(-1), per_slot.reshape(per_slot.shape[0], -1))

    def output(self, x):
        """``[B, H, N, D]`` heads-last with the query's heads (D: the query's head dim or the value's)."""
        return self.m.heads_last(x, self.problem.dtype, (*self.problem.qkv_shape[:-1], x.shape[-1]))

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


def fused_forward(problem: Problem, query, key, value, rpb=None, extra_keys=None, extra_values=None, *,
                  keep_compute_dtype=False):
    """Output and logsumexp of fused neighborhood attention; with extra tokens (``[batch, tokens, heads_kv,
    head_dim(_v)]``), one softmax over each query's neighborhood and every extra token; an empty neighborhood
    (``na_rtc.attention``) is dense attention over the tokens (:func:`na_rtc.extra_tokens.attend`)."""
    if problem.empty_neighborhood:
        return extra_tokens.merged_forward(fused_forward, problem, query, key, value, rpb, extra_keys, extra_values)
    run = _Run(problem, query)
    m = run.m
    q, k, v = run.prepare(query), run.prepare_kv(key), run.prepare_kv(value)
    bias = run.prepare_rpb(rpb)
    extra = problem.extra_tokens > 0
    if extra:
        extra_k_t, extra_v = m.transpose_last(run.prepare_extra(extra_keys)), run.prepare_extra(extra_values)
    out = m.zeros(run.shape_v, run.dtype)
    lse = m.zeros(run.shape[:3], run.dtype)
    for chunk in run.chunks():
        rows = chunk.rows
        logits = run.logits(q, k, bias, chunk, problem.scale)
        if not extra:
            probs, lse[:, :, rows] = _softmax_stats(run, logits)
            out[:, :, rows] = _weighted_sum(probs, run.gather(v, chunk))
            continue
        # the neighborhood's slots, then the extra tokens: one softmax over both (no bias on the tokens)
        slots = logits.shape[-1]
        probs, lse[:, :, rows] = _softmax_stats(run, m.concat_last(logits, problem.scale * (q[:, :, rows] @ extra_k_t)))
        out[:, :, rows] = _weighted_sum(probs[..., :slots], run.gather(v, chunk)) + probs[..., slots:] @ extra_v
    if keep_compute_dtype:
        return out, lse
    lse_dtype = "float64" if problem.dtype == "float64" else "float32"
    return run.output(out), run.m.heads_last(lse, lse_dtype, problem.lse_shape)


def fused_backward(problem: Problem, grad_out, query, key, value, rpb=None, output=None, logsumexp=None,
                   grad_lse=None, extra_keys=None, extra_values=None):
    """Gradients ``(dq, dk, dv, drpb or None)`` of fused neighborhood attention; ``grad_lse``, the
    logsumexp's gradient (or None), enters as ``delta = rowsum(dOut * out) - grad_lse``. With extra tokens,
    ``(..., d_extra_keys, d_extra_values)`` (:func:`na_rtc.extra_tokens.fused_backward`)."""
    if problem.extra_tokens or problem.empty_neighborhood:
        return extra_tokens.fused_backward(fused_backward, fused_forward, problem, grad_out, query, key, value, rpb,
                                           output, logsumexp, grad_lse, extra_keys, extra_values)
    run = _Run(problem, query)
    m = run.m
    if output is None:
        out, lse = fused_forward(problem, query, key, value, rpb, keep_compute_dtype=True)
    else:
        out, lse = run.prepare(output), run.prepare(logsumexp[..., None])[..., 0]
    q, k, v, dout = run.prepare(query), run.prepare_kv(key), run.prepare_kv(value), run.prepare(grad_out)
    bias = run.prepare_rpb(rpb)
    delta = m.sum_last(dout * out)  # rowsum(dOut * out): [B, H, N]
    if grad_lse is not None:  # d lse / d logit = p: the logits' gradient gains p * dlse
        delta = delta - run.prepare(grad_lse[..., None])[..., 0]
    keys = (*run.shape[:2], problem.tokens)  # every position (a query box holds fewer queries)
    dq, dk, dv = m.zeros(run.shape, run.dtype), m.zeros((*keys, problem.head_dim), run.dtype), \
        m.zeros((*keys, problem.v_dim), run.dtype)
    drpb = run.new_rpb_grad(rpb)
    for chunk in run.chunks():
        rows = chunk.rows
        probs = m.exp(run.logits(q, k, bias, chunk, problem.scale) - lse[:, :, rows][..., None])
        grad_probs = _dots(dout[:, :, rows], run.gather(v, chunk))
        grad_logits = run.mask(probs * (grad_probs - delta[:, :, rows][..., None]), chunk, 0.0)
        run.scatter_to_keys(dv, chunk, _outer(probs, dout[:, :, rows]))
        dq[:, :, rows] = problem.scale * _weighted_sum(grad_logits, run.gather(k, chunk))
        run.scatter_to_keys(dk, chunk, _outer(problem.scale * grad_logits, q[:, :, rows]))
        if drpb is not None:
            run.scatter_to_bias(drpb, chunk, grad_logits)
    return run.output(dq), run.kv_output(dk), run.kv_output(dv), run.rpb_output(drpb, rpb)


def qk_forward(problem: Problem, query, key, rpb=None):
    """Attention logits ``[B, *spatial, H, K]`` (unscaled; ``-inf`` in causal slots)."""
    run = _Run(problem, query)
    q, k = run.prepare(query), run.prepare_kv(key)
    bias = run.prepare_rpb(rpb)
    attn = run.m.zeros(run.weights_shape, run.dtype)
    for chunk in run.chunks():
        attn[:, :, chunk.rows] = run.logits(q, k, bias, chunk, 1.0)
    return run.weights_output(attn)


def qk_backward(problem: Problem, grad_attn, query, key, rpb=None):
    """Gradients ``(dq, dk, drpb or None)`` of :func:`qk_forward`."""
    run = _Run(problem, query)
    q, k, grad = run.prepare(query), run.prepare_kv(key), run.prepare(grad_attn)
    dq, dk = run.m.zeros(run.shape, run.dtype), run.m.zeros(run.shape, run.dtype)
    drpb = run.new_rpb_grad(rpb)
    for chunk in run.chunks():
        rows = chunk.rows
        grad_logits = run.mask(grad[:, :, rows], chunk, 0.0)
        dq[:, :, rows] = _weighted_sum(grad_logits, run.gather(k, chunk))
        run.scatter_to_keys(dk, chunk, _outer(grad_logits, q[:, :, rows]))
        if drpb is not None:
            run.scatter_to_bias(drpb, chunk, grad_logits)
    return run.output(dq), run.kv_output(dk), run.rpb_output(drpb, rpb)


def av_forward(problem: Problem, attn, value):
    """``sum_t attn[..., t] * value[key of slot t]``; out-of-window slots are ignored."""
    run = _Run(problem, value)
    weights, v = run.prepare(attn), run.prepare_kv(value)
    out = run.m.zeros(run.shape, run.dtype)
    for chunk in run.chunks():
        rows = chunk.rows
        out[:, :, rows] = _weighted_sum(run.mask(weights[:, :, rows], chunk, 0.0), run.gather(v, chunk))
    return run.output(out)


def av_backward(problem: Problem, grad_out, attn, value):
    """Gradients ``(dattn, dv)`` of :func:`av_forward` (zero in out-of-window slots)."""
    run = _Run(problem, value)
    weights, v, dout = run.prepare(attn), run.prepare_kv(value), run.prepare(grad_out)
    dattn = run.m.zeros(run.weights_shape, run.dtype)
    dv = run.m.zeros(run.shape, run.dtype)
    for chunk in run.chunks():
        rows = chunk.rows
        dattn[:, :, rows] = run.mask(_dots(dout[:, :, rows], run.gather(v, chunk)), chunk, 0.0)
        run.scatter_to_keys(dv, chunk, _outer(run.mask(weights[:, :, rows], chunk, 0.0), dout[:, :, rows]))
    return run.weights_output(dattn), run.kv_output(dv)


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
