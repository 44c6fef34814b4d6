"""The Hopper (wgmma, sm_90a) fused forward (``cuda_src/na_fused_wg.cu``): fp16 / bf16 on sm_90 GPUs.

The dq and dK/dV kernels are a family of their own (``fused_wg_bwd.py``,
``cuda_src/na_fused_wg_bwd.cu``), as for the mma.sync kernels, so that a
forward compiles only its own; they share this module's block tables.

Every kernel has blocks of WG warpgroups (128 threads each, 64 queries or keys
each; two: :data:`WARPGROUPS`) per (batch, head, tile inside
one dilation group per axis), with the same arguments and results as the
mma.sync kernels (``fused_tc.py``):

* ``na_fused_wg_fwd<T, HD, TX, TY, KC, QS, WG>``: Q K^T and P V as warpgroup
  products on the key box, KC keys at a time in three stages, the next
  chunk's Q K^T running during this chunk's softmax (QS: Q from shared
  memory, at head dim 128);
* ``na_fused_wg_bwd_dq<T, HD, TX, TY, KC, QS, WG>``: dq the same way (S, dP,
  dQ += ds K; QS: Q and dOut from shared memory, in 2D and 3D at head dim 128);
* ``na_fused_wg_bwd_dkdv<T, HD, TX, TY, QC, WG>``: dK and dV per key tile over
  its query box, QC queries at a time (S^T, dP^T in the SS form, then
  dV += P^T dOut, dK += dS^T Q).

3D instantiations (RANK 3 and the tile's z extent as trailing template
arguments, as for the mma.sync kernels) are the 3D twins ``fused_wg_3d`` and
``fused_wg_bwd_3d``, with 4 x 8 x 4 (two warpgroups) and 2 x 8 x 4 (one)
tiles.

Opt-in (``NA_RTC_WGMMA=1``) until a GPU run has measured it against the
mma.sync kernels (``python -m na_rtc bench``'s ``fused_wgmma`` entry); the
emulator runs it under the same setting, so CI tests what an sm_90 GPU runs.
Warpgroups and chunk sizes other than the tables' come from the dispatch
policy (``NA_RTC_WGMMA_WARPGROUPS``, ``NA_RTC_WGMMA_CHUNK_KEYS``).
"""

from __future__ import annotations

from ..._args import Problem
from .. import launch as L
from .. import plan as P
from .. import tiling
from ..registry import Family, Launch, Role, register, source_of
from ..tiling import CTYPES
from .fused_tc import rank_arguments

NAME = "fused_wg"
SOURCE = "na_fused_wg.cu"
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
#: In 3D two warpgroups stack along x too: a 4 x 8 x 4 tile, warpgroup j its x-planes 2 j and 2 j + 1.
WARPGROUPS = {1: 2, 2: 2, 3: 2}
#: (ndim, warpgroups) built -> the block's tile (TX, TY; 3D: TX, TY, TZ, z fastest): 64 rows a warpgroup. A
#: warpgroup multiplies every key of each chunk it takes (no per-warp skipping as in the mma.sync kernels), so
#: the 3D tile is the 128-query one whose warpgroups multiply the largest share of products inside a window
#: over the 3D benchmark shapes (geometric mean; tests/test_tensor_core_work.py models it, 64-key chunks):
#: 4 x 8 x 4 multiplies 31% on 16 x 32 x 32 with k (3, 7, 7), 33% with k (5, 7, 7) causal in time, 77% on
#: 8 x 16 x 16 with k 7 and dilation (1, 2, 2), 78% on 30 x 48 x 80 with a (18, 24, 24) window and 100% at
#: stride (16, 8, 8) (8 x 4 x 4: 29%, 34%, 83%, 76%, 94%; 4 x 4 x 8: 31%, 33%, 77%, 76%, 100%); the
#: one-warpgroup tile is its half along x, 2 x 8 x 4 (32%, 33%, 77%, 78%, 100%), within 1% of the best
#: 64-query tile by the same mean (4 x 4 x 4: 30%, 34%, 89%, 76%, 94%).
BLOCK_TILES = {(1, 1): (64, 1), (1, 2): (128, 1), (2, 1): (8, 8), (2, 2): (16, 8), (3, 1): (2, 8, 4),
               (3, 2): (4, 8, 4)}
#: head-dim bucket -> keys per staged chunk (the N of Q K^T); three stages of a K and a V chunk are 6 KC HD
#: elements
CHUNK_KEYS = {32: 64, 64: 64, 128: 64}
#: the same in 3D: at head dim 128, 64-key chunks spill even with Q in shared memory (24 bytes on sm_90a: the
#: 3D box's index math beside the O accumulators and two chunks' S), 32-key ones fit with Q in registers
CHUNK_KEYS_3D = {32: 64, 64: 64, 128: 32}
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
#: spills in 1D with two warpgroups, 48 in 2D; 3D takes 32-key chunks there, CHUNK_KEYS_3D). With 32-key chunks they fit (240 and 232 registers on
#: sm_90a), which matters more there: the SS form reads Q's 2 KiB a warpgroup from shared memory per 16
#: head dims of every chunk, which at 32 keys is more than an SM's 128 bytes a cycle of shared memory
#: deliver in the 16 cycles of the product (an estimate from the H100's published rates, not measured)
FORWARD_Q_SHARED = frozenset({(1, 128, 64), (2, 128, 64)})
#: the most dynamic shared memory a launch takes (sm_90 allows 227 KiB after the opt-in)
SHARED_BUDGET = 128 * 1024



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


def block_warpgroups(ndim: int, policy=None) -> int:
    """The table's warpgroups a block, or the built number the policy (NA_RTC_WGMMA_WARPGROUPS) asks for."""
    wanted = policy.settings.wgmma_warpgroups if policy is not None else None
    return wanted if wanted is not None and (ndim, wanted) in BLOCK_TILES else WARPGROUPS[ndim]


def block_chunk_keys(hd: int, ndim: int, warpgroups: int, policy=None) -> int:
    """The forward's keys per chunk: the table's, or the built size the policy (NA_RTC_WGMMA_CHUNK_KEYS) asks
    for (built with the table's warpgroups only)."""
    wanted = policy.settings.wgmma_chunk_keys if policy is not None else None
    built = warpgroups == WARPGROUPS[ndim] and wanted in OTHER_CHUNK_KEYS
    return wanted if built else table_chunk_keys(hd, ndim)


def table_chunk_keys(hd: int, ndim: int) -> int:
    return (CHUNK_KEYS_3D if ndim == 3 else CHUNK_KEYS)[hd]


def kernel_name_of(hd: int, dtype: str, ndim: int, warpgroups: int | None = None,
                   chunk_keys: int | None = None) -> str:
    wg = warpgroups or block_warpgroups(ndim)
    kc = chunk_keys or block_chunk_keys(hd, ndim, wg)
    tile = BLOCK_TILES[ndim, wg]
    qs = int((ndim, hd, kc) in FORWARD_Q_SHARED)
    return (f"na_fused_wg_fwd<{CTYPES[dtype]}, {hd}, {tile[0]}, {tile[1]}, {kc}, {qs}, {wg}"
            f"{rank_arguments(ndim, tile)}>")


def block_threads(ndim: int, warpgroups: int | None = None) -> int:
    return THREADS * (warpgroups or block_warpgroups(ndim))


def instantiations(ranks=(1, 2)):
    """(hd, dtype, ndim, warpgroups) of every block built for ``ranks`` (the family's (1, 2) or its 3D twin's
    (3,)), for the forward's and the backward's kernels."""
    return [(hd, dtype, ndim, wg) for dtype in DTYPES for hd in HEAD_DIMS for ndim, wg in BLOCK_TILES
            if ndim in ranks]


def _forward_instantiations(ranks=(1, 2)):
    """(hd, dtype, ndim, warpgroups, chunk keys) of every forward built: the table's chunk size for every
    block tile, the other sizes with the table's warpgroups."""
    blocks = instantiations(ranks)
    table = [(hd, dtype, ndim, wg, table_chunk_keys(hd, ndim)) for hd, dtype, ndim, wg in blocks]
    others = [(hd, dtype, ndim, wg, kc) for hd, dtype, ndim, wg in blocks if wg == WARPGROUPS[ndim]
              for kc in OTHER_CHUNK_KEYS if kc != table_chunk_keys(hd, ndim)]
    return table + others


def names(ranks=(1, 2)) -> tuple[str, ...]:
    """The forward family's kernels (``ranks`` (3,): its 3D twin's)."""
    return tuple(kernel_name_of(*instantiation) for instantiation in _forward_instantiations(ranks))


def grid(problem: Problem, policy=None, kv: bool = False) -> int:
    """Blocks of every kernel of the wgmma families: one per tile of 64 rows a warpgroup (``kv``: the dK/dV
    kernel's, per key/value head)."""
    tile = BLOCK_TILES[problem.ndim, block_warpgroups(problem.ndim, policy)]
    return (tiling.kv_grid if kv else tiling.grid)(problem, tile)


def covers(problem: Problem, policy=None) -> tuple[bool, str]:
    """Given what the mma.sync kernels cover (their backward serves this forward's gradients; the dispatcher
    checks ``fused_tc.covers`` first): the forward within its shared memory budget and the grid limit."""
    hd = head_dim_bucket(problem.max_head_dim)
    wg = block_warpgroups(problem.ndim, policy)
    smem = shared_bytes(hd, problem.dtype, problem.ndim, wg, block_chunk_keys(hd, problem.ndim, wg, policy))
    if smem > SHARED_BUDGET:
        return False, f"{smem} bytes of shared memory, more than {SHARED_BUDGET}"
    blocks = grid(problem, policy)
    return P.within_grid_limit(blocks)


def kernel_name(problem: Problem, policy=None) -> str:
    hd = head_dim_bucket(problem.max_head_dim)
    wg = block_warpgroups(problem.ndim, policy)
    return kernel_name_of(hd, problem.dtype, problem.ndim, wg, block_chunk_keys(hd, problem.ndim, wg, policy))


def plan(problem: Problem, policy=None) -> Launch:
    hd = head_dim_bucket(problem.max_head_dim)
    wg = block_warpgroups(problem.ndim, policy)
    kc = block_chunk_keys(hd, problem.ndim, wg, policy)
    return Launch(P.Kernel(source_of(NAME), kernel_name_of(hd, problem.dtype, problem.ndim, wg, kc)),
                  grid(problem, policy), block_threads(problem.ndim, wg), shared_bytes(hd, problem.dtype, problem.ndim,
                                                                                       wg, kc))


def _family(name: str, ranks) -> Family:
    """The family (``ranks`` (1, 2)) or its 3D twin (``(3,)``): one rule and planner, each its instantiations
    (the required mma.sync rule is the twin's for a 3D call: the dispatcher resolves it by rank)."""
    instantiations_ = _forward_instantiations(ranks)
    return Family(
        SOURCE, names(ranks), {kernel_name_of(*i): block_threads(i[2], i[3]) for i in instantiations_},
        {kernel_name_of(*i): shared_bytes(*i) for i in instantiations_}, archs=(ARCH,), arch_specific=True,
        name=name, roles={"forward": Role(covers, plan, L.fused_forward, requires=(("fused_tc", "forward"),),
                                   extra_tokens=True)},
        ranks=frozenset(ranks))


FAMILY = register(_family(NAME, (1, 2)))
FAMILY_3D = register(_family(NAME + "_3d", (3,)))
