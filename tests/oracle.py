"""Brute-force oracle: docs/design/definition.md transcribed literally, with loops.

One, two or three spatial axes: per axis the literal window, and in 2D/3D a
key is a neighbor when it is one on every axis (``itertools.product`` over the
per-axis neighbors; window slots row-major, ``t = (tx * ky + ty) * kz + tz``).

Nothing here uses ``na_rtc``; it is the independent definition the window
math and the reference backend are checked against. Everything is float64
NumPy and plain Python loops, so keep sizes tiny.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

__all__ = [
    "per_axis",
    "oracle_group_window",
    "oracle_window",
    "oracle_slots",
    "oracle_na",
    "oracle_qk",
    "oracle_av",
    "oracle_neighbor_mask",
    "oracle_slot_index",
]


def per_axis(value, ndim):
    """An int (or bool) for every axis, or the given per-axis tuple."""
    if isinstance(value, (tuple, list)):
        assert len(value) == ndim, (value, ndim)
        return tuple(value)
    return (value,) * ndim


def oracle_group_window(L, k, s, d, causal, i):
    """Section 2, steps 1-2: ``(g, i', start, end)`` of query ``i`` (group coordinates)."""
    assert k >= 2 and d >= 1 and 1 <= s <= k and L >= k * d, (L, k, s, d)
    g = i % d
    ig = i // d
    Lg = math.ceil((L - g) / d)
    left = k // 2
    if causal:
        leader = min((ig // s) * s + s - 1, Lg - 1)
        start = max(leader - k + 1, 0)
        end = min(ig + 1, Lg)
    else:
        leader = min((ig // s) * s + s // 2, Lg - 1)
        start = min(max(leader - left, 0), Lg - k)
        end = start + k
    return g, ig, start, end


def oracle_window(L, k, s, d, causal, i):
    """Section 2, step 3: the key positions ``j`` that are neighbors of query ``i``."""
    g, _, start, end = oracle_group_window(L, k, s, d, causal, i)
    neighbors = []
    for j in range(L):
        jg = j // d
        if j % d == g and start <= jg < end:
            neighbors.append(j)
    return neighbors


def oracle_slots(L, k, d, causal, i):
    """Window slots of query ``i`` (stride 1): list of ``k`` entries, each
    ``(key position, rpb index)`` or ``None`` for a slot past the window end."""
    g, ig, start, end = oracle_group_window(L, k, 1, d, causal, i)
    slots = []
    for t in range(k):
        jg = start + t
        slots.append((jg * d + g, jg - ig + k - 1) if jg < end else None)
    return slots


def _rpb_term(rpb, h, qpos, kpos, lengths, kernels, dilations):
    if rpb is None:
        return 0.0
    index = [h]
    for i, j, L, k, d in zip(qpos, kpos, lengths, kernels, dilations):
        index.append((j // d) - (i // d) + k - 1)
    return float(rpb[tuple(index)])


def _problem(q, kernel_size, stride, dilation, causal):
    ndim = q.ndim - 3
    assert ndim in (1, 2, 3), q.shape
    lengths = q.shape[1:-2]
    kernels = per_axis(kernel_size, ndim)
    strides = per_axis(stride, ndim)
    dilations = per_axis(dilation, ndim)
    causals = per_axis(causal, ndim)
    return ndim, lengths, kernels, strides, dilations, causals


def oracle_na(q, k, v, kernel_size, stride=1, dilation=1, causal=False, scale=None, rpb=None):
    """Fused NA: ``(out, lse)``, float64, heads-last, any number of spatial axes."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    rpb = None if rpb is None else np.asarray(rpb, dtype=np.float64)
    ndim, lengths, kernels, strides, dilations, causals = _problem(
        q, kernel_size, stride, dilation, causal)
    batch, heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
    if scale is None:
        scale = head_dim ** -0.5
    out = np.zeros(q.shape[:-1] + (v.shape[-1],))
    lse = np.zeros(q.shape[:-1])
    for b in range(batch):
        for qpos in itertools.product(*(range(L) for L in lengths)):
            per_axis_keys = [
                oracle_window(L, kk, s, d, c, i)
                for L, kk, s, d, c, i in zip(lengths, kernels, strides, dilations, causals, qpos)
            ]
            for h in range(heads):
                keys = list(itertools.product(*per_axis_keys))
                logits = []
                for kpos in keys:
                    dot = 0.0
                    for e in range(head_dim):
                        dot += q[(b, *qpos, h, e)] * k[(b, *kpos, h, e)]
                    logits.append(scale * dot + _rpb_term(
                        rpb, h, qpos, kpos, lengths, kernels, dilations))
                m = max(logits)
                weights = [math.exp(x - m) for x in logits]
                total = sum(weights)
                lse[(b, *qpos, h)] = m + math.log(total)
                for w, kpos in zip(weights, keys):
                    out[(b, *qpos, h)] += (w / total) * v[(b, *kpos, h)]
    return out, lse


def _slot_lists(lengths, kernels, dilations, causals, qpos):
    """Row-major product of per-axis slots; ``None`` where any axis is past its window."""
    per_axis_slots = [
        oracle_slots(L, kk, d, c, i)
        for L, kk, d, c, i in zip(lengths, kernels, dilations, causals, qpos)
    ]
    result = []
    for combo in itertools.product(*per_axis_slots):
        result.append(None if any(x is None for x in combo) else tuple(x[0] for x in combo))
    return result


def oracle_qk(q, k, kernel_size, dilation=1, causal=False, rpb=None):
    """Split QK(+RPB): ``[batch, *spatial, heads, prod(kernel)]``, unscaled,
    ``-inf`` in causal slots past the window."""
    q, k = (np.asarray(x, dtype=np.float64) for x in (q, k))
    rpb = None if rpb is None else np.asarray(rpb, dtype=np.float64)
    ndim, lengths, kernels, _, dilations, causals = _problem(q, kernel_size, 1, dilation, causal)
    batch, heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
    attn = np.zeros(q.shape[:-1] + (math.prod(kernels),))
    for b in range(batch):
        for qpos in itertools.product(*(range(L) for L in lengths)):
            slots = _slot_lists(lengths, kernels, dilations, causals, qpos)
            for h in range(heads):
                for t, kpos in enumerate(slots):
                    if kpos is None:
                        attn[(b, *qpos, h, t)] = -math.inf
                        continue
                    dot = 0.0
                    for e in range(head_dim):
                        dot += q[(b, *qpos, h, e)] * k[(b, *kpos, h, e)]
                    attn[(b, *qpos, h, t)] = dot + _rpb_term(
                        rpb, h, qpos, kpos, lengths, kernels, dilations)
    return attn


def oracle_av(attn, v, kernel_size, dilation=1, causal=False):
    """Split AV: ``out[i] = sum over window slots t of attn[i, t] * v[key(i, t)]``;
    slots past a causal window contribute nothing."""
    attn, v = (np.asarray(x, dtype=np.float64) for x in (attn, v))
    ndim, lengths, kernels, _, dilations, causals = _problem(v, kernel_size, 1, dilation, causal)
    batch, heads = v.shape[0], v.shape[-2]
    out = np.zeros(v.shape)
    for b in range(batch):
        for qpos in itertools.product(*(range(L) for L in lengths)):
            slots = _slot_lists(lengths, kernels, dilations, causals, qpos)
            for h in range(heads):
                for t, kpos in enumerate(slots):
                    if kpos is not None:
                        out[(b, *qpos, h)] += attn[(b, *qpos, h, t)] * v[(b, *kpos, h)]
    return out


# ------------------------------------------------------------------ index tables
# Dense / slot index tables built from the loops above, for differentiable
# oracles written with torch in the tests (independent of na_rtc.window).


def _flat(pos, lengths):
    index = 0
    for p, L in zip(pos, lengths):
        index = index * L + p
    return index


def oracle_neighbor_mask(lengths, kernel_size, stride=1, dilation=1, causal=False):
    """``mask[n, m]``: token ``m`` is a neighbor of token ``n`` (row-major
    flattened), and ``bias[n, m]``: the per-axis RPB indices ``(ndim,)`` of the
    pair (0 where not neighbors). Shapes ``[N, N]`` and ``[N, N, ndim]``."""
    ndim = len(lengths)
    kernels, strides, dilations, causals = (
        per_axis(x, ndim) for x in (kernel_size, stride, dilation, causal))
    N = math.prod(lengths)
    mask = np.zeros((N, N), dtype=bool)
    bias = np.zeros((N, N, ndim), dtype=np.int64)
    for qpos in itertools.product(*(range(L) for L in lengths)):
        per_axis_keys = [
            oracle_window(L, kk, s, d, c, i)
            for L, kk, s, d, c, i in zip(lengths, kernels, strides, dilations, causals, qpos)
        ]
        n = _flat(qpos, lengths)
        for kpos in itertools.product(*per_axis_keys):
            m = _flat(kpos, lengths)
            mask[n, m] = True
            bias[n, m] = [j // d - i // d + kk - 1
                          for i, j, kk, d in zip(qpos, kpos, kernels, dilations)]
    return mask, bias


def oracle_slot_index(lengths, kernel_size, dilation=1, causal=False):
    """``keys[n, t]``: flattened key token of window slot ``t`` of token ``n``
    (``-1`` past a causal window), and ``bias[n, t]``: its per-axis RPB indices.
    Shapes ``[N, prod(k)]`` and ``[N, prod(k), ndim]``."""
    ndim = len(lengths)
    kernels, dilations, causals = (per_axis(x, ndim) for x in (kernel_size, dilation, causal))
    N, K = math.prod(lengths), math.prod(kernels)
    keys = np.full((N, K), -1, dtype=np.int64)
    bias = np.zeros((N, K, ndim), dtype=np.int64)
    for qpos in itertools.product(*(range(L) for L in lengths)):
        n = _flat(qpos, lengths)
        for t, kpos in enumerate(_slot_lists(lengths, kernels, dilations, causals, qpos)):
            if kpos is not None:
                keys[n, t] = _flat(kpos, lengths)
                bias[n, t] = [j // d - i // d + kk - 1
                              for i, j, kk, d in zip(qpos, kpos, kernels, dilations)]
    return keys, bias
