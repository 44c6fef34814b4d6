"""Ops on the tiled split-op forward kernels (``cuda_src/na_tiled.cu``), for any executor.

:class:`TiledKernels` is :class:`~na_rtc.runtime.naive.NaiveKernels` with
``qk`` and ``av`` launched tiled when a tiled kernel covers the problem, and
the naive kernels otherwise. The tiled kernels take the naive kernels'
arguments, so only the kernel name, grid, block and shared memory differ.

Covered: stride 1 on every axis, head dim <= 128, element dtype float32 /
float16 / bfloat16 (float64 stays naive), weights in the element or the
accumulator dtype, and shared memory within
:data:`~na_rtc.runtime.families.TILED_SHARED_BUDGET` (48 KiB, so no opt-in).
The tile comes from :data:`~na_rtc.runtime.families.TILED_TILES`, keyed by
(ndim, head-dim bucket, dtype); shared memory grows with the kernel size, so
large kernels with large head dims fall back to naive.
"""

from __future__ import annotations

import math

from .. import _arrays
from .._args import Problem
from . import plan as P
from . import tiling
from .families import (CTYPES, FAMILIES, TILED_HEAD_DIMS, TILED_SHARED_BUDGET, TILED_THREADS, TILED_TILES,
                       accumulator_dtype)
from .naive import NaiveKernels, _bias, _problem_args, _tensor

FAMILY = FAMILIES["tiled"]


def head_dim_bucket(head_dim: int) -> int | None:
    return tiling.head_dim_bucket(head_dim, TILED_HEAD_DIMS)


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



class TiledKernels(NaiveKernels):
    """Naive kernels, with the split forward ops tiled where a tiled kernel serves."""

    def _tiled(self, problem: Problem, op: str, weights_dtype: str):
        """``(name, tile, shared bytes)`` of the tiled kernel for ``op``, or None (naive)."""
        dtype = problem.dtype
        hd = head_dim_bucket(problem.head_dim)
        tile = TILED_TILES.get((problem.ndim, hd, dtype))
        if tile is None or any(axis.stride != 1 for axis in problem.axes):
            return None
        if weights_dtype not in (dtype, accumulator_dtype(dtype)):
            return None
        smem = shared_bytes(problem, op, tile, hd, weights_dtype)
        if smem > TILED_SHARED_BUDGET or not 1 <= tiling.grid(problem, tile) <= P.MAX_GRID[0]:
            return None
        element, weights = CTYPES[dtype], CTYPES[weights_dtype]
        types = f"{element}, {weights}" if op == "qk" else f"{weights}, {element}"
        name = f"na_tiled_{op}<{types}, {hd}, {tile[0]}, {tile[1]}>"
        assert name in FAMILY.names, name  # the table and the family are one source of truth
        return name, tile, smem

    def choice(self, problem: Problem, op: str, weights_dtype: str | None = None) -> str:
        """The kernel name ``qk`` / ``av`` would launch for ``problem`` (tiled or naive).

        ``weights_dtype``: the logits' dtype for ``qk`` (``out_dtype``), the
        weights' dtype for ``av``; default the problem's dtype.
        """
        if op not in ("qk", "av"):
            raise ValueError(f"op must be 'qk' or 'av', got {op!r}")
        weights_dtype = weights_dtype or problem.dtype
        tiled = self._tiled(problem, op, weights_dtype)
        if tiled is not None:
            return tiled[0]
        element, weights = CTYPES[problem.dtype], CTYPES[weights_dtype]
        return f"na_qk_fwd<{element}, {weights}>" if op == "qk" else f"na_av_fwd<{weights}, {element}>"

    def _launch_tiled(self, name: str, problem: Problem, tile, smem: int, args: list[P.Arg]) -> None:
        grid = (tiling.grid(problem, tile), 1, 1)
        self.run(P.LaunchPlan(P.Kernel(FAMILY.source, name), grid, (TILED_THREADS, 1, 1), smem, tuple(args)))

    def qk(self, problem, query, key, bias, out_dtype, scale, fill):
        tiled = self._tiled(problem, "qk", out_dtype)
        if tiled is None or math.prod(problem.attn_shape) == 0:
            return super().qk(problem, query, key, bias, out_dtype, scale, fill)
        attn = _arrays.empty(query, problem.attn_shape, out_dtype)
        args = _tensor(query, problem) + _tensor(key, problem) + _bias(bias, problem) + _tensor(attn, problem)
        args += [P.f64(scale), P.f64(fill)] + _problem_args(problem)
        self._launch_tiled(tiled[0], problem, tiled[1], tiled[2], args)
        return attn

    def av(self, problem, weights, value, scale=1.0):
        tiled = self._tiled(problem, "av", _arrays.dtype_name(weights))
        if tiled is None or math.prod(problem.qkv_shape) == 0:
            return super().av(problem, weights, value, scale)
        out = _arrays.empty(value, problem.qkv_shape, problem.dtype)
        args = _tensor(weights, problem) + _tensor(value, problem) + _tensor(out, problem)
        args += [P.f64(scale)] + _problem_args(problem)
        self._launch_tiled(tiled[0], problem, tiled[1], tiled[2], args)
        return out
