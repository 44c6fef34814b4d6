// Gradients of the extra key/value tokens of a fused backward (NA_EXTRA: tokens every query attends besides
// its neighborhood, in one softmax, with no window and no bias):
//
//   p      = exp(scale q_i . xk_t - lse_i),   ds = p (dOut_i . xv_t - delta_i)
//   dxk_t  = scale sum_i ds q_i,              dxv_t = sum_i p dOut_i
//
// over every query i of every query head of the token's key/value head (grouped-query attention: HPK heads).
// lse is the forward's over the neighborhood and the tokens, delta = rowsum(dOut * out) - dlse
// (na_fused_delta), so p is the one softmax's probability and ds its logit gradient. The tokens' part of dq is
// the dq kernels' (they stream the tokens after each tile's neighborhood).
//
// na_tokens_bwd_dkdv<T, HD, TT, QC[, 3]>: one block of NA_FB_THREADS per (batch, key/value head, tile of TT tokens).
// The tile's token rows are staged once; the queries (heads of the group in order, then positions row-major:
// x, then y, then z) stream QC at a time with their lse and delta. Pass 1: p and ds per (token, query) pair into
// shared memory; pass 2: NA_FB_THREADS / TT threads own a token, each holding dims of dk and dv in registers,
// summing the chunk's queries in order. Every sum has a fixed order and there are no atomics: deterministic.
// A query's position comes from its flat index over X, Y and, in 3D (RANK 3, the 3D twin's instantiations), Z;
// below rank 3 the z axis is the trivial one (length 1) and its division folds away.
// Dynamic shared memory (na_rtc/runtime/families/tokens_bwd.py mirrors it; RS = na_fb_row<T>(max(D, DV))):
// token K and V rows TT x RS of T, query and dOut rows QC x RS of T, p and ds TT x (QC + 1) floats each,
// QC floats of lse and QC of delta.
#include "na_types.cuh"
#include "na_window.cuh"  // na_min, na_max
#include "na_shared.cuh"
#include "na_args.cuh"
#include "na_fb_common.cuh"

// one block an SM at least: without a minimum ptxas held the kernel to 48 or 64 registers and spilled 4 to 20
// bytes (it needs about 70)
template <class T, int HD, int TT, int QC, int RANK = 2>
__global__ void __launch_bounds__(NA_FB_THREADS, 1) na_tokens_bwd_dkdv(
    const T* __restrict__ q, NA_TENSOR(q), const T* __restrict__ g, NA_TENSOR(g), const float* __restrict__ lse,
    NA_ROWS(l), const float* __restrict__ delta, NA_ROWS(e), NA_EXTRA(T), T* __restrict__ dxk, long long dxk_b,
    long long dxk_n, long long dxk_h, long long dxk_l, T* __restrict__ dxv, long long dxv_b, long long dxv_n,
    long long dxv_h, long long dxv_l, double scale, NA_PROBLEM) {
    constexpr int LANES = NA_FB_THREADS / TT;  // threads per token in pass 2
    constexpr int DPT = HD / LANES;            // dims of dk and of dv per thread
    constexpr int PS = QC + 1;                 // p / ds row stride (floats)
    static_assert(NA_FB_THREADS % TT == 0 && HD % LANES == 0 && DPT >= 1, "the token tile does not map onto the block");

    // 32-bit divisions throughout (a 64-bit one is a subroutine whose calls spill registers): block, token and
    // query counts are far below 2^31
    const unsigned tiles = (unsigned)((NX + TT - 1) / TT), kv_heads = (unsigned)NA_KV_HEADS;
    const unsigned block = blockIdx.x, tile = block % tiles, kvh = block / tiles % kv_heads;
    const long long b = block / tiles / kv_heads;
    const long long t0 = (long long)tile * TT, nt = na_min(TT, NX - t0);
    const unsigned ZR = RANK == 3 ? (unsigned)Z : 1u;  // the z length (constant 1 below rank 3)
    const unsigned YZ = (unsigned)Y * ZR;
    const long long queries = X * Y * ZR;                // per head
    const long long RS = na_fb_row<T>(na_max(D, DV));

    unsigned char* smem = na_dynamic_shared();
    T* ks = (T*)smem;
    T* vs = (T*)(smem + na_fb_align16(TT * RS * (long long)sizeof(T)));
    T* qs = (T*)(smem + 2 * na_fb_align16(TT * RS * (long long)sizeof(T)));
    T* gs = (T*)((unsigned char*)qs + na_fb_align16(QC * RS * (long long)sizeof(T)));
    float* ps = (float*)((unsigned char*)gs + na_fb_align16(QC * RS * (long long)sizeof(T)));
    float* dss = ps + TT * PS;
    float* s_lse = dss + TT * PS;
    float* s_delta = s_lse + QC;

    NA_EXTRA_VECTORIZABLE(xk_vec, xv_vec)
    NA_STAGE_EXTRA_ROWS(ks, vs, RS, t0, nt, b, kvh, xk_vec, xv_vec)
    const bool q_vec = na_rows_vectorizable(q, D, q_l, q_b, q_x, q_y, q_h) && na_rows_vectorizable(q, D, q_l, q_z, 0, 0, 0);
    const bool g_vec = na_rows_vectorizable(g, DV, g_l, g_b, g_x, g_y, g_h) && na_rows_vectorizable(g, DV, g_l, g_z, 0, 0, 0);

    const int tid = threadIdx.x, my_t = tid / LANES, lane = tid % LANES;
    float ak[DPT], av[DPT];
#pragma unroll
    for (int c = 0; c < DPT; ++c) ak[c] = av[c] = 0.0f;
    const float fscale = (float)scale;

    for (long long hh = 0; hh < HPK; ++hh) {
        const long long h = (long long)kvh * HPK + hh;
        for (long long c0 = 0; c0 < queries; c0 += QC) {
            const long long nc = na_min(QC, queries - c0);
            __syncthreads();  // the previous chunk is consumed (and, first, the token rows are staged)
            // chunk row r: query c0 + r at (x, y, z), z fastest
            na_copy_rows(qs, RS, q, nc, D, q_l, q_vec, [&](long long r) {
                const unsigned i = (unsigned)(c0 + r), x = i / YZ, y = i % YZ / ZR, z = i % ZR;
                return na_row_ref{b * q_b + x * q_x + y * q_y + z * q_z + h * q_h, r};
            });
            na_copy_rows(gs, RS, g, nc, DV, g_l, g_vec, [&](long long r) {
                const unsigned i = (unsigned)(c0 + r), x = i / YZ, y = i % YZ / ZR, z = i % ZR;
                return na_row_ref{b * g_b + x * g_x + y * g_y + z * g_z + h * g_h, r};
            });
            for (long long r = tid; r < nc; r += NA_FB_THREADS) {
                const unsigned i = (unsigned)(c0 + r), x = i / YZ, y = i % YZ / ZR, z = i % ZR;
                s_lse[r] = lse[NA_ATR(l, b, x, y, z, h)];
                s_delta[r] = delta[NA_ATR(e, b, x, y, z, h)];
            }
            __syncthreads();
            // pass 1: p and ds per (token, query) pair
            for (int p = tid; p < TT * QC; p += NA_FB_THREADS) {
                const int tt = p / QC, j = p % QC;
                float pr = 0.0f, s = 0.0f;
                if (tt < nt && j < nc) {
                    float dot = 0.0f, dp = 0.0f;
                    na_fb_dots(dot, dp, qs + j * RS, ks + tt * RS, gs + j * RS, vs + tt * RS, D, DV);
                    pr = na_exp(dot * fscale - s_lse[j]);
                    s = pr * (dp - s_delta[j]);
                }
                ps[tt * PS + j] = pr;
                dss[tt * PS + j] = s;
            }
            __syncthreads();
            // pass 2: dk and dv of my token, my dims, the chunk's queries in order
            for (int j = 0; j < nc; ++j) {
                const float wp = ps[my_t * PS + j], ws = dss[my_t * PS + j];
                const T* qr = qs + j * RS;
                const T* gr = gs + j * RS;
#pragma unroll
                for (int c = 0; c < DPT; ++c) {
                    const int d = lane + c * LANES;
                    if (d < DV) av[c] += wp * (float)na_load(gr, d);
                    if (d < D) ak[c] += ws * (float)na_load(qr, d);
                }
            }
        }
    }
    if (my_t >= nt) return;
#pragma unroll
    for (int c = 0; c < DPT; ++c) {
        const int d = lane + c * LANES;
        if (d < D) na_store<T, float>(dxk, NA_AT_EXTRA(dxk, b, t0 + my_t, kvh, d), ak[c] * fscale);
        if (d < DV) na_store<T, float>(dxv, NA_AT_EXTRA(dxv, b, t0 + my_t, kvh, d), av[c]);
    }
}
