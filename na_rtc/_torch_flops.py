"""FLOP formulas of the custom ops for ``torch.utils.flop_counter.FlopCounterMode``.

Without them the counter sees opaque ops and counts zero FLOPs for attention,
so MFU and FLOP reports would hold only the projections. The formulas are
:mod:`na_rtc.flops` (exact neighbor counts, the same as ``bench``).

``FlopCounterMode`` copies torch's formula registry when it is constructed,
and na_rtc's torch wiring is imported lazily, at the first op on a torch
tensor: typically inside the counter (``with FlopCounterMode(): model(x)`` in
a fresh process). So the formulas are also added to the counters active when
this module is imported.

Imported by :mod:`na_rtc._torch` once the custom ops exist.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from . import flops
from .window import Axis


def _problem(shape, kernel_size, stride, dilation, is_causal) -> tuple:
    """``(axes, batch, heads, head_dim)`` of a heads-last ``[batch, *spatial, heads, head_dim]`` shape."""
    batch, *spatial, heads, head_dim = (int(n) for n in shape)
    stride = stride if stride is not None else [1] * len(spatial)
    axes = tuple(Axis(n, int(k), int(s), int(d), bool(c))
                 for n, k, s, d, c in zip(spatial, kernel_size, stride, dilation, is_causal))
    return axes, batch, heads, head_dim


def _fused_fwd(query, key, value, rpb, kernel_size, stride, dilation, is_causal, scale, backend, out_shape=None):
    return flops.fused_forward(*_problem(query, kernel_size, stride, dilation, is_causal))


def _fused_bwd(grad_out, query, key, value, rpb, output, logsumexp, kernel_size, stride, dilation, is_causal, scale,
               backend, grad_lse=None, out_shape=None):
    return flops.fused_backward(*_problem(query, kernel_size, stride, dilation, is_causal))


def _qk_fwd(query, key, rpb, kernel_size, dilation, is_causal, backend, out_shape=None):
    return flops.qk_forward(*_problem(query, kernel_size, None, dilation, is_causal))


def _qk_bwd(grad_attn, query, key, rpb, kernel_size, dilation, is_causal, backend, out_shape=None):
    return flops.qk_backward(*_problem(query, kernel_size, None, dilation, is_causal))


def _av_fwd(attn, value, kernel_size, dilation, is_causal, backend, out_shape=None):
    return flops.av_forward(*_problem(value, kernel_size, None, dilation, is_causal))


def _av_bwd(grad_out, attn, value, kernel_size, dilation, is_causal, backend, out_shape=None):
    return flops.av_backward(*_problem(value, kernel_size, None, dilation, is_causal))


def _register() -> dict:
    """Register every formula with torch; returns op -> registered (shape-taking) formula."""
    ops = torch.ops.na_rtc
    formulas = {ops.fused_fwd: _fused_fwd, ops.fused_bwd: _fused_bwd, ops.qk_fwd: _qk_fwd, ops.qk_bwd: _qk_bwd,
                ops.av_fwd: _av_fwd, ops.av_bwd: _av_bwd}
    return {op: register_flop_formula(op)(formula) for op, formula in formulas.items()}


def _active_counters():
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    for mode in _get_current_dispatch_mode_stack():
        counter = getattr(mode, "counter", mode)  # torch >= 2.4 wraps the counter in a dispatch mode
        if isinstance(counter, FlopCounterMode):
            yield counter


REGISTERED = _register()
for _counter in _active_counters():
    _counter.flop_registry.update(REGISTERED)
