"""Tiled backward kernels of the split ops (``cuda_src/na_tiled_bwd.cu``): ``inverse`` and ``bias_grad``.

* ``inverse`` (dK = inverse(dAttn, Q), dV = inverse(Attn, dOut)) launches
  ``na_tiled_inv``: one block per (batch, head, key tile inside one dilation
  group per axis), the tile's query box staged in shared memory, sums in the
  same order as the straightforward ``na_inv_fwd`` (bit-for-bit equal to it);
* ``bias_grad`` launches the two-pass deterministic ``na_tiled_rpb_partial``
  + ``na_tiled_rpb_reduce`` (per-tile partial sums, then a fixed-order sum
  over tiles; equal to ``na_rpb_bwd`` within rounding, not bit-for-bit: the
  summation order differs).

Where this family does not cover a problem the straightforward kernels
(``naive.py``) serve it: a stride other than 1, a dtype without
instantiations (float64), a head dim above 128, or more dynamic shared memory
than :data:`SHARED_BUDGET` (so no launch needs the above-48-KiB opt-in).
"""

from __future__ import annotations

import math

from ..._args import Problem
from .. import launch as L
from .. import plan as P
from .. import tiling
from ..registry import Family, Launch, Role, register, source_of
from ..tiling import CTYPES, accumulator_dtype

NAME = "tiled_bwd"
SOURCE = "na_tiled_bwd.cu"
INV_THREADS = 256  # NA_TINV_THREADS in na_tiled_bwd.cu
RPB_THREADS = 256  # NA_TRPB_THREADS
SHARED_BUDGET = 46 * 1024  # dynamic shared memory; above it the naive kernels run (static + dynamic <= 48 KiB)
DTYPES = ("float32", "float16", "bfloat16")
HEAD_DIM_BUCKETS = (16, 32, 64, 128)

#: key tile (TX, TY) of na_tiled_inv per (ndim, head-dim bucket, dtype).
#: A lane group (32 threads, 16 for head dim 16) owns a key, so a 256-thread
#: block holds TX * TY * lanes / 256 keys per group (at most 4) and head-dim /
#: lanes accumulators per key in registers: sized to compile without spills on
#: sm_80 and sm_90 (2D head dim 128: one key per group, 2 x 4 keys).
#: The staged chunk is TX query rows by the box height min(TY + 2ky - 2, Y / dy):
#: smem ~ TX * (TY + 2ky - 2) * D * itemsize (align16 of the y window starts
#: before it); see :func:`inv_shared_bytes`.
INV_TILES: dict[tuple[int, int, str], tuple[int, int]] = {}
for _dtype in DTYPES:
    for _hd, _t1, _t2 in ((16, 64, (8, 8)), (32, 32, (4, 8)), (64, 32, (4, 8)), (128, 16, (2, 4))):
        INV_TILES[(1, _hd, _dtype)] = (_t1, 1)
        INV_TILES[(2, _hd, _dtype)] = _t2

#: query tiles of na_tiled_rpb_partial per ndim, first that fits the budget wins
RPB_TILES: dict[int, tuple[tuple[int, int], ...]] = {1: ((64, 1), (16, 1)), 2: ((8, 8), (4, 4))}
RPB_WEIGHT_DTYPES = DTYPES  # grad logits: the problem dtype (split ops) or float32 (fused)


def _axes(problem: Problem):
    """``(length, kernel, dilation)`` for x and y (1D: a trivial y axis)."""
    axes = [(a.length, a.kernel_size, a.dilation) for a in problem.axes]
    if len(axes) == 1:
        axes.append((1, 1, 1))
    return axes


def head_dim_bucket(head_dim: int) -> int | None:
    return tiling.head_dim_bucket(head_dim, HEAD_DIM_BUCKETS)


def inv_name(weights_dtype: str, dtype: str, hd: int, tile: tuple[int, int]) -> str:
    return f"na_tiled_inv<{CTYPES[weights_dtype]}, {CTYPES[dtype]}, {hd}, {tile[0]}, {tile[1]}>"


def rpb_name(weights_dtype: str, tile: tuple[int, int]) -> str:
    return f"na_tiled_rpb_partial<{CTYPES[weights_dtype]}, {tile[0]}, {tile[1]}>"


RPB_REDUCE = "na_tiled_rpb_reduce"


def inv_shared_bytes(problem: Problem, tile: tuple[int, int]) -> int:
    """Dynamic shared memory of na_tiled_inv (the kernel's own layout)."""
    (_, _, _), (ly, ky, dy) = _axes(problem)
    cap_y = min(tile[1] + 2 * ky - 2, -(-ly // dy))
    return tiling.align16(cap_y * 4) + tile[0] * cap_y * problem.head_dim * tiling.ITEMSIZE[problem.dtype]


def rpb_shared_bytes(problem: Problem, weights_dtype: str, tile: tuple[int, int]) -> int:
    return tiling.align16(tile[0] * tile[1] * problem.slots * tiling.ITEMSIZE[weights_dtype]) + RPB_THREADS * 4


def _stride_or_dtype(problem: Problem) -> str:
    if any(a.stride != 1 for a in problem.axes):
        return "stride > 1 (the split kernels take none)"
    if problem.dtype not in DTYPES:
        return f"dtype {problem.dtype} (built for {', '.join(DTYPES)})"
    return ""


def _inverse_covers(problem: Problem, policy, weights_dtype: str, source_dtype: str) -> tuple[bool, str]:
    why = _stride_or_dtype(problem)
    if why:
        return False, why
    if source_dtype != problem.dtype or weights_dtype not in (problem.dtype, accumulator_dtype(problem.dtype)):
        return False, f"weights in {weights_dtype}, source in {source_dtype}"
    hd = head_dim_bucket(problem.head_dim)
    if hd is None:
        return False, f"head_dim {problem.head_dim} > {HEAD_DIM_BUCKETS[-1]}"
    tile = INV_TILES[(problem.ndim, hd, problem.dtype)]
    shared = inv_shared_bytes(problem, tile)
    if shared > SHARED_BUDGET:
        return False, f"the window needs {shared} bytes of shared memory, more than {SHARED_BUDGET}"
    blocks = tiling.grid(problem, tile)
    if blocks > P.MAX_GRID[0]:
        return False, f"{blocks} blocks, more than CUDA's grid limit {P.MAX_GRID[0]}"
    return True, ""


def _inverse_plan(problem: Problem, policy, weights_dtype: str, source_dtype: str) -> Launch:
    hd = head_dim_bucket(problem.head_dim)
    tile = INV_TILES[(problem.ndim, hd, problem.dtype)]
    return Launch(P.Kernel(source_of(NAME), inv_name(weights_dtype, problem.dtype, hd, tile)),
                  tiling.grid(problem, tile), INV_THREADS, inv_shared_bytes(problem, tile))


def _rpb_tile(problem: Problem, weights_dtype: str):
    """The first query tile of :data:`RPB_TILES` whose partial pass fits the budget, or None."""
    return next((tile for tile in RPB_TILES[problem.ndim]
                 if rpb_shared_bytes(problem, weights_dtype, tile) <= SHARED_BUDGET), None)


def _bias_grad_covers(problem: Problem, policy, weights_dtype: str) -> tuple[bool, str]:
    why = _stride_or_dtype(problem)
    if why:
        return False, why
    if weights_dtype not in RPB_WEIGHT_DTYPES:
        return False, f"logit gradients in {weights_dtype} (built for {', '.join(RPB_WEIGHT_DTYPES)})"
    if math.prod(problem.attn_shape) == 0:
        return False, "no logits (the straightforward kernel writes the zero gradient)"
    tile = _rpb_tile(problem, weights_dtype)
    if tile is None:
        return False, f"the window needs more than {SHARED_BUDGET} bytes of shared memory"
    blocks = problem.batch * tiling.tiles(problem, tile) * problem.heads
    if blocks > P.MAX_GRID[0]:
        return False, f"{blocks} blocks, more than CUDA's grid limit {P.MAX_GRID[0]}"
    return True, ""


def _bias_grad_plan(problem: Problem, policy, weights_dtype: str) -> Launch:
    """The partial pass, with the reduction's launch as ``extra`` (32 entries of one head per block)."""
    tile = _rpb_tile(problem, weights_dtype)
    tiles = problem.batch * tiling.tiles(problem, tile)
    source = source_of(NAME)
    reduce = Launch(P.Kernel(source, RPB_REDUCE), problem.heads * -(-math.prod(problem.rpb_shape[1:]) // 32),
                    RPB_THREADS, 0)
    return Launch(P.Kernel(source, rpb_name(weights_dtype, tile)), tiles * problem.heads, RPB_THREADS,
                  rpb_shared_bytes(problem, weights_dtype, tile), tiles, reduce)


def names() -> tuple[str, ...]:
    """Every instantiation the tables can pick."""
    names = []
    for (ndim, hd, dtype), tile in INV_TILES.items():
        for weights in (dtype, accumulator_dtype(dtype)):
            names.append(inv_name(weights, dtype, hd, tile))
    for tiles in RPB_TILES.values():
        for tile in tiles:
            for weights in RPB_WEIGHT_DTYPES:
                names.append(rpb_name(weights, tile))
    names.append(RPB_REDUCE)
    return tuple(dict.fromkeys(names))


def _threads() -> dict:
    return {n: (INV_THREADS if n.startswith("na_tiled_inv") else RPB_THREADS) for n in names()}


def _shared() -> dict:
    """The largest dynamic shared memory any launch of each kernel uses: the budget (larger ones fall back)."""
    return {n: (0 if n == RPB_REDUCE else SHARED_BUDGET) for n in names()}


FAMILY = register(Family(
    SOURCE, names(), _threads(), _shared(), name=NAME,
    roles={"inverse": Role(_inverse_covers, _inverse_plan, L.weighted),
           "bias_grad": Role(_bias_grad_covers, _bias_grad_plan, L.bias_grad_two_pass)},
))
