"""The Hopper (wgmma, sm_90a) fused forward (``cuda_src/na_fused_wg.cu``): fp16 / bf16 on sm_90 GPUs.

``na_fused_wg_fwd<T, HD, TX, TY, KC>``: one block of one warpgroup (128
threads) per (batch, head, query tile of 64 group coordinates inside one
dilation group per axis); Q K^T and P V as warpgroup products on the key box,
KC keys at a time, double-buffered. Same arguments and results as the
mma.sync forward (``fused_tc.py``), whose backward kernels serve its
gradients.

Opt-in (``NA_RTC_WGMMA=1``) until a GPU run has measured it against the
mma.sync forward (``python -m na_rtc bench``'s ``fused_wgmma`` entry); the
emulator runs it under the same setting, so CI tests what an sm_90 GPU runs.
"""

from __future__ import annotations

from .. import config as _config
from .._args import Problem
from . import fused_tc
from . import plan as P
from . import tiling
from .tiling import CTYPES

SOURCE = "na_fused_wg.cu"
THREADS = 128  # one warpgroup
ARCH = 90  # wgmma is sm_90a: the cubin runs on compute capability 9.0 only
DTYPES = ("float16", "bfloat16")
HEAD_DIMS = (32, 64, 128)
#: ndim -> query tile (TX, TY): 64 queries, the M of every wgmma
TILES = {1: (64, 1), 2: (8, 8)}
#: head-dim bucket -> keys per staged chunk (the N of Q K^T); shared memory is 4 KC HD elements
CHUNK_KEYS = {32: 64, 64: 64, 128: 64}
#: the most dynamic shared memory a launch takes (sm_90 allows 227 KiB after the opt-in)
SHARED_BUDGET = 96 * 1024


def head_dim_bucket(head_dim: int) -> int | None:
    return tiling.head_dim_bucket(head_dim, HEAD_DIMS)


def shared_bytes(hd: int, dtype: str) -> int:
    """Two stages of a K and a V chunk as core matrices (the 64-row Q tile borrows stage 1)."""
    return 4 * CHUNK_KEYS[hd] * hd * tiling.ITEMSIZE[dtype]


def kernel_name_of(hd: int, dtype: str, ndim: int) -> str:
    tx, ty = TILES[ndim]
    return f"na_fused_wg_fwd<{CTYPES[dtype]}, {hd}, {tx}, {ty}, {CHUNK_KEYS[hd]}>"


def names() -> tuple[str, ...]:
    return tuple(kernel_name_of(hd, dtype, ndim) for dtype in DTYPES for hd in HEAD_DIMS for ndim in (1, 2))


def family():
    """The kernel family (built for sm_90a only); imported late: families.py builds its table from here."""
    from .families import Family

    shared = {kernel_name_of(hd, dtype, ndim): shared_bytes(hd, dtype)
              for dtype in DTYPES for hd in HEAD_DIMS for ndim in (1, 2)}
    return Family(SOURCE, names(), {name: THREADS for name in names()}, shared, archs=(ARCH,), arch_specific=True)


def grid(problem: Problem) -> int:
    return tiling.grid(problem, TILES[problem.ndim])


def covers(problem: Problem) -> bool:
    """What the mma.sync kernels cover (their backward serves this forward's gradients), within its budget."""
    if not fused_tc.covers(problem):
        return False
    hd = head_dim_bucket(problem.head_dim)
    return shared_bytes(hd, problem.dtype) <= SHARED_BUDGET and grid(problem) <= P.MAX_GRID[0]


def kernel_name(problem: Problem) -> str:
    return kernel_name_of(head_dim_bucket(problem.head_dim), problem.dtype, problem.ndim)


def launch(problem: Problem) -> tuple[str, str, int, int, int]:
    """(source, kernel name, threads, blocks, dynamic shared bytes) of the forward of ``problem``."""
    hd = head_dim_bucket(problem.head_dim)
    return SOURCE, kernel_name(problem), THREADS, grid(problem), shared_bytes(hd, problem.dtype)


def enabled() -> bool:
    return _config.wgmma()
