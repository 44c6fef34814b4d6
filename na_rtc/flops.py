"""FLOPs of every op from exact neighbor counts: the one formula that
``python -m na_rtc bench`` reports and torch's ``FlopCounterMode`` counts.

A product over the neighborhoods (``q . k`` for every query and neighbor, or a
weighted sum of neighbor rows) is one multiply-add, 2 FLOPs, per (query,
neighbor, head-dim element), per batch element and head:
``2 * head_dim * batch * heads * sum over queries of neighbor count``.

- ``qk`` and ``av``: one product each; their backwards two each (``dq`` and
  ``dk``; ``dattn`` and ``dv``).
- fused forward: two products (``Q K^T`` and ``P V``); fused backward: 2.5x
  the forward (five products: ``Q K^T`` is recomputed), as FlashAttention's
  and NATTEN's benchmarks and torch's own count for SDPA's backward do.

Neighbor counts are exact (:func:`na_rtc.window.neighbor_count`): causal
windows hold 1..k keys and strided causal windows vary per query, so
``tokens * prod(kernel)`` would overstate their work. A 2D or 3D
neighborhood is the product of the per-axis windows, so the sum over all
queries of the product of per-axis counts is the product of the per-axis
sums (exact in every rank, with no table over the queries).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .window import Axis, neighbor_count

#: fused backward FLOPs per forward FLOP
FUSED_BACKWARD_FACTOR = 2.5


@functools.lru_cache(maxsize=256)
def axis_neighbor_sum(axis: Axis) -> int:
    """Sum over the positions of one axis of that axis's neighbor count."""
    return int(np.sum(neighbor_count(axis, np.arange(axis.length, dtype=np.int64))))


def neighbor_pairs(axes: tuple[Axis, ...]) -> int:
    """(query, key) pairs per batch element and head: the sum over queries of neighbor count."""
    return math.prod(axis_neighbor_sum(axis) for axis in axes)


def product_flops(axes: tuple[Axis, ...], batch: int, heads: int, head_dim: int) -> int:
    """One product over every (query, neighbor) pair: a multiply-add per head-dim element."""
    return 2 * head_dim * batch * heads * neighbor_pairs(axes)


def fused_forward(axes, batch, heads, head_dim) -> int:
    return 2 * product_flops(axes, batch, heads, head_dim)


def fused_backward(axes, batch, heads, head_dim) -> int:
    return int(FUSED_BACKWARD_FACTOR * fused_forward(axes, batch, heads, head_dim))


def qk_forward(axes, batch, heads, head_dim) -> int:
    return product_flops(axes, batch, heads, head_dim)


def qk_backward(axes, batch, heads, head_dim) -> int:
    return 2 * product_flops(axes, batch, heads, head_dim)


av_forward = qk_forward
av_backward = qk_backward
