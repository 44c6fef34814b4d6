"""Context parallelism on real gloo process groups on loopback (spawned processes, one group per world size).

Each world size starts its processes once and runs all its cases in them
(``gloo_worker.py``): the reference backend for the broad set, the emulator
(the CUDA kernels on the CPU) for three fixed cases, a mismatched rank,
slab lengths that change on some ranks only, shard/gather, and torch.compile
of a context-parallel layer.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_module
import time

import pytest
import torch

from distributed_cases import Case
from test_distributed import CASES, EMULATOR_CASES

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

WORLDS = (2, 3)
TIMEOUT_S = 300


def _resized(case: Case, world: int) -> Case:
    """The case with its axis split evenly over ``world`` ranks (torch.tensor_split's lengths)."""
    length = case.spatial[case.shard_dim]
    lengths = tuple(length // world + (1 if r < length % world else 0) for r in range(world))
    return Case(**{**case.__dict__, "lengths": lengths, "label": case.label and f"{case.label}-{world}ranks"})


def gloo_cases(world: int):
    """``(name, kind, case)`` for one world size: kind is a backend or a check of gloo_worker.py."""
    cases = [(f"reference-{c.id()}", "reference", c) for c in CASES if c.world == world]
    cases += [(f"reference-{_resized(c, world).id()}", "reference", _resized(c, world)) for c in CASES[:6:2]]
    cases += [(_resized(c, world).id(), "emulator", _resized(c, world)) for c in EMULATOR_CASES]
    cases += [(name, name, None) for name in ("_mismatch", "_round_trip", "_changing_lengths")]
    if world == 2:
        cases.append(("_compiled_layer", "_compiled_layer", None))
    return cases


def _run_group(world: int, tmp_path_factory) -> dict:
    import gloo_worker

    store = tmp_path_factory.mktemp(f"gloo{world}") / "store"
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=gloo_worker.main, args=(r, world, str(store), results), daemon=True)
                 for r in range(world)]
    for p in processes:
        p.start()
    outcome, done, deadline = {}, 0, time.monotonic() + TIMEOUT_S
    while done < world:
        try:
            rank, name, error, seconds = results.get(timeout=max(1.0, deadline - time.monotonic()))
        except queue_module.Empty:
            break
        if name == "done":
            done += 1
        else:
            outcome.setdefault(name, {})[rank] = (error, seconds)
    for p in processes:
        p.join(10)
        if p.is_alive():
            p.kill()
    return outcome


_GROUPS: dict = {}


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    def get(world):
        if world not in _GROUPS:
            _GROUPS[world] = _run_group(world, tmp_path_factory)
        return _GROUPS[world]
    return get


@pytest.mark.parametrize("world,name", [(w, name) for w in WORLDS for name, _, _ in gloo_cases(w)])
def test_gloo_group(world, name, group_results):
    outcome = group_results(world).get(name)
    assert outcome is not None and len(outcome) == world, f"{name}: not every rank reported within {TIMEOUT_S} s"
    for rank, (error, _) in sorted(outcome.items()):
        assert error is None, f"rank {rank}:\n{error}"
