// Fused neighborhood attention forward on tensor cores (fp16 / bf16, sm_80+).
//
// Same arguments, layouts and results as na_fused_fwd (na_fused.cu): out in
// the input dtype, lse in float32. One block of 4 warps per (batch, head,
// query tile of TX x TY = 64 group coordinates inside ONE dilation group per
// axis); warp w owns the tile's queries 16w .. 16w + 15 (tile order, y
// fastest), the 16 rows of its mma tiles. The key box (union of the tile's
// windows, DESIGN.md section 2) is walked in row-major order in chunks of KC
// keys staged in shared memory; per chunk and warp:
//   S = Q K^T    mma.m16n8k16: Q fragments (ldmatrix.x4, kept in registers
//                for the whole block) x K rows (ldmatrix.x2 on [key][d] rows);
//                8-key column tiles that none of the warp's 16 queries sees
//                are skipped (warp-uniform);
//   mask         logits outside each query's own window are -inf (exact
//                causal / strided / dilated windows), then scale and bias;
//   softmax      online per row in fp32 (the 4 lanes of a quad share a row:
//                max and sum reduced with __shfl_xor_sync), never exp(-inf - -inf);
//   O += P V     P rounded to T and repacked from the accumulator layout
//                into A fragments, V with ldmatrix.x2.trans on [key][d] rows.
// Rows of K/V past the chunk's end and head dims past D are zero in shared
// memory, so padding contributes exact zeros. A NaN or Inf in a key poisons
// exactly the queries whose windows hold it; a NaN or Inf in a value can also
// reach the other queries of the same warp whose 16-key step holds it (as
// 0 * NaN in P V): fused kernels may poison queries of the same tile
// (DESIGN.md section 8).
//
// Template parameters: element type T (fp16_t, bf16_t), head-dim bucket HD
// (16 | HD; runtime D <= HD), query tile TX x TY (TX * TY = 64; 1D: TY = 1),
// keys per chunk KC (16 | KC). Dynamic shared memory (na_rtc/runtime/fused_tc.py
// mirrors it): (64 + 2 KC) rows of HD + 8 elements.
#include "na_types.cuh"
#include "na_window.cuh"
#include "na_shared.cuh"
#include "na_tile.cuh"
#include "na_mma.cuh"
#include "na_tc_common.cuh"

#define NA_PROBLEM                                                                         \
    long long B, long long H, long long D, long long X, long long kx, long long sx, long long dx, \
        long long cx, long long Y, long long ky, long long sy, long long dy, long long cy
#define NA_STRIDES5(t) long long t##_b, long long t##_x, long long t##_y, long long t##_h, long long t##_l
#define NA_AT5(t, b, x, y, h, l) ((b) * t##_b + (x) * t##_x + (y) * t##_y + (h) * t##_h + (l) * t##_l)

template <class T, int HD, int TX, int TY, int KC>
__global__ void __launch_bounds__(NA_TC_THREADS, 1) na_fused_tc_fwd(
    const T* __restrict__ q, NA_STRIDES5(q), const T* __restrict__ k, NA_STRIDES5(k), const T* __restrict__ v,
    NA_STRIDES5(v), const float* __restrict__ rpb, long long rpb_h, long long rpb_x, long long rpb_y,
    T* __restrict__ out, NA_STRIDES5(o), float* __restrict__ lse, long long l_b, long long l_x, long long l_y,
    long long l_h, double scale, NA_PROBLEM) {
    constexpr int NQ = TX * TY;
    constexpr int P = HD + 8;         // row pitch: 16-byte rows, shifted 4 banks per row for ldmatrix
    constexpr int KSTEPS = HD / 16;   // k-steps of Q K^T over head dims
    constexpr int NT = KC / 8;        // 8-key column tiles per chunk
    constexpr int DT = HD / 8;        // 8-dim column tiles of the output
    static_assert(NQ == 16 * NA_TC_WARPS, "one 16-row mma tile per warp");
    static_assert(HD % 16 == 0 && KC % 16 == 0, "mma shapes");
    const float NEG_INF = __int_as_float(0xff800000);

    NA_TC_DECODE_BLOCK(TX, TY)
    if (!tile_ok) return;  // uniform over the block
    const int hy = (int)(ty.h1 - ty.h0);
    const int keys = (int)(tx.h1 - tx.h0) * hy;

    T* sq = reinterpret_cast<T*>(na_dynamic_shared());
    T* sk = sq + NQ * P;
    T* sv = sk + KC * P;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;

    // the tile's queries: valid ones at row qx * TY + qy, zeros elsewhere
    na_tc_stage_tile<T, HD, P, TX, TY>(sq, q, q_b, q_x, q_y, q_h, q_l, b, h, D, dx, dy, tx, ty);
    const bool k_vec = na_rows_vectorizable(k, D, k_l, k_b, k_x, k_y, k_h);
    const bool v_vec = na_rows_vectorizable(v, D, v_l, v_b, v_x, v_y, v_h);
    __syncthreads();

    unsigned qf[KSTEPS][4];
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) na_ldmatrix<4, false>(qf[ks], sq + (16 * warp + (lane & 15)) * P + 16 * ks + 8 * (lane >> 4));

    // this lane's two query rows (g and g + 8 of the warp's tile): windows in box coordinates
    const na_tc_rows rows = na_tc_query_rows<TY>(warp, lane, ax, ay, tx, ty, h, rpb_h, rpb_x, rpb_y);
    const na_tc_warp_window common = na_tc_common_window(rows);

    float o[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
    const float fscale = (float)scale;

    for (int c0 = 0; c0 < keys; c0 += KC) {
        const int cn = keys - c0 < KC ? keys - c0 : KC;
        __syncthreads();  // the previous chunk is consumed
        na_tc_stage_kv<T, HD, P, KC>(sk, sv, k, v, {k_b, k_x, k_y, k_h, k_l}, {v_b, v_x, v_y, v_h, v_l}, k_vec, v_vec,
                                     c0, cn, hy, tx, ty, dx, dy, b, h, D);
        __syncthreads();

        // S = Q K^T for the chunk's 8-key tiles this warp's queries see; masked logits -inf
        float s[NT][4];
        bool tile_live[NT];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const int key0 = c0 + 8 * nt + 2 * t;  // the lane's two columns: keys key0, key0 + 1
            bool in[4];
            na_tc_visible_tile(rows, common, c0 + 8 * nt, key0, keys, hy, in);
            tile_live[nt] = __any_sync(NA_TC_FULL, in[0] | in[1] | in[2] | in[3]);
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
            if (tile_live[nt]) {  // warp-uniform: ldmatrix and mma need every lane
#pragma unroll
                for (int ks = 0; ks < KSTEPS; ++ks) {
                    unsigned kf[2];
                    na_ldmatrix<2, false>(kf, sk + (8 * nt + (lane & 7)) * P + 16 * ks + 8 * ((lane >> 3) & 1));
                    na_mma<T>::run(s[nt], qf[ks], kf, s[nt]);
                }
            }
#pragma unroll
            for (int c = 0; c < 4; ++c)
                s[nt][c] = in[c] ? na_tc_logit(rows, c / 2, key0 + c % 2, hy, s[nt][c], fscale, rpb, rpb_x, rpb_y)
                                 : NEG_INF;
        }

        // online softmax, row i of this lane = rows g and g + 8; a quad (4 lanes) shares a row
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            float cmax = NEG_INF;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) cmax = s[nt][2 * i + e] > cmax ? s[nt][2 * i + e] : cmax;
            for (int off = 1; off < 4; off *= 2) {
                const float other = __shfl_xor_sync(NA_TC_FULL, cmax, off);
                cmax = other > cmax ? other : cmax;
            }
            const float mnew = cmax > m[i] ? cmax : m[i];
            float alpha = 1.f;
            if (mnew != NEG_INF) {
                alpha = na_exp(m[i] - mnew);  // m = -inf: 0
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const float x = s[nt][2 * i + e];
                        const float p = x == NEG_INF ? 0.f : na_exp(x - mnew);  // a NaN logit stays NaN
                        s[nt][2 * i + e] = p;
                    }
            } else {
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) s[nt][2 * i] = s[nt][2 * i + 1] = 0.f;
            }
            float rowsum = 0.f;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) rowsum += s[nt][2 * i] + s[nt][2 * i + 1];
            l[i] = l[i] * alpha + rowsum;
            m[i] = mnew;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                o[dt][2 * i] *= alpha;
                o[dt][2 * i + 1] *= alpha;
            }
        }

        // O += P V over 16-key steps (pairs of 8-key tiles); steps no query of the warp sees add nothing
#pragma unroll
        for (int ps = 0; ps < KC / 16; ++ps) {
            if (!tile_live[2 * ps] && !tile_live[2 * ps + 1]) continue;  // warp-uniform
            const unsigned pa[4] = {na_pack2<T>(s[2 * ps][0], s[2 * ps][1]), na_pack2<T>(s[2 * ps][2], s[2 * ps][3]),
                                    na_pack2<T>(s[2 * ps + 1][0], s[2 * ps + 1][1]),
                                    na_pack2<T>(s[2 * ps + 1][2], s[2 * ps + 1][3])};
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                unsigned vf[2];
                na_ldmatrix<2, true>(vf, sv + (16 * ps + (lane & 15)) * P + 8 * dt);
                na_mma<T>::run(o[dt], pa, vf, o[dt]);
            }
        }
    }

    // the row sums are spread over the quad
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        l[i] += __shfl_xor_sync(NA_TC_FULL, l[i], 1);
        l[i] += __shfl_xor_sync(NA_TC_FULL, l[i], 2);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        if (!rows.valid[i]) continue;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const long long d = 8 * dt + 2 * t + e;
                if (d < D) na_store<T, float>(out, NA_AT5(o, b, rows.x[i], rows.y[i], h, d), o[dt][2 * i + e] / l[i]);
            }
        if (t == 0) lse[b * l_b + rows.x[i] * l_x + rows.y[i] * l_y + h * l_h] = m[i] + na_log(l[i]);
    }
}
