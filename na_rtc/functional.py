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
           additional_keys=None, additional_values=None, query_start=None):
    """The fused ops; ``query_start`` (context parallelism): the query covers a box of the key's positions
    starting there (``Problem.query_box``)."""
    query, key, value = _autocast(query, key, value)
    additional_keys, additional_values = _autocast(additional_keys, additional_values)
    problem = _args.fused_problem(ndim, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
                                  additional_keys, additional_values, query_start)
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
    inward at the borders; causal windows hold 1 to ``kernel_size`` keys), in
    one softmax of ``scale * q . k`` (plus the bias) over its window and the
    extra tokens, if any.

    :param query: ``[batch, length, heads, head_dim]``: float16, bfloat16,
        float32 or float64; a NumPy array, CuPy array or torch tensor
        (strided views are read in place, no copy).
    :param key: ``[batch, length, heads_kv, head_dim]``, ``heads_kv`` a
        divisor of ``heads`` (GQA/MQA: query head ``h`` reads key/value head
        ``h // (heads // heads_kv)``); the query's kind, device and dtype.
    :param value: ``[batch, length, heads_kv, head_dim_v]``; ``head_dim_v``
        may differ from ``head_dim`` (the output takes it); kind, device and
        dtype as the query's.
    :param kernel_size: window size, ``>= 2`` and ``kernel_size * dilation
        <= length``; an int, or a tuple with one int per spatial axis (as are
        ``stride``, ``dilation`` and ``is_causal``).
    :param stride: ``1 <= stride <= kernel_size``: the queries of a block of
        ``stride`` share one window.
    :param dilation: ``>= 1``: a window takes every ``dilation``-th token.
    :param is_causal: a query's window holds only itself and earlier tokens.
    :param scale: a real number multiplying ``q . k``; default
        ``head_dim ** -0.5`` (the query's head dim).
    :param rpb: relative positional bias ``[heads, 2 * kernel_size - 1]``
        (odd ``kernel_size``, not causal), added to the scaled logits of the
        neighborhood (not of extra tokens); the inputs' dtype, or float32 next
        to float16/bfloat16 inputs.
    :param return_lse: also return the logsumexp.
    :param additional_keys: ``[batch, tokens, heads_kv, head_dim]``: extra
        tokens every query attends besides its neighborhood, in the same
        softmax (and logsumexp); given together with ``additional_values``.
    :param additional_values: ``[batch, tokens, heads_kv, head_dim_v]``.
    :param backend: a backend name (``"cuda"``, ``"emulator"``,
        ``"reference"``, ``"blocked"``) for this call only; None: the one
        :func:`na_rtc.use_backend` or ``NA_RTC_BACKEND`` forces, else the
        default for the arrays' device.
    :returns: the output ``[batch, length, heads, head_dim_v]`` with the
        query's kind, dtype and device; with ``return_lse=True`` the pair
        ``(output, logsumexp)``, the logsumexp ``[batch, length, heads]``
        float32 (float64 for float64 inputs), the natural log of each query's
        sum of ``exp(logit)``. torch outputs are differentiable, the
        logsumexp too (what :func:`na_rtc.merge_attentions` needs).
    :raises TypeError: an input that is not a NumPy/CuPy/torch array, inputs
        of different kinds or dtypes, a dtype that is not floating, an ``rpb``
        dtype other than those above, window arguments that are not ints
        (bools for ``is_causal``) or tuples of one per axis, a ``scale`` that
        is not a real number.
    :raises ValueError: a wrong number of dimensions, shapes that disagree
        (batch, length, head dim, ``heads_kv`` not dividing ``heads``, extra
        tokens' shapes), inputs on different devices, ``kernel_size < 2``,
        ``dilation < 1``, ``stride`` outside ``[1, kernel_size]``,
        ``kernel_size * dilation > length``, an ``rpb`` with an even
        ``kernel_size``, with ``is_causal`` or of the wrong shape, only one of
        ``additional_keys``/``additional_values``, an unknown ``backend``, or
        a backend that cannot run the arrays' device or rank.
    :raises RuntimeError: the chosen backend is not available on this
        machine (e.g. ``cuda`` without a GPU, CuPy or NVRTC).
    """
    return _fused(1, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb, return_lse, backend,
                  additional_keys, additional_values)


def na2d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, rpb=None,
         return_lse=False, *, additional_keys=None, additional_values=None, backend=None):
    """2D neighborhood attention, ``[batch, height, width, heads, head_dim]``.

    As :func:`na1d` on each axis; what differs:

    :param query: ``[batch, height, width, heads, head_dim]``.
    :param key: ``[batch, height, width, heads_kv, head_dim]``.
    :param value: ``[batch, height, width, heads_kv, head_dim_v]``.
    :param kernel_size: an int or a pair ``(kx, ky)``, as are ``stride``,
        ``dilation`` and ``is_causal`` (``kernel_size * dilation`` must fit
        each axis).
    :param rpb: ``[heads, 2kx - 1, 2ky - 1]``.
    :param additional_keys: ``[batch, tokens, heads_kv, head_dim]``, as in 1D
        (the tokens have no spatial layout).
    :returns: the output ``[batch, height, width, heads, head_dim_v]``, and
        with ``return_lse=True`` the logsumexp ``[batch, height, width,
        heads]``, as in :func:`na1d`.
    :raises TypeError: as :func:`na1d`.
    :raises ValueError: as :func:`na1d`, checked per axis.
    :raises RuntimeError: as :func:`na1d`.
    """
    return _fused(2, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb, return_lse, backend,
                  additional_keys, additional_values)


def na3d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, rpb=None,
         return_lse=False, *, additional_keys=None, additional_values=None, backend=None):
    """3D neighborhood attention, ``[batch, depth, height, width, heads, head_dim]``.

    As :func:`na1d` on each axis. The first spatial axis is depth or time
    (NATTEN's ``kernel_size_d`` axis): causal in time only is
    ``is_causal=(True, False, False)``. What differs:

    :param query: ``[batch, depth, height, width, heads, head_dim]``.
    :param key: ``[batch, depth, height, width, heads_kv, head_dim]``.
    :param value: ``[batch, depth, height, width, heads_kv, head_dim_v]``.
    :param kernel_size: an int or a triple ``(kx, ky, kz)``, as are
        ``stride``, ``dilation`` and ``is_causal``.
    :param rpb: ``[heads, 2kx - 1, 2ky - 1, 2kz - 1]``.
    :returns: the output ``[batch, depth, height, width, heads,
        head_dim_v]``, and with ``return_lse=True`` the logsumexp ``[batch,
        depth, height, width, heads]``, as in :func:`na1d`.
    :raises TypeError: as :func:`na1d`.
    :raises ValueError: as :func:`na1d`, checked per axis.
    :raises RuntimeError: as :func:`na1d`.
    """
    return _fused(3, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb, return_lse, backend,
                  additional_keys, additional_values)


# ---------------------------------------------------------------- split


def na1d_qk(query, key, kernel_size, dilation=1, is_causal=False, rpb=None, *, backend=None):
    """Attention logits ``[batch, length, heads, kernel_size]``: ``q . k`` per window slot.

    The first half of the split ops (:func:`na1d_qk`, a softmax of your own,
    :func:`na1d_av`), for code that needs the attention weights. Not scaled
    (pre-scale the query); ``rpb`` is added; slots outside a causal window
    are ``-inf``.

    :param query: ``[batch, length, heads, head_dim]``; float16, bfloat16,
        float32 or float64; NumPy, CuPy or torch.
    :param key: ``[batch, length, heads_kv, head_dim]``, ``heads_kv``
        dividing ``heads``; the query's kind, device and dtype.
    :param kernel_size: as in :func:`na1d` (no stride here), as are
        ``dilation`` and ``is_causal``.
    :param rpb: ``[heads, 2 * kernel_size - 1]``, as in :func:`na1d`.
    :param backend: as in :func:`na1d`.
    :returns: the logits, in the query's kind, dtype and device; slot ``t``
        is the window's ``t``-th key in order along the axis.
    :raises TypeError: as :func:`na1d` (kinds, dtypes, window arguments).
    :raises ValueError: as :func:`na1d` (dimensions, shapes, devices, window
        sizes, ``rpb``, backend).
    :raises RuntimeError: as :func:`na1d`.
    """
    return _qk(1, query, key, kernel_size, dilation, is_causal, rpb, backend)


def na2d_qk(query, key, kernel_size, dilation=1, is_causal=False, rpb=None, *, backend=None):
    """Attention logits ``[batch, height, width, heads, kx * ky]``; slot ``t = tx * ky + ty``.

    As :func:`na1d_qk` per axis: ``query`` ``[batch, height, width, heads,
    head_dim]``, ``key`` ``[batch, height, width, heads_kv, head_dim]``;
    ``kernel_size``, ``dilation`` and ``is_causal`` an int or a pair;
    ``rpb`` ``[heads, 2kx - 1, 2ky - 1]``. Raises as :func:`na1d_qk`.
    """
    return _qk(2, query, key, kernel_size, dilation, is_causal, rpb, backend)


def na3d_qk(query, key, kernel_size, dilation=1, is_causal=False, rpb=None, *, backend=None):
    """Attention logits ``[batch, depth, height, width, heads, kx * ky * kz]``; slot
    ``t = (tx * ky + ty) * kz + tz``.

    As :func:`na1d_qk` per axis: ``query`` ``[batch, depth, height, width,
    heads, head_dim]``, ``key`` with ``heads_kv`` heads; ``kernel_size``,
    ``dilation`` and ``is_causal`` an int or a triple; ``rpb`` ``[heads,
    2kx - 1, 2ky - 1, 2kz - 1]``. Raises as :func:`na1d_qk`.
    """
    return _qk(3, query, key, kernel_size, dilation, is_causal, rpb, backend)


def na1d_av(attn, value, kernel_size, dilation=1, is_causal=False, *, backend=None):
    """Weighted sum of neighbor values: ``attn [batch, length, heads, k]`` x ``value``.

    The second half of the split ops. Weights of slots outside a causal
    window are ignored.

    :param attn: ``[batch, length, heads, kernel_size]`` attention weights
        (slot order of :func:`na1d_qk`); the value's kind, device and dtype.
    :param value: ``[batch, length, heads_kv, head_dim]``, ``heads_kv``
        dividing ``heads``; float16, bfloat16, float32 or float64.
    :param kernel_size: as in :func:`na1d_qk`, as are ``dilation`` and
        ``is_causal``.
    :param backend: as in :func:`na1d`.
    :returns: ``[batch, length, heads, head_dim]`` in the value's kind, dtype
        and device.
    :raises TypeError: as :func:`na1d` (kinds, dtypes, window arguments).
    :raises ValueError: as :func:`na1d`, and an ``attn`` whose last dimension
        is not ``kernel_size`` or whose other dimensions do not match
        ``value``'s.
    :raises RuntimeError: as :func:`na1d`.
    """
    return _av(1, attn, value, kernel_size, dilation, is_causal, backend)


def na2d_av(attn, value, kernel_size, dilation=1, is_causal=False, *, backend=None):
    """2D :func:`na1d_av`: ``attn [batch, height, width, heads, kx * ky]``.

    ``value`` is ``[batch, height, width, heads_kv, head_dim]``; returns
    ``[batch, height, width, heads, head_dim]``; ``kernel_size``,
    ``dilation`` and ``is_causal`` an int or a pair. Raises as
    :func:`na1d_av`.
    """
    return _av(2, attn, value, kernel_size, dilation, is_causal, backend)


def na3d_av(attn, value, kernel_size, dilation=1, is_causal=False, *, backend=None):
    """3D :func:`na1d_av`: ``attn [batch, depth, height, width, heads, kx * ky * kz]``.

    ``value`` is ``[batch, depth, height, width, heads_kv, head_dim]``;
    returns ``[batch, depth, height, width, heads, head_dim]``;
    ``kernel_size``, ``dilation`` and ``is_causal`` an int or a triple.
    Raises as :func:`na1d_av`.
    """
    return _av(3, attn, value, kernel_size, dilation, is_causal, backend)


# ---------------------------------------------------------------- backward as plain functions


def na1d_backward(grad_out, query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
                  rpb=None, output=None, logsumexp=None, grad_logsumexp=None, *, additional_keys=None,
                  additional_values=None, backend=None):
    """Gradients ``(dq, dk, dv, drpb)`` of :func:`na1d` (``drpb`` is None without ``rpb``).

    For NumPy/CuPy users without autograd (torch tensors work too). The
    arguments after ``grad_out`` are :func:`na1d`'s, with the same shapes and
    rules.

    :param grad_out: ``[batch, length, heads, head_dim_v]``, the loss's
        gradient with respect to the output; the query's kind, device and
        dtype.
    :param output: the forward's output, given together with ``logsumexp``
        to skip recomputing them (``return_lse=True``); with extra tokens,
        the forward's with them.
    :param logsumexp: the forward's ``[batch, length, heads]`` logsumexp.
    :param grad_logsumexp: ``[batch, length, heads]``, where the loss depends
        on the logsumexp too (merged attentions); it enters as ``delta =
        rowsum(grad_out * output) - grad_logsumexp``. A floating dtype; the
        query's kind and device.
    :returns: ``(dq, dk, dv, drpb)`` shaped as ``query``, ``key``, ``value``
        and ``rpb``, in their dtypes; with ``additional_keys`` /
        ``additional_values``, ``(dq, dk, dv, drpb, d_additional_keys,
        d_additional_values)``.
    :raises TypeError: as :func:`na1d`, and for a gradient, output or
        logsumexp of another kind or dtype.
    :raises ValueError: as :func:`na1d`, and for ``grad_out``, ``output``,
        ``logsumexp`` or ``grad_logsumexp`` of the wrong shape or device, or
        ``output`` without ``logsumexp`` (or the reverse).
    :raises RuntimeError: as :func:`na1d`.
    """
    return _fused_backward(1, grad_out, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
                           output, logsumexp, grad_logsumexp, backend, additional_keys, additional_values)


def na2d_backward(grad_out, query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
                  rpb=None, output=None, logsumexp=None, grad_logsumexp=None, *, additional_keys=None,
                  additional_values=None, backend=None):
    """Gradients ``(dq, dk, dv, drpb)`` of :func:`na2d`.

    As :func:`na1d_backward` with :func:`na2d`'s shapes: ``grad_out`` and
    ``output`` ``[batch, height, width, heads, head_dim_v]``, ``logsumexp``
    and ``grad_logsumexp`` ``[batch, height, width, heads]``. Returns and
    raises as :func:`na1d_backward`.
    """
    return _fused_backward(2, grad_out, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
                           output, logsumexp, grad_logsumexp, backend, additional_keys, additional_values)


def na3d_backward(grad_out, query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
                  rpb=None, output=None, logsumexp=None, grad_logsumexp=None, *, additional_keys=None,
                  additional_values=None, backend=None):
    """Gradients ``(dq, dk, dv, drpb)`` of :func:`na3d`.

    As :func:`na1d_backward` with :func:`na3d`'s shapes: ``grad_out`` and
    ``output`` ``[batch, depth, height, width, heads, head_dim_v]``,
    ``logsumexp`` and ``grad_logsumexp`` ``[batch, depth, height, width,
    heads]``. Returns and raises as :func:`na1d_backward`.
    """
    return _fused_backward(3, grad_out, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
                           output, logsumexp, grad_logsumexp, backend, additional_keys, additional_values)


def na1d_qk_backward(grad_attn, query, key, kernel_size, dilation=1, is_causal=False, rpb=None, *, backend=None):
    """Gradients ``(dq, dk, drpb)`` of :func:`na1d_qk` (``drpb`` is None without ``rpb``).

    :param grad_attn: ``[batch, length, heads, kernel_size]``, the gradient
        with respect to the logits; the query's kind, device and dtype. The
        other arguments are :func:`na1d_qk`'s.
    :returns: ``(dq, dk, drpb)`` shaped as ``query``, ``key`` and ``rpb``.
    :raises TypeError: as :func:`na1d_qk`, and a ``grad_attn`` of another
        kind or dtype.
    :raises ValueError: as :func:`na1d_qk`, and a ``grad_attn`` of the wrong
        shape or device.
    :raises RuntimeError: as :func:`na1d`.
    """
    return _qk_backward(1, grad_attn, query, key, kernel_size, dilation, is_causal, rpb, backend)


def na2d_qk_backward(grad_attn, query, key, kernel_size, dilation=1, is_causal=False, rpb=None, *, backend=None):
    """Gradients ``(dq, dk, drpb)`` of :func:`na2d_qk`.

    As :func:`na1d_qk_backward`; ``grad_attn`` is ``[batch, height, width,
    heads, kx * ky]``.
    """
    return _qk_backward(2, grad_attn, query, key, kernel_size, dilation, is_causal, rpb, backend)


def na3d_qk_backward(grad_attn, query, key, kernel_size, dilation=1, is_causal=False, rpb=None, *, backend=None):
    """Gradients ``(dq, dk, drpb)`` of :func:`na3d_qk`.

    As :func:`na1d_qk_backward`; ``grad_attn`` is ``[batch, depth, height,
    width, heads, kx * ky * kz]``.
    """
    return _qk_backward(3, grad_attn, query, key, kernel_size, dilation, is_causal, rpb, backend)


def na1d_av_backward(grad_out, attn, value, kernel_size, dilation=1, is_causal=False, *, backend=None):
    """Gradients ``(dattn, dv)`` of :func:`na1d_av`.

    :param grad_out: ``[batch, length, heads, head_dim]``, the gradient with
        respect to the output; the value's kind, device and dtype. The other
        arguments are :func:`na1d_av`'s.
    :returns: ``(dattn, dv)`` shaped as ``attn`` and ``value``.
    :raises TypeError: as :func:`na1d_av`, and a ``grad_out`` of another kind
        or dtype.
    :raises ValueError: as :func:`na1d_av`, and a ``grad_out`` of the wrong
        shape or device.
    :raises RuntimeError: as :func:`na1d`.
    """
    return _av_backward(1, grad_out, attn, value, kernel_size, dilation, is_causal, backend)


def na2d_av_backward(grad_out, attn, value, kernel_size, dilation=1, is_causal=False, *, backend=None):
    """Gradients ``(dattn, dv)`` of :func:`na2d_av`.

    As :func:`na1d_av_backward`; ``grad_out`` is ``[batch, height, width,
    heads, head_dim]``.
    """
    return _av_backward(2, grad_out, attn, value, kernel_size, dilation, is_causal, backend)


def na3d_av_backward(grad_out, attn, value, kernel_size, dilation=1, is_causal=False, *, backend=None):
    """Gradients ``(dattn, dv)`` of :func:`na3d_av`.

    As :func:`na1d_av_backward`; ``grad_out`` is ``[batch, depth, height,
    width, heads, head_dim]``.
    """
    return _av_backward(3, grad_out, attn, value, kernel_size, dilation, is_causal, backend)


__all__ = [
    "na1d", "na2d", "na3d", "na1d_qk", "na2d_qk", "na3d_qk", "na1d_av", "na2d_av", "na3d_av",
    "na1d_backward", "na2d_backward", "na3d_backward", "na1d_qk_backward", "na2d_qk_backward", "na3d_qk_backward",
    "na1d_av_backward", "na2d_av_backward", "na3d_av_backward",
]
