"""Tiled backward kernels of the split ops (``cuda_src/na_tiled_bwd.cu``).

:class:`TiledBackwardMixin` overrides two methods of
:class:`~na_rtc.runtime.naive.NaiveKernels` (same signatures, same results):

* ``inverse`` (dK = inverse(dAttn, Q), dV = inverse(Attn, dOut)) launches
  ``na_tiled_inv``: one block per (batch, head, key tile inside one dilation
  group per axis), the tile's query box staged in shared memory, sums in the
  same order as ``na_inv_fwd`` (bit-for-bit equal to it);
* ``bias_grad`` launches the two-pass deterministic ``na_tiled_rpb_partial``
  + ``na_tiled_rpb_reduce`` (per-tile partial sums, then a fixed-order sum
  over tiles; equal to ``na_rpb_bwd`` within rounding, not bit-for-bit: the
  summation order differs).

Both fall back to ``super()`` when a problem is not covered: a stride other
than 1, a dtype without instantiations (float64), a head dim above 128, or
more dynamic shared memory than :data:`SHARED_BUDGET` (so no launch needs the
above-48-KiB opt-in). :meth:`TiledBackwardMixin.choice` names the kernel a
call would launch. Compose as ``class Kernels(TiledBackwardMixin, Base)``.
"""

from __future__ import annotations

import math

from .. import _arrays
from .._args import Problem
from . import plan as P
from . import tiling
from .tiling import CTYPES, accumulator_dtype

# families.py builds its "tiled_bwd" entry from this module's tables, so this
# module imports families (and naive, which imports families) only inside
# functions: either module may be imported first.

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


def _inv_plan(problem: Problem, weights_dtype: str, source_dtype: str):
    """``(name, grid, shared bytes)`` of na_tiled_inv, or None when not covered."""
    if any(a.stride != 1 for a in problem.axes) or problem.dtype not in DTYPES or source_dtype != problem.dtype:
        return None
    if weights_dtype not in (problem.dtype, accumulator_dtype(problem.dtype)):
        return None
    hd = head_dim_bucket(problem.head_dim)
    if hd is None:
        return None
    tile = INV_TILES[(problem.ndim, hd, problem.dtype)]
    shared = inv_shared_bytes(problem, tile)
    blocks = tiling.grid(problem, tile)
    if shared > SHARED_BUDGET or blocks > P.MAX_GRID[0]:
        return None
    return inv_name(weights_dtype, problem.dtype, hd, tile), blocks, shared


def _rpb_plan(problem: Problem, weights_dtype: str):
    """``(name, tiles per head, grid, shared bytes)`` of the partial pass, or None."""
    if any(a.stride != 1 for a in problem.axes) or problem.dtype not in DTYPES:
        return None
    if weights_dtype not in RPB_WEIGHT_DTYPES:
        return None
    for tile in RPB_TILES[problem.ndim]:
        shared = rpb_shared_bytes(problem, weights_dtype, tile)
        if shared > SHARED_BUDGET:
            continue
        tiles = problem.batch * tiling.tiles(problem, tile)
        if tiles * problem.heads > P.MAX_GRID[0]:
            return None
        return rpb_name(weights_dtype, tile), tiles, tiles * problem.heads, shared
    return None


class TiledBackwardMixin:
    """Tiled ``inverse`` and ``bias_grad``; everything else from the next class in the MRO."""

    def choice(self, problem: Problem, op: str, weights_dtype: str | None = None) -> str:
        """The kernel ``op`` (``"inverse"`` or ``"bias_grad"``; other ops: the next class
        in the MRO) would launch for ``problem`` with weights (grad logits) of
        ``weights_dtype`` (default: the problem dtype)."""
        if op not in ("inverse", "bias_grad"):
            forward = getattr(super(), "choice", None)  # TiledKernels' qk / av, when it follows in the MRO
            if forward is None:
                raise ValueError(f"op must be 'inverse' or 'bias_grad', got {op!r}")
            return forward(problem, op, weights_dtype)
        weights_dtype = weights_dtype or problem.dtype
        if op == "inverse":
            plan = _inv_plan(problem, weights_dtype, problem.dtype)
            if plan is not None:
                return plan[0]
            return f"na_inv_fwd<{CTYPES[weights_dtype]}, {CTYPES[problem.dtype]}>"
        if op == "bias_grad":
            plan = _rpb_plan(problem, weights_dtype)
            if plan is not None:
                return plan[0]
        return f"na_rpb_bwd<{CTYPES[weights_dtype]}>"

    def inverse(self, problem, weights, source, scale=1.0):
        plan = _inv_plan(problem, _arrays.dtype_name(weights), _arrays.dtype_name(source))
        if plan is None or math.prod(problem.qkv_shape) == 0:
            return super().inverse(problem, weights, source, scale)
        from .naive import _problem_args, _tensor

        name, blocks, shared = plan
        out = _arrays.empty(source, problem.qkv_shape, problem.dtype)
        args = _tensor(weights, problem) + _tensor(source, problem) + _tensor(out, problem)
        args += [P.f64(scale)] + _problem_args(problem)
        self.run(P.LaunchPlan(P.Kernel(SOURCE, name), (blocks, 1, 1), (INV_THREADS, 1, 1), shared, tuple(args)))
        return out

    def bias_grad(self, problem, grad_logits):
        plan = _rpb_plan(problem, _arrays.dtype_name(grad_logits))
        if plan is None or math.prod(problem.attn_shape) == 0:
            return super().bias_grad(problem, grad_logits)
        from .naive import _bias, _problem_args, _tensor

        name, tiles, blocks, shared = plan
        acc = accumulator_dtype(problem.dtype)
        entries = math.prod(problem.rpb_shape[1:])
        partial = _arrays.empty(grad_logits, (problem.heads * tiles * entries,), "float32")
        drpb = _arrays.empty(grad_logits, problem.rpb_shape, acc)
        args = _tensor(grad_logits, problem) + [P.ptr(partial)] + _problem_args(problem)
        self.run(P.LaunchPlan(P.Kernel(SOURCE, name), (blocks, 1, 1), (RPB_THREADS, 1, 1), shared, tuple(args)))
        (_, kx, _), (_, ky, _) = _axes(problem)
        bias = _bias(drpb, problem)
        args = [P.ptr(partial), P.i64(tiles), *bias, P.i64(problem.heads), P.i64(kx), P.i64(ky)]
        blocks = problem.heads * -(-entries // 32)  # 32 entries of one head per block
        self.run(P.LaunchPlan(P.Kernel(SOURCE, RPB_REDUCE), (blocks, 1, 1), (RPB_THREADS, 1, 1), 0, tuple(args)))
        return drpb


# ---------------------------------------------------------------- the family (families.py imports these)


def tiled_bwd_names() -> tuple[str, ...]:
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


def tiled_bwd_threads() -> dict:
    return {n: (INV_THREADS if n.startswith("na_tiled_inv") else RPB_THREADS) for n in tiled_bwd_names()}


def tiled_bwd_shared() -> dict:
    """The largest dynamic shared memory any launch of each kernel uses: the budget (larger ones fall back)."""
    return {n: (0 if n == RPB_REDUCE else SHARED_BUDGET) for n in tiled_bwd_names()}
