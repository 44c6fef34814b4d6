"""Fused (flash-style) SIMT backward kernels (``cuda_src/na_fused_bwd.cu``).

The fused backward computes ``(dq, dk, dv, drpb)`` from the forward's
``output`` and ``logsumexp`` without materializing the attention matrix
(:func:`na_rtc.runtime.launch.fused_backward` launches it):

1. ``na_fused_delta<T>`` (3D: ``<T, 3>``): ``delta = rowsum(dOut * out)``
   (float32 workspace, one thread per row);
2. ``na_fused_bwd_dq<T, HD, TX, TY, KC>``: one block per (batch, head, query
   tile in one dilation group), the union of the tile's windows streamed KC
   keys at a time; with a bias, per-tile partial sums of the logit gradient
   per relative offset (float32 workspace ``[heads, tiles, entries]``);
3. ``na_fused_bwd_dkdv<T, HD, TX, TY, QC>``: one block per (batch, head, key
   tile), the box of queries that can see the tile streamed QC at a time;
4. ``na_fused_rpb_reduce`` (3D: ``na_fused_rpb_reduce_3d``, the same code; bias only): a fixed-order sum of
   the partials.

3D instantiations (``<..., 3, TZ>``: the kernels' trailing rank and z-extent parameters) live in the 3D twin
``fused_bwd_3d``, with the same roles, so that neither family's build grows with the other's.

Every sum has a fixed order and there are no atomics: run-to-run bitwise
deterministic. Roles: ``dq`` and ``dkdv`` (one rule: fp32/fp16/bf16, head dim
<= 256, every stride / dilation / causal combination, shared memory within
:data:`SHARED_BUDGET`, grid within CUDA's limit), and ``delta`` and
``rpb_reduce``, which every fused backward launches around its dq and dK/dV
kernels (the tensor-core ones too: ``fused_tc_bwd.py``, ``fused_wg_bwd.py``).
"""

from __future__ import annotations

import math

from ..._args import Problem
from .. import plan as P
from .. import tiling
from ..registry import RANK3_SUFFIX, Family, Launch, Role, register, source_of
from ..tiling import CTYPES

NAME = "fused_bwd"
SOURCE = "na_fused_bwd.cu"
THREADS = 256  # NA_FB_THREADS in na_fused_bwd.cu
SHARED_BUDGET = 46 * 1024  # dynamic shared memory; static + dynamic stays under 48 KiB (no opt-in)
DTYPES = ("float32", "float16", "bfloat16")
HEAD_DIM_BUCKETS = (32, 64, 128, 256)

#: (ndim, head-dim bucket, dtype) -> {"dq": (TX, TY, KC), "dkdv": (TX, TY, QC)}; 3D: (TX, TY, TZ, chunk).
#: dq: TX x TY queries per block (256 / (TX TY) threads per query hold HD / that
#: dims of dq in registers), KC keys per streamed chunk. dkdv: TX x TY keys per
#: block (threads per key hold dk and dv dims), QC queries per chunk.
#: Shared memory at D = HD, see :func:`dq_shared_bytes` / :func:`dkdv_shared_bytes`:
#: dq   2 TQ RS s + 2 KC RS s + 4 TQ (KC + 1) (+ 4 bias entries)
#: dkdv 2 TK RS s + 2 QC RS s + 8 TK (QC + 1) + 24 QC (3D: 32 QC, a z window per query)
#: (RS = :func:`row_stride`: D padded to an odd number of 4-byte words)
#: 3D tiles are the squarest of their size (the key box of a cube wastes the fewest keys per query). 3D
#: uses 2D's sizes and chunks: the box is streamed, so only the bias partials (4 bytes per entry,
#: (2kx-1)(2ky-1)(2kz-1) entries) grow with the window, and every dq below leaves room for 2400 entries
#: (a 7x7x7 window has 2197; (3,7,7) 845, (5,7,7) 1521; dilation does not change them). Larger 3D windows
#: with a bias fall through to the split kernels.
_QTILE = {64: {1: (64, 1), 2: (8, 8), 3: (4, 4, 4)}, 32: {1: (32, 1), 2: (8, 4), 3: (2, 4, 4)},
          16: {1: (16, 1), 2: (4, 4), 3: (2, 2, 4)}, 8: {1: (8, 1), 2: (4, 2), 3: (2, 2, 2)}}
_CONFIG = {  # (hd, itemsize) -> ((query tile size, KC), (key tile size, QC)); bytes at D = HD, no bias
    (32, 4): ((64, 32), (16, 64)),   # dq 33.0 KiB, dkdv 30.2 KiB
    (64, 4): ((32, 32), (32, 32)),   # dq 36.6 KiB, dkdv 41.5 KiB
    (128, 4): ((16, 16), (16, 16)),  # dq 33.3 KiB, dkdv 34.8 KiB
    (32, 2): ((64, 64), (64, 32)),   # dq 33.3 KiB, dkdv 30.0 KiB
    (64, 2): ((64, 32), (32, 64)),   # dq 33.0 KiB, dkdv 42.5 KiB
    (128, 2): ((32, 32), (16, 32)),  # dq 36.6 KiB, dkdv 29.3 KiB
    (256, 4): ((8, 8), (8, 8)),      # dq 32.4 KiB, dkdv 32.8 KiB (a warp per query / key)
    (256, 2): ((8, 16), (8, 16)),    # dq 24.7 KiB, dkdv 25.6 KiB
}
TABLE: dict[tuple[int, int, str], dict[str, tuple[int, int, int]]] = {}
for _dtype in DTYPES:
    for _ndim in (1, 2, 3):
        for _hd in HEAD_DIM_BUCKETS:
            (_tq, _kc), (_tk, _qc) = _CONFIG[(_hd, tiling.ITEMSIZE[_dtype])]
            TABLE[(_ndim, _hd, _dtype)] = {"dq": (*_QTILE[_tq][_ndim], _kc), "dkdv": (*_QTILE[_tk][_ndim], _qc)}

DELTA_PREFIX = "na_fused_delta"
RPB_REDUCE = "na_fused_rpb_reduce"
#: the same reduction under the 3D twin's own name (a kernel belongs to one family)
RPB_REDUCE_3D = "na_fused_rpb_reduce_3d"


def head_dim_bucket(head_dim: int) -> int | None:
    return tiling.head_dim_bucket(head_dim, HEAD_DIM_BUCKETS)


def delta_name(dtype: str, ndim: int = 2) -> str:
    return f"na_fused_delta<{CTYPES[dtype]}{', 3' if ndim == 3 else ''}>"


def _tile_args(hd: int, cfg) -> str:
    """``HD, TX, TY, chunk`` and, for a 3D ``(TX, TY, TZ, chunk)``, the trailing ``3, TZ``."""
    *tile, chunk = cfg
    return f"{hd}, {tile[0]}, {tile[1]}, {chunk}" + (f", 3, {tile[2]}" if len(tile) == 3 else "")


def dq_name(dtype: str, hd: int, cfg) -> str:
    return f"na_fused_bwd_dq<{CTYPES[dtype]}, {_tile_args(hd, cfg)}>"


def dkdv_name(dtype: str, hd: int, cfg) -> str:
    return f"na_fused_bwd_dkdv<{CTYPES[dtype]}, {_tile_args(hd, cfg)}>"


def _tile_size(cfg) -> int:
    """Queries (dq) or keys (dK/dV) of a configuration's tile."""
    return math.prod(cfg[:-1])


def _entries(problem: Problem) -> int:
    return math.prod(problem.rpb_shape[1:])


def row_stride(head_dim: int, itemsize: int) -> int:
    """Elements per staged row (na_fb_row): an odd number of 4-byte words."""
    if itemsize >= 4:
        return head_dim | 1
    return ((-(-head_dim * itemsize // 4)) | 1) * 4 // itemsize


def dq_shared_bytes(problem: Problem, cfg, with_rpb: bool) -> int:
    tq, kc, s = _tile_size(cfg), cfg[-1], tiling.ITEMSIZE[problem.dtype]
    rs = row_stride(problem.max_head_dim, s)
    return 2 * tiling.align16(tq * rs * s) + 2 * tiling.align16(kc * rs * s) + 4 * tq * (kc + 1) + (
        4 * _entries(problem) if with_rpb else 0)


def dkdv_shared_bytes(problem: Problem, cfg) -> int:
    tk, qc, s = _tile_size(cfg), cfg[-1], tiling.ITEMSIZE[problem.dtype]
    rs = row_stride(problem.max_head_dim, s)
    window_ints = 6 if problem.ndim == 3 else 4  # per staged query: [start, end) per axis (1D runs as 2D)
    return (2 * tiling.align16(tk * rs * s) + 2 * tiling.align16(qc * rs * s) + 8 * tk * (qc + 1)
            + (8 + 4 * window_ints) * qc)


def _configs(problem: Problem):
    """``(hd, dq cfg, dkdv cfg)`` of the table (the problem's dtype and head dim have an entry)."""
    hd = head_dim_bucket(problem.max_head_dim)
    cfg = TABLE[(problem.ndim, hd, problem.dtype)]
    return hd, cfg["dq"], cfg["dkdv"]


def covers(problem: Problem, policy=None) -> tuple[bool, str]:
    """fp32/fp16/bf16, head dim <= 256, 1D/2D/3D, shared memory within the budget and grids within CUDA's
    limit."""
    hd = head_dim_bucket(problem.max_head_dim)
    if problem.dtype not in DTYPES or (problem.ndim, hd, problem.dtype) not in TABLE:
        return False, (f"no fused backward for {problem.ndim}D {problem.dtype} at head_dim {problem.max_head_dim} "
                       f"(float32/float16/bfloat16, head_dim <= {HEAD_DIM_BUCKETS[-1]})")
    _, dq, dkdv = _configs(problem)
    shared = max(dq_shared_bytes(problem, dq, problem.has_rpb), dkdv_shared_bytes(problem, dkdv))
    if shared > SHARED_BUDGET:
        return False, f"{shared} bytes of shared memory, more than {SHARED_BUDGET}"
    blocks = max(tiling.grid(problem, dq), tiling.kv_grid(problem, dkdv),
                 -(-math.prod(problem.lse_shape) // THREADS))
    return P.within_grid_limit(blocks)


def dq_plan(problem: Problem, policy=None) -> Launch:
    """The dq launch; ``tiles``: query tiles per head (the bias partials' middle dimension)."""
    hd, cfg, _ = _configs(problem)
    tiles = problem.batch * tiling.tiles(problem, cfg)
    return Launch(P.Kernel(_source(problem), dq_name(problem.dtype, hd, cfg)), tiles * problem.heads, THREADS,
                  dq_shared_bytes(problem, cfg, problem.has_rpb), tiles)


def dkdv_plan(problem: Problem, policy=None) -> Launch:
    hd, _, cfg = _configs(problem)
    return Launch(P.Kernel(_source(problem), dkdv_name(problem.dtype, hd, cfg)),
                  tiling.kv_grid(problem, cfg), THREADS, dkdv_shared_bytes(problem, cfg))


def delta_plan(problem: Problem, policy=None) -> Launch:
    """``delta = rowsum(dOut * out)``: one thread per row."""
    return Launch(P.Kernel(_source(problem), delta_name(problem.dtype, problem.ndim)),
                  -(-math.prod(problem.lse_shape) // THREADS),
                  THREADS, 0)


def rpb_reduce_plan(problem: Problem, policy=None) -> Launch:
    """The fixed-order sum of the dq kernels' bias partials: 32 entries of one head per block."""
    name = RPB_REDUCE_3D if problem.ndim == 3 else RPB_REDUCE
    return Launch(P.Kernel(_source(problem), name), problem.heads * -(-_entries(problem) // 32), THREADS, 0)


def _always(problem: Problem, policy=None) -> tuple[bool, str]:
    return True, ""


def _source(problem: Problem) -> str:
    """The source of the registered family serving the problem's rank (the twin for 3D)."""
    return source_of(NAME if problem.ndim in FAMILY.ranks else FAMILY_3D.name)


def names(ranks=frozenset({1, 2})) -> tuple[str, ...]:
    """Every instantiation the tables can pick for ``ranks``."""
    rank3 = 3 in ranks
    names = [delta_name(dtype, 3 if rank3 else 2) for dtype in DTYPES]
    for (ndim, hd, dtype), cfg in TABLE.items():
        if ndim in ranks:
            names += [dq_name(dtype, hd, cfg["dq"]), dkdv_name(dtype, hd, cfg["dkdv"])]
    names.append(RPB_REDUCE_3D if rank3 else RPB_REDUCE)
    return tuple(dict.fromkeys(names))


def _family(name: str, ranks: frozenset) -> Family:
    kernels = names(ranks)
    # the largest dynamic shared memory any launch of each kernel uses: the budget (larger ones are not covered)
    shared = {n: (SHARED_BUDGET if n.startswith(("na_fused_bwd_dq", "na_fused_bwd_dkdv")) else 0) for n in kernels}
    return Family(SOURCE, kernels, dict.fromkeys(kernels, THREADS), shared, name=name, ranks=ranks, roles={
        "dq": Role(covers, dq_plan, extra_tokens=True), "dkdv": Role(covers, dkdv_plan),
        "delta": Role(_always, delta_plan), "rpb_reduce": Role(_always, rpb_reduce_plan),
    })


FAMILY = register(_family(NAME, frozenset({1, 2})))
#: the 3D twin: the rank-3 instantiations of the same source
FAMILY_3D = register(_family(NAME + RANK3_SUFFIX, frozenset({3})))
