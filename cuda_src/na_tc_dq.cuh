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
#define NA_TC_DQ_DECODE_BLOCK(TX_, TY_, THREADS_)                                                                \
    NA_TC_DECODE_BLOCK(TX_, TY_)                                                                                \
    const long long rw_ = 2 * ky - 1, entries = (2 * kx - 1) * rw_;                                             \
    const long long tiles_ = B * ntx * nty;                                                                     \
    float* partial_out = rpb_partial ? rpb_partial + (h * tiles_ + (b * ntx + itx) * nty + ity) * entries : nullptr; \
    if (!tile_ok) {                                                                                             \
        if (partial_out)                                                                                        \
            for (long long i = tid; i < entries; i += (THREADS_)) partial_out[i] = 0.0f;                        \
        return;                                                                                                 \
    }

// Stage the tile's Q rows and then its dOut rows (pitch P, from row TX TY on) in `tiles`, zero the
// bias accumulators racc[0 .. entries) (none: entries 0), and read this warp's Q and dOut A fragments
// (16 rows from row 16 warp); ends with the barrier after which every warp holds them. THREADS threads.
template <class T, int HD, int P, int TX, int TY, int THREADS = NA_TC_THREADS>
__device__ __forceinline__ void na_tc_dq_fragments(unsigned (&qf)[HD / 16][4], unsigned (&gf)[HD / 16][4], T* tiles,
                                                   const T* q, const long long (&qs)[5], const T* g,
                                                   const long long (&gs)[5], float* racc, long long entries,
                                                   long long b, long long h, int D, long long dx, long long dy,
                                                   const na_tile_axis& tx, const na_tile_axis& ty) {
    constexpr int NQ = TX * TY;
    na_tc_load_tile<T, HD, na_rows_pitch<P>, TX, TY, THREADS>(tiles, q, qs[0], qs[1], qs[2], qs[3], qs[4], b, h, D,
                                                              dx, dy, tx, ty);
    na_tc_load_tile<T, HD, na_rows_pitch<P>, TX, TY, THREADS>(tiles + NQ * P, g, gs[0], gs[1], gs[2], gs[3], gs[4], b,
                                                              h, D, dx, dy, tx, ty);
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

// lse and delta (float32, strides b, x, y, h) of the lane's rows of the 16-row tile at tile row row0
template <int TY>
__device__ __forceinline__ void na_tc_row_stats(float (&row_lse)[2], float (&row_delta)[2], const na_tc_rows& rows,
                                                int row0, int lane, const float* __restrict__ lse,
                                                const long long (&ls)[4], const float* __restrict__ delta,
                                                const long long (&es)[4], const na_tile_axis& tx,
                                                const na_tile_axis& ty, long long dx, long long dy, long long b,
                                                long long h) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        long long x, y;
        na_tc_row_position<TY>(row0 + (lane >> 2) + 8 * i, tx, ty, dx, dy, x, y);
        row_lse[i] = rows.valid[i] ? lse[b * ls[0] + x * ls[1] + y * ls[2] + h * ls[3]] : 0.f;
        row_delta[i] = rows.valid[i] ? delta[b * es[0] + x * es[1] + y * es[2] + h * es[3]] : 0.f;
    }
}

// ds of an 8-key tile from its logits s and dOut.v products dp (elements c = 2 i + e: row i, key key0 + e)
template <int TY>
__device__ __forceinline__ void na_tc_dq_ds(float (&ds)[4], const float (&s)[4], const float (&dp)[4],
                                            const bool (&in)[4], const na_tc_rows& rows, int key0,
                                            const na_tc_box<TY>& box, const float* __restrict__ rpb,
                                            long long rpb_x, long long rpb_y, float scale,
                                            const float (&row_lse)[2], const float (&row_delta)[2]) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        const int i = c / 2;
        float d = 0.f;
        if (in[c]) {
            float logit = s[c] * scale;
            if (rpb) logit += rpb[na_tc_bias_index(rows, i, key0 + c % 2, box, rpb_x, rpb_y)];
            d = na_exp(logit - row_lse[i]) * (dp[c] - row_delta[i]);
        }
        ds[c] = d;
    }
}

// Bias partials of one chunk (box keys c0 .. c0 + cn - 1): entry (rx, ry) of racc adds the ds (in sds,
// one row of KS floats per query in tile order, column = key - c0) of every query of the tile whose
// key at that relative offset lies in the chunk; queries in tile order, as the SIMT kernel sums them.
// THREADS threads.
template <int TY, int KS, int THREADS = NA_TC_THREADS>
__device__ __forceinline__ void na_tc_dq_bias_chunk(float* racc, const float* sds, long long entries,
                                                    long long kx, long long ky, const na_tile_axis& tx,
                                                    const na_tile_axis& ty, const na_tc_box<TY>& box, int c0,
                                                    int cn) {
    const long long rw = 2 * ky - 1;
    for (long long en = threadIdx.x; en < entries; en += THREADS) {
        const long long rx = en / rw - (kx - 1), ry = en % rw - (ky - 1);
        float sum = 0.0f;
        for (int qxi = 0; qxi < (int)tx.n; ++qxi) {
            const long long bx = tx.q0 + qxi + rx - tx.h0;
            if (bx < 0 || bx >= tx.h1 - tx.h0) continue;
            for (int qyi = 0; qyi < (int)ty.n; ++qyi) {
                const long long by = ty.q0 + qyi + ry - ty.h0;
                if (by < 0 || by >= box.hy) continue;
                const long long kk = bx * box.hy + by - c0;
                if (kk >= 0 && kk < cn) sum += sds[(qxi * TY + qyi) * KS + kk];
            }
        }
        racc[en] += sum;
    }
}

// dq = scale * acc (DT 8-dim tiles) of the lane's valid rows of the 16-row tile at tile row row0;
// dq strides b, x, y, h, head dim
template <class T, int DT, int TY>
__device__ __forceinline__ void na_tc_dq_store(T* __restrict__ dq, const long long (&os)[5], const float (&acc)[DT][4],
                                               const na_tc_rows& rows, int row0, int lane, const na_tile_axis& tx,
                                               const na_tile_axis& ty, long long dx, long long dy, long long b,
                                               long long h, long long D, float scale) {
    const int t = lane & 3;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        if (!rows.valid[i]) continue;
        long long x, y;
        na_tc_row_position<TY>(row0 + (lane >> 2) + 8 * i, tx, ty, dx, dy, x, y);
        const long long at = b * os[0] + x * os[1] + y * os[2] + h * os[3];
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
template <class T, int DT, int TY, int THREADS = NA_TC_THREADS>
__device__ __forceinline__ void na_tc_dq_finish(T* __restrict__ dq, const long long (&os)[5],
                                                const float (&acc)[DT][4], const na_tc_rows& rows, int row0,
                                                int lane, const na_tile_axis& tx, const na_tile_axis& ty,
                                                long long dx, long long dy, long long b, long long h, long long D,
                                                float scale, float* partial_out, const float* racc,
                                                long long entries) {
    na_tc_dq_store<T, DT, TY>(dq, os, acc, rows, row0, lane, tx, ty, dx, dy, b, h, D, scale);
    if (partial_out) {
        __syncthreads();
        for (long long i = threadIdx.x; i < entries; i += THREADS) partial_out[i] = racc[i];
    }
}
