// Tiled backward kernels of the split ops: dK / dV through the inverse
// neighborhood, and a two-pass deterministic bias gradient.
//
// Layouts and the problem argument list are na_naive.cu's (int64 element
// strides, 1D runs as 2D with Y = 1, ky = 1). Tiles live inside one dilation
// group per axis, so a tile's keys (or queries) are dense in group coordinates.
//
// na_tiled_inv: one block per (b, h, key tile of TX x TY keys). The queries
// whose windows hold a key of the tile form one box (contiguous per axis; at
// most TX + 2kx - 2 by TY + 2ky - 2, docs/design/definition.md#monotone-windows-and-the-inverse-neighborhood; checked exhaustively
// for L < 60 with stride 1). The box's source
// rows are staged in dynamic shared memory TX query rows (x) at a time, each
// chunk the full box height (y), in the element type. Every key is owned by a
// group of NA_TINV_LANES(HD) threads, a lane holding dims lane, lane + lanes,
// ... in registers; it sums over its queries in increasing x then y order,
// exactly as na_inv_fwd does (bit-for-bit the same sums). Weights are read
// from global memory (each is used once; the lanes of a group read the same
// address). Deterministic, no atomics.
//
// Dynamic shared memory of na_tiled_inv (the host computes the same number):
//   NA_TINV_BOX_Y(...) ints of window starts of the box's y queries, padded to
//   16 bytes, then TX * NA_TINV_BOX_Y(...) * D elements of T.
//
// na_tiled_rpb_partial / na_tiled_rpb_reduce: pass 1, one block per
// (b, h, query tile of TX x TY queries in one dilation group), stages the
// tile's logit gradients in shared memory and writes one partial sum per bias
// entry (fixed order); pass 2 sums the partials of each (h, entry) over tiles
// in tile order. Deterministic, no atomics.
#include "na_types.cuh"
#include "na_window.cuh"
#include "na_shared.cuh"
#include "na_rpb_reduce.cuh"
#include "na_tile.cuh"
#include "na_args.cuh"

#define NA_TINV_THREADS 256
#define NA_TRPB_THREADS 256
// threads sharing one key: a warp, or the head-dim bucket when smaller
#define NA_TINV_LANES(HD) ((HD) < 32 ? (HD) : 32)

// box height (y) the shared memory is sized for: at most TY + 2ky - 2 queries,
// never more than the longest dilation group
__device__ __forceinline__ long long na_tinv_box_y(long long TY, long long Y, long long ky, long long dy) {
    return na_min(TY + 2 * ky - 2, (Y + dy - 1) / dy);
}

// At least 2 blocks an SM: a 128-register cap (without it ptxas picked 80
// registers and spilled for HD 128, TX 16). On sm_100 the 2D head-dim-64 tile
// with fp32 weights and fp32 or fp16 rows spills 24 to 28 bytes under that cap
// and takes 209 registers without it: one block an SM for those two there, the
// only way this source fits without spills (every other one keeps 2).
template <class T> struct na_tinv_is_bf16 { static constexpr bool value = false; };
template <> struct na_tinv_is_bf16<bf16_t> { static constexpr bool value = true; };

// The 3D path (RANK 3) at head dim 64 spills under the cap on every architecture (8 to 16 bytes on sm_100 and
// sm_120; 40 on sm_90 since its loop over the query heads of a key/value head; every key tile tried: its
// address state, not its accumulators, fills the registers): one block an SM.
template <class TA, class T, int HD, int TX, int TY, int RANK = 2>
__host__ __device__ constexpr int na_tinv_min_blocks() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1000
    return RANK == 3 ? (HD == 64 ? 1 : 2)
#if __CUDA_ARCH__ < 1200
           : sizeof(TA) == 4 && !na_tinv_is_bf16<T>::value && HD == 64 && TX == 4 && TY == 8 ? 1
#endif
           : 2;
#else
    return RANK == 3 && HD == 64 ? 1 : 2;
#endif
}

// A lane's share of a key's sums: dims lane, lane + LANES, ... in registers (DPL of them).
template <int DPL, int LANES, class A>
__device__ __forceinline__ void na_tinv_zero(A (&part)[DPL]) {
#pragma unroll
    for (int c = 0; c < DPL; ++c) part[c] = 0;
}

// part += wt * (the lane's dims of a staged source row)
template <int DPL, int LANES, class A, class T>
__device__ __forceinline__ void na_tinv_add(A (&part)[DPL], A wt, const T* row, int lane, long long D) {
#pragma unroll
    for (int c = 0; c < DPL; ++c) {
        const int d = lane + c * LANES;
        if (d < D) part[c] += wt * na_load(row, d);
    }
}

// out[at + d] = scale * the key's sums, for the lane's dims (element stride o_l)
template <int DPL, int LANES, class A, class T>
__device__ __forceinline__ void na_tinv_store(T* out, long long at, long long o_l, const A (&part)[DPL], A scale,
                                              int lane, long long D) {
#pragma unroll
    for (int c = 0; c < DPL; ++c) {
        const int d = lane + c * LANES;
        if (d < D) na_store<T, A>(out, at + d * o_l, part[c] * scale);
    }
}

// na_tiled_inv in 3D: a key tile of TX x TY x TZ keys. Its query box
// (TX + 2kx - 2) x (TY + 2ky - 2) x (TZ + 2kz - 2) is too large to stage
// whole, so it is staged TY y rows of one x plane at a time (each with the
// box's full z extent), planes in increasing x and rows in increasing y: a
// key still sums its queries in na_inv_fwd's order (x, then y, then z), so
// the results are bit for bit the straightforward kernel's.
// Dynamic shared memory: the window starts of the box's y and of its z
// queries (ints, each padded to 16 bytes), then TY * cap_z rows of D elements.
template <class TA, class T, int HD, int TX, int TY, int TZ, int LANES, int KPG, int DPL>
__device__ __forceinline__ void na_tiled_inv_3d(const TA* __restrict__ w, NA_TENSOR(w), const T* __restrict__ src,
                                                NA_TENSOR(s), T* __restrict__ out, NA_TENSOR(o), double scale,
                                                long long H, long long HPK, long long D, const na_axis& ax,
                                                const na_axis& ay, const na_axis& az) {
    typedef typename na_acc<T>::type A;
    constexpr int GROUPS = NA_TINV_THREADS / LANES;
    constexpr int KEYS = TX * TY * TZ;
    static_assert(TX <= 128 && TY <= 64 && TZ <= 64, "the prologue gives threads 0.., 128.. and 192.. the axes");
    __shared__ int key_first_x[TX], key_last_x[TX], key_first_y[TY], key_last_y[TY], key_first_z[TZ], key_last_z[TZ];

    const long long dx = ax.dilation, dy = ay.dilation, dz = az.dilation, ky = ay.kernel, kz = az.kernel;
    long long n = blockIdx.x;  // (b, h, tile x, tile y, tile z), z fastest; h: the key/value head
    const long long tile_z = n % na_tiles_per_axis(az, TZ); n /= na_tiles_per_axis(az, TZ);
    const long long tile_y = n % na_tiles_per_axis(ay, TY); n /= na_tiles_per_axis(ay, TY);
    const long long tile_x = n % na_tiles_per_axis(ax, TX); n /= na_tiles_per_axis(ax, TX);
    const long long h = n % (NA_KV_HEADS), b = n / (NA_KV_HEADS);
    const long long gx = tile_x % dx, gy = tile_y % dy, gz = tile_z % dz;
    const long long kx0 = (tile_x / dx) * TX, ky0 = (tile_y / dy) * TY, kz0 = (tile_z / dz) * TZ;
    const long long lgx = na_group_length(ax, gx), lgy = na_group_length(ay, gy), lgz = na_group_length(az, gz);
    if (kx0 >= lgx || ky0 >= lgy || kz0 >= lgz) return;  // an empty tile of a shorter group: the whole block leaves
    const long long nkx = na_min(TX, lgx - kx0), nky = na_min(TY, lgy - ky0), nkz = na_min(TZ, lgz - kz0);

    const int tid = threadIdx.x;
    na_axis_tables<true, TX, TY>(tid, ax, kx0, nkx, gx, ay, ky0, nky, gy, key_first_x, key_last_x, key_first_y,
                                 key_last_y);
    na_axis_table_z<true, TZ>(tid, az, kz0, nkz, gz, key_first_z, key_last_z);
    __syncthreads();
    // the query box: union of the keys' ranges (ranges never decrease with the key)
    const long long bx0 = key_first_x[0], bx1 = key_last_x[nkx - 1];
    const long long by0 = key_first_y[0], by1 = key_last_y[nky - 1], nby = by1 - by0;
    const long long bz0 = key_first_z[0], bz1 = key_last_z[nkz - 1], nbz = bz1 - bz0;
    const long long cap_y = na_tinv_box_y(TY, ay.length, ky, dy), cap_z = na_tinv_box_y(TZ, az.length, kz, dz);

    unsigned char* smem = na_dynamic_shared();
    int* start_y = (int*)smem;  // window starts of the box's y queries, then of its z queries
    int* start_z = (int*)(smem + ((cap_y * (long long)sizeof(int) + 15) / 16) * 16);
    T* rows = (T*)((unsigned char*)start_z + ((cap_z * (long long)sizeof(int) + 15) / 16) * 16);
    for (long long i = tid; i < nby + nbz; i += NA_TINV_THREADS) {
        long long s0, s1;
        if (i < nby) na_window(ay, (by0 + i) * dy + gy, s0, s1), start_y[i] = (int)s0;
        else na_window(az, (bz0 + i - nby) * dz + gz, s0, s1), start_z[i - nby] = (int)s0;
    }

    const bool vectorizable = na_rows_vectorizable(src, D, s_l, s_b, s_x, s_y, s_h) &&
                              na_rows_vectorizable(src, D, s_l, s_z, 0, 0, 0);
    const int lane = tid % LANES, group = tid / LANES;
    A acc[KPG][DPL];
#pragma unroll
    for (int m = 0; m < KPG; ++m) na_tinv_zero<DPL, LANES>(acc[m]);

    for (long long hq = h * HPK; hq < (h + 1) * HPK; ++hq) {  // the query heads reading this one, in order
        for (long long qx = bx0; qx < bx1; ++qx) {
            const long long x = qx * dx + gx;
            long long start_x, end_x;
            na_window(ax, x, start_x, end_x);
            for (long long c0 = by0; c0 < by1; c0 += TY) {
                const long long nrows = na_min(TY, by1 - c0);
                __syncthreads();  // the previous chunk is consumed (and the start tables are written)
                na_copy_rows(rows, D, src, nrows * nbz, D, s_l, vectorizable, [&](long long r) {
                    const long long y = (c0 + r / nbz) * dy + gy, z = (bz0 + r % nbz) * dz + gz;
                    return na_row_ref{NA_AT6(s, b, x, y, z, hq, 0), r};
                });
                __syncthreads();
#pragma unroll
                for (int m = 0; m < KPG; ++m) {
                    const int key = group + m * GROUPS;
                    const int kxi = key / (TY * TZ), kyi = key / TZ % TY, kzi = key % TZ;
                    const bool live = (KEYS % GROUPS == 0 || key < KEYS) && kxi < nkx && kyi < nky && kzi < nkz &&
                                      qx >= key_first_x[kxi < TX ? kxi : 0] && qx < key_last_x[kxi < TX ? kxi : 0];
                    const int kx_ = live ? kxi : 0, ky_ = live ? kyi : 0, kz_ = live ? kzi : 0;
                    const long long jx = kx0 + kx_, jy = ky0 + ky_, jz = kz0 + kz_;  // key group coordinates
                    const long long qy0 = na_max(key_first_y[ky_], c0);
                    const long long qy1 = live ? na_min(key_last_y[ky_], c0 + nrows) : 0;
                    const long long qz0 = key_first_z[kz_], qz1 = key_last_z[kz_];
                    const long long tbase = (jx - start_x) * ky + jy;
                    A part[DPL];
#pragma unroll
                    for (int c = 0; c < DPL; ++c) part[c] = acc[m][c];
                    for (long long qy = qy0; qy < qy1; ++qy) {
                        const long long y = qy * dy + gy;
                        const long long tz = (tbase - start_y[qy - by0]) * kz + jz;
                        const T* row = rows + (qy - c0) * nbz * D;
                        for (long long qz = qz0; qz < qz1; ++qz) {
                            const A wt = (A)na_load(w, NA_AT6(w, b, x, y, qz * dz + gz, hq, tz - start_z[qz - bz0]));
                            na_tinv_add<DPL, LANES>(part, wt, row + (qz - bz0) * D, lane, D);
                        }
                    }
#pragma unroll
                    for (int c = 0; c < DPL; ++c) acc[m][c] = part[c];
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < KPG; ++m) {
        const int key = group + m * GROUPS;
        if (KEYS % GROUPS != 0 && key >= KEYS) continue;
        const int kxi = key / (TY * TZ), kyi = key / TZ % TY, kzi = key % TZ;
        if (kxi >= nkx || kyi >= nky || kzi >= nkz) continue;
        const long long x = (kx0 + kxi) * dx + gx, y = (ky0 + kyi) * dy + gy, z = (kz0 + kzi) * dz + gz;
        na_tinv_store<DPL, LANES>(out, NA_AT6(o, b, x, y, z, h, 0), o_l, acc[m], (A)scale, lane, D);
    }
}

template <class TA, class T, int HD, int TX, int TY, int RANK = 2, int TZ = 1>
__global__ void __launch_bounds__(NA_TINV_THREADS, (na_tinv_min_blocks<TA, T, HD, TX, TY, RANK>()))
    na_tiled_inv(const TA* __restrict__ w, NA_TENSOR(w), const T* __restrict__ src, NA_TENSOR(s),
                 T* __restrict__ out, NA_TENSOR(o), double scale, NA_PROBLEM) {
    typedef typename na_acc<T>::type A;
    NA_PROBLEM_AXES(RANK)
    constexpr int LANES = NA_TINV_LANES(HD);
    constexpr int GROUPS = NA_TINV_THREADS / LANES;
    constexpr int KEYS = TX * TY * TZ;
    constexpr int KPG = (KEYS + GROUPS - 1) / GROUPS;  // keys per lane group
    constexpr int DPL = HD / LANES;                    // dims per lane
    static_assert(TX <= 128 && TY <= 128 && HD % LANES == 0, "the prologue gives threads 0.. and 128.. the axes");
    if (RANK == 3) {
        na_tiled_inv_3d<TA, T, HD, TX, TY, TZ, LANES, KPG, DPL>(w, w_b, w_x, w_y, w_z, w_h, w_l, src, s_b, s_x, s_y,
                                                                s_z, s_h, s_l, out, o_b, o_x, o_y, o_z, o_h, o_l,
                                                                scale, H, HPK, D, ax, ay, az);
        return;
    }

    __shared__ int key_first_x[TX], key_last_x[TX], key_first_y[TY], key_last_y[TY];
    __shared__ int start_x[TX];  // window starts of the chunk's query rows

    // block -> (b, h, tile x, tile y), h the key/value head; tiles per axis: dilation * ceil(ceil(L / d) / T)
    const long long ntx = dx * (((X + dx - 1) / dx + TX - 1) / TX);
    const long long nty = dy * (((Y + dy - 1) / dy + TY - 1) / TY);
    long long n = blockIdx.x;
    const long long tile_y = n % nty; n /= nty;
    const long long tile_x = n % ntx; n /= ntx;
    const long long h = n % (NA_KV_HEADS);
    const long long b = n / (NA_KV_HEADS);
    const long long gx = tile_x % dx, gy = tile_y % dy;
    const long long kx0 = (tile_x / dx) * TX, ky0 = (tile_y / dy) * TY;
    const long long lgx = na_group_length(ax, gx), lgy = na_group_length(ay, gy);
    if (kx0 >= lgx || ky0 >= lgy) return;  // an empty tile of a shorter group: the whole block leaves
    const long long nkx = na_min(TX, lgx - kx0), nky = na_min(TY, lgy - ky0);

    const int tid = threadIdx.x;
    na_axis_tables<true, TX, TY>(tid, ax, kx0, nkx, gx, ay, ky0, nky, gy, key_first_x, key_last_x, key_first_y,
                                 key_last_y);
    __syncthreads();
    // the query box: union of the keys' ranges (ranges never decrease with the key)
    const long long bx0 = key_first_x[0], bx1 = key_last_x[nkx - 1];
    const long long by0 = key_first_y[0], by1 = key_last_y[nky - 1];
    const long long nby = by1 - by0;
    const long long cap_y = na_tinv_box_y(TY, Y, ky, dy);

    unsigned char* smem = na_dynamic_shared();
    int* start_y = (int*)smem;  // window starts of the box's y queries
    T* rows = (T*)(smem + ((cap_y * (long long)sizeof(int) + 15) / 16) * 16);
    for (long long i = tid; i < nby; i += NA_TINV_THREADS) {
        long long s0, s1;
        na_window(ay, (by0 + i) * dy + gy, s0, s1);
        start_y[i] = (int)s0;
    }

    const bool vectorizable = na_rows_vectorizable(src, D, s_l, s_b, s_x, s_y, s_h);
    const int lane = tid % LANES, group = tid / LANES;
    A acc[KPG][DPL];
#pragma unroll
    for (int m = 0; m < KPG; ++m) na_tinv_zero<DPL, LANES>(acc[m]);

    for (long long hq = h * HPK; hq < (h + 1) * HPK; ++hq) {  // the query heads reading this one, in order
        for (long long c0 = bx0; c0 < bx1; c0 += TX) {
            const long long nrows = na_min(TX, bx1 - c0);
            __syncthreads();  // the previous chunk is consumed (and start_y is written)
            if (tid < nrows) {
                long long s0, s1;
                na_window(ax, (c0 + tid) * dx + gx, s0, s1);
                start_x[tid] = s0;
            }
            na_copy_rows(rows, D, src, nrows * nby, D, s_l, vectorizable, [&](long long r) {
                const long long x = (c0 + r / nby) * dx + gx, y = (by0 + r % nby) * dy + gy;
                return na_row_ref{NA_AT5(s, b, x, y, hq, 0), r};
            });
            __syncthreads();
#pragma unroll
            for (int m = 0; m < KPG; ++m) {
                const int key = group + m * GROUPS;
                const int kxi = key / TY, kyi = key % TY;
                const bool live = (KEYS % GROUPS == 0 || key < KEYS) && kxi < nkx && kyi < nky;
                const int kx_ = live ? kxi : 0, ky_ = live ? kyi : 0;
                const long long jx = kx0 + kx_, jy = ky0 + ky_;  // key group coordinates
                const long long qx0 = na_max(key_first_x[kx_], c0);
                const long long qx1 = live ? na_min(key_last_x[kx_], c0 + nrows) : 0;
                const long long qy0 = key_first_y[ky_], qy1 = key_last_y[ky_];
                A part[DPL];
#pragma unroll
                for (int c = 0; c < DPL; ++c) part[c] = acc[m][c];
                for (long long qx = qx0; qx < qx1; ++qx) {
                    const long long x = qx * dx + gx;
                    const long long tbase = (jx - start_x[qx - c0]) * ky + jy;
                    const T* row = rows + (qx - c0) * nby * D;
                    for (long long qy = qy0; qy < qy1; ++qy) {
                        const long long t = tbase - start_y[qy - by0];
                        const A wt = (A)na_load(w, NA_AT5(w, b, x, qy * dy + gy, hq, t));
                        na_tinv_add<DPL, LANES>(part, wt, row + (qy - by0) * D, lane, D);
                    }
                }
#pragma unroll
                for (int c = 0; c < DPL; ++c) acc[m][c] = part[c];
            }
        }
    }
#pragma unroll
    for (int m = 0; m < KPG; ++m) {
        const int key = group + m * GROUPS;
        if (KEYS % GROUPS != 0 && key >= KEYS) continue;
        const int kxi = key / TY, kyi = key % TY;
        if (kxi >= nkx || kyi >= nky) continue;
        const long long x = (kx0 + kxi) * dx + gx, y = (ky0 + kyi) * dy + gy;
        na_tinv_store<DPL, LANES>(out, NA_AT5(o, b, x, y, h, 0), o_l, acc[m], (A)scale, lane, D);
    }
}

// bias gradient, pass 1: partial[h, tile, entry] = sum over the tile's queries
// of dattn at the slot of relative offset `entry` (zero for an empty tile).
// Tiles per (b, h): ntx * nty (* ntz) as in na_tiled_inv,
// tile = ((b * ntx + tile_x) * nty + tile_y) * ntz + tile_z.
// Dynamic shared memory: TX * TY * TZ * slots elements of TA (the tile's rows),
// then NA_TRPB_THREADS floats for combining the parts of an entry. Below RANK 3
// z is the constant trivial axis (one tile, one query row, one offset), so the
// 1D/2D code is what it was without it.
template <class TA, int TX, int TY, int RANK = 2, int TZ = 1>
__global__ void __launch_bounds__(NA_TRPB_THREADS)
    na_tiled_rpb_partial(const TA* __restrict__ dattn, NA_TENSOR(a), float* __restrict__ partial, NA_PROBLEM) {
    typedef typename na_acc<TA>::type A;
    static_assert(TX <= 128 && TY <= 64 && TZ <= 64, "the prologue gives threads 0.., 128.. and 192.. the axes");
    NA_PROBLEM_AXES(RANK)
    __shared__ long long win_x0[TX], win_x1[TX], win_y0[TY], win_y1[TY], win_z0[TZ], win_z1[TZ];

    const long long ntx = dx * (((X + dx - 1) / dx + TX - 1) / TX);
    const long long nty = dy * (((Y + dy - 1) / dy + TY - 1) / TY);
    const long long ntz = na_tiles_per_axis(az, TZ);
    const long long tiles = B * ntx * nty * ntz;
    long long n = blockIdx.x;
    const long long tile = n % tiles;  // (b, tile_x, tile_y, tile_z)
    const long long h = n / tiles;
    const long long tile_z = tile % ntz, txy = tile / ntz;
    const long long tile_y = txy % nty, tile_x = (txy / nty) % ntx, b = txy / (nty * ntx);
    const long long gx = tile_x % dx, gy = tile_y % dy, gz = tile_z % az.dilation;
    const long long qx0 = (tile_x / dx) * TX, qy0 = (tile_y / dy) * TY, qz0 = (tile_z / az.dilation) * TZ;
    const long long nqx = na_max(0, na_min(TX, na_group_length(ax, gx) - qx0));
    const long long nqy = na_max(0, na_min(TY, na_group_length(ay, gy) - qy0));
    const long long nqz = na_max(0, na_min(TZ, na_group_length(az, gz) - qz0));
    const long long rw = 2 * ky - 1, rd = 2 * az.kernel - 1, entries = (2 * kx - 1) * rw * rd;
    const long long slots = kx * ky * az.kernel;
    float* out = partial + (h * tiles + tile) * entries;
    const int tid = threadIdx.x;
    if (nqx == 0 || nqy == 0 || nqz == 0) {
        for (long long e = tid; e < entries; e += NA_TRPB_THREADS) out[e] = 0.0f;
        return;
    }
    na_axis_tables<false, TX, TY>(tid, ax, qx0, nqx, gx, ay, qy0, nqy, gy, win_x0, win_x1, win_y0, win_y1);
    if (RANK == 3) na_axis_table_z<false, TZ>(tid, az, qz0, nqz, gz, win_z0, win_z1);
    unsigned char* smem = na_dynamic_shared();
    TA* rows = (TA*)smem;  // [query (x-major, then y, then z), slot]
    float* red = (float*)(smem + ((TX * TY * TZ * slots * (long long)sizeof(TA) + 15) / 16) * 16);
    const long long queries = nqx * nqy * nqz, elems = queries * slots;
    for (long long e = tid; e < elems; e += NA_TRPB_THREADS) {
        const long long t = e % slots, q = e / slots;
        const long long x = (qx0 + q / nqz / nqy) * dx + gx, y = (qy0 + q / nqz % nqy) * dy + gy;
        const long long z = (qz0 + q % nqz) * az.dilation + gz;
        rows[e] = dattn[NA_AT6(a, b, x, y, z, h, t)];
    }
    __syncthreads();
    // thread (part, entry): part p sums queries p, p + parts, ... (x-major order)
    const long long parts = entries >= NA_TRPB_THREADS ? 1 : NA_TRPB_THREADS / entries;
    for (long long e0 = tid; e0 < parts * entries; e0 += NA_TRPB_THREADS) {
        const long long e = e0 % entries, p = e0 / entries;
        const long long rz = e % rd, rx = e / rd / rw, ry = e / rd % rw;
        A sum = 0;
        for (long long q = p; q < queries; q += parts) {
            const long long i = q / nqz / nqy, j = q / nqz % nqy, l = q % nqz;
            const long long wx = qx0 + i + rx - (kx - 1), wy = qy0 + j + ry - (ky - 1);
            const long long wz = qz0 + l + rz - (az.kernel - 1);
            const long long z0 = RANK == 3 ? win_z0[l] : 0, z1 = RANK == 3 ? win_z1[l] : 1;
            if (wx >= win_x0[i] && wx < win_x1[i] && wy >= win_y0[j] && wy < win_y1[j] && wz >= z0 && wz < z1)
                sum += (A)na_load(rows, q * slots + ((wx - win_x0[i]) * ky + (wy - win_y0[j])) * az.kernel + (wz - z0));
        }
        if (parts == 1) out[e] = (float)sum;
        else red[p * entries + e] = (float)sum;
    }
    if (parts > 1) {
        __syncthreads();
        for (long long e = tid; e < entries; e += NA_TRPB_THREADS) {
            float sum = red[e];
            for (long long p = 1; p < parts; ++p) sum += red[p * entries + e];
            out[e] = sum;
        }
    }
}

// bias gradient, pass 2 (na_rpb_reduce.cuh)
__global__ void __launch_bounds__(NA_TRPB_THREADS)
    na_tiled_rpb_reduce(const float* __restrict__ partial, long long tiles, float* __restrict__ drpb, NA_BIAS(rpb),
                        long long H, long long kx, long long ky, long long kz) {
    na_rpb_reduce<NA_TRPB_THREADS>(partial, tiles, drpb, rpb_h, rpb_x, rpb_y, rpb_z, H, kx, ky, kz);
}
