"""Merging partial attentions: the attention of a query over the union of disjoint key sets, from each set's
output and logsumexp.

If branch ``i`` attended its keys with logsumexp ``l_i`` (natural log of the sum of ``exp(logit)``) and output
``o_i``, the attention over all of them has ``l = log(sum_i exp(l_i))`` and ``o = sum_i exp(l_i - l) o_i``:
one softmax over the union, exactly (up to rounding). This is how neighborhood attention combines with other
attention over extra tokens, or how context-parallel pieces are put together. With torch tensors the merge is
differentiable through outputs and logsumexps, and the na*d ops' logsumexps are differentiable, so gradients
reach every branch's inputs as they would through one softmax.
"""

from __future__ import annotations

from . import _arrays

__all__ = ["merge_attentions"]


def merge_attentions(outputs, lses):
    """Merge partial attentions over disjoint key sets: ``(output, logsumexp)`` of one softmax over the union.

    The math runs in float32 (float64 where a logsumexp or the outputs are
    float64). A branch whose logsumexp is ``-inf`` (no keys) leaves the others
    unchanged; where every branch has none, the output is 0 and the logsumexp
    ``-inf``, with no NaN in values or gradients. torch inputs are differentiable
    through outputs and logsumexps.

    :param outputs: a list or tuple of arrays ``[..., dim]`` (e.g. ``[batch,
        *spatial, heads, head_dim_v]``), one per branch, of one kind (NumPy, CuPy
        or torch), device, shape and floating dtype.
    :param lses: their natural-log logsumexps ``[...]`` (an output's shape
        without the last axis), as ``na*d(..., return_lse=True)`` and
        :func:`na_rtc.attention` return them; the outputs' kind and device, any
        floating dtype.
    :returns: ``(output, logsumexp)``: the output in the outputs' dtype, the
        logsumexp in the math's (float32 or float64).
    :raises TypeError: ``outputs`` or ``lses`` not a list or tuple, an entry that
        is not a NumPy/CuPy/torch array or of another kind than ``outputs[0]``, a
        dtype that is not floating, outputs of different dtypes.
    :raises ValueError: no branch, different numbers of outputs and logsumexps,
        arrays on different devices, outputs of different shapes, a logsumexp
        whose shape is not its output's without the last axis.
    """
    outputs, lses = _checked(outputs, lses)
    compute = "float64" if any(_arrays.dtype_name(x) == "float64" for x in (*outputs, *lses)) else "float32"
    out_dtype = _arrays.dtype_name(outputs[0])
    if _arrays.kind_of(outputs[0]) == _arrays.TORCH:
        return _merge_torch(outputs, lses, compute, out_dtype)
    return _merge_array(outputs, lses, compute, out_dtype)


def _checked(outputs, lses) -> tuple[list, list]:
    if not isinstance(outputs, (list, tuple)) or not isinstance(lses, (list, tuple)):
        raise TypeError("outputs and lses must be sequences (lists or tuples) of arrays, one entry per branch")
    outputs, lses = list(outputs), list(lses)
    if not outputs:
        raise ValueError("outputs must hold at least one branch")
    if len(outputs) != len(lses):
        raise ValueError(f"outputs and lses must have one entry per branch, got {len(outputs)} outputs and "
                         f"{len(lses)} lses")
    first = outputs[0]
    for name, arrays in (("outputs", outputs), ("lses", lses)):
        for i, x in enumerate(arrays):
            kind = _arrays.kind_of(x)
            if kind is None:
                raise TypeError(f"{name}[{i}] must be a NumPy array, CuPy array or torch tensor, got "
                                f"{type(x).__qualname__}")
            if kind != _arrays.kind_of(first):
                raise TypeError(f"{name}[{i}] is a {_arrays.describe(x)} but outputs[0] is a "
                                f"{_arrays.describe(first)}: all branches must be the same kind of array")
            if _arrays.device_of(x) != _arrays.device_of(first):
                raise ValueError(f"{name}[{i}] is on {_arrays.device_of(x)} but outputs[0] is on "
                                 f"{_arrays.device_of(first)}: all branches must be on one device")
            if _arrays.dtype_name(x) not in _arrays.FLOAT_DTYPES:
                raise TypeError(f"{name}[{i}] must have a floating dtype, got {_arrays.dtype_name(x)}")
    for i, (out, lse) in enumerate(zip(outputs, lses)):
        if tuple(out.shape) != tuple(first.shape):
            raise ValueError(f"outputs[{i}] has shape {tuple(out.shape)}, outputs[0] {tuple(first.shape)}: every "
                             "branch's output has the same shape")
        if _arrays.dtype_name(out) != _arrays.dtype_name(first):
            raise TypeError(f"outputs[{i}] is {_arrays.dtype_name(out)}, outputs[0] {_arrays.dtype_name(first)}: "
                            "every branch's output has the same dtype")
        if len(first.shape) < 1 or tuple(lse.shape) != tuple(first.shape[:-1]):
            raise ValueError(f"lses[{i}] must have shape {tuple(first.shape[:-1])} (its output's without the last "
                             f"axis), got {tuple(lse.shape)}")
    return outputs, lses


def _merge_torch(outputs, lses, compute: str, out_dtype: str):
    import torch

    dtype = getattr(torch, compute)
    stacked = torch.stack([lse.to(dtype) for lse in lses])  # [branches, ...]
    # the largest logsumexp of each row, a constant of the math (the result does not depend on it); 0 where every
    # branch is empty, so that exp(-inf - 0) = 0 and no -inf - -inf appears
    top = stacked.detach().amax(dim=0)
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    weights = torch.exp(stacked - top)
    total = weights.sum(dim=0)
    seen = total > 0
    safe = torch.where(seen, total, torch.ones_like(total))  # no log(0) or 0 / 0 in values or gradients
    lse = torch.where(seen, top + torch.log(safe), torch.full_like(total, float("-inf")))
    shares = weights / safe
    out = sum(share[..., None] * o.to(dtype) for share, o in zip(shares, outputs))
    return out.to(getattr(torch, out_dtype)), lse


def _merge_array(outputs, lses, compute: str, out_dtype: str):
    if _arrays.kind_of(outputs[0]) == _arrays.CUPY:
        import cupy as xp
    else:
        import numpy as xp

    stacked = xp.stack([xp.asarray(lse, dtype=compute) for lse in lses])
    top = stacked.max(axis=0)
    top = xp.where(xp.isneginf(top), 0, top).astype(compute)
    weights = xp.exp(stacked - top)
    total = weights.sum(axis=0)
    seen = total > 0
    safe = xp.where(seen, total, 1).astype(compute)
    lse = xp.where(seen, top + xp.log(safe), -xp.inf).astype(compute)
    shares = weights / safe
    out = sum(share[..., None] * xp.asarray(o, dtype=compute) for share, o in zip(shares, outputs))
    return _arrays.cast(out, out_dtype), lse
