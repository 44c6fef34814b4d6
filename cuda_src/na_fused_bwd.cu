// Fused (flash-style) backward of neighborhood attention, 1D and 2D.
//
// The forward leaves out and lse (natural-log sum of exp(logit) over the
// neighborhood, float32, [b, x, y, h]); the backward never materializes the
// [tokens, kx * ky] attention matrix: probabilities are recomputed per
// (query, key) pair as p = exp(logit - lse), with
//   logit = scale * q . k + rpb[h, j'x - i'x + kx - 1, j'y - i'y + ky - 1]
//   delta = rowsum(dOut * out)                         (na_fused_delta)
//   ds    = p * (dOut . v - delta)
//   dq    = scale * sum_keys ds * k                    (na_fused_bwd_dq, per query tile)
//   dk    = scale * sum_queries ds * q                 (na_fused_bwd_dkdv, per key tile)
//   dv    = sum_queries p * dOut
//   drpb  = sum ds per relative offset                 (partials in na_fused_bwd_dq,
//                                                       na_fused_rpb_reduce)
// Layouts and the problem argument list are na_naive.cu's (int64 element
// strides, 1D runs as 2D with Y = 1, ky = 1). Tiles live inside one dilation
// group per axis (group coordinates), so a tile's queries (or keys) are dense.
// Deterministic: every sum has a fixed order, no atomics.
// Pairs outside a query's window add nothing to any gradient (skipped, not
// multiplied by zero), so a NaN or Inf reaches exactly the gradients that
// depend on it (tests/test_nonfinite.py).
//
// na_fused_bwd_dq<T, HD, TX, TY, KC>: one block per (b, h, query tile of TX x
// TY queries). The union of the tile's windows is one box (window bounds never
// decrease with the query, DESIGN.md section 2, and the 2D union of products
// is the product of the per-axis unions), streamed KC keys at a time (the box
// linearized x-major) through shared memory. Pass 1: thread p computes
// ds for pairs (query p / KC, key p % KC), p += 256 (zero outside the query's
// window), into shared memory. Pass 2: 256 / (TX TY) threads own a query,
// lane l holding dims l, l + lanes, ... of dq in registers, summing the chunk's
// keys in order. With a bias: thread t owns bias entries t, t + 256, ... and
// adds, per chunk, the ds of every query of the tile whose key at that
// relative offset lies in the chunk (queries in order), into shared memory;
// at the end the block writes partial[h, (b, tile_x, tile_y), entry].
// Dynamic shared memory (the host computes the same numbers, each part
// padded to 16 bytes; staged rows have RS = na_fb_row<T>(D) elements, an odd
// number of words, against bank conflicts): Q and dOut rows TX TY x RS of T,
// K and V rows KC x RS of T, ds TX TY x (KC + 1) floats, then (bias only) one
// float per bias entry.
//
// na_fused_bwd_dkdv<T, HD, TX, TY, QC>: one block per (b, h, key tile of
// TX x TY keys). The queries whose windows hold a key of the tile form one box
// (na_inverse_range of the tile's first and last key per axis), streamed QC
// queries at a time (x-major) with their lse, delta and windows. Pass 1:
// p and ds per pair (key p / QC, query p % QC) into shared memory. Pass 2:
// 256 / (TX TY) threads own a key, lanes hold dims of dk and dv in registers.
// Dynamic shared memory: K and V rows TX TY x RS of T, Q and dOut rows QC x RS
// of T, p and ds TX TY x (QC + 1) floats each, QC floats of lse, QC of delta,
// 4 QC ints of window bounds.
#include "na_types.cuh"
#include "na_window.cuh"
#include "na_shared.cuh"
#include "na_rpb_reduce.cuh"
#include "na_args.cuh"

#define NA_FB_THREADS 256

__device__ __forceinline__ long long na_fb_align16(long long n) { return (n + 15) / 16 * 16; }

// row stride (elements) of a staged [rows][D] array: an odd number of 4-byte
// words, so threads reading one dim of consecutive rows hit distinct banks
template <class T> __device__ __forceinline__ long long na_fb_row(long long D) {
    if (sizeof(T) >= 4) return D | 1;
    return (((D * (long long)sizeof(T) + 3) / 4) | 1) * 4 / (long long)sizeof(T);
}

// delta[b, i, h] = sum_d dout * out (float32), one thread per row
template <class T>
__global__ void __launch_bounds__(NA_FB_THREADS)
    na_fused_delta(const T* __restrict__ g, NA_TENSOR(g), const T* __restrict__ o, NA_TENSOR(o),
                   float* __restrict__ delta, NA_ROWS(e), NA_PROBLEM) {
    long long n = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= B * X * Y * H) return;
    const long long h = n % H; n /= H;
    const long long y = n % Y; n /= Y;
    const long long x = n % X;
    const long long b = n / X;
    float sum = 0.0f;
    for (long long d = 0; d < D; ++d)
        sum += (float)na_load(g, NA_AT5(g, b, x, y, h, d)) * (float)na_load(o, NA_AT5(o, b, x, y, h, d));
    delta[NA_AT4(e, b, x, y, h)] = sum;
}

// block -> (b, h, tile x, tile y); tiles per axis: dilation * ceil(ceil(L / d) / T)
#define NA_FB_DECODE_BLOCK(TX_, TY_)                                     \
    const long long ntx = dx * (((X + dx - 1) / dx + (TX_) - 1) / (TX_)); \
    const long long nty = dy * (((Y + dy - 1) / dy + (TY_) - 1) / (TY_)); \
    long long n_ = blockIdx.x;                                            \
    const long long tile_y = n_ % nty; n_ /= nty;                         \
    const long long tile_x = n_ % ntx; n_ /= ntx;                         \
    const long long h = n_ % H;                                           \
    const long long b = n_ / H;                                           \
    const long long gx = tile_x % dx, gy = tile_y % dy;                   \
    const long long tx0 = (tile_x / dx) * (TX_), ty0 = (tile_y / dy) * (TY_);

template <class T, int HD, int TX, int TY, int KC>
__global__ void __launch_bounds__(NA_FB_THREADS)
    na_fused_bwd_dq(const T* __restrict__ q, NA_TENSOR(q), const T* __restrict__ k, NA_TENSOR(k),
                    const T* __restrict__ v, NA_TENSOR(v), const T* __restrict__ g, NA_TENSOR(g),
                    const float* __restrict__ lse, NA_ROWS(l), const float* __restrict__ delta,
                    NA_ROWS(e), const float* __restrict__ rpb, NA_BIAS(rpb), T* __restrict__ dq, NA_TENSOR(o), float* __restrict__ rpb_partial,
                    double scale, NA_PROBLEM) {
    constexpr int TQ = TX * TY;
    constexpr int LANES = NA_FB_THREADS / TQ;  // threads per query in pass 2
    constexpr int DPT = HD / LANES;            // dims per thread
    static_assert(NA_FB_THREADS % TQ == 0 && HD % LANES == 0 && DPT >= 1, "tile does not map onto the block");
    static_assert(TX <= 128 && TY <= 128, "the prologue gives threads 0.. and 128.. the axes");
    const na_axis ax = {X, kx, sx, dx, cx};
    const na_axis ay = {Y, ky, sy, dy, cy};
    __shared__ int win_x0[TX], win_x1[TX], win_y0[TY], win_y1[TY];
    __shared__ float s_lse[TQ], s_delta[TQ];

    NA_FB_DECODE_BLOCK(TX, TY)
    const long long nqx = na_max(0, na_min(TX, na_group_length(ax, gx) - tx0));
    const long long nqy = na_max(0, na_min(TY, na_group_length(ay, gy) - ty0));
    const long long rw = 2 * ky - 1, entries = (2 * kx - 1) * rw;
    const long long tiles = B * ntx * nty;
    const int tid = threadIdx.x;
    float* partial_out = rpb_partial ? rpb_partial + (h * tiles + (b * ntx + tile_x) * nty + tile_y) * entries : 0;
    if (nqx == 0 || nqy == 0) {  // an empty tile of a shorter group: the whole block leaves
        if (partial_out)
            for (long long i = tid; i < entries; i += NA_FB_THREADS) partial_out[i] = 0.0f;
        return;
    }
    na_axis_tables<false, TX, TY>(tid, ax, tx0, nqx, gx, ay, ty0, nqy, gy, win_x0, win_x1, win_y0, win_y1);
    const T zero = T();
    unsigned char* smem = na_dynamic_shared();
    constexpr int KS = KC + 1;  // ds row stride (floats)
    const long long RS = na_fb_row<T>(D);
    const bool k_vec = na_rows_vectorizable(k, D, k_l, k_b, k_x, k_y, k_h);
    const bool v_vec = na_rows_vectorizable(v, D, v_l, v_b, v_x, v_y, v_h);
    T* qs = (T*)smem;
    T* gs = (T*)(smem + na_fb_align16(TQ * RS * (long long)sizeof(T)));
    T* ks = (T*)(smem + 2 * na_fb_align16(TQ * RS * (long long)sizeof(T)));
    T* vs = (T*)((unsigned char*)ks + na_fb_align16(KC * RS * (long long)sizeof(T)));
    float* ds = (float*)((unsigned char*)vs + na_fb_align16(KC * RS * (long long)sizeof(T)));
    float* racc = ds + TQ * KS;  // bias partials (bias only)

    for (long long i = tid; i < TQ * D; i += NA_FB_THREADS) {
        const long long qi = i / D, d = i % D, qxi = qi / TY, qyi = qi % TY;
        if (qxi < nqx && qyi < nqy) {
            const long long x = (tx0 + qxi) * dx + gx, y = (ty0 + qyi) * dy + gy;
            qs[qi * RS + d] = q[NA_AT5(q, b, x, y, h, d)];
            gs[qi * RS + d] = g[NA_AT5(g, b, x, y, h, d)];
        } else {
            qs[qi * RS + d] = zero;
            gs[qi * RS + d] = zero;
        }
    }
    for (int qi = tid; qi < TQ; qi += NA_FB_THREADS) {
        const int qxi = qi / TY, qyi = qi % TY;
        float l = 0.0f, dl = 0.0f;
        if (qxi < nqx && qyi < nqy) {
            const long long x = (tx0 + qxi) * dx + gx, y = (ty0 + qyi) * dy + gy;
            l = lse[NA_AT4(l, b, x, y, h)];
            dl = delta[NA_AT4(e, b, x, y, h)];
        }
        s_lse[qi] = l;
        s_delta[qi] = dl;
    }
    if (partial_out)
        for (long long i = tid; i < entries; i += NA_FB_THREADS) racc[i] = 0.0f;
    __syncthreads();
    // the key box: union of the tile's windows
    const long long bx0 = win_x0[0], bx1 = win_x1[nqx - 1], by0 = win_y0[0], by1 = win_y1[nqy - 1];
    const long long nby = by1 - by0, nkeys = (bx1 - bx0) * nby;

    const int my_q = tid / LANES, lane = tid % LANES;
    float acc[DPT];
#pragma unroll
    for (int c = 0; c < DPT; ++c) acc[c] = 0.0f;
    const float fscale = (float)scale;

    for (long long c0 = 0; c0 < nkeys; c0 += KC) {
        const long long nc = na_min(KC, nkeys - c0);
        __syncthreads();  // the previous chunk is consumed
        // chunk row r: box key c0 + r (x-major)
        na_copy_rows(ks, RS, k, nc, D, k_l, k_vec, [&](long long r) {
            const long long x = (bx0 + (c0 + r) / nby) * dx + gx, y = (by0 + (c0 + r) % nby) * dy + gy;
            return na_row_ref{NA_AT5(k, b, x, y, h, 0), r};
        });
        na_copy_rows(vs, RS, v, nc, D, v_l, v_vec, [&](long long r) {
            const long long x = (bx0 + (c0 + r) / nby) * dx + gx, y = (by0 + (c0 + r) % nby) * dy + gy;
            return na_row_ref{NA_AT5(v, b, x, y, h, 0), r};
        });
        __syncthreads();
        // pass 1: ds per (query, key) pair
        for (int p = tid; p < TQ * KC; p += NA_FB_THREADS) {
            const int qi = p / KC, kk = p % KC;
            const int qxi = qi / TY, qyi = qi % TY;
            float s = 0.0f;
            if (kk < nc && qxi < nqx && qyi < nqy) {
                const long long wx = bx0 + (c0 + kk) / nby, wy = by0 + (c0 + kk) % nby;
                if (wx >= win_x0[qxi] && wx < win_x1[qxi] && wy >= win_y0[qyi] && wy < win_y1[qyi]) {
                    const T* qr = qs + qi * RS;
                    const T* gr = gs + qi * RS;
                    const T* kr = ks + kk * RS;
                    const T* vr = vs + kk * RS;
                    float dot = 0.0f, dp = 0.0f;
                    for (long long d = 0; d < D; ++d) {
                        dot += (float)na_load(qr, d) * (float)na_load(kr, d);
                        dp += (float)na_load(gr, d) * (float)na_load(vr, d);
                    }
                    float logit = dot * fscale;
                    if (rpb)
                        logit += rpb[h * rpb_h + (wx - tx0 - qxi + kx - 1) * rpb_x + (wy - ty0 - qyi + ky - 1) * rpb_y];
                    const float pr = na_exp(logit - s_lse[qi]);
                    s = pr * (dp - s_delta[qi]);
                }
            }
            ds[qi * KS + kk] = s;
        }
        __syncthreads();
        // pass 2: dq of my query, my dims. Keys outside my window add nothing
        // (not 0 * k: a NaN or Inf key another query sees must not reach me)
        {
            const float* dsr = ds + my_q * KS;
            const int qxi = my_q / TY, qyi = my_q % TY;
            const long long x0 = win_x0[qxi], x1 = win_x1[qxi], y0 = win_y0[qyi], y1 = win_y1[qyi];
            long long wx = bx0 + c0 / nby, wy = by0 + c0 % nby;  // key c0 + kk, walked x-major
            for (int kk = 0; kk < nc; ++kk) {
                const bool in = wx >= x0 && wx < x1 && wy >= y0 && wy < y1;
                const float w = dsr[kk];
                const T* kr = ks + kk * RS;
#pragma unroll
                for (int c = 0; c < DPT; ++c) {
                    const int d = lane + c * LANES;
                    if (in && d < D) acc[c] += w * (float)na_load(kr, d);
                }
                if (++wy == by1) { wy = by0; ++wx; }
            }
        }
        // bias partials: entry e gets the ds of every query whose key at offset e lies in the chunk
        if (partial_out) {
            for (long long en = tid; en < entries; en += NA_FB_THREADS) {
                const long long rx = en / rw - (kx - 1), ry = en % rw - (ky - 1);
                float sum = 0.0f;
                for (int qxi = 0; qxi < nqx; ++qxi) {
                    const long long wx = tx0 + qxi + rx;
                    if (wx < bx0 || wx >= bx1) continue;
                    for (int qyi = 0; qyi < nqy; ++qyi) {
                        const long long wy = ty0 + qyi + ry;
                        if (wy < by0 || wy >= by1) continue;
                        const long long kk = (wx - bx0) * nby + (wy - by0) - c0;
                        if (kk >= 0 && kk < nc) sum += ds[(qxi * TY + qyi) * KS + kk];
                    }
                }
                racc[en] += sum;
            }
        }
    }
    {
        const int qxi = my_q / TY, qyi = my_q % TY;
        if (qxi < nqx && qyi < nqy) {
            const long long x = (tx0 + qxi) * dx + gx, y = (ty0 + qyi) * dy + gy;
#pragma unroll
            for (int c = 0; c < DPT; ++c) {
                const int d = lane + c * LANES;
                if (d < D) na_store<T, float>(dq, NA_AT5(o, b, x, y, h, d), acc[c] * fscale);
            }
        }
    }
    if (partial_out)
        for (long long i = tid; i < entries; i += NA_FB_THREADS) partial_out[i] = racc[i];
}

template <class T, int HD, int TX, int TY, int QC>
__global__ void __launch_bounds__(NA_FB_THREADS)
    na_fused_bwd_dkdv(const T* __restrict__ q, NA_TENSOR(q), const T* __restrict__ k, NA_TENSOR(k),
                      const T* __restrict__ v, NA_TENSOR(v), const T* __restrict__ g, NA_TENSOR(g),
                      const float* __restrict__ lse, NA_ROWS(l), const float* __restrict__ delta,
                      NA_ROWS(e), const float* __restrict__ rpb, NA_BIAS(rpb), T* __restrict__ dk, NA_TENSOR(dk), T* __restrict__ dv,
                      NA_TENSOR(dv), double scale, NA_PROBLEM) {
    constexpr int TK = TX * TY;
    constexpr int LANES = NA_FB_THREADS / TK;  // threads per key in pass 2
    constexpr int DPT = HD / LANES;
    static_assert(NA_FB_THREADS % TK == 0 && HD % LANES == 0 && DPT >= 1, "tile does not map onto the block");
    static_assert(TX <= 128 && TY <= 128, "the prologue gives threads 0.. and 128.. the axes");
    const na_axis ax = {X, kx, sx, dx, cx};
    const na_axis ay = {Y, ky, sy, dy, cy};
    __shared__ int key_first_x[TX], key_last_x[TX], key_first_y[TY], key_last_y[TY];

    NA_FB_DECODE_BLOCK(TX, TY)
    const long long lgx = na_group_length(ax, gx), lgy = na_group_length(ay, gy);
    if (tx0 >= lgx || ty0 >= lgy) return;  // an empty tile of a shorter group: the whole block leaves
    const long long nkx = na_min(TX, lgx - tx0), nky = na_min(TY, lgy - ty0);
    const int tid = threadIdx.x;
    na_axis_tables<true, TX, TY>(tid, ax, tx0, nkx, gx, ay, ty0, nky, gy, key_first_x, key_last_x, key_first_y,
                                 key_last_y);
    const T zero = T();
    unsigned char* smem = na_dynamic_shared();
    constexpr int PS = QC + 1;  // p / ds row stride (floats)
    const long long RS = na_fb_row<T>(D);
    const bool q_vec = na_rows_vectorizable(q, D, q_l, q_b, q_x, q_y, q_h);
    const bool g_vec = na_rows_vectorizable(g, D, g_l, g_b, g_x, g_y, g_h);
    const long long krow = na_fb_align16(TK * RS * (long long)sizeof(T));
    const long long qrow = na_fb_align16(QC * RS * (long long)sizeof(T));
    T* ks = (T*)smem;
    T* vs = (T*)(smem + krow);
    T* qs = (T*)(smem + 2 * krow);
    T* gs = (T*)(smem + 2 * krow + qrow);
    float* ps = (float*)(smem + 2 * krow + 2 * qrow);
    float* dss = ps + TK * PS;
    float* c_lse = dss + TK * PS;
    float* c_delta = c_lse + QC;
    int* c_win = (int*)(c_delta + QC);  // [QC][4]: x0, x1, y0, y1

    for (long long i = tid; i < TK * D; i += NA_FB_THREADS) {
        const long long ki = i / D, d = i % D, kxi = ki / TY, kyi = ki % TY;
        if (kxi < nkx && kyi < nky) {
            const long long x = (tx0 + kxi) * dx + gx, y = (ty0 + kyi) * dy + gy;
            ks[ki * RS + d] = k[NA_AT5(k, b, x, y, h, d)];
            vs[ki * RS + d] = v[NA_AT5(v, b, x, y, h, d)];
        } else {
            ks[ki * RS + d] = zero;
            vs[ki * RS + d] = zero;
        }
    }
    __syncthreads();
    // the query box: union of the keys' inverse ranges (ranges never decrease with the key)
    const long long bx0 = key_first_x[0], bx1 = key_last_x[nkx - 1];
    const long long by0 = key_first_y[0], by1 = key_last_y[nky - 1];
    const long long nby = na_max(0, by1 - by0), nqueries = na_max(0, bx1 - bx0) * nby;  // empty: keys nobody sees

    const int my_k = tid / LANES, lane = tid % LANES;
    float acc_k[DPT], acc_v[DPT];
#pragma unroll
    for (int c = 0; c < DPT; ++c) acc_k[c] = acc_v[c] = 0.0f;
    const float fscale = (float)scale;

    for (long long c0 = 0; c0 < nqueries; c0 += QC) {
        const long long nc = na_min(QC, nqueries - c0);
        __syncthreads();  // the previous chunk is consumed
        // chunk row r: box query c0 + r (x-major)
        na_copy_rows(qs, RS, q, nc, D, q_l, q_vec, [&](long long r) {
            const long long x = (bx0 + (c0 + r) / nby) * dx + gx, y = (by0 + (c0 + r) % nby) * dy + gy;
            return na_row_ref{NA_AT5(q, b, x, y, h, 0), r};
        });
        na_copy_rows(gs, RS, g, nc, D, g_l, g_vec, [&](long long r) {
            const long long x = (bx0 + (c0 + r) / nby) * dx + gx, y = (by0 + (c0 + r) % nby) * dy + gy;
            return na_row_ref{NA_AT5(g, b, x, y, h, 0), r};
        });
        for (long long i = tid; i < nc; i += NA_FB_THREADS) {
            const long long qq = c0 + i;
            const long long x = (bx0 + qq / nby) * dx + gx, y = (by0 + qq % nby) * dy + gy;
            long long s0, s1, t0, t1;
            na_window(ax, x, s0, s1);
            na_window(ay, y, t0, t1);
            c_win[4 * i] = (int)s0;
            c_win[4 * i + 1] = (int)s1;
            c_win[4 * i + 2] = (int)t0;
            c_win[4 * i + 3] = (int)t1;
            c_lse[i] = lse[NA_AT4(l, b, x, y, h)];
            c_delta[i] = delta[NA_AT4(e, b, x, y, h)];
        }
        __syncthreads();
        // pass 1: p and ds per (key, query) pair
        for (int p = tid; p < TK * QC; p += NA_FB_THREADS) {
            const int ki = p / QC, qq = p % QC;
            const int kxi = ki / TY, kyi = ki % TY;
            float pr = 0.0f, s = 0.0f;
            if (qq < nc && kxi < nkx && kyi < nky) {
                const long long jx = tx0 + kxi, jy = ty0 + kyi;  // key group coordinates
                const int* w = c_win + 4 * qq;
                if (jx >= w[0] && jx < w[1] && jy >= w[2] && jy < w[3]) {
                    const T* qr = qs + qq * RS;
                    const T* gr = gs + qq * RS;
                    const T* kr = ks + ki * RS;
                    const T* vr = vs + ki * RS;
                    float dot = 0.0f, dp = 0.0f;
                    for (long long d = 0; d < D; ++d) {
                        dot += (float)na_load(qr, d) * (float)na_load(kr, d);
                        dp += (float)na_load(gr, d) * (float)na_load(vr, d);
                    }
                    float logit = dot * fscale;
                    if (rpb) {
                        const long long ix = bx0 + (c0 + qq) / nby, iy = by0 + (c0 + qq) % nby;
                        logit += rpb[h * rpb_h + (jx - ix + kx - 1) * rpb_x + (jy - iy + ky - 1) * rpb_y];
                    }
                    pr = na_exp(logit - c_lse[qq]);
                    s = pr * (dp - c_delta[qq]);
                }
            }
            ps[ki * PS + qq] = pr;
            dss[ki * PS + qq] = s;
        }
        __syncthreads();
        // pass 2: dk, dv of my key, my dims
        {
            const float* pr = ps + my_k * PS;
            const float* sr = dss + my_k * PS;
            // queries whose window does not hold my key add nothing (not 0 * q:
            // a NaN or Inf query must not reach keys it does not see)
            const long long jx = tx0 + my_k / TY, jy = ty0 + my_k % TY;
            for (int qq = 0; qq < nc; ++qq) {
                const int* w = c_win + 4 * qq;
                const bool in = jx >= w[0] && jx < w[1] && jy >= w[2] && jy < w[3];
                const float pw = pr[qq], sw = sr[qq];
                const T* qrow_ = qs + qq * RS;
                const T* grow_ = gs + qq * RS;
#pragma unroll
                for (int c = 0; c < DPT; ++c) {
                    const int d = lane + c * LANES;
                    if (in && d < D) {
                        acc_v[c] += pw * (float)na_load(grow_, d);
                        acc_k[c] += sw * (float)na_load(qrow_, d);
                    }
                }
            }
        }
    }
    const int kxi = my_k / TY, kyi = my_k % TY;
    if (kxi < nkx && kyi < nky) {
        const long long x = (tx0 + kxi) * dx + gx, y = (ty0 + kyi) * dy + gy;
#pragma unroll
        for (int c = 0; c < DPT; ++c) {
            const int d = lane + c * LANES;
            if (d < D) {
                na_store<T, float>(dk, NA_AT5(dk, b, x, y, h, d), acc_k[c] * fscale);
                na_store<T, float>(dv, NA_AT5(dv, b, x, y, h, d), acc_v[c]);
            }
        }
    }
}

// bias gradient, pass 2 (na_rpb_reduce.cuh)
__global__ void __launch_bounds__(NA_FB_THREADS)
    na_fused_rpb_reduce(const float* __restrict__ partial, long long tiles, float* __restrict__ drpb, NA_BIAS(rpb),
                        long long H, long long kx, long long ky, long long kz) {
    na_rpb_reduce<NA_FB_THREADS>(partial, tiles, drpb, rpb_h, rpb_x, rpb_y, rpb_z, H, kx, ky, kz);
}
