"""Context-parallel fused neighborhood attention: validate collectively, exchange the halo, compute locally.

A rank's call: its key/value slabs become tensors over the plan's local axis
(slab and halo, :mod:`.exchange`), and the single-GPU fused op (any backend)
runs the slab's queries against them as a query box of that axis
(``Problem.query_box``). The local axis is chosen so that the single-GPU
window math gives every query of the slab its global window (:mod:`.halo`),
hence the same function as one process. A backend without native query boxes
pads the queries to the whole local axis and drops the padding rows' outputs
(:mod:`na_rtc.query_box`): their gradients are zero, so they add nothing to
dK, dV or the bias gradient.

When the slab has an interior that needs no halo (:func:`.halo.overlap_pieces`),
the exchange is started, the interior computed on the slab's own rows, and
only then the exchange awaited and the two borders computed on the halo.
"""

from __future__ import annotations

import torch

from .. import functional
from .comm import communicator
from .exchange import HaloExchange
from .halo import Piece, overlap_pieces
from .validate import validate

__all__ = ["context_parallel"]


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
        return (out, lse) if return_lse else out

    def attend(piece, q_rows, keys, values, key_offset):
        """The piece's queries (rows ``q_rows`` of this slab's query, global offset ``plan.query_start``)
        against ``keys``/``values`` (global offset ``key_offset``) on the piece's local axis."""
        local_keys, local_values = (t.narrow(dim, piece.key_start - key_offset, piece.key_stop - piece.key_start)
                                    for t in (keys, values))
        # the queries are a box of the local axis: a backend with native boxes computes only them, the others
        # pad them to every row (query_box.py)
        start = [piece.query_start - piece.key_start if axis == shard_dim else 0 for axis in range(ndim)]
        return functional._fused(ndim, q_rows, local_keys, local_values, kernel_size, stride, dilation, is_causal,
                                 scale, rpb, True, backend, additional_keys, additional_values, start)

    def rows_of(piece):
        return query.narrow(dim, piece.query_start - plan.query_start, piece.query_stop - piece.query_start)

    started = []
    key_ext, value_ext = HaloExchange.apply(comm, plan, dim, started, key, value)
    pieces = overlap_pieces(plan)
    if pieces is None:  # one computation on the slab and its halo
        started[0].finish()
        whole = Piece(plan.query_start, plan.query_stop, plan.key_start, plan.key_stop)
        out, lse = attend(whole, query, key_ext, value_ext, plan.key_start)
    else:  # the interior while the halo travels, then the borders
        interior, left, right = pieces
        parts = {"interior": attend(interior, rows_of(interior), key, value, plan.query_start)}
        started[0].finish()
        for name, piece in (("left", left), ("right", right)):
            if piece is not None:
                parts[name] = attend(piece, rows_of(piece), key_ext, value_ext, plan.key_start)
        ordered = [parts[name] for name in ("left", "interior", "right") if name in parts]
        out = torch.cat([o for o, _ in ordered], dim=dim)
        lse = torch.cat([lse for _, lse in ordered], dim=dim)
    return (out, lse) if return_lse else out
