"""Tiled backward kernels of the split ops (``cuda_src/na_tiled_bwd.cu``): ``inverse`` and ``bias_grad``.

* ``inverse`` (dK = inverse(dAttn, Q), dV = inverse(Attn, dOut)) launches
  ``na_tiled_inv``: one block per (batch, head, key tile inside one dilation
  group per axis), the tile's query box staged in shared memory, sums in the
  same order as the straightforward ``na_inv_fwd`` (bit-for-bit equal to it);
* ``bias_grad`` launches the two-pass deterministic ``na_tiled_rpb_partial``
  + ``na_tiled_rpb_reduce`` (per-tile partial sums, then a fixed-order sum
  over tiles; equal to ``na_rpb_bwd`` within rounding, not bit-for-bit: the
  summation order differs).

3D runs in the twin ``tiled_bwd_3d`` (RANK 3 and TZ in the names): its
``na_tiled_inv`` stages the query box TY y rows of one x plane at a time (the
whole box of a 3D key tile does not fit shared memory at k = 7), still in
the straightforward kernel's order; the bias gradient's two passes sum 3D
tables.

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
from ..registry import RANK3_SUFFIX, Family, Launch, Role, register, source_of
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
INV_TILES: dict[tuple[int, int, str], tuple[int, ...]] = {}
#: 3D key tiles (TX, TY, TZ): as many keys per lane group as in 2D (4 up to head dim 64, one at 128).
for _dtype in DTYPES:
    for _hd, _t1, _t2, _t3 in ((16, 64, (8, 8), (4, 4, 4)), (32, 32, (4, 8), (2, 4, 4)),
                               (64, 32, (4, 8), (2, 4, 4)), (128, 16, (2, 4), (2, 2, 2))):
        INV_TILES[(1, _hd, _dtype)] = (_t1, 1)
        INV_TILES[(2, _hd, _dtype)] = _t2
        INV_TILES[(3, _hd, _dtype)] = _t3

#: query tiles of na_tiled_rpb_partial per ndim, first that fits the budget wins (3D: the tile's logit gradients,
#: tile x kx*ky*kz of them, are staged whole, so a 7x7x7 window takes the 2x2x2 tile)
RPB_TILES: dict[int, tuple[tuple[int, ...], ...]] = {1: ((64, 1), (16, 1)), 2: ((8, 8), (4, 4)),
                                                     3: ((4, 4, 4), (2, 2, 2))}
RPB_WEIGHT_DTYPES = DTYPES  # grad logits: the problem dtype (split ops) or float32 (fused)


def _axes(problem: Problem):
    """``(length, kernel, dilation)`` for x and y (1D: a trivial y axis)."""
    axes = [(a.length, a.kernel_size, a.dilation) for a in problem.axes]
    if len(axes) == 1:
        axes.append((1, 1, 1))
    return axes


def head_dim_bucket(head_dim: int) -> int | None:
    return tiling.head_dim_bucket(head_dim, HEAD_DIM_BUCKETS)


def _rank_args(tile: tuple[int, ...]) -> str:
    """The template arguments after TX, TY: RANK and TZ for a 3D tile, none below (1D/2D names unchanged)."""
    return f", 3, {tile[2]}" if len(tile) == 3 else ""


def inv_name(weights_dtype: str, dtype: str, hd: int, tile: tuple[int, ...]) -> str:
    return f"na_tiled_inv<{CTYPES[weights_dtype]}, {CTYPES[dtype]}, {hd}, {tile[0]}, {tile[1]}{_rank_args(tile)}>"


def rpb_name(weights_dtype: str, tile: tuple[int, ...]) -> str:
    return f"na_tiled_rpb_partial<{CTYPES[weights_dtype]}, {tile[0]}, {tile[1]}{_rank_args(tile)}>"


RPB_REDUCE = "na_tiled_rpb_reduce"


def _box(extent: int, axis) -> int:
    """The query box of a key tile's ``extent`` keys along ``(length, kernel, dilation)``, as the kernel caps it
    (``na_tinv_box_y``)."""
    length, kernel, dilation = axis
    return min(extent + 2 * kernel - 2, -(-length // dilation))


def inv_shared_bytes(problem: Problem, tile: tuple[int, ...]) -> int:
    """Dynamic shared memory of na_tiled_inv (the kernel's own layout): the y window starts and TX query rows of
    the box height; in 3D the y and z window starts and TY rows of the box's z extent."""
    axes, row = _axes(problem), problem.head_dim * tiling.ITEMSIZE[problem.dtype]
    cap_y = _box(tile[1], axes[1])
    if len(tile) == 3:
        cap_z = _box(tile[2], axes[2])
        return tiling.align16(cap_y * 4) + tiling.align16(cap_z * 4) + tile[1] * cap_z * row
    return tiling.align16(cap_y * 4) + tile[0] * cap_y * row


def rpb_shared_bytes(problem: Problem, weights_dtype: str, tile: tuple[int, ...]) -> int:
    return tiling.align16(math.prod(tile) * problem.slots * tiling.ITEMSIZE[weights_dtype]) + RPB_THREADS * 4


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
    blocks = tiling.kv_grid(problem, tile)
    return P.within_grid_limit(blocks)


def _inverse_planner(family: str):
    def plan(problem: Problem, policy, weights_dtype: str, source_dtype: str) -> Launch:
        hd = head_dim_bucket(problem.head_dim)
        tile = INV_TILES[(problem.ndim, hd, problem.dtype)]
        return Launch(P.Kernel(source_of(family), inv_name(weights_dtype, problem.dtype, hd, tile)),
                      tiling.kv_grid(problem, tile), INV_THREADS, inv_shared_bytes(problem, tile))

    return plan


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
    return P.within_grid_limit(blocks)


def _bias_grad_planner(family: str):
    def plan(problem: Problem, policy, weights_dtype: str) -> Launch:
        """The partial pass, with the reduction's launch as ``extra`` (32 entries of one head per block)."""
        tile = _rpb_tile(problem, weights_dtype)
        tiles = problem.batch * tiling.tiles(problem, tile)
        source = source_of(family)
        # the reduction takes the rank as arguments: one kernel, the 1D/2D family's, for every rank
        reduce = Launch(P.Kernel(source_of(NAME), RPB_REDUCE), problem.heads * -(-math.prod(problem.rpb_shape[1:]) // 32),
                        RPB_THREADS, 0)
        return Launch(P.Kernel(source, rpb_name(weights_dtype, tile)), tiles * problem.heads, RPB_THREADS,
                      rpb_shared_bytes(problem, weights_dtype, tile), tiles, reduce)

    return plan


def names(rank: int = 2) -> tuple[str, ...]:
    """Every instantiation the tables can pick for ``rank`` (1 and 2: the 1D/2D family, with the reduction every
    rank launches; 3: its twin)."""
    names = []
    for (ndim, hd, dtype), tile in INV_TILES.items():
        if (ndim == 3) == (rank == 3):
            for weights in (dtype, accumulator_dtype(dtype)):
                names.append(inv_name(weights, dtype, hd, tile))
    for ndim, tiles in RPB_TILES.items():
        for tile in tiles if (ndim == 3) == (rank == 3) else ():
            for weights in RPB_WEIGHT_DTYPES:
                names.append(rpb_name(weights, tile))
    if rank != 3:
        names.append(RPB_REDUCE)
    return tuple(dict.fromkeys(names))


def _family(name: str, rank: int, ranks: frozenset) -> Family:
    kernels = names(rank)
    threads = {n: (INV_THREADS if n.startswith("na_tiled_inv") else RPB_THREADS) for n in kernels}
    # the largest dynamic shared memory any launch of each kernel uses: the budget (larger ones fall back)
    shared = {n: (0 if n == RPB_REDUCE else SHARED_BUDGET) for n in kernels}
    return Family(SOURCE, kernels, threads, shared, name=name,
                  roles={"inverse": Role(_inverse_covers, _inverse_planner(name), L.inverse),
                         "bias_grad": Role(_bias_grad_covers, _bias_grad_planner(name), L.bias_grad_two_pass)},
                  ranks=ranks)


FAMILY = register(_family(NAME, 2, frozenset({1, 2})))
FAMILY_3D = register(_family(NAME + RANK3_SUFFIX, 3, frozenset({3})))
