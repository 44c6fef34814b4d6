"""Context-parallel fused neighborhood attention: validate collectively, exchange the halo, compute locally.

A rank's call: its key/value slabs become tensors over the plan's local axis
(slab and halo, :mod:`.exchange`), its queries are zero-padded to the same
axis, and the single-GPU op (any backend) runs on them; the slab's rows of the
output and logsumexp are returned. The local axis is chosen so that the
single-GPU window math gives every query of the slab its global window
(:mod:`.halo`), hence the same function as one process. The padding rows are
queries whose outputs are discarded: their gradients are zero, so they add
nothing to dK, dV or the bias gradient.
"""

from __future__ import annotations

import torch

from .. import functional
from .comm import communicator
from .exchange import HaloExchange
from .validate import validate

__all__ = ["context_parallel"]


def _pad(x: torch.Tensor, dim: int, before: int, after: int) -> torch.Tensor:
    """``x`` with ``before``/``after`` zero rows on dimension ``dim`` (differentiable)."""
    if not before and not after:
        return x
    spec = [0, 0] * (x.dim() - 1 - dim) + [before, after]
    return torch.nn.functional.pad(x, spec)


def _empty_slab(query, value, tensors):
    """Outputs of a rank with no queries: empty, yet in the autograd graph of every input (zero gradients),
    so that the replicated inputs' gradients exist on every rank for their all-reduce."""
    anchor = sum((t.sum() * 0 for t in tensors if t is not None and t.requires_grad), query.new_zeros(()))
    out = query.new_zeros((*query.shape[:-2], query.shape[-2], value.shape[-1])) + anchor.to(query.dtype)
    lse = query.new_zeros(query.shape[:-1], dtype=torch.float32) + anchor.float()
    return out, lse


@torch.compiler.disable
def context_parallel(ndim, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb, return_lse,
                     additional_keys, additional_values, group, shard_dim, backend):
    comm = communicator(group)
    query, key, value = functional._autocast(query, key, value)
    additional_keys, additional_values = functional._autocast(additional_keys, additional_values)
    tensors = {"query": query, "key": key, "value": value, "rpb": rpb, "additional_keys": additional_keys,
               "additional_values": additional_values}
    arguments = {"kernel_size": kernel_size, "stride": stride, "dilation": dilation, "is_causal": is_causal,
                 "scale": scale}
    plan = validate(comm, ndim, shard_dim, tensors, arguments).plan
    dim = 1 + shard_dim
    if plan.query_stop == plan.query_start:
        out, lse = _empty_slab(query, value, tensors.values())
    else:
        key, value = HaloExchange.apply(comm, plan, dim, key, value)
        before = plan.query_start - plan.key_start
        after = plan.key_stop - plan.query_stop
        out, lse = functional._fused(ndim, _pad(query, dim, before, after), key, value, kernel_size, stride,
                                     dilation, is_causal, scale, rpb, True, backend, additional_keys,
                                     additional_values)
        rows = plan.query_stop - plan.query_start
        out, lse = out.narrow(dim, before, rows), lse.narrow(dim, before, rows)
    return (out, lse) if return_lse else out
