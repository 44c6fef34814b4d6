"""na_rtc.window against the literal definition (docs/design/definition.md)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from na_rtc import window as W
from oracle import oracle_group_window, oracle_window

MAX_L = 48


@st.composite
def axes(draw, max_length=MAX_L):
    """A valid axis: k >= 2, 1 <= s <= k, L >= k * d, odd and even k."""
    k = draw(st.integers(2, min(13, max_length)))
    d = draw(st.integers(1, max(1, max_length // k)))
    L = draw(st.integers(k * d, max_length))
    s = draw(st.integers(1, k))
    causal = draw(st.booleans())
    return W.Axis(L, k, s, d, causal)


def brute_window(axis, i):
    return oracle_window(axis.length, axis.kernel_size, axis.stride, axis.dilation, axis.causal, i)


def brute_group_window(axis, i):
    return oracle_group_window(axis.length, axis.kernel_size, axis.stride, axis.dilation,
                               axis.causal, i)


HYPOTHESIS = settings(max_examples=300, deadline=None)


# --- hand-checked examples -------------------------------------------------------------

HAND_CHECKED = {
    # causal, stride 3: every non-leader query sees fewer than k keys.
    "L8-k3-s3-causal": (W.Axis(8, 3, 3, 1, True),
                        [[0], [0, 1], [0, 1, 2], [3], [3, 4], [3, 4, 5], [5, 6], [5, 6, 7]]),
    "L8-k3-s3": (W.Axis(8, 3, 3, 1, False),
                 [[0, 1, 2]] * 3 + [[3, 4, 5]] * 3 + [[5, 6, 7]] * 2),
    "L5-k3-causal": (W.Axis(5, 3, 1, 1, True),
                     [[0], [0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4]]),
    "L7-k3-shifted-borders": (W.Axis(7, 3, 1, 1, False),
                              [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5],
                               [4, 5, 6], [4, 5, 6]]),
    "L6-k4-even": (W.Axis(6, 4, 1, 1, False),
                   # left = 2, right = 1
                   [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5],
                    [2, 3, 4, 5]]),
    # d = 3 gives groups {0, 3, 6}, {1, 4}, {2, 5}
    "L7-k2-d3": (W.Axis(7, 2, 1, 3, False),
                 [[0, 3], [1, 4], [2, 5], [0, 3], [1, 4], [2, 5], [3, 6]]),
    "L8-k2-s2-d2-causal": (W.Axis(8, 2, 2, 2, True),
                           # group 0: 0,2,4,6 ; group 1: 1,3,5,7
                           [[0], [1], [0, 2], [1, 3], [4], [5], [4, 6], [5, 7]]),
}


@pytest.mark.parametrize("axis,expected", HAND_CHECKED.values(), ids=HAND_CHECKED.keys())
def test_hand_checked_windows(axis, expected):
    assert [brute_window(axis, i) for i in range(axis.length)] == expected
    got = []
    for i in range(axis.length):
        g, _ = W.group_of(axis, i)
        start, end = W.window(axis, i)
        got.append([int(j) * axis.dilation + g for j in range(int(start), int(end))])
    assert got == expected
    counts = [len(e) for e in expected]
    assert [int(W.neighbor_count(axis, i)) for i in range(axis.length)] == counts
    assert list(W.neighbor_count(axis, np.arange(axis.length))) == counts


def test_causal_stride_exact_counts():
    # L=8, k=3, s=3, causal: 1+2+3 + 1+2+3 + 2+3 neighbors.
    axis = W.Axis(8, 3, 3, 1, True)
    assert int(W.neighbor_count(axis, np.arange(8)).sum()) == 17
    # 2D product, causal on the first axis only: per-query counts multiply.
    other = W.Axis(5, 3, 1, 1, False)
    table = W.flat_slot_table((axis, other))
    assert table.valid.shape == (40, 9)
    assert int(table.valid.sum()) == 17 * 5 * 3


# --- hypothesis: window.py equals the literal definition --------------------------------

@HYPOTHESIS
@given(axes())
def test_window_and_counts_match_oracle(axis):
    i = np.arange(axis.length)
    starts, ends = W.window(axis, i)
    counts = W.neighbor_count(axis, i)
    for q in range(axis.length):
        g, ig, start, end = brute_group_window(axis, q)
        assert (int(starts[q]), int(ends[q])) == (start, end), q
        assert W.window(axis, q) == (start, end)
        assert W.group_of(axis, q) == (g, ig)
        assert int(counts[q]) == len(brute_window(axis, q))
        assert 1 <= counts[q] <= axis.kernel_size
        if not axis.causal:
            assert counts[q] == axis.kernel_size


@HYPOTHESIS
@given(axes())
def test_is_neighbor_matches_oracle(axis):
    L = axis.length
    expected = np.zeros((L, L), dtype=bool)
    for q in range(L):
        expected[q, brute_window(axis, q)] = True
    i, j = np.meshgrid(np.arange(L), np.arange(L), indexing="ij")
    np.testing.assert_array_equal(W.is_neighbor(axis, i, j), expected)
    for q, key in [(0, 0), (L - 1, L - 1), (0, L - 1), (L // 2, L // 3)]:
        assert bool(W.is_neighbor(axis, q, key)) == expected[q, key]


@HYPOTHESIS
@given(axes())
def test_rpb_index_in_range_for_neighbors(axis):
    k = axis.kernel_size
    for q in range(axis.length):
        for key in brute_window(axis, q):
            index = int(W.rpb_index(axis, q, key))
            assert 0 <= index <= 2 * k - 2
            assert index == key // axis.dilation - q // axis.dilation + k - 1


@HYPOTHESIS
@given(axes())
def test_windows_monotonic_within_group(axis):
    d = axis.dilation
    for g in range(d):
        queries = list(range(g, axis.length, d))
        assert len(queries) == W.group_length(axis, g) >= axis.kernel_size
        brute = [brute_group_window(axis, q)[2:] for q in queries]
        ours = [tuple(int(x) for x in W.window(axis, q)) for q in queries]
        assert ours == brute
        for (s0, e0), (s1, e1) in zip(brute, brute[1:]):
            assert s0 <= s1 and e0 <= e1


@HYPOTHESIS
@given(axes())
def test_inverse_range_is_brute_force_inverse(axis):
    d, k = axis.dilation, axis.kernel_size
    keys = np.arange(axis.length)
    first_all, last_all = W.inverse_range(axis, keys)
    for key in range(axis.length):
        g = key % d
        containing = [q for q in range(axis.length) if key in brute_window(axis, q)]
        assert all(q % d == g for q in containing)
        first, last = W.inverse_range(axis, key)
        assert (first, last) == (int(first_all[key]), int(last_all[key]))
        # contiguous: exactly the group coordinates [first, last)
        assert [q // d for q in containing] == list(range(first, last)), key
        assert len(containing) <= 2 * k - 1
        # every key is seen by at least one query
        assert len(containing) >= 1


@HYPOTHESIS
@given(axes())
def test_slot_table_matches_oracle(axis):
    table = W.slot_table(axis)
    L, k, d = axis.length, axis.kernel_size, axis.dilation
    assert table.keys.shape == table.valid.shape == table.bias.shape == (L, k)
    assert ((table.keys >= 0) & (table.keys < L)).all()
    for q in range(L):
        g, ig, start, end = brute_group_window(axis, q)
        for t in range(k):
            inside = start + t < end
            assert bool(table.valid[q, t]) == inside, (q, t)
            if inside:
                assert int(table.keys[q, t]) == (start + t) * d + g
                assert int(table.bias[q, t]) == start + t - ig + k - 1
            else:
                # still a real key of the same group, to keep gathers in bounds
                assert int(table.keys[q, t]) % d == g
        assert [int(x) for x in table.keys[q][table.valid[q]]] == brute_window(axis, q)
    assert table.all_valid == (not axis.causal or all(
        len(brute_window(axis, q)) == k for q in range(L)))


@settings(max_examples=120, deadline=None)
@given(axes(max_length=12), axes(max_length=12))
def test_flat_slot_table_2d_matches_oracle(ax, ay):
    table = W.flat_slot_table((ax, ay))
    X, Y = ax.length, ay.length
    kx, ky = ax.kernel_size, ay.kernel_size
    assert table.keys.shape == table.valid.shape == table.bias.shape == (X * Y, kx * ky)
    assert ((table.keys >= 0) & (table.keys < X * Y)).all()
    for x, y in itertools.product(range(X), range(Y)):
        gx, ixg, sx, ex = brute_group_window(ax, x)
        gy, iyg, sy, ey = brute_group_window(ay, y)
        row = x * Y + y
        for tx, ty in itertools.product(range(kx), range(ky)):
            t = tx * ky + ty
            inside = sx + tx < ex and sy + ty < ey
            assert bool(table.valid[row, t]) == inside, (x, y, tx, ty)
            if inside:
                jx, jy = (sx + tx) * ax.dilation + gx, (sy + ty) * ay.dilation + gy
                assert int(table.keys[row, t]) == jx * Y + jy
                bias = (sx + tx - ixg + kx - 1) * (2 * ky - 1) + (sy + ty - iyg + ky - 1)
                assert int(table.bias[row, t]) == bias
        neighbors = {jx * Y + jy for jx in brute_window(ax, x) for jy in brute_window(ay, y)}
        assert set(int(j) for j in table.keys[row][table.valid[row]]) == neighbors
        assert int(table.valid[row].sum()) == len(neighbors)


def _all_axes(max_length):
    for L in range(2, max_length):
        for k in range(2, L + 1):
            for d in range(1, L // k + 1):
                for s in range(1, k + 1):
                    for causal in (False, True):
                        yield W.Axis(L, k, s, d, causal)


@pytest.mark.parametrize("max_length", [
    pytest.param(24, id="L<24"),
    pytest.param(MAX_L, id="L<48", marks=pytest.mark.slow),
])
def test_exhaustive_monotonic_and_inverse_bound(max_length):
    """The two properties of docs/design/definition.md#monotone-windows-and-the-inverse-neighborhood, for every axis up to max_length
    (window.py is checked against the literal definition above)."""
    for axis in _all_axes(max_length):
        q = np.arange(axis.length)
        g, ig = W.group_of(axis, q)
        start, end = W.window(axis, q)
        order = np.lexsort((ig, g))
        same_group = g[order][1:] == g[order][:-1]
        assert (np.diff(start[order])[same_group] >= 0).all(), axis
        assert (np.diff(end[order])[same_group] >= 0).all(), axis
        first, last = W.inverse_range(axis, q)
        assert ((last - first) <= 2 * axis.kernel_size - 1).all(), axis
        assert ((last - first) >= 1).all(), axis


# --- 3D: a key is a neighbor when it is one on every axis ------------------------------

def _table_matches_literal_definition(axes):
    """Every row and slot of the flattened 3D (or any-rank) table against the per-axis literal windows."""
    table = W.flat_slot_table(axes)
    lengths = tuple(a.length for a in axes)
    kernels = tuple(a.kernel_size for a in axes)
    tokens, slots = int(np.prod(lengths)), int(np.prod(kernels))
    assert table.keys.shape == table.valid.shape == table.bias.shape == (tokens, slots)
    assert ((table.keys >= 0) & (table.keys < tokens)).all()
    for row, qpos in enumerate(itertools.product(*(range(n) for n in lengths))):
        literal = [brute_group_window(a, i) for a, i in zip(axes, qpos)]  # (g, i', start, end) per axis
        for t, tpos in enumerate(itertools.product(*(range(k) for k in kernels))):
            inside = all(start + s < end for (_, _, start, end), s in zip(literal, tpos))
            assert bool(table.valid[row, t]) == inside, (qpos, tpos)
            if inside:
                key, bias = 0, 0
                for a, (g, ig, start, _), s in zip(axes, literal, tpos):
                    key = key * a.length + (start + s) * a.dilation + g
                    bias = bias * (2 * a.kernel_size - 1) + (start + s - ig + a.kernel_size - 1)
                assert (int(table.keys[row, t]), int(table.bias[row, t])) == (key, bias), (qpos, tpos)
        # and the valid slots hold exactly the product of the per-axis neighbor sets
        neighbors = set()
        for kpos in itertools.product(*(brute_window(a, i) for a, i in zip(axes, qpos))):
            key = 0
            for a, j in zip(axes, kpos):
                key = key * a.length + j
            neighbors.add(key)
        assert sorted(int(j) for j in table.keys[row][table.valid[row]]) == sorted(neighbors), qpos


@settings(max_examples=60, deadline=None)
@given(axes(max_length=6), axes(max_length=6), axes(max_length=6))
def test_flat_slot_table_3d_matches_oracle(ax, ay, az):
    _table_matches_literal_definition((ax, ay, az))


# representative axes: odd and even k, k = L, dilation, stride, causal, causal with stride and dilation
AXES_3D = {
    "L4k3": W.Axis(4, 3),
    "L5k2d2": W.Axis(5, 2, 1, 2),
    "L4k2s2c": W.Axis(4, 2, 2, 1, True),
    "L5k4s3": W.Axis(5, 4, 3),
    "L3k3c": W.Axis(3, 3, 1, 1, True),
    "L6k3s3d2c": W.Axis(6, 3, 3, 2, True),
}


@pytest.mark.parametrize("first", AXES_3D.values(), ids=AXES_3D.keys())
def test_exhaustive_3d_windows_match_the_literal_definition(first):
    """Every ordered triple of the representative axes (this one first), every query and every slot."""
    for rest in itertools.product(AXES_3D.values(), repeat=2):
        _table_matches_literal_definition((first, *rest))


@settings(max_examples=60, deadline=None)
@given(st.lists(axes(max_length=7), min_size=1, max_size=3), st.data())
def test_slot_rows_are_rows_of_the_flat_table(axis_list, data):
    axes_ = tuple(axis_list)
    table = W.flat_slot_table(axes_)
    tokens = table.keys.shape[0]
    start = data.draw(st.integers(0, tokens - 1))
    stop = data.draw(st.integers(start + 1, tokens))
    rows = W.slot_rows(axes_, start, stop)
    for got, full in zip(rows, table):
        np.testing.assert_array_equal(got, full[start:stop])
    assert W.all_slots_valid(axes_) == table.all_valid
