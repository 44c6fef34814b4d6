"""Context parallelism: neighborhood attention over a torch.distributed process group.

Every rank holds a contiguous slab of one spatial axis (``shard_dim``; 0 is the
first spatial axis) of query, key and value, in rank order; every other
dimension is the same on every rank. ``na1d``/``na2d``/``na3d`` compute the
same function as :func:`na_rtc.na1d` (...) on the concatenated tensors and
return this rank's slab of the output (and logsumexp); through autograd each
rank gets the gradients of its own slabs. A rank exchanges only the key/value
rows its windows reach across the slab borders (the halo, from the window
math), never the sequence; slabs may be uneven and thinner than the halo.

Replicated inputs (``rpb``, the additional tokens, a layer's weights) get each
rank's share of their gradient: all-reduce them with ``SUM`` (as data-parallel
training does) to get the single-process gradient of the summed loss.

torch only; NCCL on GPUs (every tensor on the rank's current CUDA device) or
gloo on CPUs. Every call starts with a small all-gather on which the ranks
agree about the layout; shapes and arguments are validated collectively once
per layout, so a bad input on one rank raises the same error on every rank
(:mod:`.validate`).
"""

from __future__ import annotations

import torch

from . import validate
from .comm import Communicator, ProcessGroupCommunicator, communicator
from .exchange import TRAFFIC, pack_rows, row_bytes, unpack_rows
from .ops import context_parallel

__all__ = ["na1d", "na2d", "na3d", "shard", "gather", "bytes_exchanged", "reset_bytes_exchanged",
           "Communicator", "ProcessGroupCommunicator"]


def na1d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, rpb=None,
         return_lse=False, *, additional_keys=None, additional_values=None, group=None, shard_dim=0, backend=None):
    """Context-parallel :func:`na_rtc.na1d`: this rank's slab of the sequence in, its slab of the output out.

    Every rank of ``group`` calls it (a collective), each with its own contiguous
    slab of the sequence, in rank order; slabs may be uneven and thinner than the
    window. The other arguments are :func:`na_rtc.na1d`'s, with its dtypes and
    rules, checked on the whole sequence; ``rpb`` and the additional tokens are
    replicated (the same on every rank).

    :param query: this rank's slab ``[batch, rows, heads, head_dim]``, a torch
        tensor (NCCL: on the rank's current CUDA device; gloo: on the CPU).
    :param key: ``[batch, rows, heads_kv, head_dim]``, the same rows.
    :param value: ``[batch, rows, heads_kv, head_dim_v]``, the same rows.
    :param group: a torch.distributed process group (``None``: the default one).
    :param shard_dim: the spatial axis the slabs split (0 in 1D).
    :returns: this rank's slab of the output ``[batch, rows, heads, head_dim_v]``
        (and, with ``return_lse=True``, of the logsumexp ``[batch, rows, heads]``),
        equal to the same rows of :func:`na_rtc.na1d` on the concatenated slabs;
        differentiable, each rank getting the gradients of its own slabs.
    :raises TypeError: as :func:`na_rtc.na1d`, or a ``group`` that is not a
        process group; raised on every rank alike.
    :raises ValueError: as :func:`na_rtc.na1d` for the concatenated slabs, ranks
        whose arguments or shapes differ other than in the slab's length,
        ``shard_dim`` outside the spatial axes, or torch.distributed not
        initialized; raised on every rank alike.
    """
    return context_parallel(1, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
                            return_lse, additional_keys, additional_values, group, shard_dim, backend)


def na2d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, rpb=None,
         return_lse=False, *, additional_keys=None, additional_values=None, group=None, shard_dim=0, backend=None):
    """Context-parallel :func:`na_rtc.na2d`: as :func:`na1d`, on slabs ``[batch, height, width, heads, head_dim]``.

    ``shard_dim`` 0 splits rows (height), 1 columns (width); the slab's length
    along it may differ between ranks, every other dimension may not. Returns this
    rank's slab of :func:`na_rtc.na2d`'s output (and logsumexp); raises as
    :func:`na1d`.
    """
    return context_parallel(2, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
                            return_lse, additional_keys, additional_values, group, shard_dim, backend)


def na3d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, rpb=None,
         return_lse=False, *, additional_keys=None, additional_values=None, group=None, shard_dim=0, backend=None):
    """Context-parallel :func:`na_rtc.na3d`: as :func:`na1d`, on slabs ``[batch, depth, height, width, heads, head_dim]``.

    ``shard_dim`` 0 splits depth (time), 1 height, 2 width. Returns this rank's
    slab of :func:`na_rtc.na3d`'s output (and logsumexp); raises as :func:`na1d`.
    """
    return context_parallel(3, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
                            return_lse, additional_keys, additional_values, group, shard_dim, backend)


def _spatial_dim(x, shard_dim) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch tensor, got {type(x).__qualname__}")
    if (error := validate.shard_dim_error(shard_dim, x.dim() - 2)) is not None:
        raise ValueError(f"{error} (x is [batch, *spatial, ...] with shape {tuple(x.shape)})")
    return 1 + shard_dim


def shard(x, shard_dim=0, group=None):
    """This rank's contiguous slab of the full tensor ``x`` along spatial axis ``shard_dim``.

    ``torch.tensor_split(x, world_size, dim=1 + shard_dim)[rank]``: the first
    ``length % world_size`` ranks get one row more. A view, differentiable.

    :param x: the full tensor, the same on every rank, any dtype:
        ``[batch, *spatial, heads, head_dim]`` or a layer's input ``[batch,
        *spatial, embed_dim]``.
    :param shard_dim: the spatial axis to split (0 is the first).
    :param group: a torch.distributed process group (``None``: the default one).
    :returns: the slab, a view of ``x``.
    :raises TypeError: ``x`` is not a torch tensor, or ``group`` not a process
        group.
    :raises ValueError: ``shard_dim`` is not a spatial axis of ``x``, or
        torch.distributed is not initialized.
    """
    dim = _spatial_dim(x, shard_dim)
    comm = communicator(group)
    return torch.tensor_split(x, comm.size, dim=dim)[comm.rank]


def gather(x, shard_dim=0, group=None):
    """The full tensor from every rank's slab ``x`` along spatial axis ``shard_dim``, in rank order.

    A collective: every rank calls it and gets the whole tensor. Slabs may be
    uneven. Not differentiable (a result for checks and logging: the gradient of a
    slab is that rank's own).

    :param x: this rank's slab, a torch tensor ``[batch, *spatial, ...]``; every
        dimension but ``shard_dim``'s, and the dtype, the same on every rank.
    :param shard_dim: the spatial axis the slabs split.
    :param group: a torch.distributed process group (``None``: the default one).
    :returns: the concatenated tensor, on ``x``'s device.
    :raises TypeError: ``x`` is not a torch tensor, or ``group`` not a process
        group.
    :raises ValueError: ``shard_dim`` is not a spatial axis of ``x``, slabs that
        differ in dtype or in another dimension, or torch.distributed not
        initialized.
    """
    dim = _spatial_dim(x, shard_dim)
    comm = communicator(group)
    shapes = comm.all_gather_object((tuple(x.shape), str(x.dtype)))
    for rank, (shape, dtype) in enumerate(shapes):
        if dtype != shapes[0][1] or shape[:dim] + shape[dim + 1:] != shapes[0][0][:dim] + shapes[0][0][dim + 1:]:
            raise ValueError(f"gather: rank {rank}'s slab is {shape} {dtype} but rank 0's is {shapes[0][0]} "
                             f"{shapes[0][1]}: slabs may differ only along shard_dim {shard_dim}")
    x = x.detach()
    mine = pack_rows([x], dim, torch.arange(x.shape[dim], device=x.device))
    peers = [r for r in range(comm.size) if r != comm.rank]
    receives = [(r, torch.empty(row_bytes(x, dim) * shapes[r][0][dim], dtype=torch.uint8, device=x.device))
                for r in peers]
    comm.exchange([(r, mine) for r in peers], receives).wait()
    parts = {comm.rank: x}
    for r, buffer in receives:
        parts[r] = unpack_rows(buffer, [x], dim, shapes[r][0][dim])[0]
    return torch.cat([parts[r] for r in range(comm.size)], dim=dim)


def bytes_exchanged() -> dict:
    """Bytes this process sent and received in halo exchanges since the last :func:`reset_bytes_exchanged`.

    Forward and backward exchanges both count. Raises nothing.

    :returns: ``{"sent": int, "received": int}``.
    """
    return {"sent": TRAFFIC.sent, "received": TRAFFIC.received}


def reset_bytes_exchanged() -> None:
    """Start counting :func:`bytes_exchanged` from zero."""
    TRAFFIC.reset()
