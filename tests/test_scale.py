"""Scale limits (issue 8, part 3): 64-bit element offsets and the grid limit.

Offsets: inputs whose batch stride is more than 2^31 elements, so every
element of batch 1 sits at an offset a 32-bit index would wrap. The data
lives in one sparse anonymous mapping (MAP_NORESERVE: only the pages written
are backed), so the test needs a few MB of memory for ~9 GB of address
space. Every kernel family reads them through the emulator (fused forward
and backward, tiled and straightforward split ops and their backward) and
must match the reference on compact copies. Each case runs in a subprocess:
a wrapped 32-bit offset would read outside the mapping and crash, which must
fail the test, not the test run. GPU-marked: the same on the cuda backend.

Grid: every launch is a 1D grid of at most 2^31 - 1 blocks (CUDA's x limit);
beyond that the fused and tiled kernels step aside and the straightforward
kernels raise a ValueError that says to split the batch.
"""

from __future__ import annotations

import math
import mmap
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import na_rtc
from na_rtc import _args
from na_rtc.runtime import plan
from na_rtc.runtime.dispatch import Dispatcher
from na_rtc.runtime.families import naive
from na_rtc.runtime.policy import Policy

HERE = Path(__file__).resolve().parent
#: batch stride in elements: batch 1 starts past 2^31
BIG = 2**31 + 4096

needs_emulator = pytest.mark.skipif(not na_rtc.backends.get("emulator").probe()[0],
                                    reason="emulator needs a C++ compiler")
# Linux backs anonymous private mappings lazily; MAP_NORESERVE (0x4000 on Linux,
# not exported by Python before 3.12) also skips reserving swap for them
NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)
needs_mapping = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux's lazily backed mappings")


def sparse_inputs(count, shape, dtype, seed=0):
    """``count`` arrays of ``shape`` (batch 2) with batch stride BIG elements, in one sparse mapping.

    Returns ``(mapping, arrays)``; keep the mapping alive while the arrays are used.
    """
    assert shape[0] == 2
    dtype = np.dtype(dtype)
    per = math.prod(shape[1:])
    mapping = mmap.mmap(-1, (BIG + count * per) * dtype.itemsize,
                        flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | NORESERVE)
    flat = np.frombuffer(mapping, dtype=dtype)
    inner = np.empty(shape[1:], dtype).strides
    rng = np.random.default_rng(seed)
    arrays = []
    for i in range(count):
        view = np.lib.stride_tricks.as_strided(flat[i * per:], shape, (BIG * dtype.itemsize, *inner))
        view[...] = rng.standard_normal(shape).astype(dtype)
        arrays.append(view)
    return mapping, arrays


#: name -> (ndim, dtype, head_dim, kernel, what it exercises)
CASES = {
    "fused-1d-fp16": (1, "float16", 16, 5),
    "fused-2d-fp32-rpb": (2, "float32", 8, 3),
    "split-1d-fp16": (1, "float16", 16, 5),  # tiled qk / av and their backward
    "split-2d-fp64": (2, "float64", 4, 3),  # straightforward kernels (no tiles for float64)
    "fused-3d-fp32-rpb": (3, "float32", 8, 3),  # 3D: the fused SIMT kernels
    "split-3d-fp16": (3, "float16", 16, 3),  # 3D tiled qk / av and their backward
    "split-3d-fp64": (3, "float64", 4, 3),  # 3D straightforward kernels
}
#: rank -> the spatial axes of a case
SPATIAL = {1: (9,), 2: (6, 5), 3: (4, 3, 5)}


def run_case(name: str, backend: str) -> None:
    """Compare ``backend`` on the huge-stride inputs with the reference on compact copies (raises on mismatch)."""
    sys.path.insert(0, str(HERE))
    from helpers import assert_close

    ndim, dtype, head_dim, kernel = CASES[name]
    spatial = SPATIAL[ndim]
    shape = (2, *spatial, 2, head_dim)
    slots = kernel**ndim
    keep, (q, k, v, g) = sparse_inputs(4, shape, dtype)
    keep2, (w, gw) = sparse_inputs(2, (*shape[:-1], slots), dtype, seed=1)
    assert q.strides[0] // q.itemsize > 2**31
    rpb = np.random.default_rng(2).standard_normal((2, *(2 * kernel - 1,) * ndim)).astype(
        "float64" if dtype == "float64" else "float32") if "rpb" in name else None

    bases = {}  # mapping -> its CUDA mirror (one allocation per mapping, same element offsets)

    def device(x):
        if backend != "cuda" or x is None or x is rpb:
            return x if backend != "cuda" or x is None else __import__("torch").from_numpy(x).cuda()
        import torch

        mapping = keep if any(x is y for y in (q, k, v, g)) else keep2
        start = np.frombuffer(mapping, dtype=x.dtype).ctypes.data
        if id(mapping) not in bases:
            bases[id(mapping)] = torch.empty(len(mapping) // x.itemsize, dtype=getattr(torch, str(x.dtype)),
                                             device="cuda")
        out = bases[id(mapping)].as_strided(x.shape, [s // x.itemsize for s in x.strides],
                                             (x.ctypes.data - start) // x.itemsize)
        out.copy_(torch.from_numpy(np.ascontiguousarray(x)))
        return out

    def host(x):
        return x if isinstance(x, np.ndarray) or x is None else x.cpu().numpy()

    compact = {id(x): np.ascontiguousarray(x) for x in (q, k, v, g, w, gw)}
    pairs = []  # (what, got, want)
    fn = getattr(na_rtc, f"na{ndim}d")
    if name.startswith("fused"):
        got = fn(*map(device, (q, k, v)), kernel, rpb=device(rpb), return_lse=True, backend=backend)
        want = fn(*(compact[id(x)] for x in (q, k, v)), kernel, rpb=rpb, return_lse=True, backend="reference")
        pairs += [("out", got[0], want[0]), ("lse", got[1], want[1])]
        bwd = getattr(na_rtc, f"na{ndim}d_backward")
        got = bwd(*map(device, (g, q, k, v)), kernel, rpb=device(rpb), backend=backend)
        want = bwd(*(compact[id(x)] for x in (g, q, k, v)), kernel, rpb=rpb, backend="reference")
        pairs += [(f"d{n}", a, b) for n, a, b in zip(("q", "k", "v", "rpb"), got, want) if b is not None]
    else:
        qk, av = getattr(na_rtc, f"na{ndim}d_qk"), getattr(na_rtc, f"na{ndim}d_av")
        pairs.append(("qk", qk(*map(device, (q, k)), kernel, backend=backend),
                      qk(compact[id(q)], compact[id(k)], kernel, backend="reference")))
        pairs.append(("av", av(*map(device, (w, v)), kernel, backend=backend),
                      av(compact[id(w)], compact[id(v)], kernel, backend="reference")))
        qk_bwd, av_bwd = getattr(na_rtc, f"na{ndim}d_qk_backward"), getattr(na_rtc, f"na{ndim}d_av_backward")
        got = qk_bwd(*map(device, (gw, q, k)), kernel, backend=backend)[:2]
        got += av_bwd(*map(device, (g, w, v)), kernel, backend=backend)
        want = qk_bwd(*(compact[id(x)] for x in (gw, q, k)), kernel, backend="reference")[:2]
        want += av_bwd(*(compact[id(x)] for x in (g, w, v)), kernel, backend="reference")
        pairs += [(n, a, b) for n, a, b in zip(("dq", "dk", "dattn", "dv"), got, want)]
    for what, got, want in pairs:
        assert_close(host(got), want, dtype, "grad" if what.startswith("d") else "forward", f"{name}: {what}")


def _in_subprocess(name: str, backend: str):
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        import test_scale
        test_scale.run_case({name!r}, {backend!r})
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (
        f"{name} on {backend}: exit status {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


@needs_emulator
@needs_mapping
@pytest.mark.parametrize("name", CASES)
def test_offsets_past_2_to_the_31_on_the_emulator(name):
    _in_subprocess(name, "emulator")


@pytest.mark.gpu
@pytest.mark.skipif(not na_rtc.backends.get("cuda").probe()[0], reason="no usable GPU")
@needs_mapping
@pytest.mark.parametrize("name", CASES)
def test_offsets_past_2_to_the_31_on_the_gpu(name):
    _in_subprocess(name, "cuda")


# ---------------------------------------------------------------- the grid limit


def _huge_problem(batch: int):
    """A validated problem with ``batch`` sequences, built without allocating them."""
    q = np.broadcast_to(np.zeros((1, 64, 4, 32), np.float16), (batch, 64, 4, 32))  # zero strides: no memory
    return _args.fused_problem(1, q, q, q, 7, 1, 1, False, None, None)


def test_fused_kernels_step_aside_beyond_the_grid_limit():
    kernels = Dispatcher(lambda plan_: None, Policy.of())
    assert kernels.choose("forward", _huge_problem(2**20)).path == "simt"
    beyond = kernels.choose("forward", _huge_problem(2**31))  # 2^31 * 4 heads * tiles blocks
    assert beyond.path is None and "more than CUDA's grid limit" in dict(beyond.skipped)["simt"]


def test_straightforward_kernels_refuse_beyond_the_grid_limit_and_say_what_to_do():
    with pytest.raises(ValueError, match=r"more than CUDA's grid limit 2147483647; split the batch"):
        naive.one_thread_per_output("na_av_fwd<float, float>", 2**31 * naive.THREADS)  # planned before any launch
    launch = naive.one_thread_per_output("na_av_fwd<float, float>", (2**31 - 1) * naive.THREADS)
    assert launch.plan(()).grid == (2**31 - 1, 1, 1)


def test_launch_plans_refuse_grids_outside_cuda_limits():
    kernel = plan.Kernel("na_naive.cu", "na_av_fwd<float, float>")
    with pytest.raises(ValueError, match="outside the CUDA limits"):
        plan.LaunchPlan(kernel, (2**31, 1, 1), (256, 1, 1), 0, ())
    with pytest.raises(ValueError, match="outside the CUDA limits"):
        plan.LaunchPlan(kernel, (0, 1, 1), (256, 1, 1), 0, ())
