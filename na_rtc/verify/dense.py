"""Neighborhood attention as dense masked attention in float64: the canaries' reference.

A canary has a few hundred tokens, so the whole ``tokens x tokens`` score
matrix per head is small, and attention with the neighborhood as a mask is a
handful of matrix products: tens of milliseconds where the chunked gathers
of the reference backend (made for problems of any size) take several times
that for a backward. Being a second formulation of the definition (the
mask and bias index from :mod:`na_rtc.window`, nothing else shared), it also
keeps a kernel's canary independent of the reference backend.
"""

from __future__ import annotations

import functools

import numpy as np

from .._args import Problem
from ..window import Axis, is_neighbor, rpb_index


@functools.lru_cache(maxsize=8)  # a backward canary needs them twice (its inputs' forward, then its gradients)
def _pairs(axes: tuple[Axis, ...]):
    """``(mask, bias_index)`` over (query token, key token), tokens in row-major spatial order: whether the
    key is a neighbor (on every axis), and its flat index into the bias table ``[2k-1, ...]`` (0 elsewhere)."""
    mask = index = None
    for axis in axes:
        positions = np.arange(axis.length)
        near = is_neighbor(axis, positions[:, None], positions[None, :])
        offset = np.where(near, rpb_index(axis, positions[:, None], positions[None, :]), 0)
        if mask is None:
            mask, index = near, offset
            continue
        # append this axis to the token order: (q, k) x (qa, ka) -> (q qa, k ka), the new axis varying fastest
        tokens = mask.shape[0] * axis.length
        mask = (mask[:, None, :, None] & near[None, :, None, :]).reshape(tokens, tokens)
        index = (index[:, None, :, None] * (2 * axis.kernel_size - 1) + offset[None, :, None, :]).reshape(tokens, tokens)
    return mask, index


def _heads_first(x: np.ndarray) -> np.ndarray:
    """``[batch, *spatial, heads, dim]`` -> ``[batch, heads, tokens, dim]``."""
    return np.moveaxis(x.reshape(x.shape[0], -1, *x.shape[-2:]), 2, 1)


def _heads_last(x: np.ndarray, like: tuple[int, ...]) -> np.ndarray:
    return np.moveaxis(x, 1, -2).reshape(like)


def _kv_heads_first(problem: Problem, x: np.ndarray) -> np.ndarray:
    """A key/value array ``[batch, *spatial, heads_kv, dim]`` -> ``[batch, heads, tokens, dim]``: each key/value
    head once for every query head of its group (grouped-query attention; as is without it)."""
    return np.repeat(_heads_first(x), problem.group, axis=1)


def _group_sum(problem: Problem, x: np.ndarray) -> np.ndarray:
    """``[batch, heads, tokens, dim]`` -> ``[batch, heads_kv, tokens, dim]``: the sum over each group's query
    heads (a key/value head's gradient)."""
    batch, heads, tokens, dim = x.shape
    return x.reshape(batch, heads // problem.group, problem.group, tokens, dim).sum(2)


def _scores(problem: Problem, q, k, rpb):
    mask, index = _pairs(problem.axes)
    scores = problem.scale * (_heads_first(q) @ np.swapaxes(_kv_heads_first(problem, k), -1, -2))
    if rpb is not None:
        scores = scores + rpb.reshape(rpb.shape[0], -1)[:, index]
    return np.where(mask, scores, -np.inf), mask, index


def forward(problem: Problem, q, k, v, rpb=None, extra_k=None, extra_v=None):
    """``(out, lse)`` of the fused op, float64; with extra tokens (``[batch, tokens, heads_kv, dim]``), their
    scores are more columns of the same softmax, always visible."""
    scores, _, _ = _scores(problem, q, k, rpb)
    values = _kv_heads_first(problem, v)
    if extra_k is not None:
        # [batch, tokens, heads_kv, dim] reads like a 1D [batch, *spatial, heads, dim] array
        tokens_k, tokens_v = _kv_heads_first(problem, extra_k), _kv_heads_first(problem, extra_v)
        scores = np.concatenate((scores, problem.scale * (_heads_first(q) @ np.swapaxes(tokens_k, -1, -2))), -1)
        values = np.concatenate((values, tokens_v), -2)
    top = scores.max(-1, keepdims=True)
    lse = top[..., 0] + np.log(np.exp(scores - top).sum(-1))
    out = np.exp(scores - lse[..., None]) @ values
    return _heads_last(out, problem.out_shape), np.moveaxis(lse, 1, -1).reshape(q.shape[:-1])


def backward(problem: Problem, grad_out, q, k, v, rpb=None, extra_k=None, extra_v=None):
    """``(dq, dk, dv, drpb, d_extra_k, d_extra_v)`` of the fused op, float64 (``drpb`` None without ``rpb``, the
    extra tokens' gradients None without them): the tokens' scores are more columns of the same softmax."""
    scores, mask, index = _scores(problem, q, k, rpb)
    keys, values = _kv_heads_first(problem, k), _kv_heads_first(problem, v)
    spatial = keys.shape[-2]
    if extra_k is not None:
        tokens_k, tokens_v = _kv_heads_first(problem, extra_k), _kv_heads_first(problem, extra_v)
        scores = np.concatenate((scores, problem.scale * (_heads_first(q) @ np.swapaxes(tokens_k, -1, -2))), -1)
        keys, values = np.concatenate((keys, tokens_k), -2), np.concatenate((values, tokens_v), -2)
    top = scores.max(-1, keepdims=True)
    p = np.exp(scores - top)
    p /= p.sum(-1, keepdims=True)
    g = _heads_first(grad_out)
    out = p @ values
    ds = p * (g @ np.swapaxes(values, -1, -2) - (g * out).sum(-1, keepdims=True))
    dq = problem.scale * (ds @ keys)
    dk = _group_sum(problem, problem.scale * (np.swapaxes(ds, -1, -2) @ _heads_first(q)))
    dv = _group_sum(problem, np.swapaxes(p, -1, -2) @ g)
    d_extra = (None, None)
    if extra_k is not None:
        d_extra = (_heads_last(dk[:, :, spatial:], extra_k.shape), _heads_last(dv[:, :, spatial:], extra_v.shape))
        dk, dv, ds = dk[:, :, :spatial], dv[:, :, :spatial], ds[..., :spatial]
    drpb = None
    if rpb is not None:
        flat = np.zeros((rpb.shape[0], int(np.prod(rpb.shape[1:]))))
        per_head = np.where(mask, ds, 0.0).sum(0)  # over the batch
        for h in range(rpb.shape[0]):
            np.add.at(flat[h], index[mask], per_head[h][mask])
        drpb = flat.reshape(rpb.shape)
    return _heads_last(dq, q.shape), _heads_last(dk, k.shape), _heads_last(dv, v.shape), drpb, *d_extra
