"""The tiles of the blocked backend: query tiles inside one dilation group per axis, the key box their windows
cover, and the exact NA mask and bias indices inside the box (DESIGN notes: window math in ``na_rtc/window.py``).

A tile is a run of ``T`` consecutive queries of one dilation group on each axis (1D runs, 2D rectangles, 3D
boxes); window bounds never decrease with the query inside a group, so the keys its queries see lie in the box
from the first query's window start to the last query's window end on every axis. Every box is padded to the
largest one, so that all tiles are one batch of equal shapes: ``queries[tile, t]`` and ``keys[tile, j]`` are
flat token indices (row-major over the spatial axes), ``mask[tile, t, j]`` says whether key ``j`` is in query
``t``'s window, ``bias[tile, t, j]`` is the flat bias-table entry of the pair.

Padding: a query past its group's end (a partial tile) gets index ``N`` (the token count: a zero row the
caller appends) and a mask row holding the box's first key only, so that its softmax stays finite (its output
is dropped, and its zero output gradient adds nothing in the backward); a box key past the box's end gets index
``N`` and is masked for every query.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from ..window import Axis, group_length, window


@dataclass(frozen=True)
class Tiles:
    """Every tile of a problem: ``queries [tiles, Tq]``, ``keys [tiles, Kb]`` (int64 flat indices, ``N`` for
    padding), ``mask [tiles, Tq, Kb]`` (bool), ``bias [tiles, Tq, Kb]`` (int64 flat bias-table entries; the
    table's size for pairs outside the window)."""

    queries: np.ndarray
    keys: np.ndarray
    mask: np.ndarray
    bias: np.ndarray

    @property
    def count(self) -> int:
        return int(self.queries.shape[0])

    @property
    def tile_queries(self) -> int:
        return int(self.queries.shape[1])

    @property
    def box_keys(self) -> int:
        return int(self.keys.shape[1])


@dataclass(frozen=True)
class _AxisTiles:
    """One axis' tiles: query and key positions (-1: padding), the in-window mask and the bias offsets."""

    queries: np.ndarray  # [tiles, T]
    keys: np.ndarray  # [tiles, box]
    mask: np.ndarray  # [tiles, T, box]
    bias: np.ndarray  # [tiles, T, box], in [0, 2k - 2] inside the window


def _axis_tiles(axis: Axis, tile: int) -> _AxisTiles:
    tile = max(1, min(tile, group_length(axis, 0)))
    starts, lengths, groups, box_lo, box_hi = [], [], [], [], []
    for g in range(min(axis.dilation, axis.length)):
        lg = group_length(axis, g)
        for q0 in range(0, lg, tile):
            n = min(tile, lg - q0)
            lo, _ = window(axis, q0 * axis.dilation + g)
            _, hi = window(axis, (q0 + n - 1) * axis.dilation + g)
            starts.append(q0), lengths.append(n), groups.append(g), box_lo.append(int(lo)), box_hi.append(int(hi))
    starts, lengths, groups = np.array(starts), np.array(lengths), np.array(groups)
    box_lo, box_hi = np.array(box_lo), np.array(box_hi)
    box = int((box_hi - box_lo).max())
    t = np.arange(tile)
    j = np.arange(box)
    q_group = starts[:, None] + t  # group coordinates
    q_valid = t < lengths[:, None]
    k_group = box_lo[:, None] + j
    k_valid = k_group < box_hi[:, None]
    q_pos = np.where(q_valid, q_group * axis.dilation + groups[:, None], -1)
    k_pos = np.where(k_valid, k_group * axis.dilation + groups[:, None], -1)
    w_start, w_end = window(axis, np.where(q_valid, q_pos, groups[:, None]))
    inside = (w_start[..., None] <= k_group[:, None, :]) & (k_group[:, None, :] < w_end[..., None])
    mask = inside & q_valid[..., None] & k_valid[:, None, :]
    bias = k_group[:, None, :] - q_group[..., None] + axis.kernel_size - 1
    return _AxisTiles(q_pos, k_pos, mask, np.clip(bias, 0, 2 * axis.kernel_size - 2))


@functools.lru_cache(maxsize=32)
def tiles_of(axes: tuple[Axis, ...], tile: tuple[int, ...]) -> Tiles:
    """The tiles of a problem's ``axes`` with ``tile`` queries per axis (clamped to the axis' first group)."""
    per_axis = [_axis_tiles(a, t) for a, t in zip(axes, tile)]
    ndim = len(axes)
    lengths = [a.length for a in axes]
    tokens = math.prod(lengths)
    # the product of the axes' tiles: index [tile_x, tile_y, ..., t_x, t_y, ..., j_x, j_y, ...]
    queries = keys = None
    for i, at in enumerate(per_axis):
        q = at.queries.reshape((1,) * i + (at.queries.shape[0],) + (1,) * (ndim - 1 - i)
                               + (1,) * i + (at.queries.shape[1],) + (1,) * (ndim - 1 - i))
        k = at.keys.reshape((1,) * i + (at.keys.shape[0],) + (1,) * (ndim - 1 - i)
                            + (1,) * i + (at.keys.shape[1],) + (1,) * (ndim - 1 - i))
        stride = math.prod(lengths[i + 1:])
        queries = _combine(queries, q, stride)
        keys = _combine(keys, k, stride)
    count = math.prod(at.queries.shape[0] for at in per_axis)
    queries = np.where(queries < 0, tokens, queries).reshape(count, -1)
    keys = np.where(keys < 0, tokens, keys).reshape(count, -1)
    mask, bias = None, None
    bias_sizes = [2 * a.kernel_size - 1 for a in axes]
    for i, at in enumerate(per_axis):
        shape = ((1,) * i + (at.mask.shape[0],) + (1,) * (ndim - 1 - i)
                 + (1,) * i + (at.mask.shape[1],) + (1,) * (ndim - 1 - i)
                 + (1,) * i + (at.mask.shape[2],) + (1,) * (ndim - 1 - i))
        m, b = at.mask.reshape(shape), at.bias.reshape(shape)
        mask = m if mask is None else mask & m
        bias = b if bias is None else bias * bias_sizes[i] + b
    box = keys.shape[1]
    mask = np.broadcast_to(mask, _full_shape(per_axis)).reshape(count, -1, box)
    bias = np.broadcast_to(bias, _full_shape(per_axis)).reshape(count, -1, box)
    bias = np.where(mask, bias, math.prod(bias_sizes))
    # a padding query (no valid key) sees the box's first key, which every box has: a finite softmax
    padding = queries == tokens
    mask = mask.copy()
    mask[padding, 0] = True
    return Tiles(queries.astype(np.int64), keys.astype(np.int64), mask, bias.astype(np.int64))


def _combine(flat, positions, stride: int):
    """Flat row-major indices from one more axis' positions (-1 anywhere: -1)."""
    if flat is None:
        return np.where(positions < 0, -1, positions * stride)
    return np.where((flat < 0) | (positions < 0), -1, flat + positions * stride)


def _full_shape(per_axis) -> tuple[int, ...]:
    return (tuple(at.mask.shape[0] for at in per_axis) + tuple(at.mask.shape[1] for at in per_axis)
            + tuple(at.mask.shape[2] for at in per_axis))
