// Pieces of the dK/dV kernels on tensor cores (the mma.sync one in
// na_fused_tc_bwd.cu, the wgmma one in na_fused_wg_bwd.cu). A block owns a tile
// of 64 keys inside one dilation group per axis (warp w: keys 16 w .. 16 w +
// 15; a lane: rows g and g + 8 of them, in 8-query tiles of 4 floats, the
// layout of mma and wgmma accumulators) and walks the box of the queries
// whose windows can hold one of them, QC queries a chunk.
//
//   na_tc_key_ranges        each key's inverse range per axis and the axes of the
//                           query windows, in static shared memory
//   na_tc_query_box_of      the box of queries those ranges span
//   na_tc_key_rows_of       the lane's two key rows: validity, group coordinates
//   na_tc_dkdv_load_chunk   one chunk's Q and dOut rows (one cp.async group) and
//                           its tables: windows, lse (log2 units) and delta
//   na_tc_dkdv_visible      which of a lane's elements of an 8-query tile are
//                           inside their query's window
//   na_tc_dkdv_p_ds         p and ds = p (dp - delta) of them (0 outside)
//   na_tc_dkdv_p_ds_all     the same where every element is visible, no bias
//   na_tc_dkdv_store        dK = scale acc_k and dV = acc_v of the lane's valid keys
//   na_tc_group_chunk_of    which query head and box chunk a chunk of the stream is
//
// Grouped-query attention: a block serves one key/value head and sums dK/dV
// over the HPK query heads that read it, walking its query box once per query
// head as one stream of HPK x (box chunks) chunks: one pipeline, the next
// head's first chunk loading during this head's last.
//
// A chunk's tables hold 6 QC words: QC floats of lse, QC of delta, then [QC][4]
// ints of windows (x0, x1, y0, y1, group coordinates; empty past the box),
// 16-byte aligned: a lane reads a window as one int4, the lse and delta of
// its two columns as one float2 each. In 3D (RANK 3) 8 QC words: then [QC][2]
// ints of z windows (z0, z1).
//
// 3D blocks own a tile of TX x TY x TZ keys (z fastest) and walk a 3D query box
// row-major; the z axis of a block rides in na_tc_dkdv_z, which lower ranks
// leave at its default and never read.
#pragma once

#include "na_tc_box.cuh"
#include "na_tc_common.cuh"
#include "na_tc_load.cuh"

#define NA_TC_AT5(s, b, x, y, h, l) ((b) * s[0] + (x) * s[1] + (y) * s[2] + (h) * s[3] + (l) * s[4])

// the z part of na_tc_key_ranges (RANK 3; empty below it, so that lower ranks' static shared memory stays
// what it was)
template <int TZ, int RANK>
struct na_tc_key_ranges_z {
    int first_z[TZ], last_z[TZ];
};

template <int TZ>
struct na_tc_key_ranges_z<TZ, 2> {};

template <int TX, int TY, int TZ = 1, int RANK = 2>
struct na_tc_key_ranges : na_tc_key_ranges_z<TZ, RANK> {
    int first_x[TX], last_x[TX], first_y[TY], last_y[TY];  // group coordinates
    // x, y (and z): the windows of each chunk's queries (kept out of registers)
    na_tc_group_axis group_axes[RANK == 3 ? 3 : 2];
};

// The z axis of a 3D dK/dV block (RANK 3): the key tile's z axis, the dilation, the query box's z origin and
// the z strides of q, dOut, lse and delta. Lower ranks pass the default and never read it.
struct na_tc_dkdv_z {
    na_tile_axis tz = NA_TC_NO_Z;
    long long dz = 1;
    int bz0 = 0;
    long long q = 0, g = 0, l = 0, e = 0;
};

// fill `r` (static shared memory) for the tile's keys, THREADS threads; the caller's barrier makes it visible
// (az, tz: RANK 3 only)
template <int TX, int TY, int THREADS = NA_TC_THREADS, int TZ = 1, int RANK = 2>
__device__ __forceinline__ void na_tc_key_ranges_fill(na_tc_key_ranges<TX, TY, TZ, RANK>& r, const na_axis& ax,
                                                      const na_axis& ay, const na_tile_axis& tx,
                                                      const na_tile_axis& ty, long long dx, long long dy,
                                                      const na_axis& az = na_axis{1, 1, 1, 1, 0},
                                                      const na_tile_axis& tz = NA_TC_NO_Z) {
    const int tid = threadIdx.x;
    if (tid == 0) {
        r.group_axes[0] = na_tc_group_axis_of(ax, tx);
        r.group_axes[1] = na_tc_group_axis_of(ay, ty);
        if constexpr (RANK == 3) r.group_axes[2] = na_tc_group_axis_of(az, tz);
    }
    for (int i = tid; i < TX + TY + (RANK == 3 ? TZ : 0); i += THREADS) {
        long long f = 0, last = 0;
        if (i < TX) {
            if (i < tx.n) na_inverse_range(ax, (tx.q0 + i) * dx + tx.g, f, last);
            r.first_x[i] = (int)f;
            r.last_x[i] = (int)last;
        } else if (RANK < 3 || i < TX + TY) {
            const int j = i - TX;
            if (j < ty.n) na_inverse_range(ay, (ty.q0 + j) * dy + ty.g, f, last);
            r.first_y[j] = (int)f;
            r.last_y[j] = (int)last;
        } else if constexpr (RANK == 3) {
            const int j = i - TX - TY;
            if (j < tz.n) na_inverse_range(az, (tz.q0 + j) * az.dilation + tz.g, f, last);
            r.first_z[j] = (int)f;
            r.last_z[j] = (int)last;
        }
    }
}

// The query box: the union of the keys' inverse ranges (ranges never decrease with the key), walked
// row-major like a key box (query n at group coordinates bx0 + n / nby, by0 + n % nby; in 3D
// (bx0, by0, bz0) + (n / nbz / nby, n / nbz % nby, n % nbz), bz0 set only there).
template <int TX, int TY, int TZ = 1, int RANK = 2>
__device__ __forceinline__ na_tc_box<TY, RANK> na_tc_query_box_of(const na_tc_key_ranges<TX, TY, TZ, RANK>& r,
                                                                  const na_tile_axis& tx, const na_tile_axis& ty,
                                                                  int& bx0, int& by0, int* bz0 = nullptr,
                                                                  const na_tile_axis& tz = NA_TC_NO_Z) {
    bx0 = r.first_x[0];
    by0 = r.first_y[0];
    const long long bx1 = r.last_x[tx.n - 1], by1 = r.last_y[ty.n - 1];
    int nby = (int)na_max(0, by1 - by0), nbz = 1;
    if constexpr (RANK == 3) {
        *bz0 = r.first_z[0];
        nbz = (int)na_max(0, r.last_z[tz.n - 1] - *bz0);
    }
    const int nqueries = (int)na_max(0, bx1 - bx0) * nby * nbz;
    na_tc_box<TY, RANK> qbox;
    qbox.keys = nqueries;
    qbox.hy = TY == 1 ? 1 : nby;
    qbox.div = na_make_divisor(nby > 0 ? (unsigned)nby : 1u);
    qbox.hz = nbz;
    if (RANK == 3) qbox.div_z = na_make_divisor(nbz > 0 ? (unsigned)nbz : 1u);
    return qbox;
}

// this lane's key rows g and g + 8 of the warp's 16 keys (int group coordinates: the HD-128 kernels are at
// 255 registers)
struct na_tc_key_rows {
    bool valid[2];
    int jx[2], jy[2], jz[2];  // jz: RANK 3 only
};

template <int TY, int TZ = 1, int RANK = 2>
__device__ __forceinline__ na_tc_key_rows na_tc_key_rows_of(int warp, int gq, const na_tile_axis& tx,
                                                            const na_tile_axis& ty,
                                                            const na_tile_axis& tz = NA_TC_NO_Z) {
    na_tc_key_rows k;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        int kxi, kyi, kzi;
        na_tc_tile_coords<TY, TZ>(16 * warp + gq + 8 * i, kxi, kyi, kzi);
        k.valid[i] = kxi < tx.n && kyi < ty.n && (RANK < 3 || kzi < tz.n);
        k.jx[i] = (int)tx.q0 + kxi;
        k.jy[i] = (int)ty.q0 + kyi;
        k.jz[i] = (int)tz.q0 + kzi;
    }
    return k;
}

// Chunk c0 .. c0 + QC - 1 of the query box into a stage: its Q rows (head dim d_len) at sq, its dOut rows
// (head dim v_len) QC rows further (layout L) as one cp.async group (the caller waits), then its tables
// (plain stores; the caller's barrier). Returns whether each query whose table entry this thread wrote is a
// query of the chunk whose window holds every key of the tile (true where it wrote none): AND-ed over the
// block, whether the chunk needs no window test. THREADS threads share the work.
template <class T, int HD, class L, int QC, int TY, int THREADS = NA_TC_THREADS, int RANK = 2>
__device__ __forceinline__ bool na_tc_dkdv_load_chunk(T* sq, float* table, int c0, const na_tc_box<TY, RANK>& qbox,
                                                      int bx0, int by0, const na_tc_group_axis* axes,
                                                      const T* q, const long long (&qs)[5], bool q_vec, const T* g,
                                                      const long long (&gs)[5], bool g_vec, int d_len, int v_len,
                                                      const float* lse, const long long (&ls)[4],
                                                      const float* delta, const long long (&es)[4],
                                                      const na_tile_axis& tx, const na_tile_axis& ty, long long dx,
                                                      long long dy, long long b, long long h,
                                                      const na_tc_dkdv_z& z = {}) {
    const int cn = qbox.keys - c0 < QC ? qbox.keys - c0 : QC;
    {  // row offsets made here, not kept across the chunk loop: HD 128 is at 255 registers
        const na_tc_box_rows q_at = RANK == 3 ?
            na_tc_box_rows_of(bx0, by0, tx.g, ty.g, dx, dy, b, h, qs[0], qs[1], qs[2], qs[3], z.bz0, z.tz.g, z.dz, z.q) :
            na_tc_box_rows_of(bx0, by0, tx.g, ty.g, dx, dy, b, h, qs[0], qs[1], qs[2], qs[3]);
        const na_tc_box_rows g_at = RANK == 3 ?
            na_tc_box_rows_of(bx0, by0, tx.g, ty.g, dx, dy, b, h, gs[0], gs[1], gs[2], gs[3], z.bz0, z.tz.g, z.dz, z.g) :
            na_tc_box_rows_of(bx0, by0, tx.g, ty.g, dx, dy, b, h, gs[0], gs[1], gs[2], gs[3]);
        na_tc_load_box_keys<T, HD, L, QC, THREADS>(sq, q, qs[4], q_vec, d_len, qbox, q_at, c0);
        na_tc_load_box_keys<T, HD, L, QC, THREADS>(sq + L::rows(QC), g, gs[4], g_vec, v_len, qbox, g_at, c0);
    }
    na_cp_async_commit();
    float* c_lse = table;
    float* c_delta = c_lse + QC;
    int* c_win = reinterpret_cast<int*>(c_delta + QC);
    int* c_win_z = c_win + 4 * QC;  // RANK 3
    bool covers = true;
    for (int i = threadIdx.x; i < QC; i += THREADS) {
        int w[4] = {0, 0, 0, 0}, wz[2] = {0, 0};
        float lg = 0.f, dl = 0.f;
        if (i < cn) {
            int qx, qy, qz;
            qbox.split(c0 + i, qx, qy, qz);
            // in 1D every y is 0 (by0 0, qy 0, ty.g 0)
            const long long x = (bx0 + qx) * dx + tx.g, y = TY == 1 ? 0 : (by0 + qy) * dy + ty.g;
            na_tc_group_window(axes[0], bx0 + qx, w[0], w[1]);
            na_tc_group_window(axes[1], by0 + qy, w[2], w[3]);
            long long at_l = b * ls[0] + x * ls[1] + y * ls[2] + h * ls[3];
            long long at_e = b * es[0] + x * es[1] + y * es[2] + h * es[3];
            if constexpr (RANK == 3) {
                const long long zz = (z.bz0 + qz) * z.dz + z.tz.g;
                na_tc_group_window(axes[2], z.bz0 + qz, wz[0], wz[1]);
                at_l += zz * z.l;
                at_e += zz * z.e;
            }
            lg = lse[at_l] * NA_TC_LOG2E;  // log2 units
            dl = delta[at_e];
        }
        for (int j = 0; j < 4; ++j) c_win[4 * i + j] = w[j];
        if (RANK == 3) c_win_z[2 * i] = wz[0], c_win_z[2 * i + 1] = wz[1];
        c_lse[i] = lg;
        c_delta[i] = dl;
        covers = covers && i < cn && w[0] <= tx.q0 && tx.q0 + tx.n <= w[1] && w[2] <= ty.q0 && ty.q0 + ty.n <= w[3] &&
                 (RANK < 3 || (wz[0] <= z.tz.q0 && z.tz.q0 + z.tz.n <= wz[1]));
    }
    return covers;
}

// chunk `chunk` of a dK/dV block's stream (box_chunks chunks per query head, key/value head hk): box chunk
// `local` of query head `head`
// (int: the HD-128 kernels are at 255 registers)
struct na_tc_group_chunk {
    int local, head;
};
__device__ __forceinline__ na_tc_group_chunk na_tc_group_chunk_of(int chunk, int box_chunks, long long hk,
                                                                  long long hpk) {
    const int g = chunk / box_chunks;
    return {chunk - g * box_chunks, (int)hk * (int)hpk + g};
}

// in[2 i + e] for key row i and the tile's query column col0 + e (col0 = 8 nt + 2t of the chunk); in 1D
// (TY == 1) every key and query has y 0, inside the window [0, 1); c_win_z: the chunk's z windows (RANK 3)
template <int TY, int RANK = 2>
__device__ __forceinline__ void na_tc_dkdv_visible(bool (&in)[4], const int* c_win, int col0,
                                                   const na_tc_key_rows& keys, const int* c_win_z = nullptr) {
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
        const int* w = c_win + 4 * (col0 + e2);  // empty windows past the box
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            in[2 * i + e2] = keys.valid[i] && keys.jx[i] >= w[0] && keys.jx[i] < w[1] &&
                             (TY == 1 || (keys.jy[i] >= w[2] && keys.jy[i] < w[3]));
            if constexpr (RANK == 3) {
                const int* wz = c_win_z + 2 * (col0 + e2);
                in[2 * i + e2] = in[2 * i + e2] && keys.jz[i] >= wz[0] && keys.jz[i] < wz[1];
            }
        }
    }
}

// p = exp2(scale2 s + bias log2e - lse) and ds = p (dp - delta) of the lane's 4 elements of one tile (columns
// col0, col0 + 1 of chunk c0), 0 where `in` is false (bz0, rpb_z, kz: the z axis, RANK 3 only)
template <int TY, int RANK = 2>
__device__ __forceinline__ void na_tc_dkdv_p_ds(float (&pr)[4], float (&ds)[4], const float (&s)[4],
                                                const float (&dp)[4], const bool (&in)[4], int c0, int col0,
                                                const na_tc_box<TY, RANK>& qbox, int bx0, int by0,
                                                const na_tc_key_rows& keys, const float* rpb, long long rpb_at,
                                                long long rpb_x, long long rpb_y, long long kx, long long ky,
                                                float scale2, const float* c_lse, const float* c_delta, int bz0 = 0,
                                                long long rpb_z = 0, long long kz = 1) {
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
        const int col = col0 + e2;
        int qx, qy, qz;
        qbox.split(c0 + col, qx, qy, qz);
        const int qgx = bx0 + qx, qgy = by0 + qy, qgz = bz0 + qz;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            float p = 0.f, d = 0.f;
            if (in[2 * i + e2]) {
                float logit = s[2 * i + e2] * scale2;  // log2 units: p is one ex2
                if (rpb) {  // in 1D the y offset is 0 (ky 1, every y 0)
                    const long long y_at = TY == 1 ? 0 : (keys.jy[i] - qgy + ky - 1) * rpb_y;
                    const long long z_at = RANK == 3 ? (keys.jz[i] - qgz + kz - 1) * rpb_z : 0;
                    logit += rpb[rpb_at + (keys.jx[i] - qgx + kx - 1) * rpb_x + y_at + z_at] * NA_TC_LOG2E;
                }
                p = na_exp2_fast(logit - c_lse[col]);
                d = p * (dp[2 * i + e2] - c_delta[col]);
            }
            pr[2 * i + e2] = p;
            ds[2 * i + e2] = d;
        }
    }
}

// na_tc_dkdv_p_ds where every element is visible and there is no bias (col0 even: one float2 each of lse
// and delta)
__device__ __forceinline__ void na_tc_dkdv_p_ds_all(float (&pr)[4], float (&ds)[4], const float (&s)[4],
                                                    const float (&dp)[4], int col0, float scale2,
                                                    const float* c_lse, const float* c_delta) {
    const float2 lg = *reinterpret_cast<const float2*>(c_lse + col0);
    const float2 dl = *reinterpret_cast<const float2*>(c_delta + col0);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        pr[2 * i] = na_exp2_fast(s[2 * i] * scale2 - lg.x);
        pr[2 * i + 1] = na_exp2_fast(s[2 * i + 1] * scale2 - lg.y);
        ds[2 * i] = pr[2 * i] * (dp[2 * i] - dl.x);
        ds[2 * i + 1] = pr[2 * i + 1] * (dp[2 * i + 1] - dl.y);
    }
}

// dk = scale acc_k, dv = acc_v (strides b, x, y, h, head dim) of the lane's valid key rows, head dims < D
// (dk) and < DV (dv)
// (tz, dz, dk_z, dv_z: the z axis and the z strides, RANK 3 only)
template <class T, int DT, int RANK = 2>
__device__ __forceinline__ void na_tc_dkdv_store(T* dk, const long long (&ks)[5], const float (&acc_k)[DT][4], T* dv,
                                                 const long long (&vs)[5], const float (&acc_v)[DT][4],
                                                 const na_tc_key_rows& keys, int t, const na_tile_axis& tx,
                                                 const na_tile_axis& ty, long long dx, long long dy, long long b,
                                                 long long h, long long D, long long DV, float scale,
                                                 const na_tile_axis& tz = NA_TC_NO_Z, long long dz = 1,
                                                 long long dk_z = 0, long long dv_z = 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        if (!keys.valid[i]) continue;
        const long long x = (long long)keys.jx[i] * dx + tx.g, y = (long long)keys.jy[i] * dy + ty.g;
        const long long z = RANK == 3 ? (long long)keys.jz[i] * dz + tz.g : 0;
        const long long k_at = RANK == 3 ? z * dk_z : 0, v_at = RANK == 3 ? z * dv_z : 0;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int e2 = 0; e2 < 2; ++e2) {
                const long long d = 8 * dt + 2 * t + e2;
                if (d < D)
                    na_store<T, float>(dk, NA_TC_AT5(ks, b, x, y, h, d) + k_at, acc_k[dt][2 * i + e2] * scale);
                if (d < DV) na_store<T, float>(dv, NA_TC_AT5(vs, b, x, y, h, d) + v_at, acc_v[dt][2 * i + e2]);
            }
    }
}

#undef NA_TC_AT5
