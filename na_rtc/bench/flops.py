"""Effective FLOPs of neighborhood attention (DESIGN.md section 9).

Forward: ``4 * head_dim * batch * heads * sum over queries of neighbor count``
(a multiply-add is 2 FLOPs; QK and AV are one multiply-add per query, neighbor
and head-dim element each). Backward counts 2.5x the forward, as
FlashAttention's and NATTEN's benchmarks do, so forward+backward is 3.5x.

Neighbor counts are exact, from :func:`na_rtc.window.neighbor_count`: causal
windows hold 1..k keys and strided causal windows vary per query, so
``tokens * prod(kernel)`` would overstate their work. A 2D neighborhood is
the product of the per-axis windows, so the sum over all queries of the
product of per-axis counts is the product of the per-axis sums.
"""

from __future__ import annotations

import math

import numpy as np

from ..window import Axis, neighbor_count
from .presets import Spec

BACKWARD_FACTOR = 2.5


def axes_of(spec: Spec) -> tuple[Axis, ...]:
    return tuple(Axis(length, k, s, d, c) for length, k, s, d, c in
                 zip(spec.spatial, spec.kernel, spec.stride, spec.dilation, spec.causal))


def axis_neighbor_sum(axis: Axis) -> int:
    """Sum over the positions of one axis of that axis's neighbor count."""
    return int(np.sum(neighbor_count(axis, np.arange(axis.length, dtype=np.int64))))


def neighbor_pairs(spec: Spec) -> int:
    """(query, key) pairs per batch element and head: the sum over queries of neighbor count."""
    return math.prod(axis_neighbor_sum(axis) for axis in axes_of(spec))


def forward_flops(spec: Spec) -> int:
    return 4 * spec.head_dim * spec.batch * spec.heads * neighbor_pairs(spec)


def forward_backward_flops(spec: Spec) -> float:
    return forward_flops(spec) * (1 + BACKWARD_FACTOR)


def full_attention_flops(spec: Spec) -> int:
    """What full self-attention over every token computes (SDPA's own work), forward."""
    return 4 * spec.head_dim * spec.batch * spec.heads * spec.tokens * spec.tokens


def tflops(flops: float, seconds: float | None) -> float | None:
    if not seconds or seconds <= 0:
        return None
    return flops / seconds / 1e12
