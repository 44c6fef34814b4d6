// Pieces shared by the tensor-core fused kernels (na_fused_tc.cu forward,
// na_fused_tc_bwd.cu backward): block shape and decode, the query rows of an
// mma lane and the per-lane window tests. The key box geometry is in
// na_tc_box.cuh, the row staging in na_tc_load.cuh.
//
// Everything here runs inside the kernels' key loops, so it is written for
// few instructions per 8-key tile: 32-bit indices inside a block and window
// tests that whole tiles inside every window of a warp skip.
//
// Ranks: the pieces take the kernel's RANK (and the tile's TZ) as trailing
// template parameters, or read them from the box type (na_tc_box<TY, RANK>);
// the z axis rides in trailing arguments whose defaults are the trivial axis,
// so that below rank 3 every z term is a compile-time constant and the code
// is that of the 1D/2D kernels.
#pragma once

#include "na_tc_box.cuh"
#include "na_tc_load.cuh"

#define NA_TC_FULL 0xffffffffu
#define NA_TC_LOG2E 1.4426950408889634f
#define NA_TC_LN2 0.6931471805599453f

// The architecture being compiled for (__CUDA_ARCH__: 800 for sm_80, 1000 for sm_100), 0 in the emulator,
// which compiles with no __CUDA_ARCH__. Kernels key register-use choices on it (how far a loop is
// unrolled, whether a block-uniform value lives in a register or in shared memory): ptxas allocates
// registers differently per architecture, and a choice that fits 255 registers on one spills on another.
// The math never depends on it; a choice that changes code beyond unrolling is a template parameter whose
// default comes from here, so that the emulator can build and test every variant.
#ifdef __CUDA_ARCH__
#define NA_TC_ARCH __CUDA_ARCH__
#else
#define NA_TC_ARCH 0
#endif

// The two query rows an mma lane holds in the 16-row mma tile starting at tile
// row row0 (rows row0 + g and row0 + g + 8, g = lane / 4): whether they
// exist, their windows in box coordinates (box = the union of the tile's
// windows, origin tx.h0 / ty.h0 / tz.h0) and the rpb index of box key (0, 0, 0)
// for each. The z window [z0, z1) is one word, z0 | z1 << 16 (na_tc_z_window;
// the 3D kernels cover boxes of less than 2^16 keys along z): the 3D dq kernel
// at head dim 128 has no register to spare. Below rank 3 it is [0, 1) and
// never tested. Their positions come from na_tc_row_position, not from the
// struct, which lives in registers through the kernels' key loops.
struct na_tc_rows {
    bool valid[2];
    int wx0[2], wx1[2], wy0[2], wy1[2];
    unsigned wz[2];
    long long bias0[2];
};

// the z window [z0, z1) of a packed na_tc_rows::wz
__device__ __forceinline__ int na_tc_z0(unsigned wz) { return (int)(wz & 0xffffu); }
__device__ __forceinline__ int na_tc_z1(unsigned wz) { return (int)(wz >> 16); }

// tile row qi's coordinates in the tile: row (qx * TY + qy) * TZ + qz (z fastest; TZ 1 below rank 3)
template <int TY, int TZ = 1>
__device__ __forceinline__ void na_tc_tile_coords(int qi, int& qx, int& qy, int& qz) {
    qx = qi / (TY * TZ);
    qy = qi / TZ % TY;
    qz = qi % TZ;
}

// the position (x, y, z) of tile row qi
template <int TY, int TZ = 1>
__device__ __forceinline__ void na_tc_row_position(int qi, const na_tile_axis& tx, const na_tile_axis& ty,
                                                   const na_tile_axis& tz, long long dx, long long dy, long long dz,
                                                   long long& x, long long& y, long long& z) {
    int qx, qy, qz;
    na_tc_tile_coords<TY, TZ>(qi, qx, qy, qz);
    x = (tx.q0 + qx) * dx + tx.g;
    y = (ty.q0 + qy) * dy + ty.g;
    z = (tz.q0 + qz) * dz + tz.g;
}

// the position (x, y) of tile row qi of a tile of rank 1 or 2
template <int TY>
__device__ __forceinline__ void na_tc_row_position(int qi, const na_tile_axis& tx, const na_tile_axis& ty,
                                                   long long dx, long long dy, long long& x, long long& y) {
    long long z;
    na_tc_row_position<TY, 1>(qi, tx, ty, NA_TC_NO_Z, dx, dy, 1, x, y, z);
}

// az, tz, rpb_z: the z axis of a 3D problem (RANK 3); below it their defaults, never read
template <int TY, int TZ = 1, int RANK = 2>
__device__ __forceinline__ na_tc_rows na_tc_query_rows(int row0, int lane, const na_axis& ax, const na_axis& ay,
                                                       const na_tile_axis& tx, const na_tile_axis& ty, long long h,
                                                       long long rpb_h, long long rpb_x, long long rpb_y,
                                                       const na_axis& az = na_axis{1, 1, 1, 1, 0},
                                                       const na_tile_axis& tz = NA_TC_NO_Z, long long rpb_z = 0) {
    na_tc_rows r;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        int qx, qy, qz;
        na_tc_tile_coords<TY, TZ>(row0 + (lane >> 2) + 8 * i, qx, qy, qz);
        r.valid[i] = qx < tx.n && qy < ty.n && (RANK < 3 || qz < tz.n);
        const long long gx = tx.q0 + qx, gy = ty.q0 + qy, gz = tz.q0 + qz;  // group coordinates
        long long s0 = 0, s1 = 0, u0 = 0, u1 = 0, v0 = 0, v1 = 0;
        if (r.valid[i]) {
            na_window(ax, gx * ax.dilation + tx.g, s0, s1);
            na_window(ay, gy * ay.dilation + ty.g, u0, u1);
            if (RANK == 3) na_window(az, gz * az.dilation + tz.g, v0, v1);
        }
        r.wx0[i] = (int)(s0 - tx.h0); r.wx1[i] = (int)(s1 - tx.h0);
        r.wy0[i] = (int)(u0 - ty.h0); r.wy1[i] = (int)(u1 - ty.h0);
        r.wz[i] = RANK == 3 ? (unsigned)(v0 - tz.h0) | (unsigned)(v1 - tz.h0) << 16 : 1u << 16;
        r.bias0[i] = h * rpb_h + (tx.h0 - gx + ax.kernel - 1) * rpb_x + (ty.h0 - gy + ay.kernel - 1) * rpb_y;
        if (RANK == 3) r.bias0[i] += (tz.h0 - gz + az.kernel - 1) * rpb_z;
    }
    return r;
}

// which of a lane's 4 accumulator elements of an 8-key tile are visible: rows
// g, g + 8 (i) by box keys key0, key0 + 1 (e) at element 2 i + e
template <int TY, int RANK = 2>
__device__ __forceinline__ void na_tc_visible(const na_tc_rows& r, int key0, const na_tc_box<TY, RANK>& box,
                                              bool (&in)[4]) {
    int bx, by, bz;
    box.split(key0, bx, by, bz);
#pragma unroll
    for (int e = 0; e < 2; ++e) {
#pragma unroll
        for (int i = 0; i < 2; ++i)
            in[2 * i + e] = r.valid[i] && key0 + e < box.keys && bx >= r.wx0[i] && bx < r.wx1[i] &&
                            by >= r.wy0[i] && by < r.wy1[i] &&
                            (RANK < 3 || (bz >= na_tc_z0(r.wz[i]) && bz < na_tc_z1(r.wz[i])));
        box.step(bx, by, bz);
    }
}

// the rpb index of box key `key` for row i (rpb_z: RANK 3 only)
template <int TY, int RANK = 2>
__device__ __forceinline__ long long na_tc_bias_index(const na_tc_rows& r, int i, int key,
                                                      const na_tc_box<TY, RANK>& box, long long rpb_x,
                                                      long long rpb_y, long long rpb_z = 0) {
    int bx, by, bz;
    box.split(key, bx, by, bz);
    const long long xy = r.bias0[i] + bx * rpb_x + by * rpb_y;
    return RANK == 3 ? xy + bz * rpb_z : xy;
}

// block -> (b, h, tile itx, ity): ax / ay, the tile axes tx / ty and tile_ok (false: an
// empty tile of a shorter dilation group); kernels take the NA problem arguments
#define NA_TC_DECODE_BLOCK(TX_, TY_) NA_TC_DECODE_BLOCK_RANK(TX_, TY_, 1, 2)

// The same for a kernel of rank RANK_ (tiles TX_ x TY_ x TZ_): also az and tz, and the tile index itz, the
// fastest of the block index; below rank 3 az and tz are the trivial axis and its one tile (constants)
#define NA_TC_DECODE_BLOCK_RANK(TX_, TY_, TZ_, RANK_) NA_TC_DECODE_BLOCK_HEADS(TX_, TY_, TZ_, RANK_, H)

// The same over HEADS_ heads: the dK/dV kernels' blocks are per key/value head (H / HPK of them), h one of those
#define NA_TC_DECODE_BLOCK_HEADS(TX_, TY_, TZ_, RANK_, HEADS_)                                 \
    NA_PROBLEM_AXES(RANK_)                                                                       \
    const long long ntz = (RANK_) == 3 ? na_tiles_per_axis(az, TZ_) : 1;                         \
    const long long nty = na_tiles_per_axis(ay, TY_), ntx = na_tiles_per_axis(ax, TX_);         \
    long long n_ = blockIdx.x;                                                                   \
    const long long itz = (RANK_) == 3 ? n_ % ntz : 0;                                           \
    if ((RANK_) == 3) n_ /= ntz;                                                                 \
    const long long ity = n_ % nty; n_ /= nty;                                                   \
    const long long itx = n_ % ntx; n_ /= ntx;                                                   \
    const long long h = n_ % (HEADS_), b = n_ / (HEADS_);                                        \
    na_tile_axis tx, ty, tz = NA_TC_NO_Z;                                                        \
    const bool tile_ok = na_tile_axis_of(ax, itx, TX_, tx) && na_tile_axis_of(ay, ity, TY_, ty) && \
                         ((RANK_) < 3 || na_tile_axis_of(az, itz, TZ_, tz));

// The keys every valid row of a warp sees: the intersection of their windows
// (box coordinates) over the warp's MT mma tiles. An 8-key tile inside it
// needs no per-element window test (docs/design/kernels.md#where-the-speed-comes-from: mask only partially
// covered tiles). z bounds: RANK 3 only.
struct na_tc_warp_window {
    int x0, x1, y0, y1, z0, z1;
};

template <int MT = 1, int RANK = 2>
__device__ __forceinline__ na_tc_warp_window na_tc_common_window(const na_tc_rows* rows) {
    na_tc_warp_window w = {-(1 << 30), 1 << 30, -(1 << 30), 1 << 30, -(1 << 30), 1 << 30};
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const na_tc_rows& r = rows[mt];
            if (!r.valid[i]) continue;
            w.x0 = w.x0 > r.wx0[i] ? w.x0 : r.wx0[i];
            w.x1 = w.x1 < r.wx1[i] ? w.x1 : r.wx1[i];
            w.y0 = w.y0 > r.wy0[i] ? w.y0 : r.wy0[i];
            w.y1 = w.y1 < r.wy1[i] ? w.y1 : r.wy1[i];
            if (RANK == 3) {
                const int z0 = na_tc_z0(r.wz[i]), z1 = na_tc_z1(r.wz[i]);
                w.z0 = w.z0 > z0 ? w.z0 : z0;
                w.z1 = w.z1 < z1 ? w.z1 : z1;
            }
        }
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
        const int x0 = __shfl_xor_sync(NA_TC_FULL, w.x0, off), x1 = __shfl_xor_sync(NA_TC_FULL, w.x1, off);
        const int y0 = __shfl_xor_sync(NA_TC_FULL, w.y0, off), y1 = __shfl_xor_sync(NA_TC_FULL, w.y1, off);
        w.x0 = w.x0 > x0 ? w.x0 : x0;
        w.x1 = w.x1 < x1 ? w.x1 : x1;
        w.y0 = w.y0 > y0 ? w.y0 : y0;
        w.y1 = w.y1 < y1 ? w.y1 : y1;
        if (RANK == 3) {
            const int z0 = __shfl_xor_sync(NA_TC_FULL, w.z0, off), z1 = __shfl_xor_sync(NA_TC_FULL, w.z1, off);
            w.z0 = w.z0 > z0 ? w.z0 : z0;
            w.z1 = w.z1 < z1 ? w.z1 : z1;
        }
    }
    // no valid row in the warp: still the starting bounds (a valid row's window starts at box x 0 or later);
    // make it empty (x0 > x1), so that no tile is full and the visibility test skips every tile
    if (w.x0 == -(1 << 30)) w = {1, 0, 1, 0, 1, 0};
    return w;
}

// whether the `count` box keys first .. first + count - 1 all lie in w
template <int TY, int RANK = 2>
__device__ __forceinline__ bool na_tc_keys_full(const na_tc_warp_window& w, int first, int count,
                                                const na_tc_box<TY, RANK>& box) {
    if (first + count > box.keys) return false;
    if constexpr (RANK == 3) {
        // keys in one box row (bx, by) need their z range in w; keys over several rows need w to span the box's
        // whole z extent, and over several x-rows also its whole y extent (a sufficient test: a tile it calls
        // partial gets the per-element test)
        int bx0, by0, bz0, bx1, by1, bz1;
        box.split(first, bx0, by0, bz0);
        box.split(first + count - 1, bx1, by1, bz1);
        if (bx0 < w.x0 || bx1 >= w.x1) return false;
        if (bx0 == bx1 && by0 == by1) return by0 >= w.y0 && by0 < w.y1 && bz0 >= w.z0 && bz1 < w.z1;
        if (w.z0 > 0 || w.z1 < box.hz) return false;
        if (bx0 == bx1) return by0 >= w.y0 && by1 < w.y1;
        return w.y0 <= 0 && w.y1 >= box.hy;
    } else {
        int bx0, by0, bx1, by1;
        box.split(first, bx0, by0);
        box.split(first + count - 1, bx1, by1);
        if (bx0 < w.x0 || bx1 >= w.x1) return false;
        if (bx0 == bx1) return by0 >= w.y0 && by1 < w.y1;
        return w.y0 <= 0 && w.y1 >= box.hy;  // the keys wrap to the next box row: the window must span the box's width
    }
}

// whether the 8 box keys key_tile .. key_tile + 7 all lie in w
template <int TY, int RANK = 2>
__device__ __forceinline__ bool na_tc_tile_full(const na_tc_warp_window& w, int key_tile,
                                                const na_tc_box<TY, RANK>& box) {
    return na_tc_keys_full<TY>(w, key_tile, 8, box);
}

// The visibility of a lane's 4 elements of the 8-key tile at key_tile in each
// of the warp's MT mma tiles (see na_tc_visible; key0 = key_tile + 2 (lane %
// 4)); returns whether the tile lies inside the warp's common window
// (warp-uniform), where the per-element test is skipped.
template <int TY, int MT = 1, int RANK = 2>
__device__ __forceinline__ bool na_tc_visible_elements(const na_tc_rows* rows, const na_tc_warp_window& w,
                                                       int key_tile, int key0, const na_tc_box<TY, RANK>& box,
                                                       bool (&in)[MT][4]) {
    if (na_tc_tile_full(w, key_tile, box)) {  // a full tile has a valid row
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            in[mt][0] = in[mt][1] = rows[mt].valid[0];
            in[mt][2] = in[mt][3] = rows[mt].valid[1];
        }
        return true;
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) na_tc_visible(rows[mt], key0, box, in[mt]);
    return false;
}

// na_tc_visible_elements, and whether any lane of the warp sees one of the
// tile's elements (warp-uniform): full tiles skip the vote
template <int TY, int MT = 1, int RANK = 2>
__device__ __forceinline__ bool na_tc_visible_tile(const na_tc_rows* rows, const na_tc_warp_window& w,
                                                   int key_tile, int key0, const na_tc_box<TY, RANK>& box,
                                                   bool (&in)[MT][4]) {
    if (na_tc_visible_elements<TY, MT>(rows, w, key_tile, key0, box, in)) return true;
    bool any = false;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) any = any || in[mt][0] || in[mt][1] || in[mt][2] || in[mt][3];
    return __any_sync(NA_TC_FULL, any);
}
