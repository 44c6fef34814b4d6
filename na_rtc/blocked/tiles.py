"""The tiles of the blocked backend: query tiles inside one dilation group per axis, the key box their windows
cover, and the exact NA mask and bias indices inside the box (window math: ``na_rtc/window.py``,
which implements ``docs/design/definition.md``).

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


class Tiles:
    """Every tile of a problem, built per axis (small) and combined a chunk of tiles at a time (:meth:`chunk`),
    so that no table over every tile's (query, box key) pairs is held: in 3D a 4 x 4 x 4 tile of 7 x 7 x 7
    windows has a 1000-key box."""

    def __init__(self, axes: tuple[Axis, ...], tile: tuple[int, ...]):
        self.axes = axes
        self.per_axis = [_axis_tiles(a, t) for a, t in zip(axes, tile)]
        self.counts = tuple(int(at.queries.shape[0]) for at in self.per_axis)
        self.count = math.prod(self.counts)
        self.tile_queries = math.prod(int(at.queries.shape[1]) for at in self.per_axis)
        self.box_keys = math.prod(int(at.keys.shape[1]) for at in self.per_axis)
        self.tokens = math.prod(a.length for a in axes)
        self.bias_entries = math.prod(2 * a.kernel_size - 1 for a in axes)

    def chunk(self, start: int, stop: int, bias: bool):
        """Tiles ``start .. stop - 1`` (row-major over the axes' tiles): ``(queries [c, Tq], keys [c, Kb], mask
        [c, Tq, Kb], bias [c, Tq, Kb] or None)``; int64 flat token indices (``N``: padding), the in-window mask,
        flat bias-table entries (``bias_entries`` outside the window)."""
        ndim, tokens = len(self.axes), self.tokens
        index = np.unravel_index(np.arange(start, stop), self.counts)
        lengths = [a.length for a in self.axes]
        queries = keys = mask = flat_bias = None
        for i, (at, rows) in enumerate(zip(self.per_axis, index)):
            stride = math.prod(lengths[i + 1:])
            # this axis' entries, shaped to broadcast over the others: [c, t_0 .. t_ndim-1, j_0 .. j_ndim-1]
            q = _spread(at.queries[rows], i, ndim, 1)
            k = _spread(at.keys[rows], i, ndim, 1)
            queries = _combine(queries, q, stride)
            keys = _combine(keys, k, stride)
            m = _spread(at.mask[rows], i, ndim, 2)
            mask = m if mask is None else mask & m
            if bias:
                b = _spread(at.bias[rows], i, ndim, 2)
                flat_bias = b if flat_bias is None else flat_bias * (2 * self.axes[i].kernel_size - 1) + b
        count = stop - start
        queries = np.where(queries < 0, tokens, queries).reshape(count, -1)
        keys = np.where(keys < 0, tokens, keys).reshape(count, -1)
        full = (count, *(at.queries.shape[1] for at in self.per_axis), *(at.keys.shape[1] for at in self.per_axis))
        mask = np.broadcast_to(mask, full).reshape(count, self.tile_queries, self.box_keys).copy()
        if bias:
            flat_bias = np.broadcast_to(flat_bias, full).reshape(count, self.tile_queries, self.box_keys)
            flat_bias = np.where(mask, flat_bias, self.bias_entries)
        # a padding query (no valid key) sees the box's first key, which every box has: a finite softmax
        mask[queries == tokens, 0] = True
        return queries.astype(np.int64), keys.astype(np.int64), mask, flat_bias


def _spread(x, axis: int, ndim: int, parts: int):
    """One axis' ``[c, T]`` (``parts`` 1) or ``[c, T, box]`` (``parts`` 2) table shaped ``[c, 1.., T, 1..]`` or
    ``[c, 1.., T, 1.., 1.., box, 1..]``: its own place among the axes' query (and key) dimensions."""
    shape = [x.shape[0]]
    for part in range(parts):
        shape += [x.shape[1 + part] if i == axis else 1 for i in range(ndim)]
    return x.reshape(shape)


@functools.lru_cache(maxsize=32)
def tiles_of(axes: tuple[Axis, ...], tile: tuple[int, ...]) -> Tiles:
    """The tiles of a problem's ``axes`` with ``tile`` queries per axis (clamped to the axis' first group)."""
    return Tiles(axes, tile)


def _combine(flat, positions, stride: int):
    """Flat row-major indices from one more axis' positions (-1 anywhere: -1)."""
    if flat is None:
        return np.where(positions < 0, -1, positions * stride)
    return np.where((flat < 0) | (positions < 0), -1, flat + positions * stride)
