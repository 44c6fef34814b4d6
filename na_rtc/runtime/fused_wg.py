"""The Hopper (wgmma, sm_90a) fused kernels: fp16 / bf16 on sm_90 GPUs.

Two families, as for the mma.sync kernels: the forward (``fused_wg``,
``cuda_src/na_fused_wg.cu``) and the dq and dK/dV kernels (``fused_wg_bwd``,
``cuda_src/na_fused_wg_bwd.cu``), so that a forward compiles only its own.

Every kernel has blocks of WG warpgroups (128 threads each, 64 queries or keys
each; two: :data:`WARPGROUPS`) per (batch, head, tile inside
one dilation group per axis), with the same arguments and results as the
mma.sync kernels (``fused_tc.py``):

* ``na_fused_wg_fwd<T, HD, TX, TY, KC, QS, WG>``: Q K^T and P V as warpgroup
  products on the key box, KC keys at a time in three stages, the next
  chunk's Q K^T running during this chunk's softmax (QS: Q from shared
  memory, at head dim 128);
* ``na_fused_wg_bwd_dq<T, HD, TX, TY, KC, QS, WG>``: dq the same way (S, dP,
  dQ += ds K; QS: Q and dOut from shared memory, in 2D at head dim 128);
* ``na_fused_wg_bwd_dkdv<T, HD, TX, TY, QC, WG>``: dK and dV per key tile over
  its query box, QC queries at a time (S^T, dP^T in the SS form, then
  dV += P^T dOut, dK += dS^T Q).

Opt-in (``NA_RTC_WGMMA=1``) until a GPU run has measured it against the
mma.sync kernels (``python -m na_rtc bench``'s ``fused_wgmma`` entry); the
emulator runs it under the same setting, so CI tests what an sm_90 GPU runs.
"""

from __future__ import annotations

import math

from .. import config as _config
from .._args import Problem
from . import fused_tc
from . import plan as P
from . import tiling
from .tiling import CTYPES

SOURCE = "na_fused_wg.cu"
BWD_SOURCE = "na_fused_wg_bwd.cu"
THREADS = 128  # one warpgroup; a block has WARPGROUPS[ndim] of them
ARCH = 90  # wgmma is sm_90a: the cubin runs on compute capability 9.0 only
DTYPES = ("float16", "bfloat16")
HEAD_DIMS = (32, 64, 128)
#: ndim -> warpgroups a block, each multiplying 64 rows (queries; keys in the dK/dV kernel) of the block's
#: tile. Two share every staged chunk, each skipping the chunks outside its own rows' windows: in 1D that
#: halves the K/V (or Q/dOut) traffic per row; in 2D the 16 x 8 tile's box (28 x 20 keys at k = 13) feeds
#: 128 queries where two 8 x 8 tiles load 2 x 20 x 20, while each warpgroup still multiplies only the
#: chunks of its own 8 x-rows' windows (the same chunks as an 8 x 8 tile's). One is built too, and
#: NA_RTC_WGMMA_WARPGROUPS picks it (python -m na_rtc bench's fused_wgmma_1wg entry measures it).
WARPGROUPS = {1: 2, 2: 2}
#: (ndim, warpgroups) built -> the block's tile (TX, TY): 64 rows a warpgroup
BLOCK_TILES = {(1, 1): (64, 1), (1, 2): (128, 1), (2, 1): (8, 8), (2, 2): (16, 8)}
#: head-dim bucket -> keys per staged chunk (the N of Q K^T); three stages of a K and a V chunk are 6 KC HD
#: elements
CHUNK_KEYS = {32: 64, 64: 64, 128: 64}
#: the other chunk sizes built for the forward with the table's warpgroups, for NA_RTC_WGMMA_CHUNK_KEYS to
#: pick (python -m na_rtc bench's fused_wgmma_kc32 entry): smaller chunks pad less of a 2D box (by the work
#: model of tests/test_tensor_core_work.py, 44% of the products inside a window at 128 x 128, k = 13 with 32
#: keys, 40% with 64) but pay the rescale, the barrier and the wait per chunk twice as often. Which wins is
#: for a GPU run to measure. Chunks of 128 keys spill at every head dim (this chunk's S and the next one's
#: alone take 128 fp32 registers a thread: 48 to 240 bytes of spills on sm_90a).
OTHER_CHUNK_KEYS = (32,)
#: the forward's stages (na_tc_kv_stream): chunk c + 1 has landed while chunk c is computed
FORWARD_STAGES = 3
#: (ndim, head-dim bucket, keys per chunk) where the forward reads Q from shared memory (the SS form)
#: instead of fragment registers: at head dim 128 with 64-key chunks, the O accumulators, this chunk's S
#: and the next chunk's S in flight beside it leave no room for Q's 32 fragment registers (60 bytes of
#: spills in 1D with two warpgroups, 48 in 2D). With 32-key chunks they fit (240 and 232 registers on
#: sm_90a), which matters more there: the SS form reads Q's 2 KiB a warpgroup from shared memory per 16
#: head dims of every chunk, which at 32 keys is more than an SM's 128 bytes a cycle of shared memory
#: deliver in the 16 cycles of the product (an estimate from the H100's published rates, not measured)
FORWARD_Q_SHARED = frozenset({(1, 128, 64), (2, 128, 64)})
#: the most dynamic shared memory a launch takes (sm_90 allows 227 KiB after the opt-in)
SHARED_BUDGET = 128 * 1024
#: the dq kernel's, where its tiles do not fit the mma.sync backward's budget: room for bias tables (one float
#: an entry) beside two warpgroups' Q and dOut tiles at head dim 128 (87 KiB)
DQ_SHARED_BUDGET = 192 * 1024


#: keys per staged chunk of the dq kernel (two stages of K and V chunks live in the Q and dOut tiles' rows)
DQ_CHUNK_KEYS = 32
#: (ndim, head-dim bucket) where the dq kernel reads Q and dOut from shared memory (the SS form) instead of
#: fragment registers: in 2D at head dim 128, Q and dOut fragments, S, dP and dQ in registers leave no room
#: for the 2D box's index math (12 to 16 bytes of spills)
DQ_OPERANDS_SHARED = {(2, 128)}


#: head-dim bucket -> queries per staged chunk of the dK/dV kernel (the N of S^T = K Q^T); at head dim 128
#: the dK and dV accumulators take 128 registers a thread, so S^T and dP^T get 16 each
DKDV_CHUNK_QUERIES = {32: 64, 64: 64, 128: 32}


def head_dim_bucket(head_dim: int) -> int | None:
    return tiling.head_dim_bucket(head_dim, HEAD_DIMS)


def shared_bytes(hd: int, dtype: str, ndim: int, warpgroups: int | None = None, chunk_keys: int | None = None) -> int:
    """The forward's: three stages of a K and a V chunk as core matrices; the Q tile (64 rows a warpgroup)
    borrows stage 2, or comes first: in the SS form, and where it is larger than a stage (Q_OWN in
    na_fused_wg.cu)."""
    wg = warpgroups or block_warpgroups(ndim)
    kc = chunk_keys or block_chunk_keys(hd, ndim, wg)
    q_own = (ndim, hd, kc) in FORWARD_Q_SHARED or 64 * wg > 2 * kc
    return (2 * FORWARD_STAGES * kc * hd + (64 * wg * hd if q_own else 0)) * tiling.ITEMSIZE[dtype]


def block_warpgroups(ndim: int) -> int:
    """The table's warpgroups a block, or the built number NA_RTC_WGMMA_WARPGROUPS asks for."""
    wanted = _config.wgmma_warpgroups()
    return wanted if wanted is not None and (ndim, wanted) in BLOCK_TILES else WARPGROUPS[ndim]


def block_chunk_keys(hd: int, ndim: int, warpgroups: int) -> int:
    """The forward's keys per chunk: the table's, or the built size NA_RTC_WGMMA_CHUNK_KEYS asks for (built
    with the table's warpgroups only)."""
    wanted = _config.wgmma_chunk_keys()
    built = warpgroups == WARPGROUPS[ndim] and wanted in OTHER_CHUNK_KEYS
    return wanted if built else CHUNK_KEYS[hd]


def kernel_name_of(hd: int, dtype: str, ndim: int, warpgroups: int | None = None,
                   chunk_keys: int | None = None) -> str:
    wg = warpgroups or block_warpgroups(ndim)
    kc = chunk_keys or block_chunk_keys(hd, ndim, wg)
    tx, ty = BLOCK_TILES[ndim, wg]
    qs = int((ndim, hd, kc) in FORWARD_Q_SHARED)
    return f"na_fused_wg_fwd<{CTYPES[dtype]}, {hd}, {tx}, {ty}, {kc}, {qs}, {wg}>"


def block_threads(ndim: int, warpgroups: int | None = None) -> int:
    return THREADS * (warpgroups or block_warpgroups(ndim))


def dq_name_of(hd: int, dtype: str, ndim: int, warpgroups: int | None = None) -> str:
    wg = warpgroups or block_warpgroups(ndim)
    tx, ty = BLOCK_TILES[ndim, wg]
    qs = int((ndim, hd) in DQ_OPERANDS_SHARED)
    return f"na_fused_wg_bwd_dq<{CTYPES[dtype]}, {hd}, {tx}, {ty}, {DQ_CHUNK_KEYS}, {qs}, {wg}>"


def dq_shared_bytes(hd: int, dtype: str, ndim: int, bias_entries: int = 0, warpgroups: int | None = None) -> int:
    """Q and dOut tiles (64 rows a warpgroup of hd + 8, then the K/V stages; in the SS form 64 rows of hd,
    then the stages apart), ds floats, one float per bias entry."""
    item, rows = tiling.ITEMSIZE[dtype], 64 * (warpgroups or block_warpgroups(ndim))
    if (ndim, hd) in DQ_OPERANDS_SHARED:
        tiles = (2 * rows + 4 * DQ_CHUNK_KEYS) * hd * item
    else:
        tiles = 2 * rows * (hd + 8) * item
    return tiling.align16(tiles) + 4 * rows * (DQ_CHUNK_KEYS + 1) + 4 * bias_entries


def dq_shared_budget(hd: int, ndim: int, warpgroups: int | None = None) -> int:
    """The most dynamic shared memory a dq launch takes: the mma.sync backward's budget with one warpgroup
    and fragments in registers, DQ_SHARED_BUDGET otherwise (the launcher opts in above 48 KiB)."""
    one = (warpgroups or block_warpgroups(ndim)) == 1 and (ndim, hd) not in DQ_OPERANDS_SHARED
    return fused_tc.BWD_SHARED_BUDGET if one else DQ_SHARED_BUDGET


def dkdv_name_of(hd: int, dtype: str, ndim: int, warpgroups: int | None = None) -> str:
    wg = warpgroups or block_warpgroups(ndim)
    tx, ty = BLOCK_TILES[ndim, wg]  # keys
    return f"na_fused_wg_bwd_dkdv<{CTYPES[dtype]}, {hd}, {tx}, {ty}, {DKDV_CHUNK_QUERIES[hd]}, {wg}>"


def dkdv_shared_bytes(hd: int, dtype: str, ndim: int, warpgroups: int | None = None) -> int:
    """K and V tiles (2 x 64 rows a warpgroup) and two stages of a Q and a dOut chunk as core matrices, then two
    stages of chunk tables (lse, delta, 4 window bounds: 6 words a query)."""
    qc, wg = DKDV_CHUNK_QUERIES[hd], warpgroups or block_warpgroups(ndim)
    return (2 * 64 * wg + 4 * qc) * hd * tiling.ITEMSIZE[dtype] + 2 * 6 * qc * 4


def _instantiations():
    return [(hd, dtype, ndim, wg) for dtype in DTYPES for hd in HEAD_DIMS for ndim, wg in BLOCK_TILES]


def _forward_instantiations():
    """(hd, dtype, ndim, warpgroups, chunk keys) of every forward built: the table's chunk size for every
    block tile, the other sizes with the table's warpgroups."""
    table = [(hd, dtype, ndim, wg, CHUNK_KEYS[hd]) for hd, dtype, ndim, wg in _instantiations()]
    others = [(hd, dtype, ndim, wg, kc) for hd, dtype, ndim, wg in _instantiations() if wg == WARPGROUPS[ndim]
              for kc in OTHER_CHUNK_KEYS]
    return table + others


def names() -> tuple[str, ...]:
    """The forward family's kernels."""
    return tuple(kernel_name_of(*instantiation) for instantiation in _forward_instantiations())


def bwd_names() -> tuple[str, ...]:
    """The backward family's kernels: the dq kernels, then the dK/dV kernels."""
    return tuple(name_of(*instantiation) for name_of in (dq_name_of, dkdv_name_of) for instantiation in _instantiations())


def _family(source: str, names_: tuple[str, ...], shared: dict[str, int], threads: dict[str, int]):
    from .families import Family

    return Family(source, names_, threads, shared, archs=(ARCH,), arch_specific=True)


def family():
    """The forward family (built for sm_90a only); imported late: families.py builds its table from here."""
    shared = {kernel_name_of(*i): shared_bytes(*i) for i in _forward_instantiations()}
    threads = {kernel_name_of(*i): block_threads(i[2], i[3]) for i in _forward_instantiations()}
    return _family(SOURCE, names(), shared, threads)


def bwd_family():
    """The dq and dK/dV family (built for sm_90a only)."""
    shared, threads = {}, {}
    for hd, dtype, ndim, wg in _instantiations():
        dq, dkdv = dq_name_of(hd, dtype, ndim, wg), dkdv_name_of(hd, dtype, ndim, wg)
        shared[dq] = dq_shared_budget(hd, ndim, wg)  # its largest launch (larger bias tables are not covered)
        shared[dkdv] = dkdv_shared_bytes(hd, dtype, ndim, wg)
        threads[dq] = threads[dkdv] = block_threads(ndim, wg)
    return _family(BWD_SOURCE, bwd_names(), shared, threads)


def grid(problem: Problem) -> int:
    """Blocks of every kernel of this family: one per tile of 64 rows a warpgroup."""
    return tiling.grid(problem, BLOCK_TILES[problem.ndim, block_warpgroups(problem.ndim)])


def covers(problem: Problem) -> bool:
    """What the mma.sync kernels cover (their backward serves this forward's gradients), within its budget."""
    if not fused_tc.covers(problem):
        return False
    hd = head_dim_bucket(problem.head_dim)
    return shared_bytes(hd, problem.dtype, problem.ndim) <= SHARED_BUDGET and grid(problem) <= P.MAX_GRID[0]


def dq_covers(problem: Problem) -> bool:
    """What the mma.sync backward covers, with the bias partials within the dq kernel's shared memory."""
    if not (covers(problem) and fused_tc.bwd_covers(problem)):
        return False
    entries = math.prod(problem.rpb_shape[1:]) if problem.has_rpb else 0
    hd = head_dim_bucket(problem.head_dim)
    return dq_shared_bytes(hd, problem.dtype, problem.ndim, entries) <= dq_shared_budget(hd, problem.ndim)


def dkdv_covers(problem: Problem) -> bool:
    """What the mma.sync backward covers (the dK/dV kernel's launch is the same for every problem size)."""
    return covers(problem) and fused_tc.bwd_covers(problem)


def kernel_name(problem: Problem) -> str:
    return kernel_name_of(head_dim_bucket(problem.head_dim), problem.dtype, problem.ndim)


def launch(problem: Problem) -> tuple[str, str, int, int, int]:
    """(source, kernel name, threads, blocks, dynamic shared bytes) of the forward of ``problem``."""
    hd = head_dim_bucket(problem.head_dim)
    return (SOURCE, kernel_name(problem), block_threads(problem.ndim), grid(problem),
            shared_bytes(hd, problem.dtype, problem.ndim))
