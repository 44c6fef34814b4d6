// Per-axis neighborhood window math: the CUDA mirror of na_rtc/window.py.
//
// Keep the two in step: every formula here is docs/design/definition.md and has the
// same name as its Python twin. Positions are int64; windows are in group
// coordinates (i' = i / dilation) and key positions are j' * dilation + g.
#pragma once

struct na_axis {
    long long length;
    long long kernel;
    long long stride;
    long long dilation;
    long long causal;
};

__device__ __forceinline__ long long na_min(long long a, long long b) { return a < b ? a : b; }
__device__ __forceinline__ long long na_max(long long a, long long b) { return a > b ? a : b; }

__device__ __forceinline__ long long na_group_length(const na_axis& a, long long g) {
    return (a.length - g + a.dilation - 1) / a.dilation;
}

// window [start, end) of query position i, group coordinates
__device__ __forceinline__ void na_window(const na_axis& a, long long i, long long& start, long long& end) {
    const long long g = i % a.dilation, ig = i / a.dilation, lg = na_group_length(a, g);
    const long long block = (ig / a.stride) * a.stride;
    if (a.causal) {
        const long long leader = na_min(block + a.stride - 1, lg - 1);
        start = na_max(leader - a.kernel + 1, 0);
        end = na_min(ig + 1, lg);
    } else {
        const long long leader = na_min(block + a.stride / 2, lg - 1);
        start = na_min(na_max(leader - a.kernel / 2, 0), lg - a.kernel);
        end = start + a.kernel;
    }
}

// queries whose windows contain key position j: [first, last) in j's group
// coordinates. Window bounds never decrease with the query inside a group,
// so two binary searches find the range (O(log L), no loop over the kernel).
__device__ __forceinline__ void na_inverse_range(const na_axis& a, long long j, long long& first, long long& last) {
    const long long g = j % a.dilation, jg = j / a.dilation, lg = na_group_length(a, g);
    long long start, end, lo = 0, hi = lg;
    while (lo < hi) {  // first query whose window ends after j'
        const long long mid = (lo + hi) / 2;
        na_window(a, mid * a.dilation + g, start, end);
        if (end > jg) hi = mid; else lo = mid + 1;
    }
    first = lo;
    lo = first;
    hi = lg;
    while (lo < hi) {  // first query whose window starts after j'
        const long long mid = (lo + hi) / 2;
        na_window(a, mid * a.dilation + g, start, end);
        if (start > jg) hi = mid; else lo = mid + 1;
    }
    last = lo;
}

// The range tables of a block's tile rows on both axes, for kernels that keep
// them in shared memory: row i of an axis (position (p0 + i) * dilation + g,
// i < n) gets its window [start, end) or, with INVERSE, the queries that see
// it [first, last); rows from n to the table's end get [0, 0). Threads
// 0..TX-1 fill the x table and threads 128..128+TY-1 the y table (four warps
// apart, so the two axes' searches run at once; the block needs 128 + TY
// threads); the caller's barrier publishes them.
template <bool INVERSE, int TX, int TY, typename I>
__device__ __forceinline__ void na_axis_tables(int tid, const na_axis& ax, long long x0, long long nx, long long gx,
                                               const na_axis& ay, long long y0, long long ny, long long gy,
                                               I* lo_x, I* hi_x, I* lo_y, I* hi_y) {
    const bool on_x = tid < TX;
    if (!on_x && !(tid >= 128 && tid - 128 < TY)) return;
    const na_axis& a = on_x ? ax : ay;
    const int i = on_x ? tid : tid - 128;
    long long lo = 0, hi = 0;
    if (i < (on_x ? nx : ny)) {
        const long long p = ((on_x ? x0 : y0) + i) * a.dilation + (on_x ? gx : gy);
        if (INVERSE) na_inverse_range(a, p, lo, hi);
        else na_window(a, p, lo, hi);
    }
    (on_x ? lo_x : lo_y)[i] = (I)lo;
    (on_x ? hi_x : hi_y)[i] = (I)hi;
}

// One axis' table of a block's tile rows, for the z axis of 3D tiles, the
// same rows as na_axis_tables': threads 192..192+T fill it (na_axis_tables
// takes 0.. and 128.. for x and y; the block needs 192 + T threads); the
// caller's barrier publishes it.
template <bool INVERSE, int T, typename I>
__device__ __forceinline__ void na_axis_table_z(int tid, const na_axis& a, long long p0, long long n, long long g,
                                                I* lo, I* hi) {
    const int i = tid - 192;
    if (i < 0 || i >= T) return;
    long long s = 0, e = 0;
    if (i < n) {
        if (INVERSE) na_inverse_range(a, (p0 + i) * a.dilation + g, s, e);
        else na_window(a, (p0 + i) * a.dilation + g, s, e);
    }
    lo[i] = (I)s;
    hi[i] = (I)e;
}

// The problem's axes (NA_PROBLEM's arguments, na_args.cuh) as na_axis values.
// A kernel whose RANK is below 3 gets the trivial z axis as constants (length
// 1, kernel 1, stride 1, dilation 1, not causal), so that whatever it computes
// on z folds away at compile time and its code is that of a 2D kernel; read z
// through az (az.length, az.kernel), never through Z and kz, in such code.
#define NA_PROBLEM_AXES(RANK)                                                                  \
    const na_axis ax = {X, kx, sx, dx, cx};                                                    \
    const na_axis ay = {Y, ky, sy, dy, cy};                                                    \
    const na_axis az = (RANK) == 3 ? na_axis{Z, kz, sz, dz, cz} : na_axis{1, 1, 1, 1, 0};
