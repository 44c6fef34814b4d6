"""One rank of a real gloo process group on loopback, running every context-parallel case of a world size.

Started by ``test_distributed_gloo.py`` (spawned processes); each rank puts one
``(rank, name, error or None)`` per case on the result queue, then ``(rank,
"done", None)``. Rank 0 compares the ranks' gathered results with one process.
"""

from __future__ import annotations

import os
import time
import traceback


def _case_error(fn) -> str | None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - reported to the test process
        return traceback.format_exc(limit=6)
    return None


def _compare(case, backend, dist):
    from distributed_cases import check, full_result, rank_result

    mine = rank_result(case, None, backend)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() == 0:
        check(case, gathered, full_result(case))


def _mismatch(dist):
    """Rank 1 passes other head counts: every rank must raise the same ValueError (no hang)."""
    import torch

    from na_rtc import distributed as cp

    heads = 4 if dist.get_rank() == 1 else 2
    q, k, v = (torch.randn(1, 8, heads, 4) for _ in range(3))
    try:
        cp.na1d(q, k, v, 5)
    except ValueError as exc:
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, str(exc))
        assert len(set(messages)) == 1 and "rank 1's query" in messages[0], messages
        return
    raise AssertionError("no ValueError")


def _changing_lengths(dist):
    """The global length changes while some ranks' slabs do not (16 rows: 6, 5, 5 over three ranks; 15 rows:
    5, 5, 5): every call agrees on the layout first, so nothing hangs and every result is right."""
    import torch

    import na_rtc
    from na_rtc import distributed as cp

    torch.manual_seed(1)
    for n in (16, 15, 16, 14):
        q, k, v = (torch.randn(1, n, 2, 4, dtype=torch.float64) for _ in range(3))
        out = cp.gather(cp.na1d(*(cp.shard(t) for t in (q, k, v)), 5, backend="reference"))
        torch.testing.assert_close(out, na_rtc.na1d(q, k, v, 5, backend="reference"), atol=1e-10, rtol=1e-10)


def _round_trip(dist):
    import torch

    from na_rtc import distributed as cp

    x = torch.arange(2 * 7 * 5 * 3, dtype=torch.float32).reshape(2, 7, 5, 3)
    for dim in (0, 1):
        slab = cp.shard(x, dim)
        assert torch.equal(cp.gather(slab, dim), x)


def _compiled_layer(dist):
    """torch.compile of a context-parallel layer runs (the op is a graph break: torch.compiler.disable) and
    matches the eager layer."""
    import torch

    import na_rtc
    from na_rtc import distributed as cp

    torch.manual_seed(0)
    layer = na_rtc.NeighborhoodAttention1D(8, 2, 5, rel_pos_bias=True, process_group=dist.group.WORLD)
    x = cp.shard(torch.randn(1, 13, 8))
    eager = layer(x)
    compiled = torch.compile(layer)(x)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)  # float32 forward, the tolerance table


def main(rank: int, world: int, store: str, queue) -> None:
    os.environ["NA_RTC_EMULATOR_THREADS"] = "1"
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        from test_distributed_gloo import gloo_cases

        for name, kind, case in gloo_cases(world):
            started = time.perf_counter()
            if kind in ("reference", "emulator"):
                error = _case_error(lambda: _compare(case, kind, dist))
            else:
                error = _case_error(lambda: globals()[kind](dist))
            queue.put((rank, name, error, time.perf_counter() - started))
    finally:
        queue.put((rank, "done", None, 0.0))
        dist.destroy_process_group()
