"""Extra key/value tokens that every query attends besides its neighborhood (text tokens beside image tokens).

The fused ops take them as ``additional_keys`` ``[batch, tokens, heads_kv, head_dim]`` and ``additional_values``
``[batch, tokens, heads_kv, head_dim_v]``: one softmax over the neighborhood and the extra tokens, its
logsumexp over both. It is computed as two attentions of the same queries over disjoint key sets, neighborhood
attention on the chosen backend and dense attention over the tokens here, merged exactly through their
logsumexps (:func:`na_rtc.merge_attentions`). In torch both logsumexps are differentiable, so every gradient
(queries, keys, values, the extra tokens, rpb) is that of the one softmax. The dense part holds the
``[queries, tokens]`` logits of each head in float32 (float64 for float64 inputs); the bias applies to the
neighborhood only. A NaN in an extra token reaches every query, as it would in one softmax.
"""

from __future__ import annotations

from . import _arrays
from ._args import Problem, _same_placement

__all__ = ["check", "attend", "with_extra_tokens"]


def check(problem: Problem, query, additional_keys, additional_values) -> None:
    """Validate the extra tokens of a fused call of ``problem``: both or neither, the query's kind, device and
    dtype, ``[batch, tokens, heads_kv, head_dim]`` keys and ``head_dim_v`` values of one token count."""
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values must be given together (or both left out)")
    if additional_keys is None:
        return
    _same_placement("query", query, {"additional_keys": additional_keys, "additional_values": additional_values})
    tokens = None
    for name, x, dim in (("additional_keys", additional_keys, problem.head_dim),
                         ("additional_values", additional_values, problem.v_dim)):
        shape = tuple(int(s) for s in x.shape)
        layout = (f"[batch, tokens, heads_kv, {'head_dim' if name == 'additional_keys' else 'head_dim_v'}] = "
                  f"[{problem.batch}, tokens, {problem.kv_heads}, {dim}]")
        if len(shape) != 4 or shape[0] != problem.batch or shape[2] != problem.kv_heads or shape[3] != dim:
            raise ValueError(f"{name} must be {layout} (the key's heads, the "
                             f"{'query' if name == 'additional_keys' else 'value'}'s head dim), got shape {shape}")
        if tokens is not None and shape[1] != tokens:
            raise ValueError(f"additional_keys and additional_values must hold the same number of tokens, got "
                             f"{tokens} and {shape[1]}")
        tokens = shape[1]


def attend(query, keys, values, scale: float):
    """``(out, lse)`` of dense attention of every query ``[batch, *spatial, heads, head_dim]`` over every token of
    ``keys``/``values`` ``[batch, tokens, heads_kv, head_dim(_v)]`` (query head h reads key/value head
    ``h // (heads // heads_kv)``), in float32 (float64 for float64 queries): out ``[..., heads, head_dim_v]``,
    the natural-log logsumexp ``[..., heads]`` (``-inf`` without tokens)."""
    compute = "float64" if _arrays.dtype_name(query) == "float64" else "float32"
    batch, heads, dim = int(query.shape[0]), int(query.shape[-2]), int(query.shape[-1])
    kv_heads, tokens, dim_v = int(keys.shape[2]), int(keys.shape[1]), int(values.shape[-1])
    q = _arrays.cast(query, compute).reshape(batch, -1, kv_heads, heads // kv_heads, dim)
    k, v = _arrays.cast(keys, compute), _arrays.cast(values, compute)
    if _arrays.kind_of(query) == _arrays.TORCH:
        import torch

        logits = torch.einsum("bnkgd,btkd->bnkgt", q, k) * scale
        lse = torch.logsumexp(logits, -1)  # without tokens: -inf, and the output below 0
        out = torch.einsum("bnkgt,btkv->bnkgv", torch.softmax(logits, -1), v)
    else:
        xp = _array_module(query)
        logits = xp.einsum("bnkgd,btkd->bnkgt", q, k) * scale
        if tokens:  # NumPy's max of an empty axis raises
            peak = logits.max(-1, keepdims=True)
            peak = xp.where(xp.isfinite(peak), peak, 0.0)
            weights = xp.exp(logits - peak)
            total = weights.sum(-1, keepdims=True)
            lse = (xp.log(total) + peak)[..., 0]
            out = xp.einsum("bnkgt,btkv->bnkgv", weights / total, v)
        else:
            lse = xp.full(logits.shape[:-1], -xp.inf, dtype=compute)
            out = xp.zeros((*q.shape[:-1], dim_v), dtype=compute)
    return out.reshape(*query.shape[:-1], dim_v), lse.reshape(query.shape[:-1])


def with_extra_tokens(out, lse, query, additional_keys, additional_values, scale: float):
    """The neighborhood attention's ``(out, lse)`` merged with the dense attention over the extra tokens: one
    softmax over both, out in the query's dtype, lse in the math's (float32; float64 for float64)."""
    from .merging import merge_attentions

    extra_out, extra_lse = attend(query, additional_keys, additional_values, scale)
    compute = _arrays.dtype_name(extra_out)
    merged, merged_lse = merge_attentions([_arrays.cast(out, compute), extra_out],
                                          [_arrays.cast(lse, compute), extra_lse])
    return _arrays.cast(merged, _arrays.dtype_name(query)), merged_lse


def _array_module(x):
    """NumPy or CuPy, the library of a non-torch array."""
    if _arrays.kind_of(x) == _arrays.CUPY:
        import cupy

        return cupy
    import numpy

    return numpy
