"""Per-axis neighborhood window math: the single source of truth in Python.

This is the definition of neighborhood attention's windows. One spatial axis is
described by an :class:`Axis`; positions are integers in ``[0, length)``.
Dilation splits the axis into ``dilation`` interleaved groups; windows are
computed in *group coordinates* (``i' = i div d``) and key positions are
``j = j' * d + g``. Multi-dimensional neighborhoods are products of per-axis
ones: a key is a neighbor when it is one on every axis.

All functions accept Python ints or NumPy integer arrays (vectorized), so the
reference backend, the kernels' launch code and the tests share one
definition. The CUDA header ``cuda_src/na_window.cuh`` (added with the kernels)
must mirror these formulas.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = [
    "Axis",
    "SlotTable",
    "group_of",
    "group_length",
    "window",
    "neighbor_count",
    "is_neighbor",
    "rpb_index",
    "inverse_range",
    "slot_table",
    "flat_slot_table",
    "slot_rows",
    "all_slots_valid",
]


@dataclass(frozen=True)
class Axis:
    """One spatial axis of a neighborhood attention problem (already validated)."""

    length: int
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    causal: bool = False

    @property
    def left(self) -> int:
        return self.kernel_size // 2

    @property
    def right(self) -> int:
        return self.kernel_size - 1 - self.left


def group_of(axis: Axis, i):
    """Dilation group ``g`` and group coordinate ``i'`` of position ``i``."""
    return i % axis.dilation, i // axis.dilation


def group_length(axis: Axis, g):
    """Number of positions in dilation group ``g``: ``ceil((L - g) / d)``."""
    return (axis.length - g + axis.dilation - 1) // axis.dilation


def window(axis: Axis, i):
    """Window ``[start, end)`` of query position ``i``, in group coordinates.

    Non-causal windows always hold ``kernel_size`` keys (shifted inward at the
    borders); causal windows hold between 1 and ``kernel_size`` keys.
    """
    g, ig = group_of(axis, i)
    lg = group_length(axis, g)
    k, s = axis.kernel_size, axis.stride
    block = (ig // s) * s
    if axis.causal:
        leader = np.minimum(block + s - 1, lg - 1)
        start = np.maximum(leader - k + 1, 0)
        end = np.minimum(ig + 1, lg)
    else:
        leader = np.minimum(block + s // 2, lg - 1)
        start = np.clip(leader - axis.left, 0, lg - k)
        end = start + k
    return start, end


def neighbor_count(axis: Axis, i):
    """How many keys the window of query ``i`` holds on this axis."""
    start, end = window(axis, i)
    return end - start


def is_neighbor(axis: Axis, i, j):
    """Whether key position ``j`` lies in the window of query position ``i``."""
    gi, ig = group_of(axis, i)
    gj, jg = group_of(axis, j)
    start, end = window(axis, i)
    return (gi == gj) & (start <= jg) & (jg < end)


def rpb_index(axis: Axis, i, j):
    """Index into the bias table (length ``2k - 1``) for query ``i``, key ``j``.

    Meaningful only when ``j`` is a neighbor of ``i``; it is then in
    ``[0, 2k - 2]``.
    """
    _, ig = group_of(axis, i)
    _, jg = group_of(axis, j)
    return jg - ig + axis.kernel_size - 1


def inverse_range(axis: Axis, j):
    """Queries whose windows contain key position ``j``: ``[start, end)`` in
    group coordinates of ``j``'s group (the inverse neighborhood).

    Window start and end never decrease with the query coordinate inside a
    group (checked exhaustively for short axes by the tests), so the queries form one contiguous range,
    found here by binary search over the group's windows.
    """
    g, jg = group_of(axis, np.asarray(j))
    g = np.atleast_1d(g)
    jg = np.atleast_1d(jg)
    first = np.empty_like(jg)
    last = np.empty_like(jg)
    for group in np.unique(g):
        sel = g == group
        queries = np.arange(group_length(axis, int(group))) * axis.dilation + int(group)
        starts, ends = window(axis, queries)
        # first query whose window ends after j', one past the last whose starts at or before j'
        first[sel] = np.searchsorted(ends, jg[sel], side="right")
        last[sel] = np.searchsorted(starts, jg[sel], side="right")
    if np.ndim(j) == 0:
        return int(first[0]), int(last[0])
    return first, last


class SlotTable(NamedTuple):
    """Neighbor slots of every query along one axis (or flattened over axes).

    ``keys[i, t]`` is the key position held by window slot ``t`` of query
    ``i``; ``valid[i, t]`` says whether that slot is inside the window (causal
    windows can be shorter than ``kernel_size``); ``bias[i, t]`` indexes the
    (flattened) relative positional bias table. Invalid slots point at the
    window's first key, so gathers stay in bounds and inside the window;
    callers mask them.
    """

    keys: np.ndarray
    valid: np.ndarray
    bias: np.ndarray

    @property
    def all_valid(self) -> bool:
        return bool(self.valid.all())


@functools.lru_cache(maxsize=64)
def slot_table(axis: Axis) -> SlotTable:
    """Per-axis slot table with shapes ``[length, kernel_size]``."""
    queries = np.arange(axis.length, dtype=np.int64)
    g, ig = group_of(axis, queries)
    start, end = window(axis, queries)
    slots = np.arange(axis.kernel_size, dtype=np.int64)
    key_group_coord = start[:, None] + slots[None, :]
    valid = key_group_coord < end[:, None]
    # out-of-window slots point at the window's first key: in bounds, and never
    # a key the query must not see (a NaN there could otherwise leak through 0 * NaN)
    key_group_coord = np.where(valid, key_group_coord, start[:, None])
    keys = key_group_coord * axis.dilation + g[:, None]
    bias = key_group_coord - ig[:, None] + axis.kernel_size - 1
    for array in (keys, valid, bias):
        array.setflags(write=False)
    return SlotTable(keys, valid, bias)


def slot_rows(axes: tuple[Axis, ...], start: int, stop: int, box=None) -> SlotTable:
    """Rows ``[start, stop)`` of :func:`flat_slot_table`, built from the per-axis tables alone.

    Memory is ``(stop - start) * prod(kernel_sizes)`` entries, whatever the
    total number of tokens: the reference backend asks for one query chunk at
    a time, so 3D problems (kernel volumes of hundreds of slots) never hold a
    table over all (query, slot) pairs. With ``box`` (per axis ``(first,
    stop)`` positions) the rows are the queries of that box, flattened
    row-major over the box; keys stay flat indices over the whole axes.
    """
    box = tuple((0, axis.length) for axis in axes) if box is None else box
    tokens = np.arange(start, stop, dtype=np.int64)
    rows = len(tokens)
    keys = np.zeros((rows, 1), dtype=np.int64)
    valid = np.ones((rows, 1), dtype=bool)
    bias = np.zeros((rows, 1), dtype=np.int64)
    inner = 1
    for first, last in box:
        inner *= last - first
    for axis, (first, last) in zip(axes, box):
        inner //= last - first
        coord = first + (tokens // inner) % (last - first)  # row-major: the first axis varies slowest
        table = slot_table(axis)
        # outer product of (slots so far) x (this axis' slots), row-major
        keys = (keys[:, :, None] * axis.length + table.keys[coord][:, None, :]).reshape(rows, -1)
        valid = (valid[:, :, None] & table.valid[coord][:, None, :]).reshape(rows, -1)
        bias = (bias[:, :, None] * (2 * axis.kernel_size - 1) + table.bias[coord][:, None, :]).reshape(rows, -1)
    return SlotTable(keys, valid, bias)


def all_slots_valid(axes: tuple[Axis, ...]) -> bool:
    """Whether every window slot of every query is inside its window (no causal window is cut short):
    a product of per-axis windows is full exactly when every axis' window is."""
    return all(slot_table(axis).all_valid for axis in axes)


@functools.lru_cache(maxsize=32)
def flat_slot_table(axes: tuple[Axis, ...]) -> SlotTable:
    """Slot table over row-major flattened tokens of a multi-axis problem.

    Shapes ``[prod(lengths), prod(kernel_sizes)]``; slot ``t`` is row-major
    over the per-axis slots (``t = tx * ky + ty`` in 2D,
    ``t = (tx * ky + ty) * kz + tz`` in 3D), the token index is row-major over
    positions, and the bias index is row-major over the ``(2kx - 1, 2ky - 1,
    ...)`` bias table. Its size grows with tokens x slots; code that may meet
    large problems builds rows as it needs them (:func:`slot_rows`).
    """
    tokens = 1
    for axis in axes:
        tokens *= axis.length
    table = slot_rows(axes, 0, tokens)
    for array in table:
        array.setflags(write=False)
    return table
