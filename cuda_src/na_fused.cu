// Fused (flash-style) neighborhood attention forward, 1D, 2D and 3D.
//
//   out[b,i,h] = sum_{j in N(i)} softmax_j(logit) * v[b,j,h]
//   lse[b,i,h] = log sum_{j in N(i)} exp(logit),  logit = scale * q_i . k_j + rpb[h, j'-i'+k-1 per axis]
//
// and with NX extra tokens (NA_EXTRA) every query also attends each of them, in the same softmax: after the
// box, the tokens are one more key range, staged in the same chunks, without mask or bias.
//
// One block of NA_FUSED_THREADS threads per (batch, head, query tile of
// TX x TY x TZ group coordinates inside ONE dilation group per axis). Window
// start and end never decrease with the query inside a group
// (docs/design/definition.md#monotone-windows-and-the-inverse-neighborhood),
// so the union of the tile's windows is the box [start(first
// query), end(last query)) per axis. The box is walked in row-major order
// (x, then y, then z) in chunks of KC keys: K and V rows of a chunk are staged
// in dynamic shared memory (raw elements, 16-byte loads where the layout
// allows), so shared memory and registers do not grow with the kernel size or
// the rank (a 1D k = 255 runs like a k = 3, a 3D 7x7x7 window like a 2D one).
//
// Thread mapping: a group of G = threads / (TX * TY * TZ) consecutive lanes
// owns one query (z fastest); lane l of the group holds q, and the output
// accumulator, for dims d = l + G * e (e < E = HD / G) in registers (fp32).
// Per key the G partial dot products are summed with __shfl_xor_sync over the
// group (full warp mask: the key loop is warp-uniform, and a key that no query
// of the warp sees is skipped as a whole with __any_sync). Logits outside a
// query's own window are masked (causal windows hold 1..k keys). Softmax is
// online per chunk: chunk max, one rescale of the running sum and accumulator,
// then exp(logit - max) for the visible keys only (never exp(-inf - -inf)). A
// NaN or Inf reaches exactly the queries whose windows hold it.
//
// Template parameters: element type T, head-dim bucket HD (runtime D <= HD),
// query tile TX x TY (1D: TY = 1, ky = 1), then the rank RANK and the tile's z
// extent TZ (defaults 2 and 1: below rank 3 the z axis is the constant trivial
// axis of NA_PROBLEM_AXES, so its code folds away and 1D/2D instantiations
// keep their names and code). Shared memory is fixed per instantiation:
// 2 * KC * HD elements (na_rtc/runtime/fused.py mirrors it).
#include "na_types.cuh"
#include "na_window.cuh"
#include "na_shared.cuh"
#include "na_tile.cuh"
#include "na_args.cuh"

#define NA_FUSED_THREADS 256
#define NA_FUSED_FULL_MASK 0xffffffffu

// keys per staged chunk (na_rtc/runtime/fused.py: chunk_keys). A chunk's
// logits live in registers (s[KC]); in 3D the third axis' box coordinate and
// window take registers too, so 3D chunks are 16 keys at every head dim
// (32 would spill at head dims 32 and 64).
template <int HD, int RANK>
struct na_fused_chunk {
    static constexpr int value = HD <= 64 && RANK < 3 ? 32 : 16;
};

// Box coordinates of the box's linear index c (row-major: x, then y, then z)
// for a box of hy x hz keys per x row; below rank 3 hz is the constant 1.
struct na_fused_box_at {
    long long x, y, z;
};
__device__ __forceinline__ na_fused_box_at na_fused_box_coords(long long c, long long hy, long long hz) {
    return {c / (hy * hz), (c / hz) % hy, c % hz};
}

// 3D (and on sm_120 every rank) asks for one block an SM at least: ptxas held those to 128 registers, which they
// filled before the value head dim became its own (DV), and then spilled 8 to 12 bytes; the 3D path takes 129 to
// 142 without the cap. 0 (no minimum) keeps the others as they were.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1200
#define NA_FUSED_MIN_BLOCKS(RANK) 1
#else
#define NA_FUSED_MIN_BLOCKS(RANK) ((RANK) == 3 ? 1 : 0)
#endif
template <class T, int HD, int TX, int TY, int RANK = 2, int TZ = 1>
__global__ void __launch_bounds__(NA_FUSED_THREADS, NA_FUSED_MIN_BLOCKS(RANK)) na_fused_fwd(
    const T* __restrict__ q, NA_TENSOR(q), const T* __restrict__ k, NA_TENSOR(k), const T* __restrict__ v,
    NA_TENSOR(v), const typename na_acc<T>::type* __restrict__ rpb, NA_BIAS(rpb), NA_EXTRA(T), T* __restrict__ out, NA_TENSOR(o), float* __restrict__ lse, NA_ROWS(l), double scale, NA_PROBLEM) {
    constexpr int NQ = TX * TY * TZ;            // queries per block
    constexpr int G = NA_FUSED_THREADS / NQ;    // lanes per query
    constexpr int E = HD / G;                   // head dims per lane
    constexpr int KC = na_fused_chunk<HD, RANK>::value;
    static_assert(G >= 1 && G <= 32 && (32 % G) == 0 && G * NQ == NA_FUSED_THREADS, "lanes per query");
    static_assert(E >= 1 && E * G == HD, "head dims per lane");
    static_assert(RANK == 3 || TZ == 1, "a tile has a z extent in 3D only");
    const float NEG_INF = __int_as_float(0xff800000);

    NA_PROBLEM_AXES(RANK)
    // block -> (b, h, tile x, tile y, tile z); uniform over the block
    const long long ntz = na_tiles_per_axis(az, TZ), nty = na_tiles_per_axis(ay, TY), ntx = na_tiles_per_axis(ax, TX);
    long long n = blockIdx.x;
    const long long itz = n % ntz; n /= ntz;
    const long long ity = n % nty; n /= nty;
    const long long itx = n % ntx; n /= ntx;
    const long long h = n % H, b = n / H;
    na_tile_axis tx, ty, tz;
    if (!na_tile_axis_of(ax, itx, TX, tx) || !na_tile_axis_of(ay, ity, TY, ty) || !na_tile_axis_of(az, itz, TZ, tz))
        return;
    const long long hx = tx.h1 - tx.h0, hy = ty.h1 - ty.h0, hz = tz.h1 - tz.h0, keys = hx * hy * hz;

    T* sk = reinterpret_cast<T*>(na_dynamic_shared());
    T* sv = sk + KC * HD;
    // (in 3D the z stride moves between rows too; below rank 3 it is never read)
    const bool k_vec = na_rows_vectorizable(k, D, k_l, k_b, k_x, k_y, k_h) &&
                       (RANK < 3 || na_rows_vectorizable(k, D, k_l, k_z, 0, 0, 0));
    const bool v_vec = na_rows_vectorizable(v, DV, v_l, v_b, v_x, v_y, v_h) &&
                       (RANK < 3 || na_rows_vectorizable(v, DV, v_l, v_z, 0, 0, 0));

    // this thread's query and its window, relative to the box
    const int tid = threadIdx.x;
    const int qi = tid / G, gl = tid % G;
    const long long qx = qi / (TY * TZ), qy = (qi / TZ) % TY, qz = qi % TZ;
    const bool valid = qx < tx.n && qy < ty.n && qz < tz.n;
    const long long gx = tx.q0 + qx, gy = ty.q0 + qy, gz = tz.q0 + qz;  // group coordinates
    const long long x = gx * dx + tx.g, y = gy * dy + ty.g, z = gz * az.dilation + tz.g;
    // (z starts as the trivial axis' window [0, 1), so that below rank 3 it
    // is a constant: an invalid query's window is never read, `valid` masks it)
    long long wx0 = 0, wx1 = 0, wy0 = 0, wy1 = 0, wz0 = 0, wz1 = 1;
    if (valid) {
        long long s0, s1;
        na_window(ax, x, s0, s1);
        wx0 = s0 - tx.h0; wx1 = s1 - tx.h0;
        na_window(ay, y, s0, s1);
        wy0 = s0 - ty.h0; wy1 = s1 - ty.h0;
        if constexpr (RANK == 3) {
            na_window(az, z, s0, s1);
            wz0 = s0 - tz.h0; wz1 = s1 - tz.h0;
        }
    }

    // this lane's dims gl + G e of the value's head dim: e < ev (a count compared with the unrolled e: per-dim
    // predicates of both head dims spilled)
    const int ev = (int)na_min(E, (DV - gl + G - 1) / G);
    float qr[E], acc[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
        const long long d = gl + G * e;
        qr[e] = valid && d < D ? na_load(q, NA_AT6(q, b, x, y, z, h, d)) : 0.f;
        acc[e] = 0.f;
    }
    const float fscale = (float)scale;
    // rpb index of box key (bx, by, bz): (h0 + bx) - i' + k - 1 per axis
    const long long bias0 = h * rpb_h + (tx.h0 - gx + kx - 1) * rpb_x + (ty.h0 - gy + ky - 1) * rpb_y +
                            (tz.h0 - gz + az.kernel - 1) * rpb_z;
    float m = NEG_INF, sum = 0.f;

    // global position of box key c (row-major), for staging
    const auto key_at = [&](long long c) {
        const na_fused_box_at at = na_fused_box_coords(c, hy, hz);
        return na_fused_box_at{(tx.h0 + at.x) * dx + tx.g, (ty.h0 + at.y) * dy + ty.g,
                               (tz.h0 + at.z) * az.dilation + tz.g};
    };
    // pass 2 of a chunk (the box's or the extra tokens'): rescale once, accumulate the visible keys
    const auto accumulate = [&](const float(&s)[KC], float cmax) {
        const float mnew = cmax > m ? cmax : m;
        if (mnew == NEG_INF) return;  // no key of this chunk visible to this query, none before: nothing to add
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
                    if (e < ev) acc[e] += p * na_load(sv + kk * HD, gl + G * e);
                }
            }
        }
        m = mnew;
    };
    for (long long c0 = 0; c0 < keys; c0 += KC) {
        const int cn = (int)na_min(KC, keys - c0);
        __syncthreads();  // the previous chunk is consumed
        // chunk row r: box key c0 + r
        na_copy_rows(sk, HD, k, cn, D, k_l, k_vec, [&](long long r) {
            const na_fused_box_at p = key_at(c0 + r);
            return na_row_ref{NA_AT6(k, b, p.x, p.y, p.z, NA_KV_HEAD(h), 0), r};
        });
        na_copy_rows(sv, HD, v, cn, DV, v_l, v_vec, [&](long long r) {
            const na_fused_box_at p = key_at(c0 + r);
            return na_row_ref{NA_AT6(v, b, p.x, p.y, p.z, NA_KV_HEAD(h), 0), r};
        });
        __syncthreads();

        // pass 1: logits of the chunk (masked: -inf), chunk max
        float s[KC];
        float cmax = NEG_INF;
        const na_fused_box_at at0 = na_fused_box_coords(c0, hy, hz);
        long long bx = at0.x, by = at0.y, bz = at0.z;  // box coordinates of key c0 + kk
#pragma unroll
        for (int kk = 0; kk < KC; ++kk) {
            s[kk] = NEG_INF;
            if (kk < cn) {
                const bool in = valid && bx >= wx0 && bx < wx1 && by >= wy0 && by < wy1 && bz >= wz0 && bz < wz1;
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
                        if (rpb) logit += rpb[bias0 + bx * rpb_x + by * rpb_y + bz * rpb_z];
                        s[kk] = logit;
                        cmax = logit > cmax ? logit : cmax;
                    }
                }
            }
            if (++bz == hz) {
                bz = 0;
                if (++by == hy) { by = 0; ++bx; }
            }
        }

        accumulate(s, cmax);
    }

    // the extra tokens: one more key range after the box, which every valid query sees whole (no window, no
    // bias), staged like the box's chunks; the online softmax runs on across both ranges
    const long long kvh = NA_KV_HEAD(h);
    NA_EXTRA_VECTORIZABLE(xk_vec, xv_vec)
    for (long long t0 = 0; t0 < NX; t0 += KC) {
        const int cn = (int)na_min(KC, NX - t0);
        __syncthreads();  // the previous chunk is consumed
        NA_STAGE_EXTRA_ROWS(sk, sv, HD, t0, cn, b, kvh, xk_vec, xv_vec)
        __syncthreads();
        float s[KC];
        float cmax = NEG_INF;
#pragma unroll
        for (int kk = 0; kk < KC; ++kk) {
            s[kk] = NEG_INF;
            if (kk < cn) {  // block-uniform
                float dot = 0.f;
#pragma unroll
                for (int e = 0; e < E; ++e) {
                    const int d = gl + G * e;
                    if (d < D) dot += qr[e] * na_load(sk + kk * HD, d);
                }
#pragma unroll
                for (int off = G / 2; off > 0; off /= 2) dot += __shfl_xor_sync(NA_FUSED_FULL_MASK, dot, off);
                if (valid) {
                    s[kk] = dot * fscale;
                    cmax = s[kk] > cmax ? s[kk] : cmax;
                }
            }
        }
        accumulate(s, cmax);
    }

    if (!valid) return;
#pragma unroll
    for (int e = 0; e < E; ++e) {
        if (e < ev) na_store<T, float>(out, NA_AT6(o, b, x, y, z, h, gl + G * e), acc[e] / sum);
    }
    if (gl == 0) lse[NA_ATR(l, b, x, y, z, h)] = m + na_log(sum);
}
