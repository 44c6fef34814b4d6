// Pieces of the dq kernels on tensor cores (the mma.sync one in
// na_fused_tc_bwd.cu, the wgmma one in na_fused_wg_bwd.cu), which share the
// per-warp layout of the forwards (na_tc_softmax.cuh): a lane holds rows g
// and g + 8 of its warp's 16 queries, in 8-column tiles of 4 floats.
//
//   NA_TC_DQ_DECODE_BLOCK the block decode, the bias entries and this tile's partials
//   na_tc_dq_fragments    the Q and dOut tiles staged, a warp's A fragments read
//   na_tc_row_stats       lse and delta of the lane's two rows
//   na_tc_dq_ds           ds = p (dp - delta) of one 8-key tile, p recomputed
//                         from the logit and the lse (0 outside the window)
//   na_tc_dq_bias_chunk   the bias-gradient partials of one chunk's ds
//   na_tc_dq_store        dq = scale * acc of the lane's valid rows
//   na_tc_dq_finish       the store, then the tile's bias partials out of shared memory
#pragma once

#include "na_mma.cuh"
#include "na_tc_common.cuh"

// NA_TC_DECODE_BLOCK (na_tc_common.cuh) for a dq kernel: also `entries` (bias entries per head) and
// `partial_out`, this tile's row of the bias partials [h, tiles, entries] (null without a bias); an
// empty tile of a shorter dilation group zeroes its partials and returns (uniform over the block).
// Needs `tid` (threadIdx.x) declared before it; THREADS_ threads a block.
#define NA_TC_DQ_DECODE_BLOCK(TX_, TY_, THREADS_) NA_TC_DQ_DECODE_BLOCK_RANK(TX_, TY_, 1, 2, THREADS_)

// The same for a kernel of rank RANK_ (NA_TC_DECODE_BLOCK_RANK): entries (rx, ry, rz), tiles in the order
// of the block index (z fastest); below rank 3 the z factors are the constant 1 and tile index 0.
#define NA_TC_DQ_DECODE_BLOCK_RANK(TX_, TY_, TZ_, RANK_, THREADS_)                                              \
    NA_TC_DECODE_BLOCK_RANK(TX_, TY_, TZ_, RANK_)                                                               \
    const long long rw_ = 2 * ky - 1, entries = (2 * kx - 1) * rw_ * (2 * az.kernel - 1);                       \
    const long long tiles_ = B * ntx * nty * ntz;                                                               \
    float* partial_out =                                                                                        \
        rpb_partial ? rpb_partial + (h * tiles_ + ((b * ntx + itx) * nty + ity) * ntz + itz) * entries : nullptr; \
    if (!tile_ok) {                                                                                             \
        if (partial_out)                                                                                        \
            for (long long i = tid; i < entries; i += (THREADS_)) partial_out[i] = 0.0f;                        \
        return;                                                                                                 \
    }

// Stage the tile's Q rows and then its dOut rows (pitch P, from row TX TY TZ on) in `tiles`, zero the
// bias accumulators racc[0 .. entries) (none: entries 0), and read this warp's Q and dOut A fragments
// (16 rows from row 16 warp); ends with the barrier after which every warp holds them. THREADS threads.
// tz, dz, q_z, g_z: the z axis of a 3D tile and the z strides (lower ranks keep the defaults).
template <class T, int HD, int P, int TX, int TY, int THREADS = NA_TC_THREADS, int TZ = 1>
__device__ __forceinline__ void na_tc_dq_fragments(unsigned (&qf)[HD / 16][4], unsigned (&gf)[HD / 16][4], T* tiles,
                                                   const T* q, const long long (&qs)[5], const T* g,
                                                   const long long (&gs)[5], float* racc, long long entries,
                                                   long long b, long long h, int D, int DV, long long dx,
                                                   long long dy,
                                                   const na_tile_axis& tx, const na_tile_axis& ty,
                                                   const na_tile_axis& tz = NA_TC_NO_Z, long long dz = 1,
                                                   long long q_z = 0, long long g_z = 0) {
    constexpr int NQ = TX * TY * TZ;
    na_tc_load_tile<T, HD, na_rows_pitch<P>, TX, TY, THREADS, TZ>(tiles, q, qs[0], qs[1], qs[2], qs[3], qs[4], b, h,
                                                                  D, dx, dy, tx, ty, tz, dz, q_z);
    na_tc_load_tile<T, HD, na_rows_pitch<P>, TX, TY, THREADS, TZ>(tiles + NQ * P, g, gs[0], gs[1], gs[2], gs[3], gs[4],
                                                                  b, h, DV, dx, dy, tx, ty, tz, dz, g_z);
    na_cp_async_commit();
    for (long long i = threadIdx.x; i < entries; i += THREADS) racc[i] = 0.0f;
    na_cp_async_wait_group<0>();
    __syncthreads();
    const int warp = (int)threadIdx.x >> 5, lane = (int)threadIdx.x & 31;
#pragma unroll
    for (int ks = 0; ks < HD / 16; ++ks) {
        const int r = 16 * warp + (lane & 15), c = 16 * ks + 8 * (lane >> 4);
        na_ldmatrix<4, false>(qf[ks], tiles + r * P + c);
        na_ldmatrix<4, false>(gf[ks], tiles + (NQ + r) * P + c);
    }
}

// lse and delta (float32, strides b, x, y, h) of the lane's rows of the 16-row tile at tile row row0 (tz, dz,
// l_z, e_z: the z axis of a 3D tile and the tables' z strides; lower ranks keep the defaults)
template <int TY, int TZ = 1, int RANK = 2>
__device__ __forceinline__ void na_tc_row_stats(float (&row_lse)[2], float (&row_delta)[2], const na_tc_rows& rows,
                                                int row0, int lane, const float* __restrict__ lse,
                                                const long long (&ls)[4], const float* __restrict__ delta,
                                                const long long (&es)[4], const na_tile_axis& tx,
                                                const na_tile_axis& ty, long long dx, long long dy, long long b,
                                                long long h, const na_tile_axis& tz = NA_TC_NO_Z, long long dz = 1,
                                                long long l_z = 0, long long e_z = 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        long long x, y, z;
        na_tc_row_position<TY, TZ>(row0 + (lane >> 2) + 8 * i, tx, ty, tz, dx, dy, dz, x, y, z);
        const long long at_l = b * ls[0] + x * ls[1] + y * ls[2] + h * ls[3] + (RANK == 3 ? z * l_z : 0);
        const long long at_e = b * es[0] + x * es[1] + y * es[2] + h * es[3] + (RANK == 3 ? z * e_z : 0);
        row_lse[i] = rows.valid[i] ? lse[at_l] : 0.f;
        row_delta[i] = rows.valid[i] ? delta[at_e] : 0.f;
    }
}

// ds of an 8-key tile from its logits s and dOut.v products dp (elements c = 2 i + e: row i, key key0 + e)
// (rpb_z: the bias's z stride, RANK 3 only)
template <int TY, int RANK = 2>
__device__ __forceinline__ void na_tc_dq_ds(float (&ds)[4], const float (&s)[4], const float (&dp)[4],
                                            const bool (&in)[4], const na_tc_rows& rows, int key0,
                                            const na_tc_box<TY, RANK>& box, const float* __restrict__ rpb,
                                            long long rpb_x, long long rpb_y, float scale,
                                            const float (&row_lse)[2], const float (&row_delta)[2],
                                            long long rpb_z = 0) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        const int i = c / 2;
        float d = 0.f;
        if (in[c]) {
            float logit = s[c] * scale;
            if (rpb) logit += rpb[na_tc_bias_index(rows, i, key0 + c % 2, box, rpb_x, rpb_y, rpb_z)];
            d = na_exp(logit - row_lse[i]) * (dp[c] - row_delta[i]);
        }
        ds[c] = d;
    }
}

// Bias partials of one chunk (box keys c0 .. c0 + cn - 1): entry (rx, ry) of racc adds the ds (in sds,
// one row of KS floats per query in tile order, column = key - c0) of every query of the tile whose
// key at that relative offset lies in the chunk; queries in tile order, as the SIMT kernel sums them.
// THREADS threads. In 3D (RANK 3) entries are (rx, ry, rz), rz fastest, kz and tz the z axis's kernel and
// the tile's z axis; lower ranks keep their defaults.
template <int TY, int KS, int THREADS = NA_TC_THREADS, int RANK = 2, int TZ = 1>
__device__ __forceinline__ void na_tc_dq_bias_chunk(float* racc, const float* sds, long long entries,
                                                    long long kx, long long ky, const na_tile_axis& tx,
                                                    const na_tile_axis& ty, const na_tc_box<TY, RANK>& box, int c0,
                                                    int cn, long long kz = 1, const na_tile_axis& tz = NA_TC_NO_Z) {
    const long long rw = 2 * ky - 1, rd = RANK == 3 ? 2 * kz - 1 : 1;
    for (long long en = threadIdx.x; en < entries; en += THREADS) {
        const long long exy = en / rd, rx = exy / rw - (kx - 1), ry = exy % rw - (ky - 1);
        const long long rz = RANK == 3 ? en % rd - (kz - 1) : 0;
        float sum = 0.0f;
        for (int qxi = 0; qxi < (int)tx.n; ++qxi) {
            const long long bx = tx.q0 + qxi + rx - tx.h0;
            if (bx < 0 || bx >= tx.h1 - tx.h0) continue;
            for (int qyi = 0; qyi < (int)ty.n; ++qyi) {
                const long long by = ty.q0 + qyi + ry - ty.h0;
                if (by < 0 || by >= box.hy) continue;
                for (int qzi = 0; qzi < (RANK == 3 ? (int)tz.n : 1); ++qzi) {
                    const long long bz = RANK == 3 ? tz.q0 + qzi + rz - tz.h0 : 0;
                    if (RANK == 3 && (bz < 0 || bz >= box.hz)) continue;
                    const long long kk = (bx * box.hy + by) * box.hz + bz - c0;
                    if (kk >= 0 && kk < cn) sum += sds[((qxi * TY + qyi) * TZ + qzi) * KS + kk];
                }
            }
        }
        racc[en] += sum;
    }
}

// dq = scale * acc (DT 8-dim tiles) of the lane's valid rows of the 16-row tile at tile row row0;
// dq strides b, x, y, h, head dim (tz, dz, o_z: the z axis of a 3D tile and dq's z stride)
template <class T, int DT, int TY, int TZ = 1, int RANK = 2>
__device__ __forceinline__ void na_tc_dq_store(T* __restrict__ dq, const long long (&os)[5], const float (&acc)[DT][4],
                                               const na_tc_rows& rows, int row0, int lane, const na_tile_axis& tx,
                                               const na_tile_axis& ty, long long dx, long long dy, long long b,
                                               long long h, long long D, float scale,
                                               const na_tile_axis& tz = NA_TC_NO_Z, long long dz = 1,
                                               long long o_z = 0) {
    const int t = lane & 3;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        if (!rows.valid[i]) continue;
        long long x, y, z;
        na_tc_row_position<TY, TZ>(row0 + (lane >> 2) + 8 * i, tx, ty, tz, dx, dy, dz, x, y, z);
        const long long at = b * os[0] + x * os[1] + y * os[2] + h * os[3] + (RANK == 3 ? z * o_z : 0);
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const long long d = 8 * dt + 2 * t + e;
                if (d < D) na_store<T, float>(dq, at + d * os[4], acc[dt][2 * i + e] * scale);
            }
    }
}

// The end of a dq kernel: dq of the lane's rows (na_tc_dq_store), then, with a bias, the block's accumulated
// partials racc[0 .. entries) into partial_out (THREADS threads; a barrier first: every warp's last chunk)
template <class T, int DT, int TY, int THREADS = NA_TC_THREADS, int TZ = 1, int RANK = 2>
__device__ __forceinline__ void na_tc_dq_finish(T* __restrict__ dq, const long long (&os)[5],
                                                const float (&acc)[DT][4], const na_tc_rows& rows, int row0,
                                                int lane, const na_tile_axis& tx, const na_tile_axis& ty,
                                                long long dx, long long dy, long long b, long long h, long long D,
                                                float scale, float* partial_out, const float* racc,
                                                long long entries, const na_tile_axis& tz = NA_TC_NO_Z,
                                                long long dz = 1, long long o_z = 0) {
    na_tc_dq_store<T, DT, TY, TZ, RANK>(dq, os, acc, rows, row0, lane, tx, ty, dx, dy, b, h, D, scale, tz, dz, o_z);
    if (partial_out) {
        __syncthreads();
        for (long long i = threadIdx.x; i < entries; i += THREADS) partial_out[i] = racc[i];
    }
}
