// Fused (flash-style) backward of neighborhood attention, 1D, 2D and 3D.
//
// The forward leaves out and lse (natural-log sum of exp(logit) over the
// neighborhood, float32, [b, x, y, h]); the backward never materializes the
// [tokens, kx * ky] attention matrix: probabilities are recomputed per
// (query, key) pair as p = exp(logit - lse), with
//   logit = scale * q . k + rpb[h, j'x - i'x + kx - 1, j'y - i'y + ky - 1, j'z - i'z + kz - 1]
//   delta = rowsum(dOut * out) - dlse                  (na_fused_delta; dlse: the
//                                                       logsumexp's gradient, or 0)
//   ds    = p * (dOut . v - delta)
//   dq    = scale * sum_keys ds * k                    (na_fused_bwd_dq, per query tile; with extra tokens
//                                                       (NA_EXTRA) their keys too, streamed after the box)
//   dk    = scale * sum_queries ds * q                 (na_fused_bwd_dkdv, per key tile)
//   dv    = sum_queries p * dOut
//   drpb  = sum ds per relative offset                 (partials in na_fused_bwd_dq,
//                                                       na_fused_rpb_reduce)
// Layouts and the problem argument list are na_naive.cu's (int64 element
// strides, 1D runs as 2D with Y = 1, ky = 1). Tiles live inside one dilation
// group per axis (group coordinates), so a tile's queries (or keys) are dense.
// Every kernel takes the rank RANK and the tile's z extent TZ as trailing
// template parameters (defaults 2 and 1): below rank 3 the z axis is the
// constant trivial axis of NA_PROBLEM_AXES, so whatever is computed on it
// folds away and 1D/2D instantiations keep their names and code. In 3D, tiles
// and boxes have a z extent and are linearized x-major, then y, then z.
// Deterministic: every sum has a fixed order, no atomics.
// Pairs outside a query's window add nothing to any gradient (skipped, not
// multiplied by zero), so a NaN or Inf reaches exactly the gradients that
// depend on it (tests/test_nonfinite.py).
//
// na_fused_bwd_dq<T, HD, TX, TY, KC[, 3, TZ]>: one block per (b, h, query tile of
// TX x TY (x TZ) queries). The union of the tile's windows is one box (window bounds never
// decrease with the query, docs/design/definition.md#monotone-windows-and-the-inverse-neighborhood, and the 2D union of products
// is the product of the per-axis unions), streamed KC keys at a time (the box
// linearized x-major) through shared memory. Pass 1: thread p computes
// ds for pairs (query p / KC, key p % KC), p += 256 (zero outside the query's
// window), into shared memory. Pass 2: 256 / (TX TY) threads own a query,
// lane l holding dims l, l + lanes, ... of dq in registers, summing the chunk's
// keys in order. With a bias: thread t owns bias entries t, t + 256, ... and
// adds, per chunk, the ds of every query of the tile whose key at that
// relative offset lies in the chunk (queries in order), into shared memory;
// at the end the block writes partial[h, (b, tile_x, tile_y, tile_z), entry].
// Dynamic shared memory (the host computes the same numbers, each part
// padded to 16 bytes; staged rows have RS = na_fb_row<T>(D) elements, an odd
// number of words, against bank conflicts): Q and dOut rows TX TY x RS of T,
// K and V rows KC x RS of T, ds TX TY x (KC + 1) floats, then (bias only) one
// float per bias entry ((2kx - 1)(2ky - 1)(2kz - 1) of them).
//
// na_fused_bwd_dkdv<T, HD, TX, TY, QC[, 3, TZ]>: one block per (b, h, key tile of
// TX x TY (x TZ) keys). The queries whose windows hold a key of the tile form one box
// (na_inverse_range of the tile's first and last key per axis), streamed QC
// queries at a time (x-major) with their lse, delta and windows. Pass 1:
// p and ds per pair (key p / QC, query p % QC) into shared memory. Pass 2:
// 256 / (TX TY) threads own a key, lanes hold dims of dk and dv in registers.
// Dynamic shared memory: K and V rows TX TY x RS of T, Q and dOut rows QC x RS
// of T, p and ds TX TY TZ x (QC + 1) floats each, QC floats of lse, QC of delta,
// 4 QC ints of window bounds (6 QC in 3D: a z range too).
#include "na_types.cuh"
#include "na_window.cuh"
#include "na_tile.cuh"
#include "na_shared.cuh"
#include "na_rpb_reduce.cuh"
#include "na_args.cuh"
#include "na_fb_common.cuh"

// delta[b, i, h] = sum_d dout * out - dlse[b, i, h] (float32), one thread per row. dlse, the gradient of the
// logsumexp (d lse / d logit = p, so it enters every ds as p * dlse), may be null: no gradient reaches the
// logsumexp
template <class T, int RANK = 2>
__global__ void __launch_bounds__(NA_FB_THREADS)
    na_fused_delta(const T* __restrict__ g, NA_TENSOR(g), const T* __restrict__ o, NA_TENSOR(o),
                   const float* __restrict__ dlse, NA_ROWS(dl), float* __restrict__ delta, NA_ROWS(e), NA_PROBLEM) {
    NA_PROBLEM_AXES(RANK)
    long long n = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= B * X * Y * az.length * H) return;
    const long long h = n % H; n /= H;
    const long long z = n % az.length; n /= az.length;
    const long long y = n % Y; n /= Y;
    const long long x = n % X;
    const long long b = n / X;
    float sum = 0.0f;
    for (long long d = 0; d < DV; ++d)
        sum += (float)na_load(g, NA_AT6(g, b, x, y, z, h, d)) * (float)na_load(o, NA_AT6(o, b, x, y, z, h, d));
    if (dlse) sum -= dlse[NA_ATR(dl, b, x, y, z, h)];
    delta[NA_ATR(e, b, x, y, z, h)] = sum;
}

// block -> (b, h, tile x, tile y, tile z) over HEADS_ heads (the dK/dV kernel's blocks are per key/value
// head); tiles per axis: dilation * ceil(ceil(L / d) / T).
// Needs NA_PROBLEM_AXES (z through az: one tile, group 0, below rank 3).
#define NA_FB_DECODE_BLOCK(TX_, TY_, TZ_, HEADS_)                        \
    const long long ntx = dx * (((X + dx - 1) / dx + (TX_) - 1) / (TX_)); \
    const long long nty = dy * (((Y + dy - 1) / dy + (TY_) - 1) / (TY_)); \
    const long long ntz = na_tiles_per_axis(az, TZ_);                     \
    long long n_ = blockIdx.x;                                            \
    const long long tile_z = n_ % ntz; n_ /= ntz;                         \
    const long long tile_y = n_ % nty; n_ /= nty;                         \
    const long long tile_x = n_ % ntx; n_ /= ntx;                         \
    const long long h = n_ % (HEADS_);                                    \
    const long long b = n_ / (HEADS_);                                    \
    const long long gx = tile_x % dx, gy = tile_y % dy, gz = tile_z % az.dilation; \
    const long long tx0 = (tile_x / dx) * (TX_), ty0 = (tile_y / dy) * (TY_), tz0 = (tile_z / az.dilation) * (TZ_);

// Row i of a z table, or below rank 3 (no table) the trivial axis' row:
// window [0, 1), the one query that sees the one key.
template <int RANK>
__device__ __forceinline__ long long na_fb_z_row(const int* table, long long i, long long trivial) {
    return RANK == 3 ? table[i] : trivial;
}

// Group coordinates of the box index c (x-major, then y, then z) of a box
// with origin (x0, y0, z0) and ny x nz positions per x row.
struct na_fb_at {
    long long x, y, z;
};
__device__ __forceinline__ na_fb_at na_fb_box_at(long long c, long long x0, long long y0, long long z0, long long ny,
                                                 long long nz) {
    return {x0 + c / (ny * nz), y0 + (c / nz) % ny, z0 + c % nz};
}

// 3D asks for one block an SM at least: without it ptxas held the head-dim-128 16-bit 3D dq to 128 registers,
// which spilled 24 bytes on sm_90 once the extra tokens' key range came after the box; 0 (no minimum) keeps
// 1D/2D as they were
#define NA_FB_DQ_MIN_BLOCKS(RANK) ((RANK) == 3 ? 1 : 0)
template <class T, int HD, int TX, int TY, int KC, int RANK = 2, int TZ = 1>
__global__ void __launch_bounds__(NA_FB_THREADS, NA_FB_DQ_MIN_BLOCKS(RANK))
    na_fused_bwd_dq(const T* __restrict__ q, NA_TENSOR(q), const T* __restrict__ k, NA_TENSOR(k),
                    const T* __restrict__ v, NA_TENSOR(v), const T* __restrict__ g, NA_TENSOR(g),
                    const float* __restrict__ lse, NA_ROWS(l), const float* __restrict__ delta,
                    NA_ROWS(e), const float* __restrict__ rpb, NA_BIAS(rpb), NA_EXTRA(T), T* __restrict__ dq, NA_TENSOR(o), float* __restrict__ rpb_partial,
                    double scale, NA_PROBLEM) {
    constexpr int TQ = TX * TY * TZ;
    constexpr int LANES = NA_FB_THREADS / TQ;  // threads per query in pass 2
    constexpr int DPT = HD / LANES;            // dims per thread
    static_assert(NA_FB_THREADS % TQ == 0 && HD % LANES == 0 && DPT >= 1, "tile does not map onto the block");
    static_assert(TX <= 128 && TY <= 128, "the prologue gives threads 0.. and 128.. the axes");
    static_assert(RANK == 3 ? TY <= 64 && TZ <= 64 : TZ == 1, "3D: threads 128.. fill the y table, 192.. the z table");
    NA_PROBLEM_AXES(RANK)
    __shared__ int win_x0[TX], win_x1[TX], win_y0[TY], win_y1[TY];
    __shared__ int win_z0[TZ], win_z1[TZ];  // 3D only (unused below: the compiler drops them)
    __shared__ float s_lse[TQ], s_delta[TQ];

    NA_FB_DECODE_BLOCK(TX, TY, TZ, H)
    const long long nqx = na_max(0, na_min(TX, na_group_length(ax, gx) - tx0));
    const long long nqy = na_max(0, na_min(TY, na_group_length(ay, gy) - ty0));
    const long long nqz = na_max(0, na_min(TZ, na_group_length(az, gz) - tz0));
    // bias entries (rx, ry, rz) row-major: rz fastest
    const long long rwz = 2 * az.kernel - 1, rw = (2 * ky - 1) * rwz, entries = (2 * kx - 1) * rw;
    const long long tiles = B * ntx * nty * ntz;
    const int tid = threadIdx.x;
    float* partial_out =
        rpb_partial ? rpb_partial + (h * tiles + ((b * ntx + tile_x) * nty + tile_y) * ntz + tile_z) * entries : 0;
    if (nqx == 0 || nqy == 0 || nqz == 0) {  // an empty tile of a shorter group: the whole block leaves
        if (partial_out)
            for (long long i = tid; i < entries; i += NA_FB_THREADS) partial_out[i] = 0.0f;
        return;
    }
    na_axis_tables<false, TX, TY>(tid, ax, tx0, nqx, gx, ay, ty0, nqy, gy, win_x0, win_x1, win_y0, win_y1);
    if constexpr (RANK == 3) na_axis_table_z<false, TZ>(tid, az, tz0, nqz, gz, win_z0, win_z1);
    const T zero = T();
    unsigned char* smem = na_dynamic_shared();
    constexpr int KS = KC + 1;  // ds row stride (floats)
    const long long RS = na_fb_row<T>(na_max(D, DV));  // rows of either head dim
    // (in 3D the z stride moves between rows too; below rank 3 it is never read)
    const bool k_vec = na_rows_vectorizable(k, D, k_l, k_b, k_x, k_y, k_h) &&
                       (RANK < 3 || na_rows_vectorizable(k, D, k_l, k_z, 0, 0, 0));
    const bool v_vec = na_rows_vectorizable(v, DV, v_l, v_b, v_x, v_y, v_h) &&
                       (RANK < 3 || na_rows_vectorizable(v, DV, v_l, v_z, 0, 0, 0));
    T* qs = (T*)smem;
    T* gs = (T*)(smem + na_fb_align16(TQ * RS * (long long)sizeof(T)));
    T* ks = (T*)(smem + 2 * na_fb_align16(TQ * RS * (long long)sizeof(T)));
    T* vs = (T*)((unsigned char*)ks + na_fb_align16(KC * RS * (long long)sizeof(T)));
    float* ds = (float*)((unsigned char*)vs + na_fb_align16(KC * RS * (long long)sizeof(T)));
    float* racc = ds + TQ * KS;  // bias partials (bias only)

    // tile query qi: (qi / (TY TZ), qi / TZ % TY, qi % TZ), z fastest
    const long long DM = na_max(D, DV);
    for (long long i = tid; i < TQ * DM; i += NA_FB_THREADS) {
        const long long qi = i / DM, d = i % DM, qxi = qi / (TY * TZ), qyi = qi / TZ % TY, qzi = qi % TZ;
        if (qxi < nqx && qyi < nqy && qzi < nqz) {
            const long long x = (tx0 + qxi) * dx + gx, y = (ty0 + qyi) * dy + gy, z = (tz0 + qzi) * az.dilation + gz;
            qs[qi * RS + d] = d < D ? q[NA_AT6(q, b, x, y, z, h, d)] : zero;
            gs[qi * RS + d] = d < DV ? g[NA_AT6(g, b, x, y, z, h, d)] : zero;
        } else {
            qs[qi * RS + d] = zero;
            gs[qi * RS + d] = zero;
        }
    }
    for (int qi = tid; qi < TQ; qi += NA_FB_THREADS) {
        const int qxi = qi / (TY * TZ), qyi = qi / TZ % TY, qzi = qi % TZ;
        float l = 0.0f, dl = 0.0f;
        if (qxi < nqx && qyi < nqy && qzi < nqz) {
            const long long x = (tx0 + qxi) * dx + gx, y = (ty0 + qyi) * dy + gy, z = (tz0 + qzi) * az.dilation + gz;
            l = lse[NA_ATR(l, b, x, y, z, h)];
            dl = delta[NA_ATR(e, b, x, y, z, h)];
        }
        s_lse[qi] = l;
        s_delta[qi] = dl;
    }
    if (partial_out)
        for (long long i = tid; i < entries; i += NA_FB_THREADS) racc[i] = 0.0f;
    __syncthreads();
    // the key box: union of the tile's windows
    const long long bx0 = win_x0[0], bx1 = win_x1[nqx - 1], by0 = win_y0[0], by1 = win_y1[nqy - 1];
    const long long bz0 = na_fb_z_row<RANK>(win_z0, 0, 0), bz1 = na_fb_z_row<RANK>(win_z1, nqz - 1, 1);
    const long long nby = by1 - by0, nbz = bz1 - bz0, nkeys = (bx1 - bx0) * nby * nbz;

    const int my_q = tid / LANES, lane = tid % LANES;
    float acc[DPT];
#pragma unroll
    for (int c = 0; c < DPT; ++c) acc[c] = 0.0f;
    const float fscale = (float)scale;

    for (long long c0 = 0; c0 < nkeys; c0 += KC) {
        const long long nc = na_min(KC, nkeys - c0);
        __syncthreads();  // the previous chunk is consumed
        // chunk row r: box key c0 + r
        na_copy_rows(ks, RS, k, nc, D, k_l, k_vec, [&](long long r) {
            const na_fb_at w = na_fb_box_at(c0 + r, bx0, by0, bz0, nby, nbz);
            return na_row_ref{NA_AT6(k, b, w.x * dx + gx, w.y * dy + gy, w.z * az.dilation + gz, NA_KV_HEAD(h), 0), r};
        });
        na_copy_rows(vs, RS, v, nc, DV, v_l, v_vec, [&](long long r) {
            const na_fb_at w = na_fb_box_at(c0 + r, bx0, by0, bz0, nby, nbz);
            return na_row_ref{NA_AT6(v, b, w.x * dx + gx, w.y * dy + gy, w.z * az.dilation + gz, NA_KV_HEAD(h), 0), r};
        });
        __syncthreads();
        // pass 1: ds per (query, key) pair
        for (int p = tid; p < TQ * KC; p += NA_FB_THREADS) {
            const int qi = p / KC, kk = p % KC;
            const int qxi = qi / (TY * TZ), qyi = qi / TZ % TY, qzi = qi % TZ;
            float s = 0.0f;
            if (kk < nc && qxi < nqx && qyi < nqy && qzi < nqz) {
                const na_fb_at w = na_fb_box_at(c0 + kk, bx0, by0, bz0, nby, nbz);
                if (w.x >= win_x0[qxi] && w.x < win_x1[qxi] && w.y >= win_y0[qyi] && w.y < win_y1[qyi] &&
                    w.z >= na_fb_z_row<RANK>(win_z0, qzi, 0) && w.z < na_fb_z_row<RANK>(win_z1, qzi, 1)) {
                    const T* qr = qs + qi * RS;
                    const T* gr = gs + qi * RS;
                    const T* kr = ks + kk * RS;
                    const T* vr = vs + kk * RS;
                    float dot = 0.0f, dp = 0.0f;
                    na_fb_dots(dot, dp, qr, kr, gr, vr, D, DV);
                    float logit = dot * fscale;
                    if (rpb)
                        logit += rpb[h * rpb_h + (w.x - tx0 - qxi + kx - 1) * rpb_x +
                                     (w.y - ty0 - qyi + ky - 1) * rpb_y + (w.z - tz0 - qzi + az.kernel - 1) * rpb_z];
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
            const int qxi = my_q / (TY * TZ), qyi = my_q / TZ % TY, qzi = my_q % TZ;
            const long long x0 = win_x0[qxi], x1 = win_x1[qxi], y0 = win_y0[qyi], y1 = win_y1[qyi];
            const long long z0 = na_fb_z_row<RANK>(win_z0, qzi, 0), z1 = na_fb_z_row<RANK>(win_z1, qzi, 1);
            na_fb_at w = na_fb_box_at(c0, bx0, by0, bz0, nby, nbz);  // key c0 + kk, walked x-major
            for (int kk = 0; kk < nc; ++kk) {
                const bool in = w.x >= x0 && w.x < x1 && w.y >= y0 && w.y < y1 && w.z >= z0 && w.z < z1;
                const float wt = dsr[kk];
                const T* kr = ks + kk * RS;
#pragma unroll
                for (int c = 0; c < DPT; ++c) {
                    const int d = lane + c * LANES;
                    if (in && d < D) acc[c] += wt * (float)na_load(kr, d);
                }
                if (++w.z == bz1) {
                    w.z = bz0;
                    if (++w.y == by1) { w.y = by0; ++w.x; }
                }
            }
        }
        // bias partials: entry e gets the ds of every query whose key at offset e lies in the chunk, added
        // in query order. 3D walks the chunk's keys (the query of a key is the key minus the offset): nc
        // steps per entry, where a scan of the tile's queries would visit nearly all of them for each of up
        // to (2k-1)^3 entries per chunk; same order, same sums. Box-relative ints: a box is far smaller than
        // 2^31 positions. 1D/2D keep the scan (the walk costs their head-dim-256 kernels 5 registers).
        if (partial_out && RANK == 3) {
            for (long long en = tid; en < entries; en += NA_FB_THREADS) {
                const na_fb_at first = na_fb_box_at(c0, 0, 0, 0, nby, nbz);
                // the tile query of box key (x, y, z) at this offset: (x + ox, y + oy, z + oz)
                const int ox = (int)(bx0 - tx0 - (en / rw - (kx - 1)));
                const int oy = (int)(by0 - ty0 - (en % rw / rwz - (ky - 1)));
                const int oz = (int)(bz0 - tz0 - (en % rwz - (az.kernel - 1)));
                int x = (int)first.x, y = (int)first.y, z = (int)first.z;
                float sum = 0.0f;
                for (int kk = 0; kk < nc; ++kk) {
                    const int qxi = x + ox, qyi = y + oy, qzi = z + oz;
                    if ((unsigned)qxi < (unsigned)nqx && (unsigned)qyi < (unsigned)nqy && (unsigned)qzi < (unsigned)nqz)
                        sum += ds[((qxi * TY + qyi) * TZ + qzi) * KS + kk];
                    if (++z == nbz) {
                        z = 0;
                        if (++y == nby) { y = 0; ++x; }
                    }
                }
                racc[en] += sum;
            }
        } else if (partial_out) {
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
    // the extra tokens: one more key range after the box, seen whole by every valid query (no window, no bias),
    // staged in the same rows; their ds adds to dq like the box's
    const long long kvh = NA_KV_HEAD(h);
    NA_EXTRA_VECTORIZABLE(xk_vec, xv_vec)
    for (long long t0 = 0; t0 < NX; t0 += KC) {
        const long long nc = na_min(KC, NX - t0);
        __syncthreads();  // the previous chunk is consumed
        NA_STAGE_EXTRA_ROWS(ks, vs, RS, t0, nc, b, kvh, xk_vec, xv_vec)
        __syncthreads();
        for (int p = tid; p < TQ * KC; p += NA_FB_THREADS) {
            const int qi = p / KC, kk = p % KC;
            const int qxi = qi / (TY * TZ), qyi = qi / TZ % TY, qzi = qi % TZ;
            float s = 0.0f;
            if (kk < nc && qxi < nqx && qyi < nqy && qzi < nqz) {
                float dot = 0.0f, dp = 0.0f;
                na_fb_dots(dot, dp, qs + qi * RS, ks + kk * RS, gs + qi * RS, vs + kk * RS, D, DV);
                s = na_exp(dot * fscale - s_lse[qi]) * (dp - s_delta[qi]);
            }
            ds[qi * KS + kk] = s;
        }
        __syncthreads();
        const float* dsr = ds + my_q * KS;
        for (int kk = 0; kk < nc; ++kk) {
            const float wt = dsr[kk];
            const T* kr = ks + kk * RS;
#pragma unroll
            for (int c = 0; c < DPT; ++c) {
                const int d = lane + c * LANES;
                if (d < D) acc[c] += wt * (float)na_load(kr, d);
            }
        }
    }
    {
        const int qxi = my_q / (TY * TZ), qyi = my_q / TZ % TY, qzi = my_q % TZ;
        if (qxi < nqx && qyi < nqy && qzi < nqz) {
            const long long x = (tx0 + qxi) * dx + gx, y = (ty0 + qyi) * dy + gy, z = (tz0 + qzi) * az.dilation + gz;
#pragma unroll
            for (int c = 0; c < DPT; ++c) {
                const int d = lane + c * LANES;
                if (d < D) na_store<T, float>(dq, NA_AT6(o, b, x, y, z, h, d), acc[c] * fscale);
            }
        }
    }
    if (partial_out)
        for (long long i = tid; i < entries; i += NA_FB_THREADS) partial_out[i] = racc[i];
}

// sm_100 and newer ask for one block an SM at least: there ptxas held the dK/dV kernel to 128 registers and,
// since the loop over a key/value head's query heads and the value head dim of its own, spilled 44 to 132
// bytes (sm_80 to sm_90 fit in 128)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1000
#define NA_FB_DKDV_MIN_BLOCKS 1
#else
#define NA_FB_DKDV_MIN_BLOCKS 0
#endif
template <class T, int HD, int TX, int TY, int QC, int RANK = 2, int TZ = 1>
__global__ void __launch_bounds__(NA_FB_THREADS, NA_FB_DKDV_MIN_BLOCKS)
    na_fused_bwd_dkdv(const T* __restrict__ q, NA_TENSOR(q), const T* __restrict__ k, NA_TENSOR(k),
                      const T* __restrict__ v, NA_TENSOR(v), const T* __restrict__ g, NA_TENSOR(g),
                      const float* __restrict__ lse, NA_ROWS(l), const float* __restrict__ delta,
                      NA_ROWS(e), const float* __restrict__ rpb, NA_BIAS(rpb), T* __restrict__ dk, NA_TENSOR(dk), T* __restrict__ dv,
                      NA_TENSOR(dv), double scale, NA_PROBLEM) {
    constexpr int TK = TX * TY * TZ;
    constexpr int LANES = NA_FB_THREADS / TK;  // threads per key in pass 2
    constexpr int DPT = HD / LANES;
    constexpr int WIN = RANK == 3 ? 6 : 4;     // window bounds per staged query: [x0, x1, y0, y1(, z0, z1)]
    static_assert(NA_FB_THREADS % TK == 0 && HD % LANES == 0 && DPT >= 1, "tile does not map onto the block");
    static_assert(TX <= 128 && TY <= 128, "the prologue gives threads 0.. and 128.. the axes");
    static_assert(RANK == 3 ? TY <= 64 && TZ <= 64 : TZ == 1, "3D: threads 128.. fill the y table, 192.. the z table");
    NA_PROBLEM_AXES(RANK)
    __shared__ int key_first_x[TX], key_last_x[TX], key_first_y[TY], key_last_y[TY];
    __shared__ int key_first_z[TZ], key_last_z[TZ];  // 3D only (unused below: the compiler drops them)

    NA_FB_DECODE_BLOCK(TX, TY, TZ, NA_KV_HEADS)  // h: the key/value head
    const long long lgx = na_group_length(ax, gx), lgy = na_group_length(ay, gy), lgz = na_group_length(az, gz);
    if (tx0 >= lgx || ty0 >= lgy || tz0 >= lgz) return;  // an empty tile of a shorter group: the whole block leaves
    const long long nkx = na_min(TX, lgx - tx0), nky = na_min(TY, lgy - ty0), nkz = na_min(TZ, lgz - tz0);
    const int tid = threadIdx.x;
    na_axis_tables<true, TX, TY>(tid, ax, tx0, nkx, gx, ay, ty0, nky, gy, key_first_x, key_last_x, key_first_y,
                                 key_last_y);
    if constexpr (RANK == 3) na_axis_table_z<true, TZ>(tid, az, tz0, nkz, gz, key_first_z, key_last_z);
    const T zero = T();
    unsigned char* smem = na_dynamic_shared();
    constexpr int PS = QC + 1;  // p / ds row stride (floats)
    const long long RS = na_fb_row<T>(na_max(D, DV));  // rows of either head dim
    // (in 3D the z stride moves between rows too; below rank 3 it is never read)
    const bool q_vec = na_rows_vectorizable(q, D, q_l, q_b, q_x, q_y, q_h) &&
                       (RANK < 3 || na_rows_vectorizable(q, D, q_l, q_z, 0, 0, 0));
    const bool g_vec = na_rows_vectorizable(g, DV, g_l, g_b, g_x, g_y, g_h) &&
                       (RANK < 3 || na_rows_vectorizable(g, DV, g_l, g_z, 0, 0, 0));
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
    int* c_win = (int*)(c_delta + QC);  // [QC][WIN]

    // tile key ki: (ki / (TY TZ), ki / TZ % TY, ki % TZ), z fastest
    const long long DM = na_max(D, DV);
    for (long long i = tid; i < TK * DM; i += NA_FB_THREADS) {
        const long long ki = i / DM, d = i % DM, kxi = ki / (TY * TZ), kyi = ki / TZ % TY, kzi = ki % TZ;
        if (kxi < nkx && kyi < nky && kzi < nkz) {
            const long long x = (tx0 + kxi) * dx + gx, y = (ty0 + kyi) * dy + gy, z = (tz0 + kzi) * az.dilation + gz;
            ks[ki * RS + d] = d < D ? k[NA_AT6(k, b, x, y, z, h, d)] : zero;
            vs[ki * RS + d] = d < DV ? v[NA_AT6(v, b, x, y, z, h, d)] : zero;
        } else {
            ks[ki * RS + d] = zero;
            vs[ki * RS + d] = zero;
        }
    }
    __syncthreads();
    // the query box: union of the keys' inverse ranges (ranges never decrease with the key)
    const long long bx0 = key_first_x[0], bx1 = key_last_x[nkx - 1];
    const long long by0 = key_first_y[0], by1 = key_last_y[nky - 1];
    const long long bz0 = na_fb_z_row<RANK>(key_first_z, 0, 0), bz1 = na_fb_z_row<RANK>(key_last_z, nkz - 1, 1);
    const long long nby = na_max(0, by1 - by0), nbz = na_max(0, bz1 - bz0);
    const long long nqueries = na_max(0, bx1 - bx0) * nby * nbz;  // empty: keys nobody sees

    const int my_k = tid / LANES, lane = tid % LANES;
    // this lane's dims lane + LANES c: c < ck of the query/key head dim, c < cv of the value's (counts compared
    // with the unrolled c: per-dim tests of both head dims cost the 3D kernels some 50 registers)
    const int ck = (int)na_min(DPT, (D - lane + LANES - 1) / LANES);
    const int cv = (int)na_min(DPT, (DV - lane + LANES - 1) / LANES);
    float acc_k[DPT], acc_v[DPT];
#pragma unroll
    for (int c = 0; c < DPT; ++c) acc_k[c] = acc_v[c] = 0.0f;
    const float fscale = (float)scale;

    // grouped-query attention: the box once per query head hq of the key/value head's group, into one sum
    for (long long hq = h * HPK; hq < (h + 1) * HPK; ++hq) {
        for (long long c0 = 0; c0 < nqueries; c0 += QC) {
            const long long nc = na_min(QC, nqueries - c0);
            __syncthreads();  // the previous chunk is consumed
            // chunk row r: box query c0 + r
            na_copy_rows(qs, RS, q, nc, D, q_l, q_vec, [&](long long r) {
                const na_fb_at i = na_fb_box_at(c0 + r, bx0, by0, bz0, nby, nbz);
                return na_row_ref{NA_AT6(q, b, i.x * dx + gx, i.y * dy + gy, i.z * az.dilation + gz, hq, 0), r};
            });
            na_copy_rows(gs, RS, g, nc, DV, g_l, g_vec, [&](long long r) {
                const na_fb_at i = na_fb_box_at(c0 + r, bx0, by0, bz0, nby, nbz);
                return na_row_ref{NA_AT6(g, b, i.x * dx + gx, i.y * dy + gy, i.z * az.dilation + gz, hq, 0), r};
            });
            for (long long i = tid; i < nc; i += NA_FB_THREADS) {
                const na_fb_at at = na_fb_box_at(c0 + i, bx0, by0, bz0, nby, nbz);
                const long long x = at.x * dx + gx, y = at.y * dy + gy, z = at.z * az.dilation + gz;
                long long s0, s1, t0, t1;
                na_window(ax, x, s0, s1);
                na_window(ay, y, t0, t1);
                c_win[WIN * i] = (int)s0;
                c_win[WIN * i + 1] = (int)s1;
                c_win[WIN * i + 2] = (int)t0;
                c_win[WIN * i + 3] = (int)t1;
                if constexpr (RANK == 3) {
                    na_window(az, z, s0, s1);
                    c_win[WIN * i + 4] = (int)s0;
                    c_win[WIN * i + 5] = (int)s1;
                }
                c_lse[i] = lse[NA_ATR(l, b, x, y, z, hq)];
                c_delta[i] = delta[NA_ATR(e, b, x, y, z, hq)];
            }
            __syncthreads();
            // pass 1: p and ds per (key, query) pair
            for (int p = tid; p < TK * QC; p += NA_FB_THREADS) {
                const int ki = p / QC, qq = p % QC;
                const int kxi = ki / (TY * TZ), kyi = ki / TZ % TY, kzi = ki % TZ;
                float pr = 0.0f, s = 0.0f;
                if (qq < nc && kxi < nkx && kyi < nky && kzi < nkz) {
                    const long long jx = tx0 + kxi, jy = ty0 + kyi, jz = tz0 + kzi;  // key group coordinates
                    const int* w = c_win + WIN * qq;
                    if (jx >= w[0] && jx < w[1] && jy >= w[2] && jy < w[3] &&
                        (RANK < 3 || (jz >= w[WIN - 2] && jz < w[WIN - 1]))) {
                        const T* qr = qs + qq * RS;
                        const T* gr = gs + qq * RS;
                        const T* kr = ks + ki * RS;
                        const T* vr = vs + ki * RS;
                        float dot = 0.0f, dp = 0.0f;
                        na_fb_dots(dot, dp, qr, kr, gr, vr, D, DV);
                        float logit = dot * fscale;
                        if (rpb) {
                            const na_fb_at i = na_fb_box_at(c0 + qq, bx0, by0, bz0, nby, nbz);
                            logit += rpb[hq * rpb_h + (jx - i.x + kx - 1) * rpb_x + (jy - i.y + ky - 1) * rpb_y +
                                         (jz - i.z + az.kernel - 1) * rpb_z];
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
                const long long jx = tx0 + my_k / (TY * TZ), jy = ty0 + my_k / TZ % TY, jz = tz0 + my_k % TZ;
                for (int qq = 0; qq < nc; ++qq) {
                    const int* w = c_win + WIN * qq;
                    const bool in = jx >= w[0] && jx < w[1] && jy >= w[2] && jy < w[3] &&
                                    (RANK < 3 || (jz >= w[WIN - 2] && jz < w[WIN - 1]));
                    const float pw = pr[qq], sw = sr[qq];
                    const T* qrow_ = qs + qq * RS;
                    const T* grow_ = gs + qq * RS;
#pragma unroll
                    for (int c = 0; c < DPT; ++c) {
                        const int d = lane + c * LANES;
                        if (in && c < cv) acc_v[c] += pw * (float)na_load(grow_, d);
                        if (in && c < ck) acc_k[c] += sw * (float)na_load(qrow_, d);
                    }
                }
            }
        }
    }
    const int kxi = my_k / (TY * TZ), kyi = my_k / TZ % TY, kzi = my_k % TZ;
    if (kxi < nkx && kyi < nky && kzi < nkz) {
        const long long x = (tx0 + kxi) * dx + gx, y = (ty0 + kyi) * dy + gy, z = (tz0 + kzi) * az.dilation + gz;
#pragma unroll
        for (int c = 0; c < DPT; ++c) {
            const int d = lane + c * LANES;
            if (c < ck) na_store<T, float>(dk, NA_AT6(dk, b, x, y, z, h, d), acc_k[c] * fscale);
            if (c < cv) na_store<T, float>(dv, NA_AT6(dv, b, x, y, z, h, d), acc_v[c]);
        }
    }
}

// bias gradient, pass 2 (na_rpb_reduce.cuh), under one name per family that
// launches it: a kernel belongs to one family (one build), and the 3D twin's
// build must not need the 1D/2D family's
#define NA_FB_RPB_REDUCE(NAME)                                                                                     \
    __global__ void __launch_bounds__(NA_FB_THREADS)                                                              \
        NAME(const float* __restrict__ partial, long long tiles, float* __restrict__ drpb, NA_BIAS(rpb), long long H, \
             long long kx, long long ky, long long kz) {                                                          \
        na_rpb_reduce<NA_FB_THREADS>(partial, tiles, drpb, rpb_h, rpb_x, rpb_y, rpb_z, H, kx, ky, kz);            \
    }
NA_FB_RPB_REDUCE(na_fused_rpb_reduce)
NA_FB_RPB_REDUCE(na_fused_rpb_reduce_3d)
