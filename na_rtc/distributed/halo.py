"""Halo planning for context parallelism: which key rows each rank needs, and from whom.

One spatial axis (the shard axis) is split into contiguous slabs, one per rank,
in rank order. A rank computes its own queries; their windows (the window math
of :mod:`na_rtc.window`, on the global axis) reach key rows beyond the slab's
borders: the halo. This module computes, from the window math alone and with
no communication:

- the key rows each rank's windows read (per dilation group, the union of the
  windows of the slab's queries in that group: one contiguous range of group
  coordinates, since window bounds never decrease with the query);
- which of them every other rank owns: what this rank receives, and by
  symmetry what it sends;
- the *local axis* the rank computes on: global rows ``[key_start, key_stop)``
  holding the slab and its halo, whose start is a multiple of ``dilation *
  stride``. On that axis, with its own length, the single-GPU window math gives
  every query of the slab exactly its global window (shifted by
  ``key_start``), so the unchanged kernels compute the global function:
  dilation groups and stride blocks keep their phase because of the alignment,
  and the border clamps never bind differently because every window of the
  slab lies inside the local axis (the non-causal leader lies in its window;
  causal windows are clamped on the left only, and the axis extends to the
  last causal leader). :func:`plan_halo` checks this for every query of the
  slab, so a plan is never wrong silently.

Positions in a plan are global rows of the shard axis.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..window import Axis, window

__all__ = ["HaloPlan", "slab_bounds", "needed_rows", "plan_halo"]


def slab_bounds(lengths) -> tuple[int, ...]:
    """Global start of every rank's slab, and the axis length last (``len(lengths) + 1`` entries)."""
    return tuple(int(b) for b in np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))]))


def _window_rows(axis: Axis, first: int, stop: int):
    """Per dilation group present among queries ``[first, stop)``: ``(g, lowest window start, highest
    window end, highest stride-block leader)`` in group coordinates."""
    if stop <= first:
        return []
    queries = np.arange(first, stop, dtype=np.int64)
    g_all = queries % axis.dilation
    starts, ends = window(axis, queries)
    out = []
    for g in np.unique(g_all):
        sel = g_all == g
        ig = queries[sel] // axis.dilation
        lg = (axis.length - g + axis.dilation - 1) // axis.dilation
        # causal windows end at the query, but their start follows the block's leader
        # (docs/design/definition.md#causal-windows: the last query of a stride block); the local axis must reach it
        leader = np.minimum((ig // axis.stride) * axis.stride + axis.stride - 1, lg - 1)
        out.append((int(g), int(starts[sel].min()), int(ends[sel].max()), int(leader.max())))
    return out


def needed_rows(axis: Axis, first: int, stop: int) -> np.ndarray:
    """Sorted global key rows the windows of queries ``[first, stop)`` read."""
    rows = [np.arange(lo, hi, dtype=np.int64) * axis.dilation + g for g, lo, hi, _ in _window_rows(axis, first, stop)]
    return np.unique(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class HaloPlan:
    """One rank's part of a context-parallel problem on the shard axis.

    ``receives[o]`` / ``sends[p]``: global rows this rank gets from owner
    ``o`` / gives to rank ``p`` (sorted; ranks with nothing to exchange are
    absent). ``key_start, key_stop``: the local axis (global rows), holding the
    slab ``[query_start, query_stop)``.
    """

    rank: int
    axis: Axis
    bounds: tuple[int, ...]
    key_start: int
    key_stop: int
    receives: tuple[tuple[int, tuple[int, ...]], ...]
    sends: tuple[tuple[int, tuple[int, ...]], ...]

    @property
    def query_start(self) -> int:
        return self.bounds[self.rank]

    @property
    def query_stop(self) -> int:
        return self.bounds[self.rank + 1]

    @property
    def local_axis(self) -> Axis:
        return Axis(self.key_stop - self.key_start, self.axis.kernel_size, self.axis.stride, self.axis.dilation,
                    self.axis.causal)

    @property
    def rows_received(self) -> int:
        return sum(len(rows) for _, rows in self.receives)

    @property
    def rows_sent(self) -> int:
        return sum(len(rows) for _, rows in self.sends)


def _local_axis_range(axis: Axis, first: int, stop: int, needed: np.ndarray) -> tuple[int, int]:
    """``[key_start, key_stop)``: slab and halo, start aligned to ``dilation * stride``, long enough for the
    local window math (``kernel * dilation`` rows), reaching every causal leader."""
    lo, hi = first, stop
    if len(needed):
        lo, hi = min(lo, int(needed[0])), max(hi, int(needed[-1]) + 1)
    if axis.causal:
        for g, _, _, leader in _window_rows(axis, first, stop):
            hi = max(hi, leader * axis.dilation + g + 1)
    period = axis.dilation * axis.stride
    lo -= lo % period
    span = axis.kernel_size * axis.dilation
    if hi - lo < span:
        hi = min(axis.length, lo + span)
        if hi - lo < span:
            lo = max(0, hi - span)
            lo -= lo % period
    return lo, hi


def _check_local_windows(axis: Axis, first: int, stop: int, key_start: int, key_stop: int) -> None:
    """Every slab query's window on the local axis is its global window shifted by ``key_start``."""
    if stop <= first:
        return
    queries = np.arange(first, stop, dtype=np.int64)
    local = Axis(key_stop - key_start, axis.kernel_size, axis.stride, axis.dilation, axis.causal)
    gs, ge = window(axis, queries)
    ls, le = window(local, queries - key_start)
    shift = key_start // axis.dilation
    if not (np.array_equal(gs - shift, ls) and np.array_equal(ge - shift, le)):
        raise RuntimeError(f"internal error: the local axis [{key_start}, {key_stop}) does not reproduce the "
                           f"windows of queries [{first}, {stop}) of {axis}; please report it")


def _owned(bounds, owner: int, rows: np.ndarray) -> tuple[int, ...]:
    sel = (rows >= bounds[owner]) & (rows < bounds[owner + 1])
    return tuple(int(r) for r in rows[sel])


@functools.lru_cache(maxsize=256)
def plan_halo(axis: Axis, lengths: tuple[int, ...], rank: int) -> HaloPlan:
    """The plan of ``rank`` when the ranks' slabs of ``axis`` have ``lengths`` (in rank order)."""
    bounds = slab_bounds(lengths)
    if bounds[-1] != axis.length:
        raise ValueError(f"slab lengths {lengths} sum to {bounds[-1]}, not the axis length {axis.length}")
    size = len(lengths)
    needed = [needed_rows(axis, bounds[r], bounds[r + 1]) for r in range(size)]
    first, stop = bounds[rank], bounds[rank + 1]
    key_start, key_stop = _local_axis_range(axis, first, stop, needed[rank])
    _check_local_windows(axis, first, stop, key_start, key_stop)
    receives = tuple((o, rows) for o in range(size) if o != rank for rows in [_owned(bounds, o, needed[rank])] if rows)
    sends = tuple((p, rows) for p in range(size) if p != rank for rows in [_owned(bounds, rank, needed[p])] if rows)
    return HaloPlan(rank, axis, bounds, key_start, key_stop, receives, sends)


#: the most rows the pieces of an overlapped call may compute, relative to one computation over slab and halo
OVERLAP_EXTRA_WORK = 1.125


@dataclass(frozen=True)
class Piece:
    """Queries ``[query_start, query_stop)`` computed on the local axis ``[key_start, key_stop)`` (global
    rows), on which every one of them has its global window."""

    query_start: int
    query_stop: int
    key_start: int
    key_stop: int


def _piece(axis: Axis, first: int, stop: int) -> Piece | None:
    """The piece of queries ``[first, stop)``, or None when no local axis reproduces their windows."""
    key_start, key_stop = _local_axis_range(axis, first, stop, needed_rows(axis, first, stop))
    try:
        _check_local_windows(axis, first, stop, key_start, key_stop)
    except RuntimeError:
        return None
    return Piece(first, stop, key_start, key_stop)


def _inside(piece: Piece | None, lo: int, hi: int) -> bool:
    return piece is not None and lo <= piece.key_start and piece.key_stop <= hi


@functools.lru_cache(maxsize=256)
def overlap_pieces(plan: HaloPlan) -> tuple[Piece, ...] | None:
    """``(interior, left border, right border)`` (a border may be None) when the slab's interior is worth
    computing while the halo travels, else None.

    The interior's queries and keys lie inside the slab (it needs no received row); the borders' local axes
    lie inside the plan's. Each piece's local axis holds rows of queries that are not its own, which a backend
    without native query boxes computes and discards: the split is taken when all pieces together compute at most
    ``OVERLAP_EXTRA_WORK`` times the rows of the single computation (wide slabs, short halos)."""
    axis, first, stop = plan.axis, plan.query_start, plan.query_stop
    if not plan.receives or stop - first < 2:
        return None
    queries = np.arange(first, stop, dtype=np.int64)
    starts, ends = window(axis, queries)
    g = queries % axis.dilation
    fits = (starts * axis.dilation + g >= first) & ((ends - 1) * axis.dilation + g < stop)
    if not fits.any():
        return None
    lo, hi = int(queries[fits][0]), int(queries[fits][-1]) + 1
    period = axis.dilation * axis.stride
    interior = None
    for shrink_left in range(2 * period + 1):  # the alignment and the causal leader may need a few rows
        for shrink_right in range(2 * period + 1):
            a, b = lo + shrink_left, hi - shrink_right
            if b - a < (stop - first + 1) // 2:
                break
            candidate = _piece(axis, a, b)
            if _inside(candidate, first, stop):
                interior = candidate
                break
        if interior is not None:
            break
    if interior is None:
        return None
    ranges = ((first, interior.query_start), (interior.query_stop, stop))
    borders = [_piece(axis, q0, q1) if q1 > q0 else None for q0, q1 in ranges]
    if any(q1 > q0 and not _inside(b, plan.key_start, plan.key_stop) for b, (q0, q1) in zip(borders, ranges)):
        return None
    # every piece computes all rows of its local axis: the split is worth it only while those rows add
    # little to the one computation over slab and halo
    rows = sum(p.key_stop - p.key_start for p in (interior, *borders) if p is not None)
    if rows > OVERLAP_EXTRA_WORK * (plan.key_stop - plan.key_start):
        return None
    return (interior, *borders)
