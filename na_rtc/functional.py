"""Public neighborhood attention functions: validate once, pick a backend, run.

All tensors are heads-last, ``[batch, *spatial, heads, head_dim]``; integer
arguments may be one int or a tuple with one entry per spatial axis. Inputs
may be NumPy arrays, CuPy arrays or torch tensors; outputs have the input's
kind, dtype and device. torch inputs are differentiable. Every function takes
a keyword-only ``backend`` that overrides :func:`na_rtc.use_backend` for one
call.
"""

from __future__ import annotations

from . import _args, _arrays, backends


def _autocast(*tensors):
    """Under ``torch.autocast``, the tensors in the autocast dtype (NA runs like a
    matmul: low precision in, fp32 accumulation inside); unchanged otherwise.
    The cast is differentiable, so fp32 leaves still get fp32 gradients."""
    first = tensors[0]
    if _arrays.kind_of(first) != _arrays.TORCH:
        return tensors
    import torch

    device_type = first.device.type
    # devices without autocast (meta, used to initialize and trace large models) would make the query raise
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if _arrays.kind_of(t) == _arrays.TORCH and t.is_floating_point() else t for t in tensors)


def _run(op: str, problem: _args.Problem, backend: str | None, *arrays):
    """Forward ``op`` on the chosen backend, through autograd for torch inputs."""
    chosen = backends.select(problem, backend)
    if problem.kind == "torch":
        from . import _torch

        return _torch.FUNCTIONS[op].apply(chosen, problem, *arrays)
    return chosen.ops[f"{op}_forward"](problem, *arrays)


def _fused(ndim, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb, return_lse, backend,
           additional_keys=None, additional_values=None):
    query, key, value = _autocast(query, key, value)
    additional_keys, additional_values = _autocast(additional_keys, additional_values)
    problem = _args.fused_problem(ndim, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
                                  additional_keys, additional_values)
    extra = (additional_keys, additional_values) if problem.extra_tokens else ()
    out, lse = _run(_args.FUSED, problem, backend, query, key, value, rpb, *extra)
    return (out, lse) if return_lse else out


def _qk(ndim, query, key, kernel_size, dilation, is_causal, rpb, backend):
    query, key = _autocast(query, key)
    problem = _args.qk_problem(ndim, query, key, kernel_size, dilation, is_causal, rpb)
    return _run(_args.QK, problem, backend, query, key, rpb)


def _av(ndim, attn, value, kernel_size, dilation, is_causal, backend):
    attn, value = _autocast(attn, value)
    problem = _args.av_problem(ndim, attn, value, kernel_size, dilation, is_causal)
    return _run(_args.AV, problem, backend, attn, value)


def _backward(op: str, problem: _args.Problem, backend: str | None, *arrays):
    """Gradients of ``op`` on the chosen backend; torch tensors go through the custom ops
    (so meta tensors and torch.compile work) and stay differentiable where autograd records."""
    chosen = backends.select(problem, backend)
    if problem.kind == _arrays.TORCH:
        from . import _torch

        return _torch.BACKWARDS[op](chosen, problem, *arrays)
    return chosen.ops[f"{op}_backward"](problem, *arrays)


def _fused_backward(ndim, grad_out, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
                    output, logsumexp, grad_logsumexp, backend, additional_keys=None, additional_values=None):
    problem = _args.fused_problem(ndim, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
                                  additional_keys, additional_values)
    _args.check_fused_backward(problem, grad_out, query, output, logsumexp, grad_logsumexp)
    if not problem.extra_tokens:
        return _backward(_args.FUSED, problem, backend, grad_out, query, key, value, rpb, output, logsumexp,
                         grad_logsumexp)
    return _backward(_args.FUSED, problem, backend, grad_out, query, key, value, rpb, output, logsumexp,
                     grad_logsumexp, additional_keys, additional_values)


def _qk_backward(ndim, grad_attn, query, key, kernel_size, dilation, is_causal, rpb, backend):
    problem = _args.qk_problem(ndim, query, key, kernel_size, dilation, is_causal, rpb)
    _args.check_qk_backward(problem, grad_attn, query)
    return _backward(_args.QK, problem, backend, grad_attn, query, key, rpb)


def _av_backward(ndim, grad_out, attn, value, kernel_size, dilation, is_causal, backend):
    problem = _args.av_problem(ndim, attn, value, kernel_size, dilation, is_causal)
    _args.check_av_backward(problem, grad_out, value)
    return _backward(_args.AV, problem, backend, grad_out, attn, value)


# ---------------------------------------------------------------- fused


def na1d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, rpb=None,
         return_lse=False, *, additional_keys=None, additional_values=None, backend=None):
    """1D neighborhood attention, ``[batch, length, heads, head_dim]``.

    Each query attends to ``kernel_size`` keys around it (the window shifts
    inward at the borders; causal windows hold 1 to ``kernel_size`` keys).
    ``key`` and ``value`` may have fewer heads than ``query`` (GQA/MQA: a
    divisor of its heads), and ``value`` a head dim of its own, which the
    output takes. ``additional_keys``/``additional_values``
    (``[batch, tokens, heads_kv, head_dim]`` / ``head_dim_v``) are extra
    tokens every query attends besides its neighborhood, in the same softmax
    (and logsumexp); the bias applies to the neighborhood only.
    ``scale`` defaults to ``head_dim ** -0.5`` (the query's);
    ``rpb`` (``[heads, 2k - 1]``,
    odd ``k``, not causal) is added to the logits unscaled. With
    ``return_lse=True`` returns ``(output, logsumexp)``, the logsumexp being
    ``[batch, length, heads]`` float32 (float64 for float64 inputs), the
    natural log of each query's sum of ``exp(logit)``; for torch inputs it is
    differentiable too (what :func:`na_rtc.merge_attentions` needs).
    """
    return _fused(1, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb, return_lse, backend,
                  additional_keys, additional_values)


def na2d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, rpb=None,
         return_lse=False, *, additional_keys=None, additional_values=None, backend=None):
    """2D neighborhood attention, ``[batch, height, width, heads, head_dim]``.

    As :func:`na1d` per axis; ``kernel_size``, ``stride``, ``dilation`` and
    ``is_causal`` may be pairs. ``rpb`` is ``[heads, 2kx - 1, 2ky - 1]``.
    """
    return _fused(2, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb, return_lse, backend,
                  additional_keys, additional_values)


def na3d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, rpb=None,
         return_lse=False, *, additional_keys=None, additional_values=None, backend=None):
    """3D neighborhood attention, ``[batch, depth, height, width, heads, head_dim]``.

    The first spatial axis is depth or time (NATTEN's ``kernel_size_d`` axis):
    causal in time only is ``is_causal=(True, False, False)``. As
    :func:`na1d` per axis; ``kernel_size``, ``stride``, ``dilation`` and
    ``is_causal`` may be triples. ``rpb`` is
    ``[heads, 2kx - 1, 2ky - 1, 2kz - 1]``.
    """
    return _fused(3, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb, return_lse, backend,
                  additional_keys, additional_values)


# ---------------------------------------------------------------- split


def na1d_qk(query, key, kernel_size, dilation=1, is_causal=False, rpb=None, *, backend=None):
    """Attention logits ``[batch, length, heads, kernel_size]``: ``q . k`` per window slot.

    Not scaled (pre-scale the query); ``rpb`` added; ``-inf`` in causal slots
    past the query.
    """
    return _qk(1, query, key, kernel_size, dilation, is_causal, rpb, backend)


def na2d_qk(query, key, kernel_size, dilation=1, is_causal=False, rpb=None, *, backend=None):
    """Attention logits ``[batch, height, width, heads, kx * ky]``; slot ``t = tx * ky + ty``."""
    return _qk(2, query, key, kernel_size, dilation, is_causal, rpb, backend)


def na3d_qk(query, key, kernel_size, dilation=1, is_causal=False, rpb=None, *, backend=None):
    """Attention logits ``[batch, depth, height, width, heads, kx * ky * kz]``; slot
    ``t = (tx * ky + ty) * kz + tz``."""
    return _qk(3, query, key, kernel_size, dilation, is_causal, rpb, backend)


def na1d_av(attn, value, kernel_size, dilation=1, is_causal=False, *, backend=None):
    """Weighted sum of neighbor values: ``attn [batch, length, heads, k]`` x ``value``.

    Weights of slots outside a causal window are ignored.
    """
    return _av(1, attn, value, kernel_size, dilation, is_causal, backend)


def na2d_av(attn, value, kernel_size, dilation=1, is_causal=False, *, backend=None):
    """2D :func:`na1d_av`: ``attn [batch, height, width, heads, kx * ky]``."""
    return _av(2, attn, value, kernel_size, dilation, is_causal, backend)


def na3d_av(attn, value, kernel_size, dilation=1, is_causal=False, *, backend=None):
    """3D :func:`na1d_av`: ``attn [batch, depth, height, width, heads, kx * ky * kz]``."""
    return _av(3, attn, value, kernel_size, dilation, is_causal, backend)


# ---------------------------------------------------------------- backward as plain functions


def na1d_backward(grad_out, query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
                  rpb=None, output=None, logsumexp=None, grad_logsumexp=None, *, additional_keys=None,
                  additional_values=None, backend=None):
    """Gradients ``(dq, dk, dv, drpb)`` of :func:`na1d` (``drpb`` is None without ``rpb``).

    For NumPy/CuPy users without autograd. Pass the forward's ``output`` and
    ``logsumexp`` (``return_lse=True``) to skip recomputing them, and
    ``grad_logsumexp`` (the logsumexp's shape) where the loss depends on the
    logsumexp too (merged attentions): it enters as
    ``delta = rowsum(grad_out * output) - grad_logsumexp``. With
    ``additional_keys``/``additional_values`` (as in :func:`na1d`; then
    ``output`` and ``logsumexp``, if given, are the forward's with them)
    returns ``(dq, dk, dv, drpb, d_additional_keys, d_additional_values)``.
    """
    return _fused_backward(1, grad_out, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
                           output, logsumexp, grad_logsumexp, backend, additional_keys, additional_values)


def na2d_backward(grad_out, query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
                  rpb=None, output=None, logsumexp=None, grad_logsumexp=None, *, additional_keys=None,
                  additional_values=None, backend=None):
    """Gradients ``(dq, dk, dv, drpb)`` of :func:`na2d`."""
    return _fused_backward(2, grad_out, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
                           output, logsumexp, grad_logsumexp, backend, additional_keys, additional_values)


def na3d_backward(grad_out, query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
                  rpb=None, output=None, logsumexp=None, grad_logsumexp=None, *, additional_keys=None,
                  additional_values=None, backend=None):
    """Gradients ``(dq, dk, dv, drpb)`` of :func:`na3d`."""
    return _fused_backward(3, grad_out, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
                           output, logsumexp, grad_logsumexp, backend, additional_keys, additional_values)


def na1d_qk_backward(grad_attn, query, key, kernel_size, dilation=1, is_causal=False, rpb=None, *, backend=None):
    """Gradients ``(dq, dk, drpb)`` of :func:`na1d_qk` (``drpb`` is None without ``rpb``)."""
    return _qk_backward(1, grad_attn, query, key, kernel_size, dilation, is_causal, rpb, backend)


def na2d_qk_backward(grad_attn, query, key, kernel_size, dilation=1, is_causal=False, rpb=None, *, backend=None):
    """Gradients ``(dq, dk, drpb)`` of :func:`na2d_qk`."""
    return _qk_backward(2, grad_attn, query, key, kernel_size, dilation, is_causal, rpb, backend)


def na3d_qk_backward(grad_attn, query, key, kernel_size, dilation=1, is_causal=False, rpb=None, *, backend=None):
    """Gradients ``(dq, dk, drpb)`` of :func:`na3d_qk`."""
    return _qk_backward(3, grad_attn, query, key, kernel_size, dilation, is_causal, rpb, backend)


def na1d_av_backward(grad_out, attn, value, kernel_size, dilation=1, is_causal=False, *, backend=None):
    """Gradients ``(dattn, dv)`` of :func:`na1d_av`."""
    return _av_backward(1, grad_out, attn, value, kernel_size, dilation, is_causal, backend)


def na2d_av_backward(grad_out, attn, value, kernel_size, dilation=1, is_causal=False, *, backend=None):
    """Gradients ``(dattn, dv)`` of :func:`na2d_av`."""
    return _av_backward(2, grad_out, attn, value, kernel_size, dilation, is_causal, backend)


def na3d_av_backward(grad_out, attn, value, kernel_size, dilation=1, is_causal=False, *, backend=None):
    """Gradients ``(dattn, dv)`` of :func:`na3d_av`."""
    return _av_backward(3, grad_out, attn, value, kernel_size, dilation, is_causal, backend)


__all__ = [
    "na1d", "na2d", "na3d", "na1d_qk", "na2d_qk", "na3d_qk", "na1d_av", "na2d_av", "na3d_av",
    "na1d_backward", "na2d_backward", "na3d_backward", "na1d_qk_backward", "na2d_qk_backward", "na3d_qk_backward",
    "na1d_av_backward", "na2d_av_backward", "na3d_av_backward",
]
