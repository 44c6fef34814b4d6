"""torch wiring: autograd Functions over ``torch.library`` custom ops.

Each op family has a forward and a backward custom op (``na_rtc::fused_fwd``,
``na_rtc::fused_bwd``, ...) with a fake implementation that only computes
shapes, so eager mode, ``torch.compile(fullgraph=True)`` and export all see
the same opaque ops. The custom ops take plain arguments (lists of ints,
bools, a float, the backend's name) and rebuild the validated problem inside,
then call that backend's op table; the backward never stores gathered
neighborhoods. An autograd Function per family connects forward and backward.

This module imports torch; it is only imported once a torch tensor is seen.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _args, backends


def _window(problem: _args.Problem) -> tuple[list[int], list[int], list[int], list[bool]]:
    axes = problem.axes
    return ([a.kernel_size for a in axes], [a.stride for a in axes], [a.dilation for a in axes],
            [bool(a.causal) for a in axes])


def _ops(backend: str) -> dict:
    return backends.get(backend).ops


def _without_autocast(impl):
    """Run a custom op's implementation with autocast off: inputs arrive already
    in the autocast dtype (functional._autocast), and the backends' own math
    (the reference's matmuls) must keep its fp32/fp64 accumulation."""

    @functools.wraps(impl)
    def run(*args, **kwargs):
        device_type = args[0].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return impl(*args, **kwargs)

    return run


def _no_rpb_grad(like: Tensor) -> Tensor:
    """Stand-in for a missing bias gradient (custom ops cannot return None)."""
    return like.new_empty((0,))


def _lse_dtype(query: Tensor) -> torch.dtype:
    return torch.float64 if query.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- fused


@torch.library.custom_op("na_rtc::fused_fwd", mutates_args=())
@_without_autocast
def fused_fwd(query: Tensor, key: Tensor, value: Tensor, rpb: Optional[Tensor], kernel_size: list[int],
              stride: list[int], dilation: list[int], is_causal: list[bool], scale: float,
              backend: str) -> tuple[Tensor, Tensor]:
    problem = _args.fused_problem(len(kernel_size), query, key, value, kernel_size, stride, dilation, is_causal,
                                  scale, rpb)
    return _ops(backend)["fused_forward"](problem, query, key, value, rpb)


@fused_fwd.register_fake
def _(query, key, value, rpb, kernel_size, stride, dilation, is_causal, scale, backend):
    return query.new_empty(query.shape), query.new_empty(query.shape[:-1], dtype=_lse_dtype(query))


@torch.library.custom_op("na_rtc::fused_bwd", mutates_args=())
@_without_autocast
def fused_bwd(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, rpb: Optional[Tensor], output: Tensor,
              logsumexp: Tensor, kernel_size: list[int], stride: list[int], dilation: list[int],
              is_causal: list[bool], scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    problem = _args.fused_problem(len(kernel_size), query, key, value, kernel_size, stride, dilation, is_causal,
                                  scale, rpb)
    dq, dk, dv, drpb = _ops(backend)["fused_backward"](problem, grad_out, query, key, value, rpb, output, logsumexp)
    return dq, dk, dv, _no_rpb_grad(query) if drpb is None else drpb


@fused_bwd.register_fake
def _(grad_out, query, key, value, rpb, output, logsumexp, kernel_size, stride, dilation, is_causal, scale, backend):
    drpb = _no_rpb_grad(query) if rpb is None else rpb.new_empty(rpb.shape)
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape), drpb


class FusedNA(torch.autograd.Function):
    """(query, key, value, rpb) -> (output, logsumexp); logsumexp carries no gradient."""

    @staticmethod
    def forward(ctx, backend, problem, query, key, value, rpb):
        ctx.window = (*_window(problem), problem.scale, backend.name)
        out, lse = fused_fwd(query, key, value, rpb, *ctx.window)
        ctx.save_for_backward(query, key, value, rpb, out, lse)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_lse):
        query, key, value, rpb, out, lse = ctx.saved_tensors
        dq, dk, dv, drpb = fused_bwd(grad_out, query, key, value, rpb, out, lse, *ctx.window)
        return None, None, dq, dk, dv, None if rpb is None else drpb


# ---------------------------------------------------------------- split: QK


@torch.library.custom_op("na_rtc::qk_fwd", mutates_args=())
@_without_autocast
def qk_fwd(query: Tensor, key: Tensor, rpb: Optional[Tensor], kernel_size: list[int], dilation: list[int],
           is_causal: list[bool], backend: str) -> Tensor:
    problem = _args.qk_problem(len(kernel_size), query, key, kernel_size, dilation, is_causal, rpb)
    return _ops(backend)["qk_forward"](problem, query, key, rpb)


@qk_fwd.register_fake
def _(query, key, rpb, kernel_size, dilation, is_causal, backend):
    slots = 1
    for k in kernel_size:
        slots *= k
    return query.new_empty((*query.shape[:-1], slots))


@torch.library.custom_op("na_rtc::qk_bwd", mutates_args=())
@_without_autocast
def qk_bwd(grad_attn: Tensor, query: Tensor, key: Tensor, rpb: Optional[Tensor], kernel_size: list[int],
           dilation: list[int], is_causal: list[bool], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    problem = _args.qk_problem(len(kernel_size), query, key, kernel_size, dilation, is_causal, rpb)
    dq, dk, drpb = _ops(backend)["qk_backward"](problem, grad_attn, query, key, rpb)
    return dq, dk, _no_rpb_grad(query) if drpb is None else drpb


@qk_bwd.register_fake
def _(grad_attn, query, key, rpb, kernel_size, dilation, is_causal, backend):
    drpb = _no_rpb_grad(query) if rpb is None else rpb.new_empty(rpb.shape)
    return query.new_empty(query.shape), key.new_empty(key.shape), drpb


class NAQK(torch.autograd.Function):
    """(query, key, rpb) -> attention logits."""

    @staticmethod
    def forward(ctx, backend, problem, query, key, rpb):
        kernel_size, _, dilation, causal = _window(problem)
        ctx.window = (kernel_size, dilation, causal, backend.name)
        ctx.save_for_backward(query, key, rpb)
        return qk_fwd(query, key, rpb, *ctx.window)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_attn):
        query, key, rpb = ctx.saved_tensors
        dq, dk, drpb = qk_bwd(grad_attn, query, key, rpb, *ctx.window)
        return None, None, dq, dk, None if rpb is None else drpb


# ---------------------------------------------------------------- split: AV


@torch.library.custom_op("na_rtc::av_fwd", mutates_args=())
@_without_autocast
def av_fwd(attn: Tensor, value: Tensor, kernel_size: list[int], dilation: list[int], is_causal: list[bool],
           backend: str) -> Tensor:
    problem = _args.av_problem(len(kernel_size), attn, value, kernel_size, dilation, is_causal)
    return _ops(backend)["av_forward"](problem, attn, value)


@av_fwd.register_fake
def _(attn, value, kernel_size, dilation, is_causal, backend):
    return value.new_empty(value.shape)


@torch.library.custom_op("na_rtc::av_bwd", mutates_args=())
@_without_autocast
def av_bwd(grad_out: Tensor, attn: Tensor, value: Tensor, kernel_size: list[int], dilation: list[int],
           is_causal: list[bool], backend: str) -> tuple[Tensor, Tensor]:
    problem = _args.av_problem(len(kernel_size), attn, value, kernel_size, dilation, is_causal)
    return _ops(backend)["av_backward"](problem, grad_out, attn, value)


@av_bwd.register_fake
def _(grad_out, attn, value, kernel_size, dilation, is_causal, backend):
    return attn.new_empty(attn.shape), value.new_empty(value.shape)


class NAAV(torch.autograd.Function):
    """(attn, value) -> output."""

    @staticmethod
    def forward(ctx, backend, problem, attn, value):
        kernel_size, _, dilation, causal = _window(problem)
        ctx.window = (kernel_size, dilation, causal, backend.name)
        ctx.save_for_backward(attn, value)
        return av_fwd(attn, value, *ctx.window)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        attn, value = ctx.saved_tensors
        return (None, None, *av_bwd(grad_out, attn, value, *ctx.window))


#: op family -> autograd Function
FUNCTIONS = {"fused": FusedNA, "qk": NAQK, "av": NAAV}
