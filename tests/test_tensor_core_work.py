"""The work of the tensor-core kernels, counted: the emulator counts the
tensor-core instructions a launch executes (one per warp: a warpgroup's
wgmma counts four), and the counts must equal a model of what each block
must multiply.

The wgmma kernels walk a block's box (keys for the forward and dq, queries
for dK/dV) in chunks, and each warpgroup multiplies only the chunks that hold
a key (query) one of its own rows sees: with two warpgroups a block, that is
what keeps a 128-row block from doing more products than two 64-row ones. A
kernel that multiplied chunks it could skip would still give right results,
and no timing on a CPU would show it; these counts do. The model is
independent of the kernels' formulas: the rows' windows (inverse ranges for
dK/dV) from ``na_rtc.window``, the box positions of the keys they hold, and
the chunks those fall in.

The mma.sync forward skips, per warp, the 8-key tiles that none of its rows
sees (and the 16-key steps of P V with neither tile seen); its model is the
same visibility, per warp and tile.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import test_fused_bwd
import test_fused_tc
import test_fused_tc_bwd
import test_fused_tc_3d
from helpers import RecordingExecutor

import na_rtc
from na_rtc import window
from na_rtc.runtime.families import fused_tc, fused_tc_bwd, fused_wg, fused_wg_bwd

pytestmark = pytest.mark.skipif(not na_rtc.backends.get("emulator").probe()[0],
                                reason="emulator needs a C++ compiler")


def _axes(cfg) -> list[window.Axis]:
    return [window.Axis(*a) for a in zip(cfg.spatial, cfg.kernel_size, cfg.stride, cfg.dilation, cfg.causal)]


@dataclasses.dataclass
class _Tile:
    """One axis of a block's tile: dilation group, first group coordinate, valid rows."""

    g: int
    q0: int
    n: int

    def rows(self) -> np.ndarray:
        return np.arange(self.q0, self.q0 + self.n)


def _tiles(axis: window.Axis, size: int) -> list[_Tile]:
    """The tiles of ``size`` group coordinates along ``axis``, per dilation group (those past a group's end
    launch no work)."""
    out = []
    for g in range(axis.dilation):
        length = int(window.group_length(axis, g))
        out += [_Tile(g, q0, min(size, length - q0)) for q0 in range(0, length, size)]
    return out


def _span(axis: window.Axis, tile: _Tile, rows: np.ndarray, inverse: bool) -> tuple[int, int]:
    """[first, last] group coordinate of the keys the windows of ``rows`` hold (with ``inverse``: of the
    queries whose windows hold the keys ``rows``); None when there are none."""
    positions = rows * axis.dilation + tile.g
    start, end = (window.inverse_range if inverse else window.window)(axis, positions)
    start, end = np.atleast_1d(start), np.atleast_1d(end)
    seen = end > start
    return (int(start[seen].min()), int(end[seen].max()) - 1) if seen.any() else None


def _chunk_counts(cfg, tile_shape, warpgroups, chunk, inverse=False):
    """Per block of ``tile_shape``, per warpgroup (64 rows, whole x-rows), the chunks of ``chunk`` box
    positions that hold a key (query) its rows' windows (inverse ranges) hold. The box is the union over the
    block's rows, walked row-major."""
    axes = _axes(cfg)
    counts = []
    per_axis = [_tiles(a, t) for a, t in zip(axes, tile_shape)]
    for tiles in np.ndindex(*[len(p) for p in per_axis]):
        block = [per_axis[i][t] for i, t in enumerate(tiles)]
        spans = [_span(a, t, t.rows(), inverse) for a, t in zip(axes, block)]
        if any(s is None for s in spans):  # no key (query) to multiply: the box is empty
            counts += [0] * warpgroups
            continue
        width = math.prod(s[1] - s[0] + 1 for s in spans[1:])  # box positions a box x-row (x-plane in 3D)
        x_rows = tile_shape[0] // warpgroups
        for j in range(warpgroups):
            rows = block[0].rows()[j * x_rows:(j + 1) * x_rows]
            x = _span(axes[0], block[0], rows, inverse) if len(rows) else None
            if x is None:
                counts.append(0)
                continue
            first = (x[0] - spans[0][0]) * width  # every box position of the first and last box rows is seen
            last = (x[1] - spans[0][0]) * width + width - 1
            counts.append(last // chunk - first // chunk + 1)
    return counts


def _instructions(counts, per_chunk, cfg):
    return sum(counts) * per_chunk * cfg.batch * cfg.heads * 4  # four warps a warpgroup instruction


def _forward_counted(cfg, warpgroups, chunk_keys, monkeypatch):
    monkeypatch.setenv("NA_RTC_WGMMA_WARPGROUPS", str(warpgroups))
    monkeypatch.setenv("NA_RTC_WGMMA_CHUNK_KEYS", str(chunk_keys))
    run = RecordingExecutor()
    test_fused_tc._run(cfg, executor=run, wgmma=True)
    hd = fused_wg.head_dim_bucket(cfg.head_dim)
    assert run.names == [fused_wg.kernel_name_of(hd, cfg.dtype, cfg.ndim, warpgroups, chunk_keys)]
    return run.op_counts[0]


#: 3D boxes of many chunks whose second warpgroup starts past the first chunk (x windows of 3 keys), and one
#: whose first warpgroup ends before the last
LONG_BOXES_3D = [test_fused_tc_3d._long_box((9, 14, 16), (3, 9, 11), 64, "bfloat16", rpb=True),
                 test_fused_tc_3d._long_box((10, 12, 12), (3, 7, 7), 128, "float16")]
# long boxes (many chunks; in every ndim a second warpgroup whose chunks start past 0) and sweep
# configurations with dilation, stride and causal windows (the mma.sync kernels' 3D counts are tested below)
FORWARD_CASES = test_fused_tc.LONG_BOXES + test_fused_tc.CONFIGS[::4]
WGMMA_FORWARD_CASES = FORWARD_CASES + LONG_BOXES_3D + test_fused_tc_3d.CONFIGS[::4]


# (warpgroups, keys per chunk): the table's chunks with one and two warpgroups, and every other chunk size
# built (with the table's two warpgroups)
FORWARD_BLOCKS = [(1, None), (2, None)] + [(2, kc) for kc in fused_wg.OTHER_CHUNK_KEYS]


@pytest.mark.parametrize("warpgroups, chunk_keys", FORWARD_BLOCKS, ids=lambda x: str(x or "table"))
@pytest.mark.parametrize("cfg", WGMMA_FORWARD_CASES, ids=str)
def test_the_wgmma_forward_multiplies_the_chunks_its_warpgroups_see(cfg, warpgroups, chunk_keys, monkeypatch):
    hd = fused_wg.head_dim_bucket(cfg.head_dim)
    table = fused_wg.table_chunk_keys(hd, cfg.ndim)
    kc = chunk_keys if chunk_keys and warpgroups == fused_wg.WARPGROUPS[cfg.ndim] else table  # else not built
    counts = _chunk_counts(cfg, fused_wg.BLOCK_TILES[cfg.ndim, warpgroups], warpgroups, kc)
    got = _forward_counted(cfg, warpgroups, kc, monkeypatch)
    assert got == {"mma.sync": 0, "wgmma": _instructions(counts, hd // 16 + kc // 16, cfg)}  # Q K^T, P V


def test_two_warpgroups_skip_chunks_in_every_ndim():
    """The long boxes hold blocks whose second warpgroup skips chunks at the start of the box and whose first
    skips chunks at its end (else the test above would not test the skipping)."""
    for ndim in (1, 2, 3):
        skipped = []
        for cfg in (c for c in test_fused_tc.LONG_BOXES + LONG_BOXES_3D if c.ndim == ndim):
            kc = fused_wg.table_chunk_keys(fused_wg.head_dim_bucket(cfg.head_dim), ndim)
            one = _chunk_counts(cfg, fused_wg.BLOCK_TILES[ndim, 2], 1, kc)
            two = _chunk_counts(cfg, fused_wg.BLOCK_TILES[ndim, 2], 2, kc)
            skipped += [a > b for a, b in zip(np.repeat(one, 2), two)]
        assert any(skipped[0::2]) and any(skipped[1::2]), ndim


def test_a_2d_block_of_two_warpgroups_loads_a_third_less_for_as_many_products():
    """The reason for 16 x 8 blocks in 2D: on issue 9's 128 x 128 map at k = 13, their two warpgroups
    multiply 1680 chunks where the 8 x 8 blocks of one warpgroup that cover the same queries multiply 1668
    (a warpgroup's range may start inside a chunk), while the blocks stage 1056 chunks of K and V instead of
    1668."""
    cfg = dataclasses.replace(test_fused_tc.LONG_BOXES[-1], spatial=(128, 128), kernel_size=(13, 13),
                              causal=(False, False))
    kc = fused_wg.CHUNK_KEYS[fused_wg.head_dim_bucket(cfg.head_dim)]
    multiplied = sum(_chunk_counts(cfg, fused_wg.BLOCK_TILES[2, 2], 2, kc))
    staged = sum(_chunk_counts(cfg, fused_wg.BLOCK_TILES[2, 2], 1, kc))  # each block's whole box
    one = sum(_chunk_counts(cfg, fused_wg.BLOCK_TILES[2, 1], 1, kc))  # multiplied and staged alike
    assert multiplied <= 1.01 * one and staged <= 0.64 * one


def _backward_counted(case, warpgroups, monkeypatch):
    monkeypatch.setenv("NA_RTC_WGMMA_WARPGROUPS", str(warpgroups))
    run = RecordingExecutor()
    test_fused_bwd._run(case, run, tensor_cores=True, wgmma=True)
    return {name.split("<")[0]: counts for name, counts in zip(run.names, run.op_counts)}


BACKWARD_CASES = test_fused_tc_bwd.LONG_BOX_CASES + test_fused_tc_bwd.CASES[::4]
WGMMA_BACKWARD_CASES = BACKWARD_CASES + test_fused_tc_3d.LONG_BOX_CASES[:1] + test_fused_tc_3d.CASES[::4]


@pytest.mark.parametrize("warpgroups", [1, 2])
@pytest.mark.parametrize("case", WGMMA_BACKWARD_CASES, ids=str)
def test_the_wgmma_backward_multiplies_the_chunks_its_warpgroups_see(case, warpgroups, monkeypatch):
    hd = fused_wg.head_dim_bucket(case.head_dim)
    tile = fused_wg.BLOCK_TILES[case.ndim, warpgroups]
    kc, qc = fused_wg_bwd.DQ_CHUNK_KEYS, fused_wg_bwd.DKDV_CHUNK_QUERIES[hd]
    dq = _chunk_counts(case, tile, warpgroups, kc)
    dkdv = _chunk_counts(case, tile, warpgroups, qc, inverse=True)
    got = _backward_counted(case, warpgroups, monkeypatch)
    assert got["na_fused_wg_bwd_dq"] == {"mma.sync": 0, "wgmma": _instructions(dq, 2 * hd // 16 + kc // 16, case)}
    assert got["na_fused_wg_bwd_dkdv"] == {"mma.sync": 0,
                                           "wgmma": _instructions(dkdv, 2 * hd // 16 + 2 * qc // 16, case)}


def _box_visibility(cfg, axes, block, tile_shape, chunk, inverse=False):
    """[tile row, box position] visibility of one block, over the box's chunks of ``chunk`` positions: the row
    is a valid query whose window holds the key (with ``inverse``: a valid key in the window of the query) on
    every axis; box positions and tile rows row-major (the last axis fastest), none seen past the box's end."""
    ranges = window.inverse_range if inverse else window.window

    def bounds(axis, tile, q):
        start, end = ranges(axis, q * axis.dilation + tile.g)
        return np.atleast_1d(start), np.atleast_1d(end)

    origins = [int(bounds(a, t, t.q0)[0][0]) for a, t in zip(axes, block)]
    extents = [int(bounds(a, t, t.q0 + t.n - 1)[1][0]) - o for a, t, o in zip(axes, block, origins)]
    size = max(math.prod(extents), 0)
    n = np.arange(-(-size // chunk) * chunk)
    box_coords = np.unravel_index(np.minimum(n, size - 1), extents) if size else [n] * len(axes)
    rows = np.arange(math.prod(tile_shape))
    row_coords = np.unravel_index(rows, tile_shape[:len(axes)])
    seen = np.broadcast_to(n < size, (len(rows), len(n))).copy()
    for a, t, origin, q, position in zip(axes, block, origins, row_coords, box_coords):
        start, end = bounds(a, t, t.q0 + np.minimum(q, t.n - 1))
        seen &= ((q < t.n)[:, None] & (start[:, None] - origin <= position[None, :])
                 & (position[None, :] < end[:, None] - origin))
    return seen


def _live_warp_tiles(cfg, tile_shape, chunk, rows_per_warp, inverse=False):
    """Over every block: the 8-column tiles of the box (keys; queries with ``inverse``) some row of a warp
    sees, and the 16-column steps with a tile seen, one per warp each."""
    axes = _axes(cfg)
    per_axis = [_tiles(a, t) for a, t in zip(axes, tile_shape)]
    tiles = steps = 0
    for index in np.ndindex(*[len(p) for p in per_axis]):
        block = [per_axis[i][t] for i, t in enumerate(index)]
        seen = _box_visibility(cfg, axes, block, tile_shape, chunk, inverse)
        warps = math.prod(tile_shape) // rows_per_warp
        live = seen.reshape(warps, rows_per_warp, -1, 8).any(axis=(1, 3))  # [warp, 8-column tile]
        tiles += int(live.sum())
        steps += int(live.reshape(warps, -1, 2).any(axis=2).sum())
    return tiles * cfg.batch * cfg.heads, steps * cfg.batch * cfg.heads


@pytest.mark.parametrize("cfg", FORWARD_CASES, ids=str)
def test_the_mma_sync_forward_skips_the_key_tiles_no_row_of_a_warp_sees(cfg):
    hd = fused_tc.head_dim_bucket(cfg.head_dim)
    kc, mt = fused_tc.config(hd)
    tiles, steps = _live_warp_tiles(cfg, fused_tc.TILES[cfg.ndim, mt], kc, 16 * mt)
    run = RecordingExecutor()
    test_fused_tc._run(cfg, executor=run)
    assert run.names[0].startswith("na_fused_tc_fwd<")
    # per live tile and mma tile of the warp: Q K^T's k-steps; per live step: P V's 8-dim tiles
    assert run.op_counts[0] == {"mma.sync": (tiles * hd // 16 + steps * hd // 8) * mt, "wgmma": 0}


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=str)
def test_the_mma_sync_backward_skips_the_tiles_no_row_of_a_warp_sees(case):
    hd = fused_tc.head_dim_bucket(case.head_dim)
    tile = fused_tc.TILES[case.ndim, 1]
    dq_tiles, dq_steps = _live_warp_tiles(case, tile, fused_tc_bwd.DQ_CHUNK[hd], 16)
    dkdv_tiles, dkdv_steps = _live_warp_tiles(case, tile, fused_tc_bwd.DKDV_CHUNK[case.ndim, hd], 16, inverse=True)
    run = RecordingExecutor()
    test_fused_bwd._run(case, run, tensor_cores=True)
    got = {name.split("<")[0]: counts for name, counts in zip(run.names, run.op_counts)}
    # S and dP per live tile, dQ += ds K per live step; S^T and dP^T per live tile, dV and dK per live step
    assert got["na_fused_tc_bwd_dq"] == {"mma.sync": 2 * dq_tiles * hd // 16 + dq_steps * hd // 8, "wgmma": 0}
    assert got["na_fused_tc_bwd_dkdv"] == {"mma.sync": 2 * dkdv_tiles * hd // 16 + 2 * dkdv_steps * hd // 8,
                                           "wgmma": 0}


# ---------------------------------------------------------------- 3D (the fused_tc_3d and fused_tc_bwd_3d twins)


@pytest.mark.parametrize("cfg", test_fused_tc_3d.LONG_BOXES + test_fused_tc_3d.CONFIGS[::2], ids=str)
def test_the_3d_mma_sync_forward_skips_the_key_tiles_no_row_of_a_warp_sees(cfg):
    """The same model in 3D: a warp's 16 rows are one x-plane of the 4 x 4 x 4 tile, the box is walked
    row-major in (x, y, z) and an 8-key tile can span box rows."""
    hd = fused_tc.head_dim_bucket(cfg.head_dim)
    kc, mt = fused_tc.config(hd, ndim=3)
    tiles, steps = _live_warp_tiles(cfg, fused_tc.TILES[3, mt], kc, 16 * mt)
    run = RecordingExecutor()
    test_fused_tc_3d.forward(cfg, run)
    assert run.names[0].endswith(", 3, 4>")
    assert run.op_counts[0] == {"mma.sync": (tiles * hd // 16 + steps * hd // 8) * mt, "wgmma": 0}


@pytest.mark.parametrize("case", test_fused_tc_3d.LONG_BOX_CASES + test_fused_tc_3d.CASES[::2], ids=str)
def test_the_3d_mma_sync_backward_skips_the_tiles_no_row_of_a_warp_sees(case):
    hd = fused_tc.head_dim_bucket(case.head_dim)
    tile = fused_tc.TILES[3, 1]
    dq_tiles, dq_steps = _live_warp_tiles(case, tile, fused_tc_bwd.DQ_CHUNK[hd], 16)
    dkdv_tiles, dkdv_steps = _live_warp_tiles(case, tile, fused_tc_bwd.DKDV_CHUNK[3, hd], 16, inverse=True)
    run = RecordingExecutor()
    test_fused_tc_3d.backward(case, run=run)
    got = {name.split("<")[0]: counts for name, counts in zip(run.names, run.op_counts)}
    assert got["na_fused_tc_bwd_dq"] == {"mma.sync": 2 * dq_tiles * hd // 16 + dq_steps * hd // 8, "wgmma": 0}
    assert got["na_fused_tc_bwd_dkdv"] == {"mma.sync": 2 * dkdv_tiles * hd // 16 + 2 * dkdv_steps * hd // 8,
                                           "wgmma": 0}


def product_share(cfg, tile_shape, mma_tiles, chunk=32, inverse=False):
    """The share of the mma.sync forward's products (Q K^T and P V, per row and key) that fall inside a window,
    with its warp-level skipping of 8-key tiles and 16-key steps, for query tiles ``tile_shape`` of
    ``mma_tiles`` mma tiles a warp. Blocks whose windows sit alike in their boxes are counted once. With
    ``inverse``: the dK/dV kernel's (key tiles, the queries that see them; 16 keys a warp, mma_tiles 1)."""
    axes = _axes(cfg)
    per_axis = [_tiles(a, t) for a, t in zip(axes, tile_shape)]

    def pattern(axis, tile, size):
        """What decides a block's visibility along one axis: its rows' windows relative to the box origin."""
        q = tile.q0 + np.minimum(np.arange(size), tile.n - 1)
        ranges = window.inverse_range if inverse else window.window
        start, end = (np.atleast_1d(x) for x in ranges(axis, q * axis.dilation + tile.g))
        return tuple(start - start[0]), tuple(end - start[0]), tile.n

    groups: dict = {}
    for index in np.ndindex(*[len(p) for p in per_axis]):
        block = [per_axis[i][t] for i, t in enumerate(index)]
        key = tuple(pattern(a, t, s) for a, t, s in zip(axes, block, tile_shape))
        groups.setdefault(key, [block, 0])[1] += 1
    issued = useful = 0
    rows_per_warp = 16 * mma_tiles
    for block, count in groups.values():
        seen = _box_visibility(cfg, axes, block, tile_shape, chunk, inverse)
        live = seen.reshape(-1, rows_per_warp, seen.shape[1] // 8, 8).any(axis=(1, 3))
        steps = live.reshape(live.shape[0], -1, 2).any(axis=2)
        issued += count * rows_per_warp * (8 * int(live.sum()) + 16 * int(steps.sum()))
        useful += count * 2 * int(seen.sum())
    return useful / issued


def _bench_shape(spatial, kernel, stride=(1, 1, 1), dilation=(1, 1, 1), causal=(False, False, False)):
    return test_fused_tc_3d.Config(spatial, kernel, dilation, causal, 1, 1, 64, False, False, "float16", stride)


#: the 3D benchmark shapes the tile was chosen on (30 x 48 x 80 with a (18, 24, 24) window, strides 1 and
#: (16, 8, 8), takes a minute here: the tile's docstring in fused_tc.py gives its shares)
BENCH_3D = [
    _bench_shape((16, 32, 32), (3, 7, 7)),
    _bench_shape((8, 16, 16), (7, 7, 7), dilation=(1, 2, 2)),
    _bench_shape((16, 32, 32), (5, 7, 7), causal=(True, False, False)),
]
#: 64-query tiles of one mma tile a warp, and 128-query ones of two
OTHER_3D_TILES = [((2, 8, 4), 1), ((2, 4, 8), 1), ((1, 8, 8), 1), ((8, 4, 4), 2), ((4, 4, 8), 2), ((2, 8, 8), 2)]


@pytest.mark.parametrize("cfg", BENCH_3D, ids=str)
def test_the_3d_tile_multiplies_the_largest_share_inside_windows(cfg):
    ours = product_share(cfg, fused_tc.TILES[3, 1], 1)
    others = {tile: product_share(cfg, tile, mt) for tile, mt in OTHER_3D_TILES}
    assert all(ours >= share for share in others.values()), (ours, others)


def wgmma_share(cfg, tile_shape, warpgroups, chunk=64):
    """The share of the wgmma forward's products (Q K^T and P V, per row and key) that fall inside a window:
    each warpgroup multiplies its 64 rows by every key of each chunk its rows see (``_chunk_counts``, which the
    counted tests above hold to the kernels)."""
    inside = 1
    for axis in _axes(cfg):  # the windows are separable: the sum of their sizes is a product over axes
        start, end = window.window(axis, np.arange(axis.length))
        inside *= int((np.asarray(end) - np.asarray(start)).sum())
    return inside / (64 * chunk * sum(_chunk_counts(cfg, tile_shape, warpgroups, chunk)))


#: the 3D bench shapes with the video diffusion one at both strides
WGMMA_BENCH_3D = BENCH_3D + [_bench_shape((30, 48, 80), (18, 24, 24)),
                             _bench_shape((30, 48, 80), (18, 24, 24), stride=(16, 8, 8))]
#: other 128-query tiles of two warpgroups (whole x-planes each)
OTHER_WGMMA_3D_TILES = [(8, 4, 4), (4, 4, 8), (2, 8, 8), (16, 2, 4)]


def test_the_3d_wgmma_tile_multiplies_the_largest_share_inside_windows():
    """The table's two-warpgroup 3D tile has the best geometric mean of the share over the bench shapes (the
    shares are in fused_wg.BLOCK_TILES' comment); its one-warpgroup half stays within 1% of 4 x 4 x 4."""
    def mean(tile, warpgroups):
        return math.prod(wgmma_share(cfg, tile, warpgroups) for cfg in WGMMA_BENCH_3D) ** (1 / len(WGMMA_BENCH_3D))

    ours = mean(fused_wg.BLOCK_TILES[3, 2], 2)
    others = {tile: mean(tile, 2) for tile in OTHER_WGMMA_3D_TILES}
    assert all(ours >= share for share in others.values()), (ours, others)
    assert mean(fused_wg.BLOCK_TILES[3, 1], 1) >= 0.99 * mean((4, 4, 4), 1)
