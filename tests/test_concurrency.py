"""Concurrency (issue 8, part 6): launches from several Python threads (and,
on the GPU, several torch streams) at once give the results of sequential
runs, bit for bit.

Threads start together behind a barrier and each runs a different problem
(1D/2D, fused and split, forward and backward, different dtypes), several
times, so kernel loading (in-memory caches cleared first), the caches and
the launches all race. The expected results come from the same calls made
one after another afterwards.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from helpers import make_inputs

import na_rtc

THREADS = 8
ROUNDS = 3


def _job(index: int, device: str):
    """A distinct problem per index, on ``device``: a callable returning a tuple of tensors."""
    rng = np.random.default_rng(100 + index)
    dtype = (torch.float32, torch.float16, torch.bfloat16)[index % 3]
    if index % 2:
        shape, kernel, fused, bwd = (1, 9, 7, 2, 16), (3, 3), na_rtc.na2d, na_rtc.na2d_backward
    else:
        shape, kernel, fused, bwd = (2, 23, 2, 32), 5, na_rtc.na1d, na_rtc.na1d_backward
    q, k, v, g = (x.to(device) for x in make_inputs(rng, shape, dtype, 4)[0])
    stride = 2 if index % 4 == 2 else 1

    def run(backend):
        out, lse = fused(q, k, v, kernel, stride=stride, return_lse=True, backend=backend)
        grads = bwd(g, q, k, v, kernel, stride=stride, output=out, logsumexp=lse, backend=backend)
        qk = (na_rtc.na1d_qk if len(shape) == 4 else na_rtc.na2d_qk)(q, k, kernel, backend=backend)
        return (out, lse, *grads[:3], qk)

    return run


def _race(backend: str, device: str = "cpu", streams: bool = False):
    jobs = [_job(i, device) for i in range(THREADS)]
    results: list = [[None] * ROUNDS for _ in jobs]
    errors: list = []
    start = threading.Barrier(len(jobs))

    def worker(i):
        try:
            stream = torch.cuda.Stream() if streams else None
            start.wait()
            for r in range(ROUNDS):
                if stream is not None:
                    with torch.cuda.stream(stream):
                        results[i][r] = jobs[i](backend)
                    stream.synchronize()
                else:
                    results[i][r] = jobs[i](backend)
        except BaseException as error:  # noqa: BLE001 - reported below with its thread
            errors.append((i, error))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    expected = [job(backend) for job in jobs]  # one after another, after the race
    for i, want in enumerate(expected):
        for r in range(ROUNDS):
            for a, b in zip(results[i][r], want):
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"thread {i}, round {r}"


@pytest.mark.skipif(not na_rtc.backends.get("emulator").probe()[0], reason="emulator needs a C++ compiler")
def test_threads_on_the_emulator_match_sequential_runs():
    from na_rtc.emulator import build

    build.clear_memory_cache()  # the threads load the kernel libraries concurrently
    _race("emulator")


def test_threads_on_the_reference_match_sequential_runs():
    _race("reference")


@pytest.mark.gpu
@pytest.mark.skipif(not na_rtc.backends.get("cuda").probe()[0], reason="no usable GPU")
def test_threads_on_their_own_streams_match_sequential_runs():
    from na_rtc.runtime import cache

    cache.clear_memory_cache()  # the threads load the kernels concurrently
    _race("cuda", device="cuda", streams=True)
