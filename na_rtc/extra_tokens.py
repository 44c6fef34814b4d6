"""Extra key/value tokens that every query attends besides its neighborhood (text tokens beside image tokens).

The fused ops take them as ``additional_keys`` ``[batch, tokens, heads_kv, head_dim]`` and ``additional_values``
``[batch, tokens, heads_kv, head_dim_v]``: one softmax over the neighborhood and the extra tokens, its
logsumexp over both; the bias applies to the neighborhood only. A NaN in an extra token reaches every query, as
it would in one softmax.

Where each part is computed:

* forward: the backends take the tokens with the neighborhood (the reference's softmax, the fused kernels' key
  loops, which stream them after each query tile's neighborhood as one more key range); a kernel path that does
  not stream them computes the neighborhood's attention and merges it with dense attention over the tokens
  (:func:`merged_forward`, exact through the two logsumexps);
* backward (:func:`fused_backward`, every backend): once the output and logsumexp cover both parts, the
  neighborhood's gradients are exactly those of the backend's fused backward given them (the probabilities
  ``exp(logit - lse)`` and ``delta = rowsum(dOut * out) - dlse`` are the one softmax's), and the tokens' part is
  dense attention's backward with the same ``lse`` and ``delta`` (:func:`gradients`), which adds to dq.

The dense parts run in float32 (float64 for float64 inputs) through the array library's matrix products
(cuBLAS on a GPU), over chunks of queries: they hold ``[chunk, tokens]`` logits per head, never
``[queries, tokens]`` (the chunk is sized by ``NA_RTC_REFERENCE_CHUNK_MB``).
"""

from __future__ import annotations

from . import _arrays, config
from ._args import Problem

__all__ = ["attend", "fused_backward", "gradients", "merged_forward", "with_extra_tokens"]


def _compute_dtype(x) -> str:
    return "float64" if _arrays.dtype_name(x) == "float64" else "float32"


def _einsum(like, spec: str, *operands):
    """``einsum`` of the library of ``like`` (NumPy with a BLAS-backed contraction order)."""
    if _arrays.kind_of(like) == _arrays.TORCH:
        import torch

        return torch.einsum(spec, *operands)
    xp = _array_module(like)
    return xp.einsum(spec, *operands, optimize=True) if xp.__name__ == "numpy" else xp.einsum(spec, *operands)


def _row_chunks(queries: int, batch: int, heads: int, tokens: int, itemsize: int):
    """Query rows ``slice``s such that one ``[batch, rows, heads, tokens]`` buffer fits the chunk budget."""
    per_row = max(1, batch * heads * tokens * itemsize)
    step = max(1, config.reference_chunk_bytes() // per_row)
    for start in range(0, queries, step):
        yield slice(start, min(start + step, queries))


def attend(query, keys, values, scale: float):
    """``(out, lse)`` of dense attention of every query ``[batch, *spatial, heads, head_dim]`` over every token of
    ``keys``/``values`` ``[batch, tokens, heads_kv, head_dim(_v)]`` (query head h reads key/value head
    ``h // (heads // heads_kv)``), in float32 (float64 for float64 queries): out ``[..., heads, head_dim_v]``,
    the natural-log logsumexp ``[..., heads]`` (``-inf`` without tokens, the output 0)."""
    compute = _compute_dtype(query)
    batch, heads, dim = int(query.shape[0]), int(query.shape[-2]), int(query.shape[-1])
    kv_heads, tokens, dim_v = int(keys.shape[2]), int(keys.shape[1]), int(values.shape[-1])
    q = _arrays.cast(query, compute).reshape(batch, -1, kv_heads, heads // kv_heads, dim)
    k, v = _arrays.cast(keys, compute), _arrays.cast(values, compute)
    queries = int(q.shape[1])
    out = _arrays.zeros(q, (batch, queries, kv_heads, heads // kv_heads, dim_v), compute)
    lse = _arrays.empty(q, (batch, queries, kv_heads, heads // kv_heads), compute)
    torch_kind = _arrays.kind_of(query) == _arrays.TORCH
    if not tokens:
        lse[...] = float("-inf")
    else:
        for rows in _row_chunks(queries, batch, heads, tokens, 8 if compute == "float64" else 4):
            logits = _einsum(q, "bnkgd,btkd->bnkgt", q[:, rows], k) * scale
            if torch_kind:
                import torch

                lse[:, rows] = torch.logsumexp(logits, -1)
            else:
                xp = _array_module(query)
                peak = logits.max(-1, keepdims=True)
                peak = xp.where(xp.isfinite(peak), peak, 0.0)
                lse[:, rows] = (xp.log(xp.exp(logits - peak).sum(-1, keepdims=True)) + peak)[..., 0]
            weights = _exp(logits - lse[:, rows][..., None])
            out[:, rows] = _einsum(q, "bnkgt,btkv->bnkgv", weights, v)
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


def merged_forward(forward, problem: Problem, query, key, value, rpb, additional_keys, additional_values):
    """``(out, lse)`` of a call with extra tokens where ``forward`` (a backend's fused forward) takes the
    neighborhood only: its attention merged with dense attention over the tokens, lse float32 (float64 for
    float64 inputs), as the backends return it. An empty neighborhood (``na_rtc.attention``) is the dense part
    alone."""
    if problem.empty_neighborhood:
        out, lse = attend(query, additional_keys, additional_values, problem.scale)
        return _arrays.cast(out, _arrays.dtype_name(query)), lse
    out, lse = forward(problem.without_extra_tokens(), query, key, value, rpb)
    out, lse = with_extra_tokens(out, lse, query, additional_keys, additional_values, problem.scale)
    return out, _arrays.cast(lse, _compute_dtype(query))


def gradients(grad_out, query, keys, values, output, logsumexp, grad_lse, scale: float):
    """Dense attention's backward given its softmax's statistics: ``(dq, d_keys, d_values)`` in the compute
    dtype (float32; float64 for float64) for queries ``[batch, *spatial, heads, dim]`` over ``keys``/``values``
    ``[batch, tokens, heads_kv, dim(_v)]``, from the ``output`` and ``logsumexp`` of the softmax they are part
    of (over the neighborhood and the tokens, for extra tokens: ``dq`` is then what the tokens add) and the
    logsumexp's gradient (or None)."""
    compute = _compute_dtype(query)
    batch, heads, dim = int(query.shape[0]), int(query.shape[-2]), int(query.shape[-1])
    tokens, kv_heads, dim_v = int(keys.shape[1]), int(keys.shape[2]), int(values.shape[-1])
    group = heads // kv_heads
    q = _arrays.cast(query, compute).reshape(batch, -1, kv_heads, group, dim)
    queries = int(q.shape[1])
    dout = _arrays.cast(grad_out, compute).reshape(batch, queries, kv_heads, group, dim_v)
    out = _arrays.cast(output, compute).reshape(batch, queries, kv_heads, group, dim_v)
    lse = _arrays.cast(logsumexp, compute).reshape(batch, queries, kv_heads, group)
    delta = (dout * out).sum(-1)  # rowsum(dOut * out) - dlse: as in every fused backward
    if grad_lse is not None:
        delta = delta - _arrays.cast(grad_lse, compute).reshape(delta.shape)
    k, v = _arrays.cast(keys, compute), _arrays.cast(values, compute)
    dq = _arrays.zeros(q, q.shape, compute)
    dk = _arrays.zeros(q, tuple(keys.shape), compute)
    dv = _arrays.zeros(q, tuple(values.shape), compute)
    for rows in _row_chunks(queries, batch, heads, tokens, 8 if compute == "float64" else 4):
        probs = _exp(_einsum(q, "bnkgd,btkd->bnkgt", q[:, rows], k) * scale - lse[:, rows][..., None])
        dv += _einsum(q, "bnkgt,bnkgv->btkv", probs, dout[:, rows])
        grad_logits = probs * (_einsum(q, "bnkgv,btkv->bnkgt", dout[:, rows], v) - delta[:, rows][..., None])
        dq[:, rows] = scale * _einsum(q, "bnkgt,btkd->bnkgd", grad_logits, k)
        dk += scale * _einsum(q, "bnkgt,bnkgd->btkd", grad_logits, q[:, rows])
    return dq.reshape(tuple(query.shape)), dk, dv


def fused_backward(backward, forward, problem: Problem, grad_out, query, key, value, rpb, output, logsumexp,
                   grad_lse, additional_keys, additional_values):
    """``(dq, dk, dv, drpb, d_additional_keys, d_additional_values)`` of a fused call with extra tokens, from a
    backend's fused ``backward`` and ``forward`` (the forward runs only where ``output`` is None): the
    neighborhood's gradients from the backend given the output and logsumexp over both parts, the tokens'
    from :func:`gradients`; every gradient in its input's dtype. An empty neighborhood (``na_rtc.attention``)
    has no keys of its own: dk, dv and drpb are None."""
    if output is None:
        output, logsumexp = forward(problem, query, key, value, rpb, additional_keys, additional_values)
    dq_extra, dxk, dxv = gradients(grad_out, query, additional_keys, additional_values, output, logsumexp, grad_lse,
                                   problem.scale)
    dtype = _arrays.dtype_name(query)
    if problem.empty_neighborhood:
        dq, dk, dv, drpb = dq_extra, None, None, None
    else:
        dq, dk, dv, drpb = backward(problem.without_extra_tokens(), grad_out, query, key, value, rpb, output,
                                    logsumexp, grad_lse)
        dq = _arrays.cast(dq, _arrays.dtype_name(dq_extra)) + dq_extra
    dq = _arrays.cast(dq, dtype)
    return dq, dk, dv, drpb, _arrays.cast(dxk, dtype), _arrays.cast(dxv, dtype)


def _exp(x):
    if _arrays.kind_of(x) == _arrays.TORCH:
        return x.exp()
    return _array_module(x).exp(x)


def _array_module(x):
    """NumPy or CuPy, the library of a non-torch array."""
    if _arrays.kind_of(x) == _arrays.CUPY:
        import cupy

        return cupy
    import numpy

    return numpy
