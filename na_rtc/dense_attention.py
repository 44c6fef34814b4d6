"""Dense attention with the NA ops' conventions: :func:`attention`, for the parts of a model where every query
attends every key (the text tokens of a text-image model attending all image tokens and themselves).

It is the fused NA op with an empty neighborhood and the keys as its extra tokens
(:func:`na_rtc._args.dense_problem`): one code path. On the ``cuda`` and ``emulator`` backends the fused
kernels stream the keys as they stream extra tokens (tensor cores included; the backward's dq kernel and the
tokens' dK/dV kernel), never holding a ``[queries, keys]`` matrix; where no kernel serves (float64, head dims
past the kernels) and on the reference backend, chunked matrix products in float32 (float64 for float64 inputs,
:mod:`na_rtc.extra_tokens`). GQA/MQA and a value head dim of its own as in the NA ops, and a logsumexp to merge
with (:func:`na_rtc.merge_attentions`).
"""

from __future__ import annotations

from . import _args, _arrays, backends

__all__ = ["attention"]


def attention(query, key, value, *, scale=None, return_lse=False, backend=None):
    """Softmax attention of every query over every key, with the NA ops' conventions.

    Query and key lengths may differ. On the ``cuda`` and ``emulator`` backends
    the fused kernels stream the keys, never holding a ``[queries, keys]``
    matrix.

    :param query: ``[batch, queries, heads, head_dim]``: float16, bfloat16,
        float32 or float64; a NumPy array, CuPy array or torch tensor.
    :param key: ``[batch, keys, heads_kv, head_dim]``, ``heads_kv`` dividing
        ``heads`` (query head ``h`` reads key/value head ``h // (heads //
        heads_kv)``); the query's kind, device and dtype.
    :param value: ``[batch, keys, heads_kv, head_dim_v]``; the same.
    :param scale: a real number multiplying ``q . k``; default
        ``head_dim ** -0.5``.
    :param return_lse: also return the logsumexp.
    :param backend: a backend name for this call, as in :func:`na_rtc.na1d`
        (default: :func:`na_rtc.use_backend`'s, else the device's).
    :returns: the output ``[batch, queries, heads, head_dim_v]`` in the query's
        kind, dtype and device and, with ``return_lse=True``, ``(output,
        logsumexp)``, the logsumexp ``[batch, queries, heads]`` (float32; float64
        for float64 inputs; ``-inf`` without keys). torch tensors are
        differentiable through output and logsumexp (first derivatives).
    :raises TypeError: an input that is not a NumPy/CuPy/torch array, inputs of
        different kinds or dtypes, a dtype that is not floating, a ``scale`` that
        is not a real number.
    :raises ValueError: an input that is not 4-dimensional, shapes that disagree
        (batch, key length, head dims, ``heads_kv`` not dividing ``heads``),
        inputs on different devices, an unknown ``backend`` or one that cannot
        run the arrays' device.
    :raises RuntimeError: the chosen backend is not available on this machine.
    """
    from .functional import _autocast

    query, key, value = _autocast(query, key, value)
    problem = _args.dense_problem(query, key, value, scale)
    chosen = _backend(problem, backend)
    if problem.kind == _arrays.TORCH:
        from ._torch import DenseAttention

        out, lse = DenseAttention.apply(chosen, problem.scale, query, key, value)
    else:
        out, lse = chosen.ops["fused_forward"](problem, query, key, value, None, key, value)
    return (out, lse) if return_lse else out


def _backend(problem: _args.Problem, name: str | None) -> backends.Backend:
    """The backend of a dense call: the NA ops' choice, but the reference's matrix products where there is
    nothing for a kernel to do (no keys, no queries, no heads)."""
    if not (problem.extra_tokens and problem.tokens and problem.batch and problem.heads):
        return backends.get("reference")
    return backends.select(problem, name)
