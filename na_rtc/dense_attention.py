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
    """Softmax attention of every query over every key: ``[batch, queries, heads, head_dim]`` over
    ``key``/``value`` ``[batch, keys, heads_kv, head_dim]`` / ``head_dim_v``.

    Query and key lengths may differ; ``heads_kv`` divides ``heads`` (query head h reads key/value head
    ``h // (heads // heads_kv)``). ``scale`` defaults to ``head_dim ** -0.5``. Returns the output
    ``[batch, queries, heads, head_dim_v]`` in the query's dtype and, with ``return_lse=True``, the logsumexp
    ``[batch, queries, heads]`` (float32; float64 for float64 inputs; ``-inf`` without keys). NumPy arrays, CuPy
    arrays and torch tensors; torch tensors are differentiable through output and logsumexp (first
    derivatives). ``backend`` picks one by name as in the NA ops (default: :func:`na_rtc.use_backend`'s, else
    the device's).
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
