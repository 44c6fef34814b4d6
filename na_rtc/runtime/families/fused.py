"""The fused (flash-style) SIMT forward kernel (``cuda_src/na_fused.cu``).

``na_fused_fwd<T, HD, TX, TY>`` (3D: ``na_fused_fwd<T, HD, TX, TY, 3, TZ>``): one block of
:data:`THREADS` threads per (batch, head, query tile inside one dilation
group per axis); the key/value box the tile's windows cover is streamed
through shared memory in chunks, softmax is online in fp32, and the kernel
writes the output (problem dtype) and the logsumexp (float32).

Covered: float32 / float16 / bfloat16, head dim <= 256, every kernel size,
stride, dilation and causal combination, with or without RPB. Shared memory
is fixed per instantiation (``2 * chunk_keys * HD`` elements, at most 32
KiB: no opt-in), whatever the kernel size or rank. The query tile comes from
:data:`TILES`, keyed by (ndim, head-dim bucket, dtype); a group of ``THREADS / (TX * TY)`` lanes owns one
query and holds ``HD / lanes`` output dims in registers. The dispatcher tries
it after the tensor-core kernels (``fused_wg.py``, ``fused_tc.py``), which
take the same arguments.

Two families share the source: ``fused`` (1D and 2D) and its 3D twin
``fused_3d`` (the rank-3 instantiations), so that neither's build grows with
the other's.
"""

from __future__ import annotations

from ..._args import Problem
from .. import launch as L
from .. import plan as P
from .. import tiling
from ..registry import RANK3_SUFFIX, Family, Launch, Role, register, source_of
from ..tiling import CTYPES

NAME = "fused"
SOURCE = "na_fused.cu"
THREADS = 256  # NA_FUSED_THREADS in na_fused.cu
SHARED_BUDGET = 48 * 1024
DTYPES = ("float32", "float16", "bfloat16")
HEAD_DIMS = (32, 64, 128, 256)  # head-dim buckets: runtime head_dim <= bucket

#: (ndim, head-dim bucket, dtype) -> query tile (TX, TY) in group coordinates (1D: TY = 1), 3D (TX, TY, TZ).
#: TX * TY (* TZ) queries per 256-thread block, 256 / queries lanes per query, 8 dims per lane
#: (head dim 256: a whole warp per query, 8 queries per block).
#: 3D tiles are as close to cubes as the query count allows: a tile's key box is (T + k - 1) per axis at
#: stride 1 (dilation tiles inside a group, so it stays dense), and a cube wastes the fewest of its keys on
#: every query's window (4x4x4 and k = 7: 343 of 1000 box keys per query; a flat 2x4x8 tile: 343 of 1120).
#: The box is streamed in chunks of :func:`chunk_keys` keys, so shared memory does not grow with it: any
#: window fits (k = 7, (3, 7, 7), (5, 7, 7), dilated or not, take the 2 * 16 * HD elements a 3D k = 3 takes).
TILES: dict[tuple[int, int, str], tuple[int, ...]] = {
    (ndim, hd, dtype): tile
    for dtype in DTYPES
    for (ndim, hd), tile in {
        (1, 32): (64, 1), (1, 64): (32, 1), (1, 128): (16, 1), (1, 256): (8, 1),
        (2, 32): (8, 8), (2, 64): (8, 4), (2, 128): (4, 4), (2, 256): (4, 2),
        (3, 32): (4, 4, 4), (3, 64): (2, 4, 4), (3, 128): (2, 2, 4), (3, 256): (2, 2, 2),
    }.items()
}


def head_dim_bucket(head_dim: int) -> int | None:
    return tiling.head_dim_bucket(head_dim, HEAD_DIMS)


def chunk_keys(hd: int, ndim: int = 2) -> int:
    """Keys per staged chunk (na_fused_chunk in na_fused.cu): 3D chunks are 16 keys at every head dim (their
    logits live in registers beside a third axis' coordinates; 32 would spill)."""
    return 32 if hd <= 64 and ndim < 3 else 16


def shared_bytes(hd: int, dtype: str, ndim: int = 2) -> int:
    """Dynamic shared memory of one block: a chunk of K rows and of V rows, HD elements each."""
    return 2 * chunk_keys(hd, ndim) * hd * tiling.ITEMSIZE[dtype]


def kernel_name_of(hd: int, dtype: str, tile: tuple[int, ...]) -> str:
    """The instantiation of a tile: 1D/2D ``<T, HD, TX, TY>``, 3D ``<T, HD, TX, TY, 3, TZ>`` (the kernel's
    trailing RANK and TZ parameters keep their defaults 2 and 1 below rank 3)."""
    rank3 = f", 3, {tile[2]}" if len(tile) == 3 else ""
    return f"na_fused_fwd<{CTYPES[dtype]}, {hd}, {tile[0]}, {tile[1]}{rank3}>"


def _instantiations(ranks) -> dict[str, int]:
    """Every instantiation serving ``ranks``, with its dynamic shared memory."""
    return {kernel_name_of(hd, dtype, tile): shared_bytes(hd, dtype, ndim)
            for (ndim, hd, dtype), tile in TILES.items() if ndim in ranks}


def names(ranks=frozenset({1, 2})) -> tuple[str, ...]:
    return tuple(_instantiations(ranks))


def covers(problem: Problem, policy=None) -> tuple[bool, str]:
    """float32/float16/bfloat16, head dim <= 256, 1D, 2D or 3D, within the grid limit."""
    hd = head_dim_bucket(problem.max_head_dim)
    tile = TILES.get((problem.ndim, hd, problem.dtype))
    if tile is None:
        return False, (f"no fused kernel for {problem.ndim}D {problem.dtype} at head_dim {problem.max_head_dim} "
                       f"(float32/float16/bfloat16, head_dim <= {HEAD_DIMS[-1]})")
    shared = shared_bytes(hd, problem.dtype, problem.ndim)
    if shared > SHARED_BUDGET:
        return False, f"{shared} bytes of shared memory, more than {SHARED_BUDGET}"
    blocks = tiling.grid(problem, tile)
    return P.within_grid_limit(blocks)


def plan(problem: Problem, policy=None) -> Launch:
    hd = head_dim_bucket(problem.max_head_dim)
    tile = TILES[problem.ndim, hd, problem.dtype]
    family = NAME if problem.ndim in FAMILY.ranks else FAMILY_3D.name
    return Launch(P.Kernel(source_of(family), kernel_name_of(hd, problem.dtype, tile)), tiling.grid(problem, tile),
                  THREADS, shared_bytes(hd, problem.dtype, problem.ndim))


def _family(name: str, ranks: frozenset) -> Family:
    kernels = _instantiations(ranks)
    return Family(SOURCE, tuple(kernels), dict.fromkeys(kernels, THREADS), kernels, name=name,
                  roles={"forward": Role(covers, plan, L.fused_forward, extra_tokens=True)}, ranks=ranks)


FAMILY = register(_family(NAME, frozenset({1, 2})))
#: the 3D twin: the rank-3 instantiations of the same source
FAMILY_3D = register(_family(NAME + RANK3_SUFFIX, frozenset({3})))
