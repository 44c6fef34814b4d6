// The key box of a tensor-core kernel's query tile in 32-bit block-local
// coordinates, for the kernels' key loops: division by the box width through
// a multiply-high (na_divisor; 1D boxes, TY == 1, divide by nothing), window
// bounds in group coordinates without 64-bit divisions (na_tc_group_window),
// and the element offsets of a box row in a tensor.
#pragma once

#include "na_tile.cuh"

// n / d for 0 <= n < 2^31 and a block-uniform 1 <= d < 2^31 without a
// division instruction (Granlund & Montgomery): with s = ceil(log2 d) and
// m = floor(2^32 (2^s - d) / d) + 1 (< 2^32), n / d = (umulhi(m, n) + n) >> s,
// where the sum stays below 2^32 because umulhi(m, n) <= n.
struct na_divisor {
    unsigned m, s;
};

__device__ __forceinline__ na_divisor na_make_divisor(unsigned d) {
    const unsigned s = d > 1 ? 32 - __clz((int)(d - 1)) : 0;
    return {(unsigned)((((1ull << s) - d) << 32) / d + 1), s};
}

__device__ __forceinline__ int na_divide(const na_divisor& dv, int n) {
    return (int)((__umulhi(dv.m, (unsigned)n) + (unsigned)n) >> dv.s);
}

// One axis of a tile's dilation group for window math in 32-bit group
// coordinates: na_tc_group_window(a, i') gives na_window(axis, i' * d + g)
// (na_window.cuh, docs/design/definition.md) without its 64-bit divisions, for
// windows computed inside a kernel's chunk loop.
struct na_tc_group_axis {
    int kernel, stride, lg, causal;
    na_divisor by_stride;
};

__device__ __forceinline__ na_tc_group_axis na_tc_group_axis_of(const na_axis& a, const na_tile_axis& t) {
    return {(int)a.kernel, (int)a.stride, (int)t.lg, (int)a.causal, na_make_divisor((unsigned)a.stride)};
}

__device__ __forceinline__ void na_tc_group_window(const na_tc_group_axis& a, int ig, int& start, int& end) {
    const int block = na_divide(a.by_stride, ig) * a.stride;
    if (a.causal) {
        const int leader = block + a.stride - 1 < a.lg - 1 ? block + a.stride - 1 : a.lg - 1;
        start = leader - a.kernel + 1 > 0 ? leader - a.kernel + 1 : 0;
        end = ig + 1 < a.lg ? ig + 1 : a.lg;
    } else {
        const int leader = block + a.stride / 2 < a.lg - 1 ? block + a.stride / 2 : a.lg - 1;
        const int lo = leader - a.kernel / 2 > 0 ? leader - a.kernel / 2 : 0;
        start = lo < a.lg - a.kernel ? lo : a.lg - a.kernel;
        end = start + a.kernel;
    }
}

// The key box of a block's query tile (the union of its queries' windows,
// docs/design/definition.md), walked row-major: box key n sits at box coordinates
// (n / hy, n % hy), origin (tx.h0, ty.h0); in 3D (RANK 3) at (n / hz / hy,
// n / hz % hy, n % hz), origin (tx.h0, ty.h0, tz.h0). 1D tiles (TY == 1) have
// hy == 1; below RANK 3 hz is 1 and the z coordinate of every key is 0, so
// the z code folds away.
template <int TY, int RANK = 2>
struct na_tc_box {
    static_assert(RANK < 3 || TY > 1, "a 3D box has a y extent (TY == 1 means 1D)");
    int keys, hy, hz;
    na_divisor div, div_z;  // by hy; by hz (RANK 3)

    __device__ __forceinline__ void split(int n, int& bx, int& by) const {
        if (TY == 1) {
            bx = n;
            by = 0;
        } else {
            bx = na_divide(div, n);
            by = n - bx * hy;
        }
    }

    __device__ __forceinline__ void split(int n, int& bx, int& by, int& bz) const {
        if constexpr (RANK == 3) {
            const int row = na_divide(div_z, n);  // the (bx, by) row of hz keys
            bz = n - row * hz;
            split(row, bx, by);
        } else {
            split(n, bx, by);
            bz = 0;
        }
    }

    // the box key after (bx, by, bz), row-major
    __device__ __forceinline__ void step(int& bx, int& by, int& bz) const {
        if (RANK == 3 && ++bz < hz) return;
        bz = 0;
        if (++by == hy) { by = 0; ++bx; }
    }
};

// the trivial z axis of a tile below rank 3 (group 0, one query, box [0, 1)): the default of the z arguments
#define NA_TC_NO_Z (na_tile_axis{0, 1, 0, 1, 0, 1})

template <int TY, int RANK = 2>
__device__ __forceinline__ na_tc_box<TY, RANK> na_tc_box_of(const na_tile_axis& tx, const na_tile_axis& ty,
                                                            const na_tile_axis& tz = NA_TC_NO_Z) {
    na_tc_box<TY, RANK> box;
    box.hy = TY == 1 ? 1 : (int)(ty.h1 - ty.h0);
    box.hz = RANK == 3 ? (int)(tz.h1 - tz.h0) : 1;
    box.keys = (int)(tx.h1 - tx.h0) * box.hy * box.hz;
    box.div = na_make_divisor((unsigned)box.hy);
    if (RANK == 3) box.div_z = na_make_divisor((unsigned)box.hz);
    return box;
}

// Element offsets of box row (bx, by, bz) of one (b, h) in a tensor: base + bx * step_x + by * step_y
// (+ bz * step_z in 3D), for a box with origin (x0, y0, z0) in the dilation groups gx, gy, gz (group
// coordinates; position = x * dx + gx). Below rank 3 the z arguments keep their defaults and fold away.
struct na_tc_box_rows {
    long long base, step_x, step_y, step_z;

    template <int RANK = 2>
    __device__ __forceinline__ long long at(int bx, int by, int bz) const {
        const long long xy = base + bx * step_x + by * step_y;
        return RANK == 3 ? xy + bz * step_z : xy;
    }
};

__device__ __forceinline__ na_tc_box_rows na_tc_box_rows_of(long long x0, long long y0, long long gx, long long gy,
                                                            long long dx, long long dy, long long b, long long h,
                                                            long long sb, long long sx, long long sy, long long sh,
                                                            long long z0 = 0, long long gz = 0, long long dz = 1,
                                                            long long sz = 0) {
    return {b * sb + (x0 * dx + gx) * sx + (y0 * dy + gy) * sy + (z0 * dz + gz) * sz + h * sh, dx * sx, dy * sy,
            dz * sz};
}

// The chunks [lo, hi) of KC keys of a tile's key box that hold keys of warpgroup j's queries, for blocks of
// several warpgroups that share every staged chunk and skip the others. Warpgroup j owns tile rows
// 64 j .. 64 j + 63, whole query x-rows (TY queries each, TY dividing 64; a 3D tile passes its x-planes'
// TY TZ); their windows along x are monotone, so the box rows from the first x-row's window start to the
// last one's end hold every key they see (each box row spans the whole box along y, hy keys; along y and z
// in 3D, hy hz). Empty (0, 0) when none of those x-rows is a valid query.
// Warpgroup j's x-rows of the tile (64 rows, TY a row) that hold valid rows: [first, last], empty when
// first > last.
template <int TY>
__device__ __forceinline__ void na_tc_warpgroup_x_rows(const na_tile_axis& tx, int j, int& first, int& last) {
    static_assert(64 % TY == 0, "a warpgroup owns whole x-rows of the tile");
    first = 64 * j / TY;
    last = (int)na_min(first + 64 / TY - 1, tx.n - 1);
}

template <int TY, int KC>
__device__ __forceinline__ void na_tc_warpgroup_chunks(const na_axis& ax, const na_tile_axis& tx, long long dx,
                                                       int hy, int j, int& lo, int& hi) {
    int first, last;
    na_tc_warpgroup_x_rows<TY>(tx, j, first, last);
    lo = hi = 0;
    if (first > last) return;
    long long s0, e0, s1, e1;
    na_window(ax, (tx.q0 + first) * dx + tx.g, s0, e0);
    na_window(ax, (tx.q0 + last) * dx + tx.g, s1, e1);
    lo = (int)(s0 - tx.h0) * hy / KC;
    hi = ((int)(e1 - tx.h0) * hy + KC - 1) / KC;
    // a window holds a key at least, but for dense attention's empty ones (an empty box, counted as one chunk of
    // zero rows): never empty with queries, so that lo < hi says "takes the token chunks" in every case
    if (hi <= lo) hi = lo + 1;
}
