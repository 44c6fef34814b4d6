"""Effective FLOPs of a benchmark problem, as the benchmark reports them.

Forward: ``4 * head_dim * batch * heads * sum over queries of neighbor count``
(a multiply-add is 2 FLOPs; QK and AV are one multiply-add per query, neighbor
and head-dim element each). Backward counts 2.5x the forward, as
FlashAttention's and NATTEN's benchmarks do, so forward+backward is 3.5x.
``heads`` is the query's: with GQA/MQA every query head still does its own QK
and AV, whatever the key/value heads it shares. Extra key/value tokens add to
every query's neighbor count: each query attends them as well.
The neighbor counts and per-op formulas are :mod:`na_rtc.flops`, which torch's
``FlopCounterMode`` counts with too.
"""

from __future__ import annotations

from .. import flops as _op_flops
from ..window import Axis
from .presets import Spec

BACKWARD_FACTOR = _op_flops.FUSED_BACKWARD_FACTOR


def axes_of(spec: Spec) -> tuple[Axis, ...]:
    return tuple(Axis(length, k, s, d, c) for length, k, s, d, c in
                 zip(spec.spatial, spec.kernel, spec.stride, spec.dilation, spec.causal))


def neighbor_pairs(spec: Spec) -> int:
    """(query, key) pairs per batch element and head: the sum over queries of neighbor count."""
    return _op_flops.neighbor_pairs(axes_of(spec))


def forward_flops(spec: Spec) -> int:
    return _op_flops.fused_forward(axes_of(spec), spec.batch, spec.heads, spec.head_dim) + _extra_token_flops(spec)


def _extra_token_flops(spec: Spec) -> int:
    """QK and AV of every query against every extra token (dense): what a TFLOP/s figure must count, or 512 extra
    tokens beside a 169-key window would leave most of the work out."""
    return 4 * spec.head_dim * spec.batch * spec.heads * spec.tokens * spec.extra_tokens


def forward_backward_flops(spec: Spec) -> float:
    return forward_flops(spec) * (1 + BACKWARD_FACTOR)


def full_attention_flops(spec: Spec) -> int:
    """What full self-attention over every token (and the extra tokens) computes (SDPA's own work), forward."""
    return 4 * spec.head_dim * spec.batch * spec.heads * spec.tokens * (spec.tokens + spec.extra_tokens)


def tflops(flops: float, seconds: float | None) -> float | None:
    if not seconds or seconds <= 0:
        return None
    return flops / seconds / 1e12
