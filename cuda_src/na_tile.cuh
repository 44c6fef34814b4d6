// Query tiles inside one dilation group per axis, shared by the tiled and
// fused kernels: which queries a block owns and the box of keys their
// windows cover (window bounds are monotone inside a group,
// docs/design/definition.md#monotone-windows-and-the-inverse-neighborhood,
// so the box is the first query's start to the last query's end).
#pragma once

#include "na_window.cuh"

// One axis of a block's tile: the dilation group, the group length, the
// first query (group coordinate), the number of valid queries, and the halo
// [h0, h1) of keys the tile's windows cover.
struct na_tile_axis {
    long long g, lg, q0, n, h0, h1;
};

// tile index `tile` of an axis cut into `d` groups of ceil(ceil(L / d) / T)
// tiles each; returns false when the tile lies past its group's end
__device__ __forceinline__ bool na_tile_axis_of(const na_axis& a, long long tile, long long T, na_tile_axis& t) {
    t.g = tile % a.dilation;
    t.q0 = (tile / a.dilation) * T;
    t.lg = na_group_length(a, t.g);
    if (t.q0 >= t.lg) return false;
    t.n = na_min(T, t.lg - t.q0);
    long long s, e;
    na_window(a, t.q0 * a.dilation + t.g, t.h0, e);
    na_window(a, (t.q0 + t.n - 1) * a.dilation + t.g, s, t.h1);
    return true;
}

__device__ __forceinline__ long long na_tiles_per_axis(const na_axis& a, long long T) {
    const long long longest = (a.length + a.dilation - 1) / a.dilation;  // group 0
    return a.dilation * ((longest + T - 1) / T);
}
