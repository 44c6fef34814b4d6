"""torch autograd wiring: one autograd Function per op family, backend-agnostic.

The Functions call the selected backend's forward and backward ops, so every
backend (reference now, emulator and cuda later) gets autograd for free. The
backward never stores gathered neighborhoods: it calls the backend's chunked
backward with the saved inputs (plus output and logsumexp for fused ops).

This module imports torch; only import it when a torch tensor is seen.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class FusedNA(torch.autograd.Function):
    """(query, key, value, rpb) -> (output, logsumexp); logsumexp carries no gradient."""

    @staticmethod
    def forward(ctx, backend, problem, query, key, value, rpb):
        out, lse = backend.ops["fused_forward"](problem, query, key, value, rpb)
        ctx.backend, ctx.problem = backend, problem
        ctx.save_for_backward(query, key, value, rpb, out, lse)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_lse):
        query, key, value, rpb, out, lse = ctx.saved_tensors
        dq, dk, dv, drpb = ctx.backend.ops["fused_backward"](
            ctx.problem, grad_out, query, key, value, rpb, out, lse
        )
        return None, None, dq, dk, dv, drpb


class NAQK(torch.autograd.Function):
    """(query, key, rpb) -> attention logits."""

    @staticmethod
    def forward(ctx, backend, problem, query, key, rpb):
        ctx.backend, ctx.problem = backend, problem
        ctx.save_for_backward(query, key, rpb)
        return backend.ops["qk_forward"](problem, query, key, rpb)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_attn):
        query, key, rpb = ctx.saved_tensors
        dq, dk, drpb = ctx.backend.ops["qk_backward"](ctx.problem, grad_attn, query, key, rpb)
        return None, None, dq, dk, drpb


class NAAV(torch.autograd.Function):
    """(attn, value) -> output."""

    @staticmethod
    def forward(ctx, backend, problem, attn, value):
        ctx.backend, ctx.problem = backend, problem
        ctx.save_for_backward(attn, value)
        return backend.ops["av_forward"](problem, attn, value)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        attn, value = ctx.saved_tensors
        dattn, dv = ctx.backend.ops["av_backward"](ctx.problem, grad_out, attn, value)
        return None, None, dattn, dv


#: op family -> autograd Function
FUNCTIONS = {"fused": FusedNA, "qk": NAQK, "av": NAAV}
