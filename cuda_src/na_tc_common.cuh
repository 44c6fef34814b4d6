// Pieces shared by the tensor-core fused kernels (na_fused_tc.cu forward,
// na_fused_tc_bwd.cu backward): block shape, the key box of a query tile,
// row staging into shared memory (cp.async where the layout allows) and the
// per-lane window tests.
//
// Everything here runs inside the kernels' key loops, so it is written for
// few instructions per 8-key tile: 32-bit indices inside a block, division by
// the box width through a multiply-high (na_divisor), 1D boxes (TY == 1)
// without any division, and row staging whose piece indices are compile-time
// shifts.
#pragma once

#include "na_shared.cuh"
#include "na_async.cuh"
#include "na_tile.cuh"

// Kernels declare __launch_bounds__(NA_TC_THREADS, 1): without the minimum of one
// block per SM ptxas capped some instantiations at 168 registers and spilled.
#define NA_TC_WARPS 4
#define NA_TC_THREADS (32 * NA_TC_WARPS)
#define NA_TC_FULL 0xffffffffu
#define NA_TC_LOG2E 1.4426950408889634f
#define NA_TC_LN2 0.6931471805599453f

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
// (na_window.cuh, DESIGN.md section 2) without its 64-bit divisions, for
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
// DESIGN.md section 2), walked row-major: box key n sits at box coordinates
// (n / hy, n % hy), origin (tx.h0, ty.h0). 1D tiles (TY == 1) have hy == 1.
template <int TY>
struct na_tc_box {
    int keys, hy;
    na_divisor div;

    __device__ __forceinline__ void split(int n, int& bx, int& by) const {
        if (TY == 1) {
            bx = n;
            by = 0;
        } else {
            bx = na_divide(div, n);
            by = n - bx * hy;
        }
    }
};

template <int TY>
__device__ __forceinline__ na_tc_box<TY> na_tc_box_of(const na_tile_axis& tx, const na_tile_axis& ty) {
    na_tc_box<TY> box;
    box.hy = TY == 1 ? 1 : (int)(ty.h1 - ty.h0);
    box.keys = (int)(tx.h1 - tx.h0) * box.hy;
    box.div = na_make_divisor((unsigned)box.hy);
    return box;
}

// Element offsets of box row (bx, by) of one (b, h) in a tensor: base + bx * step_x + by * step_y, for a
// box with origin (x0, y0) in the dilation groups gx, gy (group coordinates; position = x * dx + gx).
struct na_tc_box_rows {
    long long base, step_x, step_y;
};

__device__ __forceinline__ na_tc_box_rows na_tc_box_rows_of(long long x0, long long y0, long long gx, long long gy,
                                                            long long dx, long long dy, long long b, long long h,
                                                            long long sb, long long sx, long long sy, long long sh) {
    return {b * sb + (x0 * dx + gx) * sx + (y0 * dy + gy) * sy + h * sh, dx * sx, dy * sy};
}

// Load ROWS rows of HD elements into shared rows of pitch P: row(r, at) says
// whether row r exists and sets `at`, its element offset in src (element
// stride `step`); missing rows and head dims D..HD are zero. With `vec`
// (block-uniform, na_rows_vectorizable: rows contiguous and 16-byte aligned,
// D a multiple of 16 bytes) every 16-byte piece is one cp.async (zero-filling
// ones included), which lands at the next na_cp_async_wait_group: the caller
// commits and waits; the per-piece work is the row's offset and one copy.
// Otherwise element by element, landed on return (for strided head dims and
// unaligned rows).
template <class T, int HD, int P, int ROWS, class Row>
__device__ __forceinline__ void na_tc_load_rows(T* dst, const T* src, long long step, bool vec, int D, Row row) {
    if (vec) {
        constexpr int V = 16 / (int)sizeof(T), PIECES = HD / V, N = ROWS * PIECES;
        static_assert(HD % V == 0 && (P * (int)sizeof(T)) % 16 == 0, "16-byte pieces of 16-byte aligned rows");
#pragma unroll
        for (int i = 0; i < (N + NA_TC_THREADS - 1) / NA_TC_THREADS; ++i) {
            const int e = (int)threadIdx.x + i * NA_TC_THREADS;
            if (N % NA_TC_THREADS == 0 || e < N) {
                const int r = e / PIECES, c = (e % PIECES) * V;
                long long at = 0;
                const bool ok = row(r, at) && c < D;
                na_cp_async_zfill_16(dst + r * P + c, ok ? src + at + c : src, ok ? 16 : 0);
            }
        }
        return;
    }
    for (int e = threadIdx.x; e < ROWS * HD; e += NA_TC_THREADS) {
        const int r = e / HD, c = e % HD;
        long long at = 0;
        const bool ok = row(r, at) && c < D;
        dst[r * P + c] = ok ? src[at + c * step] : T();
    }
}

// load box keys c0 .. c0 + KC - 1 of one tensor into KC shared rows (keys past the box: zero); the
// dkdv kernel walks its box of queries the same way
template <class T, int HD, int P, int KC, int TY>
__device__ __forceinline__ void na_tc_load_box_keys(T* dst, const T* src, long long step, bool vec, int D,
                                                    const na_tc_box<TY>& box, const na_tc_box_rows& rows, int c0) {
    na_tc_load_rows<T, HD, P, KC>(dst, src, step, vec, D, [&](int r, long long& at) {
        const int key = c0 + r;
        if (key >= box.keys) return false;
        int bx, by;
        box.split(key, bx, by);
        at = rows.base + bx * rows.step_x + by * rows.step_y;
        return true;
    });
}

// The K and V rows of a key box, streamed in chunks of KC box keys through two
// shared-memory stages of 2 KC rows each (the K chunk, then the V chunk), as
// the forward and the dq kernel walk the box: load(stages, chunk) issues chunk
// `chunk` into stage chunk % 2 as one cp.async group.
template <class T, int HD, int P, int KC, int TY>
struct na_tc_kv_stream {
    const T* k;
    const T* v;
    long long k_step, v_step;  // element strides of the head dim
    bool k_vec, v_vec;
    int d_len;
    na_tc_box_rows k_at, v_at;

    __device__ __forceinline__ void load(T* stages, const na_tc_box<TY>& box, int chunk) const {
        T* stage = stages + (chunk & 1) * 2 * KC * P;
        na_tc_load_box_keys<T, HD, P, KC>(stage, k, k_step, k_vec, d_len, box, k_at, chunk * KC);
        na_tc_load_box_keys<T, HD, P, KC>(stage + KC * P, v, v_step, v_vec, d_len, box, v_at, chunk * KC);
        na_cp_async_commit();
    }

    // the top of the iteration on chunk `chunk` of `chunks` (chunk 0 loaded before the loop): issue
    // chunk + 1 (an empty group after the last keeps the wait uniform), wait for chunk `chunk` and
    // make it visible to the block; returns its stage (K rows, then V rows from KC * P on). The
    // caller ends each iteration with a barrier, before the stage it read is loaded again.
    __device__ __forceinline__ const T* arrive(T* stages, const na_tc_box<TY>& box, int chunk, int chunks) const {
        if (chunk + 1 < chunks) load(stages, box, chunk + 1);
        else na_cp_async_commit();
        na_cp_async_wait_group<1>();
        __syncthreads();
        return stages + (chunk & 1) * 2 * KC * P;
    }
};

// the stream of one (b, h)'s K and V (strides b, x, y, h, head dim) over the key box of tiles tx, ty
template <class T, int HD, int P, int KC, int TY>
__device__ __forceinline__ na_tc_kv_stream<T, HD, P, KC, TY> na_tc_kv_stream_of(
    const T* k, const long long (&ks)[5], const T* v, const long long (&vs)[5], long long D,
    const na_tile_axis& tx, const na_tile_axis& ty, long long dx, long long dy, long long b, long long h) {
    return {k,
            v,
            ks[4],
            vs[4],
            na_rows_vectorizable(k, D, ks[4], ks[0], ks[1], ks[2], ks[3]),
            na_rows_vectorizable(v, D, vs[4], vs[0], vs[1], vs[2], vs[3]),
            (int)D,
            na_tc_box_rows_of(tx.h0, ty.h0, tx.g, ty.g, dx, dy, b, h, ks[0], ks[1], ks[2], ks[3]),
            na_tc_box_rows_of(tx.h0, ty.h0, tx.g, ty.g, dx, dy, b, h, vs[0], vs[1], vs[2], vs[3])};
}

// load the NROWS = TX * TY rows of a tile of one (b, h) (row qx * TY + qy: group
// coordinates tx.q0 + qx, ty.q0 + qy; rows of missing queries zero)
template <class T, int HD, int P, int TX, int TY>
__device__ __forceinline__ void na_tc_load_tile(T* dst, const T* src, long long s_b, long long s_x, long long s_y,
                                                long long s_h, long long s_l, long long b, long long h, int D,
                                                long long dx, long long dy, const na_tile_axis& tx,
                                                const na_tile_axis& ty) {
    const bool vec = na_rows_vectorizable(src, D, s_l, s_b, s_x, s_y, s_h);
    const long long base = b * s_b + (tx.q0 * dx + tx.g) * s_x + (ty.q0 * dy + ty.g) * s_y + h * s_h;
    const long long step_x = dx * s_x, step_y = dy * s_y;
    na_tc_load_rows<T, HD, P, TX * TY>(dst, src, s_l, vec, D, [&](int r, long long& at) {
        const int qx = r / TY, qy = r % TY;
        at = base + qx * step_x + qy * step_y;
        return qx < tx.n && qy < ty.n;
    });
}

// The two query rows an mma lane holds in the 16-row mma tile starting at tile
// row row0 (rows row0 + g and row0 + g + 8, g = lane / 4): whether they
// exist, their windows in box coordinates (box = the union of the tile's
// windows, origin tx.h0 / ty.h0) and the rpb index of box key (0, 0) for each.
// Their positions come from na_tc_row_position, not from the struct, which
// lives in registers through the kernels' key loops.
struct na_tc_rows {
    bool valid[2];
    int wx0[2], wx1[2], wy0[2], wy1[2];
    long long bias0[2];
};

// the position (x, y) of tile row qi (row qx * TY + qy)
template <int TY>
__device__ __forceinline__ void na_tc_row_position(int qi, const na_tile_axis& tx, const na_tile_axis& ty,
                                                   long long dx, long long dy, long long& x, long long& y) {
    x = (tx.q0 + qi / TY) * dx + tx.g;
    y = (ty.q0 + qi % TY) * dy + ty.g;
}

template <int TY>
__device__ __forceinline__ na_tc_rows na_tc_query_rows(int row0, int lane, const na_axis& ax, const na_axis& ay,
                                                       const na_tile_axis& tx, const na_tile_axis& ty, long long h,
                                                       long long rpb_h, long long rpb_x, long long rpb_y) {
    na_tc_rows r;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int qi = row0 + (lane >> 2) + 8 * i, qx = qi / TY, qy = qi % TY;
        r.valid[i] = qx < tx.n && qy < ty.n;
        const long long gx = tx.q0 + qx, gy = ty.q0 + qy;  // group coordinates
        long long s0 = 0, s1 = 0, u0 = 0, u1 = 0;
        if (r.valid[i]) {
            na_window(ax, gx * ax.dilation + tx.g, s0, s1);
            na_window(ay, gy * ay.dilation + ty.g, u0, u1);
        }
        r.wx0[i] = (int)(s0 - tx.h0); r.wx1[i] = (int)(s1 - tx.h0);
        r.wy0[i] = (int)(u0 - ty.h0); r.wy1[i] = (int)(u1 - ty.h0);
        r.bias0[i] = h * rpb_h + (tx.h0 - gx + ax.kernel - 1) * rpb_x + (ty.h0 - gy + ay.kernel - 1) * rpb_y;
    }
    return r;
}

// which of a lane's 4 accumulator elements of an 8-key tile are visible: rows
// g, g + 8 (i) by box keys key0, key0 + 1 (e) at element 2 i + e
template <int TY>
__device__ __forceinline__ void na_tc_visible(const na_tc_rows& r, int key0, const na_tc_box<TY>& box, bool (&in)[4]) {
    int bx, by;
    box.split(key0, bx, by);
#pragma unroll
    for (int e = 0; e < 2; ++e) {
#pragma unroll
        for (int i = 0; i < 2; ++i)
            in[2 * i + e] = r.valid[i] && key0 + e < box.keys && bx >= r.wx0[i] && bx < r.wx1[i] &&
                            by >= r.wy0[i] && by < r.wy1[i];
        if (++by == box.hy) { by = 0; ++bx; }
    }
}

// the rpb index of box key `key` for row i
template <int TY>
__device__ __forceinline__ long long na_tc_bias_index(const na_tc_rows& r, int i, int key, const na_tc_box<TY>& box,
                                                      long long rpb_x, long long rpb_y) {
    int bx, by;
    box.split(key, bx, by);
    return r.bias0[i] + bx * rpb_x + by * rpb_y;
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
// (box coordinates) over the warp's MT mma tiles. An 8-key tile inside it
// needs no per-element window test (DESIGN.md section 7: mask only partially
// covered tiles).
struct na_tc_warp_window {
    int x0, x1, y0, y1;
};

template <int MT = 1>
__device__ __forceinline__ na_tc_warp_window na_tc_common_window(const na_tc_rows* rows) {
    na_tc_warp_window w = {-(1 << 30), 1 << 30, -(1 << 30), 1 << 30};
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

// whether the 8 box keys key_tile .. key_tile + 7 all lie in w
template <int TY>
__device__ __forceinline__ bool na_tc_tile_full(const na_tc_warp_window& w, int key_tile, const na_tc_box<TY>& box) {
    if (key_tile + 8 > box.keys) return false;
    int bx0, by0, bx1, by1;
    box.split(key_tile, bx0, by0);
    box.split(key_tile + 7, bx1, by1);
    if (bx0 < w.x0 || bx1 >= w.x1) return false;
    if (bx0 == bx1) return by0 >= w.y0 && by1 < w.y1;
    return w.y0 <= 0 && w.y1 >= box.hy;  // the tile wraps to the next box row: the window must span the box's width
}

// The visibility of a lane's 4 elements of the 8-key tile at key_tile in each
// of the warp's MT mma tiles (see na_tc_visible; key0 = key_tile + 2 (lane %
// 4)) and whether any lane of the warp sees one of them (warp-uniform). Tiles
// inside the warp's common window skip the per-element test and the vote.
template <int TY, int MT = 1>
__device__ __forceinline__ bool na_tc_visible_tile(const na_tc_rows* rows, const na_tc_warp_window& w,
                                                   int key_tile, int key0, const na_tc_box<TY>& box,
                                                   bool (&in)[MT][4]) {
    if (na_tc_tile_full(w, key_tile, box)) {  // warp-uniform; a full tile has a valid row
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            in[mt][0] = in[mt][1] = rows[mt].valid[0];
            in[mt][2] = in[mt][3] = rows[mt].valid[1];
        }
        return true;
    }
    bool any = false;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        na_tc_visible(rows[mt], key0, box, in[mt]);
        any = any || in[mt][0] || in[mt][1] || in[mt][2] || in[mt][3];
    }
    return __any_sync(NA_TC_FULL, any);
}
