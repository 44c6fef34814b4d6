"""Context parallelism (na_rtc.distributed) on simulated groups: N virtual ranks in one process.

The library code runs unchanged; only the communicator is the in-process one
of ``simulated_group.py`` (sends delivered by copying). Real gloo process
groups run in ``test_distributed_gloo.py``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import na_rtc
from na_rtc import distributed as cp
from na_rtc.distributed.halo import needed_rows, plan_halo
from na_rtc.window import Axis, is_neighbor, window

from helpers import assert_close
from distributed_cases import Case, check, full_result, predicted_bytes_sent, rank_result
from simulated_group import run_ranks

# ---------------------------------------------------------------- planning


def _random_lengths(rng, length: int, world: int) -> tuple[int, ...]:
    cuts = np.sort(rng.integers(0, length + 1, world - 1))
    return tuple(int(n) for n in np.diff(np.concatenate([[0], cuts, [length]])))


def _axes(max_length: int):
    for length in range(2, max_length):
        for k in range(2, 7):
            for d in (1, 2, 3):
                if k * d > length:
                    continue
                for s in range(1, k + 1):
                    for causal in (False, True):
                        yield Axis(length, k, s, d, causal)


def test_plans_reproduce_global_windows_and_receive_exactly_the_halo():
    """Every slab of every split of short axes (2 to 5 ranks, uneven, thin and empty slabs): the local axis
    holds the slab, gives each query its global window (plan_halo checks it and raises otherwise), and the
    rows received are exactly the keys the slab's windows reach outside it (brute force over all pairs)."""
    rng = np.random.default_rng(0)
    plans = 0
    for axis in _axes(22):
        keys = np.arange(axis.length)
        for world in (2, 3, 5):
            lengths = _random_lengths(rng, axis.length, world)
            bounds = np.concatenate([[0], np.cumsum(lengths)])
            for rank in range(world):
                plan = plan_halo(axis, lengths, rank)
                lo, hi = bounds[rank], bounds[rank + 1]
                assert plan.key_start <= lo and hi <= plan.key_stop <= axis.length
                assert plan.key_start % (axis.dilation * axis.stride) == 0
                assert plan.key_stop - plan.key_start >= axis.kernel_size * axis.dilation
                queries = np.arange(lo, hi)
                reached = set(keys[is_neighbor(axis, queries[:, None], keys[None, :]).any(0)]) if hi > lo else set()
                received = {r for _, rows in plan.receives for r in rows}
                assert received == reached - set(range(lo, hi)), (axis, lengths, rank)
                for owner, rows in plan.receives:
                    assert all(bounds[owner] <= r < bounds[owner + 1] for r in rows)
                plans += 1
    assert plans > 10000


def test_sends_mirror_receives():
    axis = Axis(40, 7, 2, 2, False)
    lengths = (3, 20, 1, 16)
    plans = [plan_halo(axis, lengths, r) for r in range(4)]
    for plan in plans:
        for peer, rows in plan.sends:
            assert dict(plans[peer].receives)[plan.rank] == rows


def test_causal_halo_is_on_the_left_only():
    axis = Axis(64, 9, 3, 2, True)
    lengths = (10, 30, 24)
    for rank in range(3):
        plan = plan_halo(axis, lengths, rank)
        assert all(owner < rank for owner, _ in plan.receives)
        assert all(peer > rank for peer, _ in plan.sends)


def test_needed_rows_are_the_union_of_windows():
    axis = Axis(31, 5, 3, 3, False)
    starts, ends = window(axis, np.arange(7, 19))
    expected = sorted({(j * 3 + i % 3) for i, s, e in zip(range(7, 19), starts, ends) for j in range(s, e)})
    assert list(needed_rows(axis, 7, 19)) == expected


# ---------------------------------------------------------------- results against one process

CASES = [
    Case((23,), (5,), (9, 14)),
    Case((23,), (5,), (3, 2, 18), stride=(3,), label="1d-thin-slabs-stride3"),
    Case((30,), (4,), (7, 8, 7, 8), dilation=(3,), causal=(True,)),
    Case((26,), (7,), (1, 0, 12, 2, 11), stride=(2,), dilation=(2,), rpb=True, label="1d-5ranks-empty-slab-rpb"),
    Case((21,), (6,), (10, 11), stride=(6,), causal=(True,), heads=4, heads_kv=1),
    Case((13, 9), (5, 3), (6, 2, 5), stride=(2, 1), dilation=(2, 1), rpb=True),
    Case((11, 12), (3, 5), (4, 4, 4), shard_dim=1, dilation=(1, 2), heads=4, heads_kv=2, head_dim_v=6),
    Case((12, 10), (5, 3), (5, 7), causal=(True, False), extra=3),
    Case((10, 9), (4, 3), (2, 3, 2, 2), shard_dim=1, stride=(2, 3), extra=2, heads=4, heads_kv=2,
         label="2d-4ranks-thin-dim1-stride-extra-gqa"),
    Case((7, 6, 8), (3, 3, 5), (2, 5), stride=(1, 2, 1), rpb=True),
    Case((6, 9, 5), (3, 3, 2), (3, 2, 4), shard_dim=1, dilation=(2, 3, 1), causal=(False, True, False)),
    Case((5, 6, 11), (2, 3, 3), (4, 3, 4), shard_dim=2, extra=2, head_dim_v=3, heads=2, heads_kv=1),
    # slabs wide enough for the interior to run while the halo travels (the cases above mostly are not)
    Case((200,), (5,), (90, 110), stride=(2,), dilation=(2,), causal=(True,)),
    Case((320, 3), (5, 3), (160, 160), dilation=(2, 1), rpb=True, extra=2),
    Case((90, 3, 2), (3, 3, 2), (40, 50), stride=(3, 1, 1), heads=2, heads_kv=1),
]


@pytest.fixture(scope="module")
def full_results():
    return {}


@pytest.mark.parametrize("case", CASES, ids=Case.id)
def test_slabs_equal_one_process(case, full_results):
    """Output, logsumexp and every gradient (query, key, value slabs; rpb and extra tokens summed over the
    ranks) against the float64 reference on the full tensors; the bytes each rank sends are the halo."""
    ranks = run_ranks(case.world, lambda comm: rank_result(case, comm, "reference"))
    check(case, ranks, full_result(case))
    assert run_ranks.last_world.bytes_sent == predicted_bytes_sent(case)


EMULATOR_CASES = [
    Case((19,), (5,), (8, 11), stride=(2,), dtype=torch.float32, heads=2, head_dim=8, label="emulator-1d"),
    Case((9, 10), (3, 5), (3, 3, 3), dilation=(2, 1), rpb=True, dtype=torch.float32, head_dim=8,
         label="emulator-2d-rpb"),
    Case((5, 6, 6), (3, 3, 3), (2, 3), causal=(True, False, False), extra=2, heads=2, heads_kv=1,
         dtype=torch.float32, head_dim=8, label="emulator-3d-causal-extra-mqa"),
]


@pytest.mark.parametrize("case", EMULATOR_CASES, ids=Case.id)
def test_slabs_equal_one_process_on_the_kernels(case):
    ranks = run_ranks(case.world, lambda comm: rank_result(case, comm, "emulator"))
    check(case, ranks, full_result(case))


def test_the_interior_is_computed_while_the_halo_travels(monkeypatch):
    """Order on every rank: the exchange is issued, the interior computed, the exchange awaited, the border
    computed; the result is still one process's."""
    import threading

    from na_rtc.distributed import ops

    case = Case((256,), (7,), (128, 128))
    current = threading.local()
    fused = ops.functional._fused

    def recording(ndim, query, *args, **kwargs):
        if hasattr(current, "events"):  # a virtual rank's call (the single-process reference is not one)
            current.events.append(f"compute {query.shape[1]} rows")
        return fused(ndim, query, *args, **kwargs)

    monkeypatch.setattr(ops.functional, "_fused", recording)

    def rank(comm):
        current.events = comm.world.events[comm.rank]
        return rank_result(case, comm, "reference")

    check(case, run_ranks(2, rank), full_result(case))
    for events in run_ranks.last_world.events:
        forward = events[:events.index("wait") + 2]
        # the op gets the slab's own rows, each once: 125 interior, 3 border (a query box of the local axis)
        assert forward == ["all_gather", "all_gather", "exchange", "compute 125 rows", "wait", "compute 3 rows"], events


def test_replicated_gradients_exist_on_a_rank_without_rows():
    """A rank whose slab is empty still returns gradients (zeros) for the replicated inputs, so that their
    all-reduce has a tensor on every rank."""
    case = Case((12,), (3,), (6, 0, 6), rpb=True, extra=2)
    ranks = run_ranks(3, lambda comm: rank_result(case, comm, "reference"))
    assert ranks[1]["out"].shape[1] == 0
    for name in ("rpb", "additional_keys", "additional_values"):
        assert ranks[1][name] is not None and not ranks[1][name].any()


# ---------------------------------------------------------------- validation


def _errors(world, fn):
    """``fn(comm)`` on every rank; each rank's exception (or None)."""
    def body(comm):
        try:
            fn(comm)
        except (ValueError, TypeError) as exc:
            return exc
        return None
    return run_ranks(world, body)


def _qkv(length=16, heads=2, dim=4):
    return [torch.randn(1, length, heads, dim, dtype=torch.float64) for _ in range(3)]


def test_a_mismatched_rank_raises_on_every_rank():
    def fn(comm):
        q, k, v = _qkv(8, heads=2 if comm.rank != 1 else 4)
        cp.na1d(q, k, v, 5, group=comm, backend="reference")
    errors = _errors(3, fn)
    assert all(isinstance(e, ValueError) for e in errors)
    assert len({str(e) for e in errors}) == 1
    assert "rank 1's query" in str(errors[0])


def test_a_local_error_raises_on_every_rank():
    def fn(comm):
        q, k, v = _qkv(8)
        if comm.rank == 2:
            k = k[:, :5]
        cp.na1d(q, k, v, 5, group=comm, backend="reference")
    errors = _errors(3, fn)
    assert all(isinstance(e, ValueError) for e in errors) and len({str(e) for e in errors}) == 1
    assert "rank 2" in str(errors[0]) and "key's slab" in str(errors[0])


def test_the_global_problem_is_checked_on_every_rank():
    def fn(comm):
        q, k, v = _qkv(3)
        cp.na1d(q, k, v, 7, group=comm, backend="reference")  # 6 rows in all, kernel 7
    errors = _errors(2, fn)
    assert all(isinstance(e, ValueError) for e in errors) and len({str(e) for e in errors}) == 1
    assert "kernel_size" in str(errors[0]) and "slab lengths (3, 3)" in str(errors[0])


def test_validation_runs_once_per_signature():
    """One small all-gather a call (slab lengths and digests), the full check once per signature."""
    def fn(comm):
        q, k, v = _qkv(9)
        for _ in range(3):
            cp.na1d(q, k, v, 5, group=comm, backend="reference")
        cp.na1d(q, k, v, 3, group=comm, backend="reference")
    run_ranks(2, fn)
    for events in run_ranks.last_world.events:
        assert events.count("all_gather") == 4 + 2


def test_slab_lengths_may_change_on_some_ranks_only():
    """16 rows over three ranks are 6, 5, 5; then 15 rows are 5, 5, 5: ranks 1 and 2 see the same call as
    before, yet the layout changed (a cache keyed by a rank's own view would hang or run a stale plan)."""
    full = {n: [torch.randn(1, n, 2, 4, dtype=torch.float64) for _ in range(3)] for n in (16, 15)}

    def fn(comm):
        outs = []
        for n in (16, 15, 16):
            q, k, v = (cp.shard(t, 0, comm) for t in full[n])
            outs.append(cp.na1d(q, k, v, 5, group=comm, backend="reference"))
        return outs

    ranks = run_ranks(3, fn)
    for i, n in enumerate((16, 15, 16)):
        got = torch.cat([r[i] for r in ranks], dim=1)
        assert_close(got, na_rtc.na1d(*full[n], 5, backend="reference"), "float64", "forward", f"{n} rows")


@pytest.mark.parametrize("shard_dim", [-1, 1, 0.0, True])
def test_bad_shard_dim(shard_dim):
    errors = _errors(2, lambda comm: cp.na1d(*_qkv(), 5, group=comm, shard_dim=shard_dim))
    assert all(isinstance(e, ValueError) and "shard_dim" in str(e) for e in errors)


def test_bad_group_and_array_kinds():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="group"):
        cp.na1d(q, k, v, 5, group="world")
    errors = _errors(2, lambda comm: cp.na1d(q.numpy(), k, v, 5, group=comm))
    assert all(isinstance(e, TypeError) and "torch" in str(e) for e in errors)


def test_device_rules_of_the_communication_backend():
    """gloo exchanges CPU tensors only, NCCL tensors on the rank's current CUDA device: every rank raises."""
    def fn(comm):
        comm.backend = "gloo"
        q, k, v = (t.to("meta") for t in _qkv())
        cp.na1d(q, k, v, 5, group=comm)
    errors = _errors(2, fn)
    assert all(isinstance(e, ValueError) and "gloo group exchanges CPU tensors only" in str(e) for e in errors)

    def nccl(comm):
        comm.backend = "nccl"
        cp.na1d(*_qkv(), 5, group=comm)
    errors = _errors(2, nccl)
    assert all(isinstance(e, ValueError) and "with NCCL every tensor must be on the rank's current CUDA device"
               in str(e) for e in errors)


def test_uninitialized_default_group():
    if torch.distributed.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(ValueError, match="init_process_group"):
        cp.na1d(*_qkv(), 5)


# ---------------------------------------------------------------- shard and gather


@pytest.mark.parametrize("shard_dim", [0, 1])
def test_shard_gather_round_trip(shard_dim):
    x = torch.randn(2, 7, 5, 3)
    slabs = run_ranks(3, lambda comm: cp.shard(x, shard_dim, comm))
    assert [s.shape[1 + shard_dim] for s in slabs] == [len(t) for t in np.array_split(range(x.shape[1 + shard_dim]), 3)]
    gathered = run_ranks(3, lambda comm: cp.gather(slabs[comm.rank], shard_dim, comm))
    for g in gathered:
        assert torch.equal(g, x)


def test_gather_rejects_mismatched_slabs():
    errors = _errors(2, lambda comm: cp.gather(torch.zeros(1, 3, 2 + comm.rank, 4), 0, comm))
    assert all(isinstance(e, ValueError) and "rank 1's slab" in str(e) for e in errors)


# ---------------------------------------------------------------- layers


@pytest.mark.parametrize("cls,shape,kwargs,shard_dim", [
    (na_rtc.NeighborhoodAttention1D, (2, 5, 8), dict(kernel_size=7, is_causal=True), 0),  # padded: 5 < 7
    (na_rtc.NeighborhoodAttention2D, (1, 6, 11, 8), dict(kernel_size=3, dilation=(1, 2), rel_pos_bias=True,
                                                          num_kv_heads=1), 1),
    (na_rtc.NeighborhoodAttention3D, (1, 7, 4, 4, 8), dict(kernel_size=3, stride=(2, 1, 1)), 0),
], ids=["1d-causal-padded", "2d-rpb-mqa-dim1", "3d-stride"])
def test_layer_with_a_process_group(cls, shape, kwargs, shard_dim):
    torch.manual_seed(0)
    layer = cls(8, 2, **kwargs).double()
    x, weights = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    (layer(leaf) * weights).sum().backward()
    expected = {"out": layer(x).detach(), "x": leaf.grad, **{n: p.grad.clone() for n, p in layer.named_parameters()}}

    def rank(comm):
        mine = copy.deepcopy(layer)
        mine.zero_grad()
        mine.process_group, mine.shard_dim = comm, shard_dim
        xs = cp.shard(x, shard_dim, comm).clone().requires_grad_()
        out = mine(xs)
        (out * cp.shard(weights, shard_dim, comm)).sum().backward()
        return {"out": out.detach(), "x": xs.grad, **{n: p.grad for n, p in mine.named_parameters()}}

    ranks = run_ranks(3, rank)
    for name, want in expected.items():
        got = torch.cat([r[name] for r in ranks], 1 + shard_dim) if name in ("out", "x") else \
            sum(r[name] for r in ranks)
        assert_close(got, want, "float64", "forward" if name == "out" else "grad", name)


def test_layer_arguments():
    with pytest.raises(ValueError, match="shard_dim"):
        na_rtc.NeighborhoodAttention2D(8, 2, 3, shard_dim=2)
    layer = na_rtc.NeighborhoodAttention1D(8, 2, 3, attn_drop=0.1, process_group=object())
    with pytest.raises(ValueError, match="attn_drop"):
        layer(torch.randn(1, 6, 8))
    assert "context parallel over shard_dim=0" in repr(layer)


def test_a_layer_gathers_slab_lengths_once_per_call():
    """A context-parallel layer's call: one gather of slab lengths (its padding) and the op's layout
    agreement; the full check only on the first call."""
    layer = na_rtc.NeighborhoodAttention1D(8, 2, 3)

    def fn(comm):
        mine = copy.deepcopy(layer)
        mine.process_group = comm
        for _ in range(2):
            mine(torch.randn(1, 5, 8))
    run_ranks(2, fn)
    for events in run_ranks.last_world.events:
        assert events.count("all_gather") == 3 + 2
