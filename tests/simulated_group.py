"""N virtual ranks in one process, for testing context parallelism without torch.distributed.

Each rank runs in its own thread with a :class:`SimulatedCommunicator` (the
:class:`na_rtc.distributed.Communicator` protocol): sends are delivered by
copying the buffer into the receiver's mailbox, so the library code under test
is the code that runs on a real process group. Every call is recorded per rank
(bytes sent, the order of exchanges and waits), and every wait has a timeout,
so a test that would hang fails instead.
"""

from __future__ import annotations

import collections
import threading

TIMEOUT_S = 60.0


class SimulatedWorld:
    def __init__(self, size: int):
        self.size = size
        self.mail = collections.defaultdict(collections.deque)
        self.cond = threading.Condition()
        self.barrier = threading.Barrier(size, timeout=TIMEOUT_S)
        self.slots = [None] * size
        self.bytes_sent = [0] * size
        self.events = [[] for _ in range(size)]


class _Pending:
    def __init__(self, comm, receives):
        self.comm, self.receives = comm, receives

    def wait(self) -> None:
        world, rank = self.comm.world, self.comm.rank
        with world.cond:
            for peer, buffer in self.receives:
                box = world.mail[(peer, rank)]
                if not world.cond.wait_for(lambda: len(box) > 0, timeout=TIMEOUT_S):
                    raise TimeoutError(f"rank {rank} waited {TIMEOUT_S} s for rank {peer}")
                message = box.popleft()
                if message.numel() != buffer.numel():
                    raise ValueError(f"rank {rank} expected {buffer.numel()} bytes from rank {peer}, "
                                     f"got {message.numel()}")
                buffer.copy_(message)
        world.events[rank].append("wait")


class SimulatedCommunicator:
    def __init__(self, world: SimulatedWorld, rank: int):
        self.world, self.rank, self.size = world, rank, world.size

    def key(self):
        return ("simulated", id(self.world), self.rank, self.size)

    def all_gather_object(self, obj) -> list:
        world = self.world
        world.slots[self.rank] = obj
        world.barrier.wait()
        gathered = list(world.slots)
        world.barrier.wait()
        world.events[self.rank].append("all_gather")
        return gathered

    def exchange(self, sends, receives):
        world = self.world
        with world.cond:
            for peer, buffer in sends:
                world.mail[(self.rank, peer)].append(buffer.clone())
                world.bytes_sent[self.rank] += buffer.numel()
            world.cond.notify_all()
        world.events[self.rank].append("exchange")
        return _Pending(self, receives)


def run_ranks(size: int, fn):
    """``fn(communicator)`` on ``size`` virtual ranks at once; their results in rank order. The first
    exception of any rank is raised (the others are reported in its notes)."""
    world = SimulatedWorld(size)
    results, errors = [None] * size, [None] * size

    def body(rank):
        try:
            results[rank] = fn(SimulatedCommunicator(world, rank))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors[rank] = exc
            world.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S * 2)
        if t.is_alive():
            raise TimeoutError("a virtual rank did not finish")
    run_ranks.last_world = world
    failed = sorted((e for e in errors if e is not None), key=lambda e: isinstance(e, threading.BrokenBarrierError))
    if failed:
        raise failed[0]
    return results
