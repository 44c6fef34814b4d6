"""The communication context parallelism needs, over a torch.distributed process group.

Two operations: gathering one small Python object from every rank (collective
validation, slab lengths) and a point-to-point exchange of byte buffers with
some peers (halo rows forward, their gradients backward), issued
asynchronously. :class:`ProcessGroupCommunicator` implements them on a
``torch.distributed`` group (NCCL, gloo, ...); anything with the same methods
(a :class:`Communicator`) can be passed as ``group=`` instead, which is how the
tests run many virtual ranks in one process.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["Communicator", "ProcessGroupCommunicator", "communicator"]


class PendingExchange(Protocol):
    def wait(self) -> None:
        """Block until every buffer of the exchange is sent and received."""


@runtime_checkable
class Communicator(Protocol):
    """What :mod:`na_rtc.distributed` asks of a group of ranks (a protocol).

    Pass an object with these attributes and methods as ``group`` to use another
    transport than torch.distributed (a simulated group, for instance).
    :class:`ProcessGroupCommunicator` is the one for a torch.distributed group.

    :ivar rank: this rank's index in the group, ``0 <= rank < size``.
    :ivar size: the number of ranks.
    """

    rank: int
    size: int

    def all_gather_object(self, obj) -> list:
        """``obj`` of every rank, in rank order (a collective: every rank calls it)."""

    def exchange(self, sends, receives) -> PendingExchange:
        """Start sending each ``(peer, uint8 tensor)`` of ``sends`` and receiving into each ``(peer, uint8
        tensor)`` of ``receives``; every peer posts the matching calls. Returns what to wait on."""

    def key(self):
        """What identifies the group in the validation cache (hashable)."""


class _Done:
    def wait(self) -> None:
        return None


class _Requests:
    def __init__(self, requests):
        self._requests = requests

    def wait(self) -> None:
        for request in self._requests:
            request.wait()


class ProcessGroupCommunicator:
    """:class:`Communicator` on a torch.distributed process group.

    :param group: the process group (``None``: the default group). torch.distributed
        must be initialized (``torch.distributed.init_process_group``; torchrun
        sets up its environment).
    :raises ValueError: torch.distributed is not available or not initialized.
    """

    def __init__(self, group=None):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("group: torch.distributed is not initialized; call torch.distributed."
                             "init_process_group first (torchrun sets up its environment), or pass group=")
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self._dist = dist

    def all_gather_object(self, obj) -> list:
        """As :meth:`Communicator.all_gather_object`."""
        gathered = [None] * self.size
        self._dist.all_gather_object(gathered, obj, group=self.group)
        return gathered

    def exchange(self, sends, receives) -> PendingExchange:
        """As :meth:`Communicator.exchange`: batched ``isend``/``irecv`` on the group."""
        dist = self._dist
        ops = [dist.P2POp(dist.isend, buffer, group=self.group, group_peer=peer) for peer, buffer in sends]
        ops += [dist.P2POp(dist.irecv, buffer, group=self.group, group_peer=peer) for peer, buffer in receives]
        if not ops:
            return _Done()
        return _Requests(dist.batch_isend_irecv(ops))

    def key(self):
        """What identifies the group in the validation cache."""
        return ("process_group", id(self.group), self.rank, self.size)


def communicator(group) -> Communicator:
    """The :class:`Communicator` for ``group``: a torch.distributed group (``None``: the default one) or a
    communicator passed through."""
    if group is not None and not _is_process_group(group):
        if isinstance(group, Communicator):
            return group
        raise TypeError(f"group: expected a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    return ProcessGroupCommunicator(group)


def _is_process_group(group) -> bool:
    import torch.distributed as dist

    return dist.is_available() and isinstance(group, dist.ProcessGroup)
