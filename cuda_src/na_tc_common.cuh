// Pieces shared by the tensor-core fused kernels (na_fused_tc.cu forward,
// na_fused_tc_bwd.cu backward): block shape and the staging of rows into
// shared memory with exact zeros for padding.
#pragma once

#include "na_shared.cuh"
#include "na_tile.cuh"

#define NA_TC_WARPS 4
#define NA_TC_THREADS (32 * NA_TC_WARPS)
#define NA_TC_FULL 0xffffffffu

// stage `rows` rows of D elements into shared rows of pitch P, zero-filling
// head dims D..HD and the rows up to `capacity` (disjoint elements: no barrier
// needed between the two passes); ref(r) gives row r's global offset
template <class T, int HD, int P, class Ref>
__device__ __forceinline__ void na_tc_stage(T* dst, const T* src, long long rows, long long capacity, long long D,
                                            long long step, bool vec, Ref ref) {
    na_copy_rows(dst, P, src, rows, D, step, vec, [&](long long r) { return na_row_ref{ref(r), r}; });
    const T zero = T();
    const int pad = HD - (int)D, full = (int)rows;
    for (int e = threadIdx.x; e < full * pad; e += NA_TC_THREADS) dst[(e / pad) * P + D + e % pad] = zero;
    for (int e = threadIdx.x; e < ((int)capacity - full) * HD; e += NA_TC_THREADS)
        dst[(full + e / HD) * P + e % HD] = zero;
}


// stage a tile of NROWS = TX * TY rows of one (b, h) (row qx * TY + qy: group
// coordinates tx.q0 + qx, ty.q0 + qy) into rows of pitch P: the tile's valid
// rows from global memory, every other row and the head dims past D zero
template <class T, int HD, int P, int TX, int TY>
__device__ __forceinline__ void na_tc_stage_tile(T* dst, const T* src, long long s_b, long long s_x, long long s_y,
                                                 long long s_h, long long s_l, long long b, long long h, long long D,
                                                 long long dx, long long dy, const na_tile_axis& tx,
                                                 const na_tile_axis& ty) {
    const long long nqy = ty.n;
    na_copy_rows(dst, P, src, tx.n * nqy, D, s_l, na_rows_vectorizable(src, D, s_l, s_b, s_x, s_y, s_h),
                 [&](long long r) {
                     const long long qx = r / nqy, qy = r % nqy;
                     return na_row_ref{b * s_b + ((tx.q0 + qx) * dx + tx.g) * s_x + ((ty.q0 + qy) * dy + ty.g) * s_y +
                                           h * s_h,
                                       qx * TY + qy};
                 });
    const T zero = T();
    for (int e = threadIdx.x; e < TX * TY * HD; e += NA_TC_THREADS) {
        const int r = e / HD, c = e % HD;
        if (r / TY >= tx.n || r % TY >= nqy || c >= D) dst[r * P + c] = zero;
    }
}
