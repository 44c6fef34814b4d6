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

3D runs in the twin ``tiled_3d`` (RANK 3 and a TZ extent in the names): its
kernels stage the key halo one x plane at a time, so shared memory holds
``(TY + ky - 1)(TZ + kz - 1)`` rows whatever ``kx``, and its tiles are chosen
so that a 7 x 7 x 7 window fits at every head-dim bucket.
"""

from __future__ import annotations

from ..._args import Problem
from .. import launch as L
from .. import plan as P
from .. import tiling
from ..registry import RANK3_SUFFIX, Family, Launch, Role, register, source_of
from ..tiling import CTYPES, accumulator_dtype

NAME = "tiled"
SOURCE = "na_tiled.cu"
THREADS = 256
SHARED_BUDGET = 48 * 1024  # the most dynamic shared memory a launch gets: no opt-in needed
HEAD_DIMS = (32, 64, 128)  # head-dim buckets: runtime head_dim <= bucket
#: (ndim, head-dim bucket, dtype) -> query tile (TX, TY) or, in 3D, (TX, TY, TZ), group coordinates; 1D tiles
#: have TY = 1. 3D tiles keep one x plane of a 7 x 7 x 7 window's halo and the tile's queries (and, for av, the
#: plane's weights) within the budget: 4 x 4 x 4 at head dim 32, 2 x 4 x 4 above, 4 x 2 x 2 for float32 at 128.
TILES = {
    (ndim, hd, dtype): tile
    for dtype in ("float32", "float16", "bfloat16")
    for (ndim, hd), tile in {
        (1, 32): (64, 1), (1, 64): (64, 1), (1, 128): (32, 1),
        (2, 32): (8, 8), (2, 64): (4, 4) if dtype == "float32" else (8, 8), (2, 128): (4, 4),
        (3, 32): (4, 4, 4), (3, 64): (2, 4, 4), (3, 128): (4, 2, 2) if dtype == "float32" else (2, 4, 4),
    }.items()
}


def _rank_args(tile: tuple[int, ...]) -> str:
    """The template arguments after TX, TY: none below 3D (1D/2D names are those of the kernels before RANK),
    RANK and TZ in 3D."""
    return f", 3, {tile[2]}" if len(tile) == 3 else ""


def names(rank: int = 2) -> tuple[str, ...]:
    """The instantiations of the tiles of ``rank`` (1 and 2: the 1D/2D family; 3: its twin)."""
    names = []
    for (ndim, hd, dtype), tile in TILES.items():
        if (ndim == 3) != (rank == 3):
            continue
        for weights in (dtype, accumulator_dtype(dtype)):
            names += [kernel_name("qk", dtype, weights, hd, tile), kernel_name("av", dtype, weights, hd, tile)]
    return tuple(dict.fromkeys(names))


def head_dim_bucket(head_dim: int) -> int | None:
    return tiling.head_dim_bucket(head_dim, HEAD_DIMS)


def _kernels(problem: Problem) -> tuple[int, int]:
    """Kernel size per axis as (kx, ky): 1D problems have ky = 1."""
    ks = problem.kernel_size
    return (ks[0], ks[1] if problem.ndim == 2 else 1)


def shared_bytes(problem: Problem, op: str, tile: tuple[int, ...], hd: int, weights_dtype: str) -> int:
    """Dynamic shared memory of one block (mirrors the layout in na_tiled.cu)."""
    if len(tile) == 3:
        return _shared_bytes_3d(problem, op, tile, hd, weights_dtype)
    (tx, ty), (kx, ky) = tile, _kernels(problem)
    item = tiling.ITEMSIZE[problem.dtype]
    pitch = hd + 4 // item  # na_tiled_pitch
    halo_rows = (tx + kx - 1) * (ty + ky - 1)
    if op == "qk":
        return (tx * ty + halo_rows) * pitch * item
    weights = tiling.align16(tx * ty * kx * ky * tiling.ITEMSIZE[weights_dtype])
    return weights + halo_rows * pitch * item


def _shared_bytes_3d(problem: Problem, op: str, tile: tuple[int, int, int], hd: int, weights_dtype: str) -> int:
    """The 3D path's: the window tables (na_tile3_table_bytes), then the queries (qk) or one plane's weights
    (av), then one x plane of the halo."""
    (tx, ty, tz), (_, ky, kz) = tile, problem.kernel_size
    item = tiling.ITEMSIZE[problem.dtype]
    pitch = hd + 4 // item  # na_tiled_pitch
    tables = tiling.align16(2 * (tx + ty + tz) * 8)
    plane = (ty + ky - 1) * (tz + kz - 1) * pitch * item
    if op == "qk":
        return tables + tx * ty * tz * pitch * item + plane
    return tables + tiling.align16(tx * ty * tz * ky * kz * tiling.ITEMSIZE[weights_dtype]) + plane


def kernel_name(op: str, dtype: str, weights_dtype: str, hd: int, tile: tuple[int, ...]) -> str:
    element, weights = CTYPES[dtype], CTYPES[weights_dtype]
    types = f"{element}, {weights}" if op == "qk" else f"{weights}, {element}"
    return f"na_tiled_{op}<{types}, {hd}, {tile[0]}, {tile[1]}{_rank_args(tile)}>"


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


def _planner(op: str, family: str):
    def plan(problem: Problem, policy, weights_dtype: str) -> Launch:
        hd = head_dim_bucket(problem.head_dim)
        tile = TILES[problem.ndim, hd, problem.dtype]
        name = kernel_name(op, problem.dtype, weights_dtype, hd, tile)
        return Launch(P.Kernel(source_of(family), name), tiling.grid(problem, tile), THREADS,
                      shared_bytes(problem, op, tile, hd, weights_dtype))

    return plan


def _family(name: str, rank: int, ranks: frozenset) -> Family:
    kernels = names(rank)
    return Family(SOURCE, kernels, dict.fromkeys(kernels, THREADS), dict.fromkeys(kernels, SHARED_BUDGET), name=name,
                  roles={"qk": Role(_rule("qk"), _planner("qk", name), L.qk),
                         "av": Role(_rule("av"), _planner("av", name), L.weighted)},
                  ranks=ranks)


FAMILY = register(_family(NAME, 2, frozenset({1, 2})))
FAMILY_3D = register(_family(NAME + RANK3_SUFFIX, 3, frozenset({3})))
