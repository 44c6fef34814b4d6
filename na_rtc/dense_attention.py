"""Dense attention with the NA ops' conventions: :func:`attention`, for the parts of a model where every query
attends every key (the text tokens of a text-image model attending all image tokens and themselves).

It is the extra-token computation of the fused NA ops (:mod:`na_rtc.extra_tokens`) with an empty
neighborhood: the same chunked matrix products in float32 (float64 for float64 inputs), never a
``[queries, keys]`` matrix, GQA/MQA and a value head dim of its own, and a logsumexp to merge with
(:func:`na_rtc.merge_attentions`).
"""

from __future__ import annotations

from . import _args, _arrays, extra_tokens

__all__ = ["attention"]


def attention(query, key, value, *, scale=None, return_lse=False):
    """Softmax attention of every query over every key: ``[batch, queries, heads, head_dim]`` over
    ``key``/``value`` ``[batch, keys, heads_kv, head_dim]`` / ``head_dim_v``.

    Query and key lengths may differ; ``heads_kv`` divides ``heads`` (query head h reads key/value head
    ``h // (heads // heads_kv)``). ``scale`` defaults to ``head_dim ** -0.5``. Returns the output
    ``[batch, queries, heads, head_dim_v]`` in the query's dtype and, with ``return_lse=True``, the logsumexp
    ``[batch, queries, heads]`` (float32; float64 for float64 inputs; ``-inf`` without keys). NumPy arrays, CuPy
    arrays and torch tensors; torch tensors are differentiable through output and logsumexp (first
    derivatives).
    """
    from .functional import _autocast

    query, key, value = _autocast(query, key, value)
    scale = _check(query, key, value, scale)
    if _arrays.kind_of(query) == _arrays.TORCH:
        from ._torch import DenseAttention

        out, lse = DenseAttention.apply(query, key, value, scale)
    else:
        out, lse = extra_tokens.attend(query, key, value, scale)
        out = _arrays.cast(out, _arrays.dtype_name(query))
    return (out, lse) if return_lse else out


def _check(query, key, value, scale) -> float:
    """Validate the arrays (kind, device, dtype, shapes) and return the scale."""
    _args._array_kind("query", query)
    _args._same_placement("query", query, {"key": key, "value": value})
    _args._floating("query", query)
    shapes = {name: tuple(int(s) for s in x.shape) for name, x in (("query", query), ("key", key), ("value", value))}
    for name, shape in shapes.items():
        if len(shape) != 4:
            raise ValueError(f"{name} must have 4 dimensions [batch, tokens, heads, head_dim], got shape {shape}")
    (batch, _, heads, dim), (_, keys, heads_kv, key_dim), value_shape = shapes.values()
    if dim < 1:
        raise ValueError(f"query head_dim (last dimension) must be >= 1, got {dim}")
    if key_dim != dim or shapes["key"][0] != batch:
        raise ValueError(f"key must be [batch, keys, heads_kv, head_dim] = [{batch}, keys, heads_kv, {dim}] (the "
                         f"query's batch and head dim), got shape {shapes['key']}")
    if value_shape[:3] != shapes["key"][:3] or value_shape[3] < 1:
        raise ValueError(f"value must be [batch, keys, heads_kv, head_dim_v] with the key's batch, keys and heads "
                         f"{shapes['key'][:3]}, got shape {value_shape}")
    if heads_kv < 1 or heads % heads_kv:
        raise ValueError(f"key has {heads_kv} heads, which must divide query's {heads} heads (GQA/MQA: each "
                         f"key/value head serves heads // heads_kv query heads)")
    return _args._scale(scale, dim)
