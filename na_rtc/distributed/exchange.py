"""The halo exchange: slab rows to the ranks whose windows read them, and their gradients back.

:class:`HaloExchange` is an autograd Function. Forward, it sends each peer the
rows of this rank's slab that the peer's windows read and receives the rows
its own windows read from their owners, and returns tensors over the local
axis of the plan (``[key_start, key_stop)`` on the shard dimension): the slab,
the received rows, zeros for rows no window of this rank reads. Backward is
the same exchange reversed: the gradient of each received row goes back to
its owner, which adds it to its own rows' gradient (one peer after another,
so the sum is deterministic).

All tensors of one call travel in one byte buffer per peer and direction
(rows packed contiguously, whatever the shard dimension), so a rank posts at
most one send and one receive per peer.
"""

from __future__ import annotations

import functools
import math

import torch

from .halo import HaloPlan

__all__ = ["HaloExchange", "PendingHalo", "Traffic", "TRAFFIC", "pack_rows", "row_bytes", "unpack_rows"]


class Traffic:
    """Bytes this process sent and received in halo exchanges (forward and backward), since the last reset."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sent = self.received = 0

    def count(self, sends, receives) -> None:
        self.sent += sum(buffer.numel() for _, buffer in sends)
        self.received += sum(buffer.numel() for _, buffer in receives)


TRAFFIC = Traffic()


def row_bytes(t: torch.Tensor, dim: int) -> int:
    """Bytes of one row of ``t`` along ``dim`` (whatever its length there, zero included)."""
    return math.prod(t.shape[:dim] + t.shape[dim + 1:]) * t.element_size()


def pack_rows(tensors, dim: int, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of every tensor along ``dim``, as one contiguous uint8 buffer."""
    parts = [t.index_select(dim, index).contiguous().view(-1).view(torch.uint8) for t in tensors]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def unpack_rows(buffer: torch.Tensor, templates, dim: int, rows: int):
    """The tensors :func:`pack_rows` packed into ``buffer``: ``templates`` give dtype and shape (the shard
    dimension ``dim`` holding ``rows``)."""
    out, offset = [], 0
    for t in templates:
        shape = list(t.shape)
        shape[dim] = rows
        size = math.prod(shape) * t.element_size()
        out.append(buffer[offset:offset + size].view(t.dtype).view(shape))
        offset += size
    return out


def _receive_buffers(templates, dim: int, peers_rows, device):
    return [(peer, torch.empty(len(rows) * sum(row_bytes(t, dim) for t in templates), dtype=torch.uint8,
                               device=device)) for peer, rows in peers_rows]


@functools.lru_cache(maxsize=256)
def _index(rows: tuple, offset: int, device) -> torch.Tensor:
    """Rows (global) less ``offset`` as an index tensor on ``device``, built once per plan and device: every
    step's exchange, forward and backward, reuses it instead of copying the rows to the device again."""
    return torch.tensor(rows, dtype=torch.long, device=device) - offset


class PendingHalo:
    """A forward exchange in flight: the tensors over the local axis hold the slab (zeros elsewhere) until
    :meth:`finish` waits for the received rows and writes them in."""

    def __init__(self, comm, plan: HaloPlan, dim: int, tensors):
        device = tensors[0].device
        sends = [(peer, pack_rows(tensors, dim, _index(rows, plan.query_start, device)))
                 for peer, rows in plan.sends]
        self._receives = _receive_buffers(tensors, dim, plan.receives, device)
        TRAFFIC.count(sends, self._receives)
        self._pending = comm.exchange(sends, self._receives)
        self._sends = sends  # alive until the exchange completes, whatever the backend keeps
        self._plan, self._dim, self._templates = plan, dim, tensors
        self.extended = []
        for t in tensors:
            shape = list(t.shape)
            shape[dim] = plan.key_stop - plan.key_start
            e = t.new_zeros(shape)
            e.narrow(dim, plan.query_start - plan.key_start, t.shape[dim]).copy_(t)
            self.extended.append(e)

    def finish(self) -> None:
        if self._pending is None:
            return
        self._pending.wait()
        self._pending = self._sends = None
        with torch.no_grad():  # the received rows are data: the exchange's backward returns their gradients
            for (_, rows), (_, buffer) in zip(self._plan.receives, self._receives):
                index = _index(rows, self._plan.key_start, buffer.device)
                for e, part in zip(self.extended, unpack_rows(buffer, self._templates, self._dim, len(rows))):
                    e.index_copy_(self._dim, index, part)


def exchange_backward(comm, plan: HaloPlan, dim: int, grads):
    """Gradients of the slabs from gradients over the local axis: own rows, plus what every peer read."""
    device = grads[0].device
    n = plan.query_stop - plan.query_start
    sends = [(owner, pack_rows(grads, dim, _index(rows, plan.key_start, device))) for owner, rows in plan.receives]
    receives = _receive_buffers(grads, dim, plan.sends, device)
    TRAFFIC.count(sends, receives)
    pending = comm.exchange(sends, receives)
    own = [g.narrow(dim, plan.query_start - plan.key_start, n).clone() for g in grads]
    pending.wait()
    for (peer, rows), (_, buffer) in zip(plan.sends, receives):
        index = _index(rows, plan.query_start, device)
        for g, part in zip(own, unpack_rows(buffer, grads, dim, len(rows))):
            g.index_add_(dim, index, part)
    return own


class HaloExchange(torch.autograd.Function):
    """``apply(comm, plan, dim, started, *slabs)`` -> the slabs over the plan's local axis, differentiable.

    The forward starts the exchange and returns at once: the received rows are in the outputs only after
    ``started[0].finish()`` (``started`` is an empty list the forward appends its :class:`PendingHalo` to),
    so that the caller can compute what needs no halo in between."""

    @staticmethod
    def forward(ctx, comm, plan, dim, started, *slabs):
        ctx.comm, ctx.plan, ctx.dim = comm, plan, dim
        pending = PendingHalo(comm, plan, dim, slabs)
        started.append(pending)
        return tuple(pending.extended)

    @staticmethod
    def backward(ctx, *grads):
        # autograd materializes the gradients of unused outputs as zeros: every one is a tensor
        return (None, None, None, None, *exchange_backward(ctx.comm, ctx.plan, ctx.dim, grads))
