// Tiled split-op forward kernels (the NAT paper's "tiled NA"), 1D and 2D.
//
// Same runtime arguments, layouts and results as na_qk_fwd / na_av_fwd in
// na_naive.cu (so launch plans are packed the same way): one block per
// (batch, head, query tile of TX x TY group coordinates inside ONE dilation
// group per axis). The block copies the tile's queries (qk) or weights (av)
// and the halo of keys (values) that the union of the tile's windows covers
// into dynamic shared memory once, as raw elements (16-byte vector loads
// where the layout allows: na_copy_rows in na_shared.cuh), then computes every
// (query, slot) / (query, d) pair from there. Window start and end never
// decrease with the query inside a group (DESIGN.md section 2), so the halo
// per axis is [start(first query), end(last query)): at most T + k - 1 wide
// for stride 1, the only stride the dispatcher launches these with.
//
// Accumulation order is the naive kernels' (d in order for qk, window slots
// in row-major order for av) and elements convert to the accumulator exactly
// as there, so tiled == naive bit for bit where both run the same compiler.
//
// Template parameters: element types, head-dim bucket HD (runtime D <= HD;
// it fixes the shared row pitch) and the query tile TX x TY (1D: TY = 1).
// Shared memory depends on the runtime kernel size; the launcher computes it
// with the same formulas (na_rtc/runtime/tiled.py, keep in step).
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
template <int TX, int TY>
__device__ __forceinline__ bool na_tile_of_block(const na_axis& ax, const na_axis& ay, long long H, long long& b,
                                                 long long& h, na_tile_axis& tx, na_tile_axis& ty) {
    const long long nty = na_tiles_per_axis(ay, TY), ntx = na_tiles_per_axis(ax, TX);
    long long n = blockIdx.x;
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
template <class T, class TA, int HD, int TX, int TY>
__global__ void __launch_bounds__(256, NA_TILED_QK_MIN_BLOCKS) na_tiled_qk(
    const T* __restrict__ q, NA_TENSOR(q), const T* __restrict__ k, NA_TENSOR(k),
    const typename na_acc<T>::type* __restrict__ rpb, NA_BIAS(rpb),
    TA* __restrict__ attn, NA_TENSOR(a), double scale, double fill, NA_PROBLEM) {
    typedef typename na_acc<T>::type A;
    constexpr int P = na_tiled_pitch<T, HD>::value;
    const na_axis ax = {X, kx, sx, dx, cx};
    const na_axis ay = {Y, ky, sy, dy, cy};
    long long b, h;
    na_tile_axis tx, ty;
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
    na_stage_halo(sk, P, k, k_b, k_x, k_y, k_h, k_l, b, h, D, dx, dy, tx, ty, hyw);
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
template <class TA, class T, int HD, int TX, int TY>
__global__ void __launch_bounds__(256) na_tiled_av(
    const TA* __restrict__ attn, NA_TENSOR(a), const T* __restrict__ v, NA_TENSOR(v), T* __restrict__ out,
    NA_TENSOR(o), double scale, NA_PROBLEM) {
    typedef typename na_acc<T>::type A;
    constexpr int P = na_tiled_pitch<T, HD>::value;
    const na_axis ax = {X, kx, sx, dx, cx};
    const na_axis ay = {Y, ky, sy, dy, cy};
    long long b, h;
    na_tile_axis tx, ty;
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
    na_stage_halo(sv, P, v, v_b, v_x, v_y, v_h, v_l, b, h, D, dx, dy, tx, ty, hyw);
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
