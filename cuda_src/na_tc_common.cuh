// Pieces shared by the tensor-core fused kernels (na_fused_tc.cu forward,
// na_fused_tc_bwd.cu backward): block shape and the staging of rows into
// shared memory with exact zeros for padding.
#pragma once

#include "na_shared.cuh"
#include "na_tile.cuh"

// Kernels declare __launch_bounds__(NA_TC_THREADS, 1): without the minimum of one
// block per SM ptxas capped some instantiations at 168 registers and spilled.
#define NA_TC_WARPS 4
#define NA_TC_THREADS (32 * NA_TC_WARPS)
#define NA_TC_FULL 0xffffffffu

// stage `rows` rows of D elements into shared rows of pitch P, zero-filling
// head dims D..HD and the rows up to `capacity` (disjoint elements: no barrier
// needed between the two passes); ref(r) gives row r's global offset
template <class T, int HD, int P, class Ref>
__device__ __forceinline__ void na_tc_stage(T* dst, const T* src, long long rows, long long capacity, long long D,
                                            long long step, bool vec, Ref ref) {
    na_copy_rows(dst, P, src, rows, D, step, vec, [&](long long r) { return na_row_ref{ref(r), r}; });
    const T zero = T();
    const int pad = HD - (int)D, full = (int)rows;
    for (int e = threadIdx.x; e < full * pad; e += NA_TC_THREADS) dst[(e / pad) * P + D + e % pad] = zero;
    for (int e = threadIdx.x; e < ((int)capacity - full) * HD; e += NA_TC_THREADS)
        dst[(full + e / HD) * P + e % HD] = zero;
}


// stage a tile of NROWS = TX * TY rows of one (b, h) (row qx * TY + qy: group
// coordinates tx.q0 + qx, ty.q0 + qy) into rows of pitch P: the tile's valid
// rows from global memory, every other row and the head dims past D zero
template <class T, int HD, int P, int TX, int TY>
__device__ __forceinline__ void na_tc_stage_tile(T* dst, const T* src, long long s_b, long long s_x, long long s_y,
                                                 long long s_h, long long s_l, long long b, long long h, long long D,
                                                 long long dx, long long dy, const na_tile_axis& tx,
                                                 const na_tile_axis& ty) {
    const long long nqy = ty.n;
    na_copy_rows(dst, P, src, tx.n * nqy, D, s_l, na_rows_vectorizable(src, D, s_l, s_b, s_x, s_y, s_h),
                 [&](long long r) {
                     const long long qx = r / nqy, qy = r % nqy;
                     return na_row_ref{b * s_b + ((tx.q0 + qx) * dx + tx.g) * s_x + ((ty.q0 + qy) * dy + ty.g) * s_y +
                                           h * s_h,
                                       qx * TY + qy};
                 });
    const T zero = T();
    for (int e = threadIdx.x; e < TX * TY * HD; e += NA_TC_THREADS) {
        const int r = e / HD, c = e % HD;
        if (r / TY >= tx.n || r % TY >= nqy || c >= D) dst[r * P + c] = zero;
    }
}

// The two query rows an mma lane holds (rows g and g + 8 of its warp's 16, g =
// lane / 4): whether they exist, their positions, their windows in box
// coordinates (box = the union of the tile's windows, origin tx.h0 / ty.h0)
// and the rpb index of box key (0, 0) for each.
struct na_tc_rows {
    bool valid[2];
    int wx0[2], wx1[2], wy0[2], wy1[2];
    long long x[2], y[2], bias0[2];
};

template <int TY>
__device__ __forceinline__ na_tc_rows na_tc_query_rows(int warp, int lane, const na_axis& ax, const na_axis& ay,
                                                       const na_tile_axis& tx, const na_tile_axis& ty, long long h,
                                                       long long rpb_h, long long rpb_x, long long rpb_y) {
    na_tc_rows r;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int qi = 16 * warp + (lane >> 2) + 8 * i, qx = qi / TY, qy = qi % TY;
        r.valid[i] = qx < tx.n && qy < ty.n;
        const long long gx = tx.q0 + qx, gy = ty.q0 + qy;  // group coordinates
        r.x[i] = gx * ax.dilation + tx.g;
        r.y[i] = gy * ay.dilation + ty.g;
        long long s0 = 0, s1 = 0, u0 = 0, u1 = 0;
        if (r.valid[i]) {
            na_window(ax, r.x[i], s0, s1);
            na_window(ay, r.y[i], u0, u1);
        }
        r.wx0[i] = (int)(s0 - tx.h0); r.wx1[i] = (int)(s1 - tx.h0);
        r.wy0[i] = (int)(u0 - ty.h0); r.wy1[i] = (int)(u1 - ty.h0);
        r.bias0[i] = h * rpb_h + (tx.h0 - gx + ax.kernel - 1) * rpb_x + (ty.h0 - gy + ay.kernel - 1) * rpb_y;
    }
    return r;
}

// which of a lane's 4 accumulator elements of an 8-key tile are visible: rows
// g, g + 8 (i) by box keys key0, key0 + 1 (e) at element 2 i + e; the box is
// `keys` keys walked row-major, hy per row
__device__ __forceinline__ void na_tc_visible(const na_tc_rows& r, int key0, int keys, int hy, bool (&in)[4]) {
    int bx = key0 / hy, by = key0 % hy;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
#pragma unroll
        for (int i = 0; i < 2; ++i)
            in[2 * i + e] = r.valid[i] && key0 + e < keys && bx >= r.wx0[i] && bx < r.wx1[i] && by >= r.wy0[i] &&
                            by < r.wy1[i];
        if (++by == hy) { by = 0; ++bx; }
    }
}

// the logit of element 2 i + e from its raw dot product (callers pass only visible elements)
__device__ __forceinline__ float na_tc_logit(const na_tc_rows& r, int i, int key, int hy, float dot, float scale,
                                             const float* rpb, long long rpb_x, long long rpb_y) {
    float logit = dot * scale;
    if (rpb) logit += rpb[r.bias0[i] + (long long)(key / hy) * rpb_x + (long long)(key % hy) * rpb_y];
    return logit;
}

// global offset of box key `key` of one (b, h) in a tensor with the given strides
__device__ __forceinline__ long long na_tc_key_offset(long long key, int hy, const na_tile_axis& tx,
                                                      const na_tile_axis& ty, long long dx, long long dy, long long b,
                                                      long long h, long long sb, long long sx, long long sy,
                                                      long long sh) {
    const long long bx = key / hy, by = key % hy;
    return b * sb + ((tx.h0 + bx) * dx + tx.g) * sx + ((ty.h0 + by) * dy + ty.g) * sy + h * sh;
}

// block -> (b, h, tile itx, ity): ax / ay, the tile axes tx / ty and tile_ok (false: an
// empty tile of a shorter dilation group); kernels take the NA problem arguments
#define NA_TC_DECODE_BLOCK(TX_, TY_)                                                   \
    const na_axis ax = {X, kx, sx, dx, cx};                                       \
    const na_axis ay = {Y, ky, sy, dy, cy};                                       \
    const long long nty = na_tiles_per_axis(ay, TY_), ntx = na_tiles_per_axis(ax, TX_); \
    long long n_ = blockIdx.x;                                                    \
    const long long ity = n_ % nty; n_ /= nty;                                    \
    const long long itx = n_ % ntx; n_ /= ntx;                                    \
    const long long h = n_ % H, b = n_ / H;                                       \
    na_tile_axis tx, ty;                                                          \
    const bool tile_ok = na_tile_axis_of(ax, itx, TX_, tx) && na_tile_axis_of(ay, ity, TY_, ty);

// The keys every valid row of a warp sees: the intersection of their windows
// (box coordinates). An 8-key tile inside it needs no per-element window test
// (DESIGN.md section 7: mask only partially covered tiles).
struct na_tc_warp_window {
    int x0, x1, y0, y1;
};

__device__ __forceinline__ na_tc_warp_window na_tc_common_window(const na_tc_rows& r) {
    na_tc_warp_window w = {-(1 << 30), 1 << 30, -(1 << 30), 1 << 30};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        if (!r.valid[i]) continue;
        w.x0 = w.x0 > r.wx0[i] ? w.x0 : r.wx0[i];
        w.x1 = w.x1 < r.wx1[i] ? w.x1 : r.wx1[i];
        w.y0 = w.y0 > r.wy0[i] ? w.y0 : r.wy0[i];
        w.y1 = w.y1 < r.wy1[i] ? w.y1 : r.wy1[i];
    }
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
        const int x0 = __shfl_xor_sync(NA_TC_FULL, w.x0, off), x1 = __shfl_xor_sync(NA_TC_FULL, w.x1, off);
        const int y0 = __shfl_xor_sync(NA_TC_FULL, w.y0, off), y1 = __shfl_xor_sync(NA_TC_FULL, w.y1, off);
        w.x0 = w.x0 > x0 ? w.x0 : x0;
        w.x1 = w.x1 < x1 ? w.x1 : x1;
        w.y0 = w.y0 > y0 ? w.y0 : y0;
        w.y1 = w.y1 < y1 ? w.y1 : y1;
    }
    return w;  // no valid row in the warp: x0 > x1, every tile partial
}

// whether the 8 box keys key_tile .. key_tile + 7 (row-major, hy per row) all lie in w
__device__ __forceinline__ bool na_tc_tile_full(const na_tc_warp_window& w, int key_tile, int keys, int hy) {
    if (key_tile + 8 > keys) return false;
    const int last = key_tile + 7, bx0 = key_tile / hy, by0 = key_tile % hy, bx1 = last / hy, by1 = last % hy;
    if (bx0 < w.x0 || bx1 >= w.x1) return false;
    if (bx0 == bx1) return by0 >= w.y0 && by1 < w.y1;
    return w.y0 <= 0 && w.y1 >= hy;  // the tile wraps to the next box row: the window must span the box's width
}

// the visibility of a lane's 4 elements of an 8-key tile (see na_tc_visible), skipping the per-element test
// for tiles inside the warp's common window
__device__ __forceinline__ void na_tc_visible_tile(const na_tc_rows& r, const na_tc_warp_window& w, int key_tile,
                                                   int key0, int keys, int hy, bool (&in)[4]) {
    if (na_tc_tile_full(w, key_tile, keys, hy)) {  // warp-uniform
        in[0] = in[1] = r.valid[0];
        in[2] = in[3] = r.valid[1];
    } else {
        na_tc_visible(r, key0, keys, hy, in);
    }
}

// stage box keys c0 .. c0 + cn - 1 of one (b, h) from K and V into chunk rows
// of pitch P (KC rows each; padding rows and head dims zero), as the forward
// and the dq kernel stream them
template <class T, int HD, int P, int KC>
__device__ __forceinline__ void na_tc_stage_kv(T* sk, T* sv, const T* k, const T* v, const long long (&ks)[5],
                                               const long long (&vs)[5], bool k_vec, bool v_vec, int c0, int cn,
                                               int hy, const na_tile_axis& tx, const na_tile_axis& ty, long long dx,
                                               long long dy, long long b, long long h, long long D) {
    na_tc_stage<T, HD, P>(sk, k, cn, KC, D, ks[4], k_vec, [&](long long r) {
        return na_tc_key_offset(c0 + r, hy, tx, ty, dx, dy, b, h, ks[0], ks[1], ks[2], ks[3]);
    });
    na_tc_stage<T, HD, P>(sv, v, cn, KC, D, vs[4], v_vec, [&](long long r) {
        return na_tc_key_offset(c0 + r, hy, tx, ty, dx, dy, b, h, vs[0], vs[1], vs[2], vs[3]);
    });
}
