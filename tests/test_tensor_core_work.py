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
        width = spans[1][1] - spans[1][0] + 1 if cfg.ndim == 2 else 1  # box positions a box row
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
    args = run.names[0].removesuffix(">").split(", ")  # ..., KC, QS, WG
    assert (int(args[-3]), int(args[-1])) == (chunk_keys, warpgroups), run.names[0]
    return run.op_counts[0]


# long boxes (many chunks; in both ndims a second warpgroup whose chunks start past 0) and sweep
# configurations with dilation, stride and causal windows
FORWARD_CASES = test_fused_tc.LONG_BOXES + test_fused_tc.CONFIGS[::4]


# (warpgroups, keys per chunk): the table's chunks with one and two warpgroups, and every other chunk size
# built (with the table's two warpgroups)
FORWARD_BLOCKS = [(1, None), (2, None)] + [(2, kc) for kc in fused_wg.OTHER_CHUNK_KEYS]


@pytest.mark.parametrize("warpgroups, chunk_keys", FORWARD_BLOCKS, ids=lambda x: str(x or "table"))
@pytest.mark.parametrize("cfg", FORWARD_CASES, ids=str)
def test_the_wgmma_forward_multiplies_the_chunks_its_warpgroups_see(cfg, warpgroups, chunk_keys, monkeypatch):
    hd = fused_wg.head_dim_bucket(cfg.head_dim)
    kc = chunk_keys or fused_wg.CHUNK_KEYS[hd]
    counts = _chunk_counts(cfg, fused_wg.BLOCK_TILES[cfg.ndim, warpgroups], warpgroups, kc)
    got = _forward_counted(cfg, warpgroups, kc, monkeypatch)
    assert got == {"mma.sync": 0, "wgmma": _instructions(counts, hd // 16 + kc // 16, cfg)}  # Q K^T, P V


def test_two_warpgroups_skip_chunks_in_both_ndims():
    """The long boxes hold blocks whose second warpgroup skips chunks at the start of the box and whose first
    skips chunks at its end (else the test above would not test the skipping)."""
    for ndim in (1, 2):
        skipped = []
        for cfg in (c for c in test_fused_tc.LONG_BOXES if c.ndim == ndim):
            kc = fused_wg.CHUNK_KEYS[fused_wg.head_dim_bucket(cfg.head_dim)]
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


@pytest.mark.parametrize("warpgroups", [1, 2])
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=str)
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
    every axis; box positions row-major, none seen past the box's end."""
    ranges = window.inverse_range if inverse else window.window

    def bounds(axis, tile, q):
        start, end = ranges(axis, q * axis.dilation + tile.g)
        return np.atleast_1d(start), np.atleast_1d(end)

    origins = [int(bounds(a, t, t.q0)[0][0]) for a, t in zip(axes, block)]
    ends = [int(bounds(a, t, t.q0 + t.n - 1)[1][0]) for a, t in zip(axes, block)]
    hy = ends[1] - origins[1] if cfg.ndim == 2 else 1
    size = (ends[0] - origins[0]) * hy
    n = np.arange(-(-size // chunk) * chunk)
    box_coords = (n // hy, n % hy)
    rows = np.arange(math.prod(tile_shape))
    row_coords = (rows // tile_shape[1], rows % tile_shape[1]) if cfg.ndim == 2 else (rows,)
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
