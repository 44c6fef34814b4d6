// Tiled split-op forward kernels (the NAT paper's "tiled NA"), 1D, 2D and 3D.
//
// Same runtime arguments, layouts and results as na_qk_fwd / na_av_fwd in
// na_naive.cu (so launch plans are packed the same way): one block per
// (batch, head, query tile of TX x TY group coordinates inside ONE dilation
// group per axis). The block copies the tile's queries (qk) or weights (av)
// and the halo of keys (values) that the union of the tile's windows covers
// into dynamic shared memory once, as raw elements (16-byte vector loads
// where the layout allows: na_copy_rows in na_shared.cuh), then computes every
// (query, slot) / (query, d) pair from there. Window start and end never
// decrease with the query inside a group (docs/design/definition.md#monotone-windows-and-the-inverse-neighborhood), so the halo
// per axis is [start(first query), end(last query)): at most T + k - 1 wide
// for stride 1, the only stride the dispatcher launches these with.
//
// Accumulation order is the naive kernels' (d in order for qk, window slots
// in row-major order for av) and elements convert to the accumulator exactly
// as there, so tiled == naive bit for bit where both run the same compiler.
//
// 3D (RANK 3, a TX x TY x TZ query tile): the halo box of a 3D tile is the
// product of the per-axis halos, (TX + kx - 1)(TY + ky - 1)(TZ + kz - 1) rows,
// too many for shared memory at k = 7 and large head dims; so the 3D path
// stages it one x plane at a time ((TY + ky - 1)(TZ + kz - 1) rows, and for
// av the tile's weights of that plane) and walks the planes in increasing x.
// Every logit still reads one key row; av adds the slots of each plane in
// row-major order, plane after plane, so the sums are na_av_fwd's, in its
// order. Below RANK 3 that path compiles away and the 1D/2D code is unchanged.
//
// Template parameters: element types, head-dim bucket HD (runtime D <= HD;
// it fixes the shared row pitch), the query tile TX x TY (1D: TY = 1), and
// RANK and TZ (3D only). Shared memory depends on the runtime kernel size;
// the launcher computes it with the same formulas
// (na_rtc/runtime/families/tiled.py, keep in step).
#include "na_types.cuh"
#include "na_window.cuh"
#include "na_shared.cuh"
#include "na_tile.cuh"
#include "na_args.cuh"

// shared row pitch in elements: HD plus one 32-bit word, so consecutive rows
// start in different banks (an odd word pitch for every HD bucket)
template <class T, int HD>
struct na_tiled_pitch {
    static constexpr int value = HD + (int)(4 / sizeof(T));
};

// Decode the block into (b, h, tile x, tile y); false: nothing to do here.
// `n`: the block index (3D: what is left after the z tile)
template <int TX, int TY>
__device__ __forceinline__ bool na_tile_of_block(const na_axis& ax, const na_axis& ay, long long H, long long& b,
                                                 long long& h, na_tile_axis& tx, na_tile_axis& ty,
                                                 long long n = blockIdx.x) {
    const long long nty = na_tiles_per_axis(ay, TY), ntx = na_tiles_per_axis(ax, TX);
    const long long iy = n % nty; n /= nty;
    const long long ix = n % ntx; n /= ntx;
    h = n % H;
    b = n / H;
    return na_tile_axis_of(ax, ix, TX, tx) && na_tile_axis_of(ay, iy, TY, ty);
}

// stage the key (value) halo [h0, h1) per axis of one (b, h): box row
// (wx, wy) goes to shared row wx * hyw + wy (pitch P elements)
template <class T>
__device__ __forceinline__ void na_stage_halo(T* dst, long long P, const T* src, long long s_b, long long s_x,
                                              long long s_y, long long s_h, long long s_l, long long b, long long h,
                                              long long D, long long dx, long long dy, const na_tile_axis& tx,
                                              const na_tile_axis& ty, long long hyw) {
    const long long hy = ty.h1 - ty.h0;
    const long long base = b * s_b + h * s_h;
    na_copy_rows(dst, P, src, (tx.h1 - tx.h0) * hy, D, s_l, na_rows_vectorizable(src + base, D, s_l, s_x, s_y, 0, 0),
                 [&](long long r) {
                     const long long wx = r / hy, wy = r % hy;
                     return na_row_ref{base + ((tx.h0 + wx) * dx + tx.g) * s_x + ((ty.h0 + wy) * dy + ty.g) * s_y,
                                       wx * hyw + wy};
                 });
}

// ---------------------------------------------------------------- 3D: x planes of the halo

// Decode the block into (b, h, tile x, tile y, tile z); false: nothing to do here.
template <int TX, int TY, int TZ>
__device__ __forceinline__ bool na_tile3_of_block(const na_axis& ax, const na_axis& ay, const na_axis& az, long long H,
                                                  long long& b, long long& h, na_tile_axis& tx, na_tile_axis& ty,
                                                  na_tile_axis& tz) {
    const long long ntz = na_tiles_per_axis(az, TZ);
    long long n = blockIdx.x;
    const long long iz = n % ntz;
    n /= ntz;
    return na_tile_of_block<TX, TY>(ax, ay, H, b, h, tx, ty, n) && na_tile_axis_of(az, iz, TZ, tz);
}

// The windows [lo, hi) of a 3D tile's query rows per axis, in shared memory:
// lo[0..TX) x, lo[TX..TX+TY) y, then z (rows past a tile's end get [0, 0)).
// The caller's barrier publishes them.
__device__ __forceinline__ void na_tile_row_window(const na_axis& a, const na_tile_axis& t, long long r, long long& lo,
                                                   long long& hi) {
    long long s = 0, e = 0;
    if (r < t.n) na_window(a, (t.q0 + r) * a.dilation + t.g, s, e);
    lo = s;
    hi = e;
}
template <int TX, int TY, int TZ>
__device__ __forceinline__ void na_tile3_windows(const na_axis& ax, const na_axis& ay, const na_axis& az,
                                                 const na_tile_axis& tx, const na_tile_axis& ty,
                                                 const na_tile_axis& tz, long long* lo, long long* hi) {
    // one call per axis, never an axis picked by a runtime index: that would put the axes in local memory
    const int i = threadIdx.x;
    if (i < TX) na_tile_row_window(ax, tx, i, lo[i], hi[i]);
    else if (i < TX + TY) na_tile_row_window(ay, ty, i - TX, lo[i], hi[i]);
    else if (i < TX + TY + TZ) na_tile_row_window(az, tz, i - TX - TY, lo[i], hi[i]);
}

// Shared memory of the 3D path starts with the window tables (2 (TX + TY + TZ) int64, 16-byte aligned)
template <int TX, int TY, int TZ>
__device__ __forceinline__ long long na_tile3_table_bytes() {
    return (2 * (TX + TY + TZ) * 8 + 15) / 16 * 16;
}

// stage the halo's x plane at key position px: box row (wy, wz) goes to shared row wy * hzw + wz
template <class T>
__device__ __forceinline__ void na_stage_plane(T* dst, long long P, const T* src, long long s_b, long long s_x,
                                               long long s_y, long long s_z, long long s_h, long long s_l, long long b,
                                               long long h, long long D, long long px, long long dy, long long dz,
                                               const na_tile_axis& ty, const na_tile_axis& tz, long long hzw) {
    const long long hz = tz.h1 - tz.h0;
    const long long base = b * s_b + h * s_h + px * s_x;
    const bool vec = na_rows_vectorizable(src + base, D, s_l, s_y, s_z, 0, 0);
    na_copy_rows(dst, P, src, (ty.h1 - ty.h0) * hz, D, s_l, vec, [&](long long r) {
        const long long wy = r / hz, wz = r % hz;
        return na_row_ref{base + ((ty.h0 + wy) * dy + ty.g) * s_y + ((tz.h0 + wz) * dz + tz.g) * s_z, wy * hzw + wz};
    });
}

// the offset of a 3D tile's query row qi (x-major: qi = (qx * TY + qy) * TZ + qz) in a [b, x, y, z, h, ...]
// tensor; rows past the tile's end read its first query (never used)
template <int TY, int TZ>
__device__ __forceinline__ long long na_tile3_row(long long qi, const na_tile_axis& tx, const na_tile_axis& ty,
                                                  const na_tile_axis& tz, long long dx, long long dy, long long dz,
                                                  long long s_b, long long s_x, long long s_y, long long s_z,
                                                  long long s_h, long long b, long long h) {
    long long qx = qi / (TY * TZ), qy = qi / TZ % TY, qz = qi % TZ;
    if (qx >= tx.n || qy >= ty.n || qz >= tz.n) qx = qy = qz = 0;
    return b * s_b + h * s_h + ((tx.q0 + qx) * dx + tx.g) * s_x + ((ty.q0 + qy) * dy + ty.g) * s_y +
           ((tz.q0 + qz) * dz + tz.g) * s_z;
}

// Blocks an SM must hold, for ptxas's register budget: by default it keeps na_tiled_qk at 64 registers (four
// blocks an SM), which on sm_120 spills 8 bytes; there one block as the minimum lets it take the 72 it needs.
// Elsewhere the default fits, and a minimum of one would cost a block an SM (68 to 72 registers).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1200
#define NA_TILED_QK_MIN_BLOCKS 1
#else
#define NA_TILED_QK_MIN_BLOCKS 4
#endif

// logits: attn[b,i,h,t] = scale * q[b,i,h] . k[b,key(i,t),h] + rpb[h, rel(i,t)],
// `fill` outside (causal) windows: na_qk_fwd, from shared memory
template <class T, class TA, int HD, int TX, int TY, int RANK = 2, int TZ = 1>
__global__ void __launch_bounds__(256, RANK == 3 ? 2 : NA_TILED_QK_MIN_BLOCKS) na_tiled_qk(
    const T* __restrict__ q, NA_TENSOR(q), const T* __restrict__ k, NA_TENSOR(k),
    const typename na_acc<T>::type* __restrict__ rpb, NA_BIAS(rpb),
    TA* __restrict__ attn, NA_TENSOR(a), double scale, double fill, NA_PROBLEM) {
    typedef typename na_acc<T>::type A;
    constexpr int P = na_tiled_pitch<T, HD>::value;
    NA_PROBLEM_AXES(RANK)
    long long b, h;
    na_tile_axis tx, ty;
    if (RANK == 3) {  // the halo one x plane at a time (see the top of this file)
        na_tile_axis tz;
        if (!na_tile3_of_block<TX, TY, TZ>(ax, ay, az, H, b, h, tx, ty, tz)) return;  // uniform over the block
        constexpr int Q = TX * TY * TZ;
        const long long hzw = TZ + az.kernel - 1, kyz = ky * az.kernel, slots = kx * kyz;
        unsigned char* smem = na_dynamic_shared();
        long long* lo = reinterpret_cast<long long*>(smem);
        long long* hi = lo + TX + TY + TZ;
        T* sq = reinterpret_cast<T*>(smem + na_tile3_table_bytes<TX, TY, TZ>());
        T* sk = sq + Q * P;
        na_tile3_windows<TX, TY, TZ>(ax, ay, az, tx, ty, tz, lo, hi);
        const bool vec = na_rows_vectorizable(q, D, q_l, q_b, q_x, q_y, q_h) && q_z % (16 / (long long)sizeof(T)) == 0;
        na_copy_rows(sq, P, q, Q, D, q_l, vec, [&](long long r) {
            return na_row_ref{na_tile3_row<TY, TZ>(r, tx, ty, tz, dx, dy, az.dilation, q_b, q_x, q_y, q_z, q_h, b, h), r};
        });
        if (tx.h1 - tx.h0 > TX + kx - 1 || ty.h1 - ty.h0 > TY + ky - 1 || tz.h1 - tz.h0 > hzw) __trap();  // stride > 1
        __syncthreads();
        if (cx || cy || az.causal) {  // a causal window holds fewer slots: those past it get `fill`, once
            for (long long p = threadIdx.x; p < Q * slots; p += blockDim.x) {
                const long long t = p % slots, qi = p / slots;
                const long long qx = qi / (TY * TZ), qy = qi / TZ % TY, qz = qi % TZ;
                if (qx >= tx.n || qy >= ty.n || qz >= tz.n) continue;
                const long long wtx = t / kyz, wty = t / az.kernel % ky, wtz = t % az.kernel;
                if (lo[qx] + wtx < hi[qx] && lo[TX + qy] + wty < hi[TX + qy] && lo[TX + TY + qz] + wtz < hi[TX + TY + qz])
                    continue;
                const long long x = (tx.q0 + qx) * dx + tx.g, y = (ty.q0 + qy) * dy + ty.g;
                na_store<TA, A>(attn, NA_AT6(a, b, x, y, (tz.q0 + qz) * az.dilation + tz.g, h, t), (A)fill);
            }
        }
        for (long long px = tx.h0; px < tx.h1; ++px) {
            __syncthreads();  // the previous plane is consumed
            na_stage_plane(sk, P, k, k_b, k_x, k_y, k_z, k_h, k_l, b, NA_KV_HEAD(h), D, px * dx + tx.g, dy, az.dilation, ty, tz,
                           hzw);
            __syncthreads();
            for (long long p = threadIdx.x; p < Q * kyz; p += blockDim.x) {
                const long long tyz = p % kyz, qi = p / kyz;
                const long long qx = qi / (TY * TZ), qy = qi / TZ % TY, qz = qi % TZ;
                if (qx >= tx.n || qy >= ty.n || qz >= tz.n || px < lo[qx] || px >= hi[qx]) continue;
                const long long wty = tyz / az.kernel, wtz = tyz % az.kernel;
                const long long y0 = lo[TX + qy], z0 = lo[TX + TY + qz];
                if (y0 + wty >= hi[TX + qy] || z0 + wtz >= hi[TX + TY + qz]) continue;
                const T* qrow = sq + qi * P;
                const T* krow = sk + ((y0 + wty - ty.h0) * hzw + (z0 + wtz - tz.h0)) * P;
                A dot = 0;
                for (long long d = 0; d < D; ++d) dot += na_load(qrow, d) * na_load(krow, d);
                A logit = dot * (A)scale;
                const long long gx = tx.q0 + qx, gy = ty.q0 + qy, gz = tz.q0 + qz;
                if (rpb)
                    logit += rpb[h * rpb_h + (px - gx + kx - 1) * rpb_x + (y0 + wty - gy + ky - 1) * rpb_y +
                                 (z0 + wtz - gz + az.kernel - 1) * rpb_z];
                const long long t = (px - lo[qx]) * kyz + tyz;
                na_store<TA, A>(attn, NA_AT6(a, b, gx * dx + tx.g, gy * dy + ty.g, gz * az.dilation + tz.g, h, t),
                                logit);
            }
        }
        return;
    }
    if (!na_tile_of_block<TX, TY>(ax, ay, H, b, h, tx, ty)) return;  // uniform over the block
    const long long hyw = TY + ky - 1;  // halo row width the launcher sized shared memory for
    T* sq = reinterpret_cast<T*>(na_dynamic_shared());
    T* sk = sq + TX * TY * P;

    // queries: row qx * TY + qy; keys: row (j'x - h0x) * hyw + (j'y - h0y)
    na_copy_rows(sq, P, q, tx.n * TY, D, q_l, na_rows_vectorizable(q, D, q_l, q_b, q_x, q_y, q_h),
                 [&](long long r) {
                     const long long qx = r / TY, qy = r % TY;
                     const long long y = qy < ty.n ? (ty.q0 + qy) * dy + ty.g : ty.g;  // rows past the end: never read
                     return na_row_ref{NA_AT5(q, b, (tx.q0 + qx) * dx + tx.g, y, h, 0), r};
                 });
    const long long hx = tx.h1 - tx.h0, hy = ty.h1 - ty.h0;
    if (hx > TX + kx - 1 || hy > hyw) __trap();  // a stride > 1 launch: shared memory was sized for stride 1
    na_stage_halo(sk, P, k, k_b, k_x, k_y, k_h, k_l, b, NA_KV_HEAD(h), D, dx, dy, tx, ty, hyw);
    __syncthreads();

    const long long slots = kx * ky;
    for (long long p = threadIdx.x; p < TX * TY * slots; p += blockDim.x) {
        const long long t = p % slots, qi = p / slots, qx = qi / TY, qy = qi % TY;
        if (qx >= tx.n || qy >= ty.n) continue;
        const long long gx = tx.q0 + qx, gy = ty.q0 + qy;
        const long long x = gx * dx + tx.g, y = gy * dy + ty.g;
        const long long wtx = t / ky, wty = t % ky;
        long long x0, x1, y0, y1;
        na_window(ax, x, x0, x1);
        na_window(ay, y, y0, y1);
        const long long out = NA_AT5(a, b, x, y, h, t);
        if (x0 + wtx >= x1 || y0 + wty >= y1) {
            na_store<TA, A>(attn, out, (A)fill);
            continue;
        }
        const T* qrow = sq + qi * P;
        const T* krow = sk + ((x0 + wtx - tx.h0) * hyw + (y0 + wty - ty.h0)) * P;
        A dot = 0;
        for (long long d = 0; d < D; ++d) dot += na_load(qrow, d) * na_load(krow, d);
        A logit = dot * (A)scale;
        if (rpb) logit += rpb[h * rpb_h + (x0 + wtx - gx + kx - 1) * rpb_x + (y0 + wty - gy + ky - 1) * rpb_y];
        na_store<TA, A>(attn, out, logit);
    }
}

// weighted sum over the window: out[b,i,h,d] = scale * sum_t attn[b,i,h,t] * v[b,key(i,t),h,d]
// (slots outside the window are skipped): na_av_fwd, from shared memory
// 3D asks for one block an SM at least: without it ptxas held the 3D path to 128 registers on sm_90 and spilled
// 8 bytes; 0 (no minimum) keeps the 1D/2D instantiations exactly as they were.
template <class TA, class T, int HD, int TX, int TY, int RANK = 2, int TZ = 1>
__global__ void __launch_bounds__(256, RANK == 3 ? 1 : 0) na_tiled_av(
    const TA* __restrict__ attn, NA_TENSOR(a), const T* __restrict__ v, NA_TENSOR(v), T* __restrict__ out,
    NA_TENSOR(o), double scale, NA_PROBLEM) {
    typedef typename na_acc<T>::type A;
    constexpr int P = na_tiled_pitch<T, HD>::value;
    NA_PROBLEM_AXES(RANK)
    long long b, h;
    na_tile_axis tx, ty;
    if (RANK == 3) {  // the halo one x plane at a time, each with the tile's weights of that plane
        na_tile_axis tz;
        if (!na_tile3_of_block<TX, TY, TZ>(ax, ay, az, H, b, h, tx, ty, tz)) return;  // uniform over the block
        constexpr int Q = TX * TY * TZ;
        constexpr int ITEMS = (Q * HD + 255) / 256;  // (query, d) outputs per thread, summed in registers
        const long long hzw = TZ + az.kernel - 1, kyz = ky * az.kernel;
        unsigned char* smem = na_dynamic_shared();
        long long* lo = reinterpret_cast<long long*>(smem);
        long long* hi = lo + TX + TY + TZ;
        TA* sw = reinterpret_cast<TA*>(smem + na_tile3_table_bytes<TX, TY, TZ>());  // [query, (ty, tz)]
        T* sv = reinterpret_cast<T*>(reinterpret_cast<unsigned char*>(sw) + (Q * kyz * (long long)sizeof(TA) + 15) / 16 * 16);
        na_tile3_windows<TX, TY, TZ>(ax, ay, az, tx, ty, tz, lo, hi);
        if (tx.h1 - tx.h0 > TX + kx - 1 || ty.h1 - ty.h0 > TY + ky - 1 || tz.h1 - tz.h0 > hzw) __trap();  // stride > 1
        A acc[ITEMS];
#pragma unroll
        for (int m = 0; m < ITEMS; ++m) acc[m] = 0;
        for (long long px = tx.h0; px < tx.h1; ++px) {
            __syncthreads();  // the previous plane is consumed (and the window tables are written)
            na_stage_plane(sv, P, v, v_b, v_x, v_y, v_z, v_h, v_l, b, NA_KV_HEAD(h), D, px * dx + tx.g, dy, az.dilation, ty, tz,
                           hzw);
            for (long long e = threadIdx.x; e < Q * kyz; e += blockDim.x) {  // weights of slots (px - x0, ty, tz)
                const long long qi = e / kyz, qx = qi / (TY * TZ);
                if (qx >= tx.n || px < lo[qx] || px >= hi[qx]) continue;  // never read
                const long long at = na_tile3_row<TY, TZ>(qi, tx, ty, tz, dx, dy, az.dilation, a_b, a_x, a_y, a_z,
                                                          a_h, b, h);
                sw[e] = attn[at + ((px - lo[qx]) * kyz + e % kyz) * a_l];
            }
            __syncthreads();
#pragma unroll
            for (int m = 0; m < ITEMS; ++m) {
                const long long p = threadIdx.x + m * 256;
                const long long d = p % D, qi = p / D;
                const long long qx = qi / (TY * TZ), qy = qi / TZ % TY, qz = qi % TZ;
                if (qi >= Q || qx >= tx.n || qy >= ty.n || qz >= tz.n || px < lo[qx] || px >= hi[qx]) continue;
                const long long y0 = lo[TX + qy], y1 = hi[TX + qy], z0 = lo[TX + TY + qz], z1 = hi[TX + TY + qz];
                const TA* wrow = sw + qi * kyz;
                A sum = acc[m];
                for (long long wy = y0; wy < y1; ++wy) {
                    const T* vrow = sv + ((wy - ty.h0) * hzw + (z0 - tz.h0)) * P + d;
                    for (long long wz = z0; wz < z1; ++wz)
                        sum += (A)na_load(wrow, (wy - y0) * az.kernel + (wz - z0)) * na_load(vrow, (wz - z0) * P);
                }
                acc[m] = sum;
            }
        }
#pragma unroll
        for (int m = 0; m < ITEMS; ++m) {
            const long long p = threadIdx.x + m * 256;
            const long long d = p % D, qi = p / D;
            const long long qx = qi / (TY * TZ), qy = qi / TZ % TY, qz = qi % TZ;
            if (qi >= Q || qx >= tx.n || qy >= ty.n || qz >= tz.n) continue;
            const long long x = (tx.q0 + qx) * dx + tx.g, y = (ty.q0 + qy) * dy + ty.g;
            na_store<T, A>(out, NA_AT6(o, b, x, y, (tz.q0 + qz) * az.dilation + tz.g, h, d), acc[m] * (A)scale);
        }
        return;
    }
    if (!na_tile_of_block<TX, TY>(ax, ay, H, b, h, tx, ty)) return;  // uniform over the block
    const long long hyw = TY + ky - 1;
    const long long slots = kx * ky;
    // weights first (TX*TY rows of `slots`, padded to 16 bytes), then the value halo
    TA* sa = reinterpret_cast<TA*>(na_dynamic_shared());
    const long long weight_bytes = ((long long)(TX * TY) * slots * (long long)sizeof(TA) + 15) / 16 * 16;
    T* sv = reinterpret_cast<T*>(na_dynamic_shared() + weight_bytes);

    // weights: row qx * TY + qy of `slots` elements
    na_copy_rows(sa, slots, attn, tx.n * TY, slots, a_l, na_rows_vectorizable(attn, slots, a_l, a_b, a_x, a_y, a_h),
                 [&](long long r) {
                     const long long qx = r / TY, qy = r % TY;
                     const long long y = qy < ty.n ? (ty.q0 + qy) * dy + ty.g : ty.g;
                     return na_row_ref{NA_AT5(a, b, (tx.q0 + qx) * dx + tx.g, y, h, 0), r};
                 });
    const long long hx = tx.h1 - tx.h0, hy = ty.h1 - ty.h0;
    if (hx > TX + kx - 1 || hy > hyw) __trap();  // a stride > 1 launch: shared memory was sized for stride 1
    na_stage_halo(sv, P, v, v_b, v_x, v_y, v_h, v_l, b, NA_KV_HEAD(h), D, dx, dy, tx, ty, hyw);
    __syncthreads();

    for (long long p = threadIdx.x; p < TX * TY * D; p += blockDim.x) {
        const long long d = p % D, qi = p / D, qx = qi / TY, qy = qi % TY;
        if (qx >= tx.n || qy >= ty.n) continue;
        const long long x = (tx.q0 + qx) * dx + tx.g, y = (ty.q0 + qy) * dy + ty.g;
        long long x0, x1, y0, y1;
        na_window(ax, x, x0, x1);
        na_window(ay, y, y0, y1);
        const TA* arow = sa + qi * slots;
        A sum = 0;
        for (long long wx = x0; wx < x1; ++wx) {
            const T* vrow = sv + ((wx - tx.h0) * hyw + (y0 - ty.h0)) * P + d;
            for (long long wy = y0; wy < y1; ++wy) {
                const long long t = (wx - x0) * ky + (wy - y0);
                sum += (A)na_load(arow, t) * na_load(vrow, (wy - y0) * P);
            }
        }
        na_store<T, A>(out, NA_AT5(o, b, x, y, h, d), sum * (A)scale);
    }
}
