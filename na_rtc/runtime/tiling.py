"""Small shared facts of the kernel launchers (no imports from the rest of
runtime/, so families.py and every launcher module can use them freely)."""

from __future__ import annotations

#: our element types: dtype name -> C++ type in cuda_src/na_types.cuh
CTYPES = {"float32": "float", "float64": "double", "float16": "fp16_t", "bfloat16": "bf16_t"}
ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}


def accumulator_dtype(dtype: str) -> str:
    """Kernels accumulate in float32, or float64 for float64 inputs."""
    return "float64" if dtype == "float64" else "float32"


def head_dim_bucket(head_dim: int, buckets) -> int | None:
    """The smallest bucket holding ``head_dim`` (kernels take the actual head dim at run time)."""
    return next((bucket for bucket in buckets if head_dim <= bucket), None)


def tiles_per_axis(length: int, dilation: int, tile: int) -> int:
    """Tiles along an axis as the tiled kernels count them: ``d * ceil(ceil(L / d) / T)``
    (every dilation group gets as many tiles as the longest, group 0)."""
    longest_group = -(-length // dilation)
    return dilation * -(-longest_group // tile)


def tiles(problem, tile) -> int:
    """Tiles of one (batch, head) of a validated problem for a (TX, TY) tile (1D: TY ignored)."""
    count = 1
    for axis, size in zip(problem.axes, tile):
        count *= tiles_per_axis(axis.length, axis.dilation, size)
    return count


def grid(problem, tile) -> int:
    """Blocks of a launch with one block per (batch, head, tile)."""
    return problem.batch * problem.heads * tiles(problem, tile)


def kv_grid(problem, tile) -> int:
    """Blocks of a launch with one block per (batch, key/value head, tile): the kernels that write dK/dV, whose
    block sums over the query heads reading its key/value head (grouped-query attention)."""
    return problem.batch * problem.kv_heads * tiles(problem, tile)


def align16(n: int) -> int:
    return -(-n // 16) * 16
