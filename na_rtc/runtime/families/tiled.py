"""The tiled split-op forward kernels (``cuda_src/na_tiled.cu``): ``qk`` and ``av`` from shared memory.

One block of :data:`THREADS` threads per (batch, head, query tile inside one
dilation group per axis) stages the tile's queries and the halo of keys (or
values) their windows cover, then computes every (query, slot) product from
there. They take the straightforward kernels' arguments (``naive.py``), so
only the kernel name, grid and shared memory differ; where this family does
not cover a problem, the straightforward kernels serve it.

Covered: stride 1 on every axis, head dim <= 128, element dtype float32 /
float16 / bfloat16 (float64 stays straightforward), weights in the element
or the accumulator dtype, and shared memory within :data:`SHARED_BUDGET`
(48 KiB, so no opt-in). The tile comes from :data:`TILES`, keyed by (ndim,
head-dim bucket, dtype); shared memory grows with the kernel size, so large
kernels with large head dims fall back.
"""

from __future__ import annotations

from ..._args import Problem
from .. import launch as L
from .. import plan as P
from .. import tiling
from ..registry import Family, Launch, Role, register, source_of
from ..tiling import CTYPES, accumulator_dtype

NAME = "tiled"
SOURCE = "na_tiled.cu"
THREADS = 256
SHARED_BUDGET = 48 * 1024  # the most dynamic shared memory a launch gets: no opt-in needed
HEAD_DIMS = (32, 64, 128)  # head-dim buckets: runtime head_dim <= bucket
#: (ndim, head-dim bucket, dtype) -> query tile (TX, TY), group coordinates; 1D tiles have TY = 1
TILES = {
    (ndim, hd, dtype): tile
    for dtype in ("float32", "float16", "bfloat16")
    for (ndim, hd), tile in {
        (1, 32): (64, 1), (1, 64): (64, 1), (1, 128): (32, 1),
        (2, 32): (8, 8), (2, 64): (4, 4) if dtype == "float32" else (8, 8), (2, 128): (4, 4),
    }.items()
}


def names() -> tuple[str, ...]:
    names = []
    for (_, hd, dtype), (tx, ty) in TILES.items():
        element, acc = CTYPES[dtype], CTYPES[accumulator_dtype(dtype)]
        for weights in (element, acc):
            names += [f"na_tiled_qk<{element}, {weights}, {hd}, {tx}, {ty}>",
                      f"na_tiled_av<{weights}, {element}, {hd}, {tx}, {ty}>"]
    return tuple(dict.fromkeys(names))


def head_dim_bucket(head_dim: int) -> int | None:
    return tiling.head_dim_bucket(head_dim, HEAD_DIMS)


def _kernels(problem: Problem) -> tuple[int, int]:
    """Kernel size per axis as (kx, ky): 1D problems have ky = 1."""
    ks = problem.kernel_size
    return (ks[0], ks[1] if problem.ndim == 2 else 1)


def shared_bytes(problem: Problem, op: str, tile: tuple[int, int], hd: int, weights_dtype: str) -> int:
    """Dynamic shared memory of one block (mirrors the layout in na_tiled.cu)."""
    (tx, ty), (kx, ky) = tile, _kernels(problem)
    item = tiling.ITEMSIZE[problem.dtype]
    pitch = hd + 4 // item  # na_tiled_pitch
    halo_rows = (tx + kx - 1) * (ty + ky - 1)
    if op == "qk":
        return (tx * ty + halo_rows) * pitch * item
    weights = tiling.align16(tx * ty * kx * ky * tiling.ITEMSIZE[weights_dtype])
    return weights + halo_rows * pitch * item


def kernel_name(op: str, problem: Problem, weights_dtype: str, hd: int, tile: tuple[int, int]) -> str:
    element, weights = CTYPES[problem.dtype], CTYPES[weights_dtype]
    types = f"{element}, {weights}" if op == "qk" else f"{weights}, {element}"
    return f"na_tiled_{op}<{types}, {hd}, {tile[0]}, {tile[1]}>"


def _rule(op: str):
    def covers(problem: Problem, policy, weights_dtype: str) -> tuple[bool, str]:
        dtype = problem.dtype
        if any(axis.stride != 1 for axis in problem.axes):
            return False, "stride > 1 (the split kernels take none)"
        hd = head_dim_bucket(problem.head_dim)
        tile = TILES.get((problem.ndim, hd, dtype))
        if tile is None:
            return False, (f"no tile for {problem.ndim}D {dtype} at head_dim {problem.head_dim} (float32/float16/"
                           f"bfloat16, head_dim <= {HEAD_DIMS[-1]})")
        if weights_dtype not in (dtype, accumulator_dtype(dtype)):
            return False, f"weights in {weights_dtype} (built for {dtype} and {accumulator_dtype(dtype)})"
        smem = shared_bytes(problem, op, tile, hd, weights_dtype)
        if smem > SHARED_BUDGET:
            return False, (f"the window {'x'.join(map(str, problem.kernel_size))} needs {smem} bytes of shared "
                           f"memory, more than {SHARED_BUDGET}")
        blocks = tiling.grid(problem, tile)
        if not 1 <= blocks <= P.MAX_GRID[0]:
            return False, f"{blocks} blocks (1 to {P.MAX_GRID[0]} launch)"
        return True, ""

    return covers


def _planner(op: str):
    def plan(problem: Problem, policy, weights_dtype: str) -> Launch:
        hd = head_dim_bucket(problem.head_dim)
        tile = TILES[problem.ndim, hd, problem.dtype]
        name = kernel_name(op, problem, weights_dtype, hd, tile)
        return Launch(P.Kernel(source_of(NAME), name), tiling.grid(problem, tile), THREADS,
                      shared_bytes(problem, op, tile, hd, weights_dtype))

    return plan


FAMILY = register(Family(
    SOURCE, names(), dict.fromkeys(names(), THREADS), dict.fromkeys(names(), SHARED_BUDGET), name=NAME,
    roles={"qk": Role(_rule("qk"), _planner("qk"), L.qk), "av": Role(_rule("av"), _planner("av"), L.weighted)},
))
