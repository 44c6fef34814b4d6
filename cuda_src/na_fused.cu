// Fused (flash-style) neighborhood attention forward, 1D and 2D.
//
//   out[b,i,h] = sum_{j in N(i)} softmax_j(logit) * v[b,j,h]
//   lse[b,i,h] = log sum_{j in N(i)} exp(logit),  logit = scale * q_i . k_j + rpb[h, j'-i'+k-1 per axis]
//
// One block of NA_FUSED_THREADS threads per (batch, head, query tile of
// TX x TY group coordinates inside ONE dilation group per axis). Window start
// and end never decrease with the query inside a group (DESIGN.md section 2),
// so the union of the tile's windows is the box [start(first query),
// end(last query)) per axis. The box is walked in row-major order in chunks
// of KC keys: K and V rows of a chunk are staged in dynamic shared memory
// (raw elements, 16-byte loads where the layout allows), so shared memory
// and registers do not grow with the kernel size (a 1D k = 255 runs like a
// k = 3).
//
// Thread mapping: a group of G = threads / (TX * TY) consecutive lanes owns
// one query; lane l of the group holds q, and the output accumulator, for
// dims d = l + G * e (e < E = HD / G) in registers (fp32). Per key the G
// partial dot products are summed with __shfl_xor_sync over the group (full
// warp mask: the key loop is warp-uniform, and a key that no query of the
// warp sees is skipped as a whole with __any_sync). Logits outside a query's
// own window are masked (causal windows hold 1..k keys). Softmax is online
// per chunk: chunk max, one rescale of the running sum and accumulator, then
// exp(logit - max) for the visible keys only (never exp(-inf - -inf)). A NaN
// or Inf reaches exactly the queries whose windows hold it.
//
// Template parameters: element type T, head-dim bucket HD (runtime D <= HD),
// query tile TX x TY (1D: TY = 1, ky = 1). Shared memory is fixed per
// instantiation: 2 * KC * HD elements (na_rtc/runtime/fused.py mirrors it).
#include "na_types.cuh"
#include "na_window.cuh"
#include "na_shared.cuh"
#include "na_tile.cuh"
#include "na_args.cuh"

#define NA_FUSED_THREADS 256
#define NA_FUSED_FULL_MASK 0xffffffffu

// keys per staged chunk (na_rtc/runtime/fused.py: chunk_keys)
template <int HD>
struct na_fused_chunk {
    static constexpr int value = HD <= 64 ? 32 : 16;
};

template <class T, int HD, int TX, int TY>
__global__ void __launch_bounds__(NA_FUSED_THREADS) na_fused_fwd(
    const T* __restrict__ q, NA_TENSOR(q), const T* __restrict__ k, NA_TENSOR(k), const T* __restrict__ v,
    NA_TENSOR(v), const typename na_acc<T>::type* __restrict__ rpb, NA_BIAS(rpb), T* __restrict__ out, NA_TENSOR(o), float* __restrict__ lse, NA_ROWS(l), double scale, NA_PROBLEM) {
    constexpr int NQ = TX * TY;                 // queries per block
    constexpr int G = NA_FUSED_THREADS / NQ;    // lanes per query
    constexpr int E = HD / G;                   // head dims per lane
    constexpr int KC = na_fused_chunk<HD>::value;
    static_assert(G >= 1 && G <= 32 && (32 % G) == 0 && G * NQ == NA_FUSED_THREADS, "lanes per query");
    static_assert(E >= 1 && E * G == HD, "head dims per lane");
    const float NEG_INF = __int_as_float(0xff800000);

    const na_axis ax = {X, kx, sx, dx, cx};
    const na_axis ay = {Y, ky, sy, dy, cy};
    // block -> (b, h, tile x, tile y); uniform over the block
    const long long nty = na_tiles_per_axis(ay, TY), ntx = na_tiles_per_axis(ax, TX);
    long long n = blockIdx.x;
    const long long ity = n % nty; n /= nty;
    const long long itx = n % ntx; n /= ntx;
    const long long h = n % H, b = n / H;
    na_tile_axis tx, ty;
    if (!na_tile_axis_of(ax, itx, TX, tx) || !na_tile_axis_of(ay, ity, TY, ty)) return;
    const long long hx = tx.h1 - tx.h0, hy = ty.h1 - ty.h0, keys = hx * hy;

    T* sk = reinterpret_cast<T*>(na_dynamic_shared());
    T* sv = sk + KC * HD;
    const bool k_vec = na_rows_vectorizable(k, D, k_l, k_b, k_x, k_y, k_h);
    const bool v_vec = na_rows_vectorizable(v, D, v_l, v_b, v_x, v_y, v_h);

    // this thread's query and its window, relative to the box
    const int tid = threadIdx.x;
    const int qi = tid / G, gl = tid % G;
    const long long qx = qi / TY, qy = qi % TY;
    const bool valid = qx < tx.n && qy < ty.n;
    const long long gx = tx.q0 + qx, gy = ty.q0 + qy;  // group coordinates
    const long long x = gx * dx + tx.g, y = gy * dy + ty.g;
    long long wx0 = 0, wx1 = 0, wy0 = 0, wy1 = 0;
    if (valid) {
        long long s0, s1;
        na_window(ax, x, s0, s1);
        wx0 = s0 - tx.h0; wx1 = s1 - tx.h0;
        na_window(ay, y, s0, s1);
        wy0 = s0 - ty.h0; wy1 = s1 - ty.h0;
    }

    float qr[E], acc[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
        const long long d = gl + G * e;
        qr[e] = valid && d < D ? na_load(q, NA_AT5(q, b, x, y, h, d)) : 0.f;
        acc[e] = 0.f;
    }
    const float fscale = (float)scale;
    // rpb index of box key (bx, by): (h0 + bx) - i' + k - 1 per axis
    const long long bias0 = h * rpb_h + (tx.h0 - gx + kx - 1) * rpb_x + (ty.h0 - gy + ky - 1) * rpb_y;
    float m = NEG_INF, sum = 0.f;

    for (long long c0 = 0; c0 < keys; c0 += KC) {
        const int cn = (int)na_min(KC, keys - c0);
        __syncthreads();  // the previous chunk is consumed
        // chunk row r: box key c0 + r (row-major)
        na_copy_rows(sk, HD, k, cn, D, k_l, k_vec, [&](long long r) {
            const long long kxp = (tx.h0 + (c0 + r) / hy) * dx + tx.g, kyp = (ty.h0 + (c0 + r) % hy) * dy + ty.g;
            return na_row_ref{NA_AT5(k, b, kxp, kyp, h, 0), r};
        });
        na_copy_rows(sv, HD, v, cn, D, v_l, v_vec, [&](long long r) {
            const long long kxp = (tx.h0 + (c0 + r) / hy) * dx + tx.g, kyp = (ty.h0 + (c0 + r) % hy) * dy + ty.g;
            return na_row_ref{NA_AT5(v, b, kxp, kyp, h, 0), r};
        });
        __syncthreads();

        // pass 1: logits of the chunk (masked: -inf), chunk max
        float s[KC];
        float cmax = NEG_INF;
        long long bx = c0 / hy, by = c0 % hy;  // box coordinates of key c0 + kk
#pragma unroll
        for (int kk = 0; kk < KC; ++kk) {
            s[kk] = NEG_INF;
            if (kk < cn) {
                const bool in = valid && bx >= wx0 && bx < wx1 && by >= wy0 && by < wy1;
                if (__any_sync(NA_FUSED_FULL_MASK, in)) {  // warp-uniform
                    float dot = 0.f;
#pragma unroll
                    for (int e = 0; e < E; ++e) {
                        const int d = gl + G * e;
                        if (d < D) dot += qr[e] * na_load(sk + kk * HD, d);
                    }
#pragma unroll
                    for (int off = G / 2; off > 0; off /= 2) dot += __shfl_xor_sync(NA_FUSED_FULL_MASK, dot, off);
                    if (in) {
                        float logit = dot * fscale;
                        if (rpb) logit += rpb[bias0 + bx * rpb_x + by * rpb_y];
                        s[kk] = logit;
                        cmax = logit > cmax ? logit : cmax;
                    }
                }
            }
            if (++by == hy) { by = 0; ++bx; }
        }

        // pass 2: rescale once, accumulate the visible keys
        const float mnew = cmax > m ? cmax : m;
        if (mnew != NEG_INF) {  // some key of this query was visible (else nothing to add)
            const float alpha = na_exp(m - mnew);  // m = -inf: 0 (mnew is not -inf)
            sum *= alpha;
#pragma unroll
            for (int e = 0; e < E; ++e) acc[e] *= alpha;
#pragma unroll
            for (int kk = 0; kk < KC; ++kk) {
                if (s[kk] != NEG_INF) {  // visible (a NaN logit is visible: it poisons the query)
                    const float p = na_exp(s[kk] - mnew);
                    sum += p;
#pragma unroll
                    for (int e = 0; e < E; ++e) {
                        const int d = gl + G * e;
                        if (d < D) acc[e] += p * na_load(sv + kk * HD, d);
                    }
                }
            }
            m = mnew;
        }
    }

    if (!valid) return;
#pragma unroll
    for (int e = 0; e < E; ++e) {
        const long long d = gl + G * e;
        if (d < D) na_store<T, float>(out, NA_AT5(o, b, x, y, h, d), acc[e] / sum);
    }
    if (gl == 0) lse[b * l_b + x * l_x + y * l_y + h * l_h] = m + na_log(sum);
}
