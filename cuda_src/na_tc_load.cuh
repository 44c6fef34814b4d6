// Staging rows of global memory into the tensor-core kernels' shared memory:
// 16-byte cp.async pieces where the layout allows (element copies otherwise),
// rows of a key box or of a query tile, and the two-stage stream of K/V
// chunks that the forward and the dq kernel walk (the mma.sync forward's and
// dq kernel's run on into the extra key/value tokens: na_tc_kv_token_stream;
// the wgmma kernels stage theirs with na_wg_load_tokens).
#pragma once

#include "na_async.cuh"
#include "na_shared.cuh"
#include "na_tc_box.cuh"

// The block of every tensor-core kernel (the loads below split their work over
// it). Kernels declare __launch_bounds__(NA_TC_THREADS, 1): without the
// minimum of one block per SM ptxas capped some instantiations at 168
// registers and spilled.
#define NA_TC_WARPS 4
#define NA_TC_THREADS (32 * NA_TC_WARPS)

// Shared-memory layouts of staged rows: L::at(r, c) is the element offset of
// head dim c of row r, L::rows(n) the elements n rows take (n a multiple of 8),
// L::piece(e, pieces, r, c) which 16-byte piece (row r, piece c) copy e of a
// load moves (the order decides the bank conflicts of the copies).
//   na_rows_pitch<P>   row major with pitch P (ldmatrix reads rows: P = HD + 8
//                      shifts each row by 4 banks); consecutive copies along a row
//   na_rows_core<HD>   wgmma core matrices (na_wgmma.cuh), 16-bit elements: 8
//                      rows x 8 head dims as 64 contiguous elements, the HD / 8
//                      matrices of a group of 8 rows one after another; 8
//                      consecutive copies fill one matrix (128 contiguous bytes)
template <int P>
struct na_rows_pitch {
    static constexpr __host__ __device__ int rows(int n) { return n * P; }
    static __device__ __forceinline__ int at(int r, int c) { return r * P + c; }
    static __device__ __forceinline__ void piece(int e, int pieces, int& r, int& c) {
        r = e / pieces;
        c = e % pieces;
    }
};

template <int HD>
struct na_rows_core {
    static_assert(HD % 8 == 0, "whole core matrices of 8 head dims");
    static constexpr __host__ __device__ int rows(int n) { return n * HD; }
    static __device__ __forceinline__ int at(int r, int c) {
        return ((r >> 3) * (HD / 8) + (c >> 3)) * 64 + (r & 7) * 8 + (c & 7);
    }
    static __device__ __forceinline__ void piece(int e, int pieces, int& r, int& c) {
        r = (e & 7) + 8 * (e / (8 * pieces));
        c = (e >> 3) % pieces;
    }
};

// The loads below split their work over THREADS threads of the block (threadIdx.x < THREADS; the
// tensor-core kernels' NA_TC_THREADS unless a kernel has more warpgroups).
//
// Load ROWS rows of HD elements into shared rows of layout L: row(r, at) says
// whether row r exists and sets `at`, its element offset in src (element
// stride `step`); missing rows and head dims D..HD are zero. With `vec`
// (block-uniform, na_rows_vectorizable: rows contiguous and 16-byte aligned,
// D a multiple of 16 bytes) every 16-byte piece is one cp.async (zero-filling
// ones included), which lands at the next na_cp_async_wait_group: the caller
// commits and waits; the per-piece work is the row's offset and one copy.
// Otherwise element by element, landed on return (for strided head dims and
// unaligned rows).
template <class T, int HD, class L, int ROWS, int THREADS = NA_TC_THREADS, class Row>
__device__ __forceinline__ void na_tc_load_rows(T* dst, const T* src, long long step, bool vec, int D, Row row) {
    if (vec) {
        constexpr int V = 16 / (int)sizeof(T), PIECES = HD / V, N = ROWS * PIECES;
        static_assert(HD % V == 0 && (L::rows(1) * (int)sizeof(T)) % 16 == 0, "16-byte pieces of 16-byte aligned rows");
#pragma unroll
        for (int i = 0; i < (N + THREADS - 1) / THREADS; ++i) {
            const int e = (int)threadIdx.x + i * THREADS;
            if (N % THREADS == 0 || e < N) {
                int r, c;
                L::piece(e, PIECES, r, c);
                c *= V;
                long long at = 0;
                const bool ok = row(r, at) && c < D;
                na_cp_async_zfill_16(dst + L::at(r, c), ok ? src + at + c : src, ok ? 16 : 0);
            }
        }
        return;
    }
    for (int e = threadIdx.x; e < ROWS * HD; e += THREADS) {
        const int r = e / HD, c = e % HD;
        long long at = 0;
        const bool ok = row(r, at) && c < D;
        dst[L::at(r, c)] = ok ? src[at + c * step] : T();
    }
}

// Load box keys c0 .. c0 + KC - 1 of one tensor into KC shared rows (keys past the box: zero); the
// dkdv kernel walks its box of queries the same way. 1D boxes (TY == 1) with cp.async pieces take a
// strength-reduced path: copy e + THREADS of a load moves the same piece of the row
// THREADS / PIECES further on (both layouts' piece() orders; asserted below), and in 1D a box
// key's row is a constant stride away from the previous one, so each thread forms one address per
// chunk and steps it, instead of a 64-bit row offset per piece. Only where a thread copies at least 4
// pieces of a tensor per chunk (2 in blocks of more than one warpgroup): below that the saving is small,
// and the one-warpgroup backward kernels at head dim 128 (255 registers) spill with it, while the
// two-warpgroup wgmma dK/dV at head dim 128 spills without it.
template <class T, int HD, class L, int KC, int THREADS = NA_TC_THREADS, int TY, int RANK>
__device__ __forceinline__ void na_tc_load_box_keys(T* dst, const T* src, long long step, bool vec, int D,
                                                    const na_tc_box<TY, RANK>& box, const na_tc_box_rows& rows,
                                                    int c0) {
    constexpr int V = 16 / (int)sizeof(T), PIECES = HD / V, PASS = THREADS / PIECES;
    if constexpr (TY == 1 && THREADS % PIECES == 0 && KC % PASS == 0 && PASS % 8 == 0 &&
                  KC / PASS >= (THREADS > NA_TC_THREADS ? 2 : 4)) {
        if (vec) {
            int r0, c;
            L::piece((int)threadIdx.x, PIECES, r0, c);
            c *= V;
            const bool c_ok = c < D;
            // past the box's end a zero-filling copy gets the tensor's own address (never an address
            // outside it, whether or not a copy of 0 bytes touches its source)
            const T* from = src + rows.base + (long long)(c0 + r0) * rows.step_x + c;
            const long long pass_step = (long long)PASS * rows.step_x;
            T* to = dst + L::at(r0, c);
#pragma unroll
            for (int i = 0; i < KC / PASS; ++i) {
                const bool ok = c_ok && c0 + r0 + i * PASS < box.keys;
                na_cp_async_zfill_16(to + i * L::rows(PASS), ok ? from : src, ok ? 16 : 0);
                from += pass_step;
            }
            return;
        }
    }
    na_tc_load_rows<T, HD, L, KC, THREADS>(dst, src, step, vec, D, [&](int r, long long& at) {
        const int key = c0 + r;
        if (key >= box.keys) return false;
        int bx, by, bz;
        box.split(key, bx, by, bz);
        at = rows.at<RANK>(bx, by, bz);
        return true;
    });
}

// The K and V rows of a key box, streamed in chunks of KC box keys through
// STAGES shared-memory stages of 2 KC rows each (the K chunk, then the V
// chunk), as the forward and the dq kernel walk the box: load(stages, chunk)
// issues chunk `chunk` into stage chunk % STAGES as one cp.async group. Rows
// in layout L. With STAGES 3 the stream runs one chunk further ahead: chunk
// c + 1 has landed while chunk c is computed, for a forward that multiplies
// the next chunk's Q K^T during this chunk's softmax (na_fused_wg.cu).
template <class T, int HD, class L, int KC, int TY, int THREADS = NA_TC_THREADS, int STAGES = 2, int RANK = 2>
struct na_tc_kv_stream {
    static_assert(STAGES == 2 || STAGES == 3, "two or three stages");
    const T* k;
    const T* v;
    long long k_step, v_step;  // element strides of the head dim
    bool k_vec, v_vec;
    int k_len, v_len;  // head dims of K and of V (the rest of a row up to HD is zero)
    na_tc_box_rows k_at, v_at;

    // chunk `chunk`'s stage: its K rows, then its V rows from L::rows(KC) on
    __device__ __forceinline__ T* stage_of(T* stages, int chunk) const {
        return stages + (STAGES == 2 ? chunk & 1 : chunk % STAGES) * L::rows(2 * KC);
    }

    __device__ __forceinline__ void load(T* stages, const na_tc_box<TY, RANK>& box, int chunk) const {
        T* stage = stage_of(stages, chunk);
        na_tc_load_box_keys<T, HD, L, KC, THREADS>(stage, k, k_step, k_vec, k_len, box, k_at, chunk * KC);
        na_tc_load_box_keys<T, HD, L, KC, THREADS>(stage + L::rows(KC), v, v_step, v_vec, v_len, box, v_at,
                                                   chunk * KC);
        na_cp_async_commit();
    }

    // the top of the iteration on chunk `chunk` of `chunks` (chunks 0 .. STAGES - 2 loaded before the
    // loop): wait for every chunk issued (the newest is chunk + STAGES - 2) and make it visible to the
    // block, then issue chunk + STAGES - 1 into the stage chunk - 1 held (every warp is past chunk - 1 at
    // this barrier, so that stage is free), which lands while the block computes this one: one barrier a
    // chunk. Returns this chunk's stage. ASYNC_PROXY: the rows are read by wgmma (the async proxy), so
    // each thread fences its landed copies before the barrier (na_wgmma.cuh), and the caller waits for
    // its wgmma on chunk - 1 before the next arrive.
    template <bool ASYNC_PROXY = false>
    __device__ __forceinline__ const T* arrive(T* stages, const na_tc_box<TY, RANK>& box, int chunk,
                                              int chunks) const {
        na_cp_async_wait_group<0>();
        if (ASYNC_PROXY) na_fence_proxy_async();
        __syncthreads();
        if (chunk + STAGES - 1 < chunks) load(stages, box, chunk + STAGES - 1);
        return stage_of(stages, chunk);
    }
};

// The extra key/value tokens of one (b, key/value head) (NA_EXTRA), staged as the keys of a box of `count` keys
// (the box's, with only the key count changed): token n, split as a box key n = (bx hy + by) hz + bz, sits at
// k_at.at(bx, by, bz) = n token strides after the (b, head)'s token 0. The tensors (from token 0 on), their
// head-dim strides and whether they stage in 16-byte pieces. Without tokens the pointers may be null (never
// read).
template <class T>
struct na_tc_token_rows {
    const T* k;
    const T* v;
    long long k_step, v_step;
    na_tc_box_rows k_at, v_at;
    int count;
    bool k_vec, v_vec;
};

// the tokens of (b, key/value head kvh) of NA_EXTRA's xk / xv ([b, token, head, head dim]: strides *_b, *_n,
// *_h, *_l; NX tokens) with head dims D and DV, as keys of `box` (its hy and hz)
template <class T, int TY, int RANK>
__device__ __forceinline__ na_tc_token_rows<T> na_tc_token_rows_of(
    const T* xk, long long xk_b, long long xk_n, long long xk_h, long long xk_l, const T* xv, long long xv_b,
    long long xv_n, long long xv_h, long long xv_l, long long NX, long long D, long long DV, long long b,
    long long kvh, const na_tc_box<TY, RANK>& box) {
    if (NX == 0) return {xk, xv, 0, 0, {}, {}, 0, false, false};  // null pointers stay null
    const long long hz = RANK == 3 ? box.hz : 1, hyz = (TY == 1 ? 1 : box.hy) * hz;
    return {xk + (b * xk_b + kvh * xk_h),
            xv + (b * xv_b + kvh * xv_h),
            xk_l,
            xv_l,
            {0, hyz * xk_n, hz * xk_n, xk_n},
            {0, hyz * xv_n, hz * xv_n, xv_n},
            (int)NX,
            na_rows_vectorizable(xk, D, xk_l, xk_b, xk_n, xk_h, 0),
            na_rows_vectorizable(xv, DV, xv_l, xv_b, xv_n, xv_h, 0)};
}

// The K/V stream of na_tc_kv_stream followed by the extra tokens as one more key range: chunks 0 ..
// box_chunks - 1 are the box's, chunk box_chunks + i holds tokens KC i .. KC (i + 1) - 1 (rows past the last
// token zero, like rows past the box), so that the pipeline runs on across the boundary and a forward or a dq
// kernel walks both ranges in one loop of chunks() chunks (without tokens: the box's alone; chunk 0 is always the box's,
// which has a key at least). The tokens' addresses (`tokens`, block-uniform) sit in shared memory and are read
// where a chunk of tokens is issued (the kernel writes them before a barrier that precedes the first such
// load): held in registers through the chunk loop, they and the values derived from them took the heaviest
// forwards past 255 registers (spills), and the others 10 to 20 more.
template <class T, int HD, class L, int KC, int TY, int THREADS = NA_TC_THREADS, int STAGES = 2, int RANK = 2>
struct na_tc_kv_token_stream : na_tc_kv_stream<T, HD, L, KC, TY, THREADS, STAGES, RANK> {
    const na_tc_token_rows<T>* tokens;
    int box_chunks;

    // the chunks of both ranges (count: the tokens')
    __device__ __forceinline__ int chunks(int count) const { return box_chunks + (count + KC - 1) / KC; }

    __device__ __forceinline__ void load(T* stages, const na_tc_box<TY, RANK>& box, int chunk) const {
        T* stage = this->stage_of(stages, chunk);
        if (chunk < box_chunks) {
            na_tc_load_box_keys<T, HD, L, KC, THREADS>(stage, this->k, this->k_step, this->k_vec, this->k_len, box,
                                                       this->k_at, chunk * KC);
            na_tc_load_box_keys<T, HD, L, KC, THREADS>(stage + L::rows(KC), this->v, this->v_step, this->v_vec,
                                                       this->v_len, box, this->v_at, chunk * KC);
        } else {  // the tokens as keys of a box of x.count keys (na_tc_token_rows)
            const na_tc_token_rows<T>& x = *tokens;
            na_tc_box<TY, RANK> range = box;
            range.keys = x.count;
            const int c0 = (chunk - box_chunks) * KC;
            na_tc_load_box_keys<T, HD, L, KC, THREADS>(stage, x.k, x.k_step, x.k_vec, this->k_len, range, x.k_at, c0);
            na_tc_load_box_keys<T, HD, L, KC, THREADS>(stage + L::rows(KC), x.v, x.v_step, x.v_vec, this->v_len, range,
                                                       x.v_at, c0);
        }
        na_cp_async_commit();
    }

    // na_tc_kv_stream::arrive over both ranges (`chunks`: chunks()), issuing the next chunk of either
    template <bool ASYNC_PROXY = false>
    __device__ __forceinline__ const T* arrive(T* stages, const na_tc_box<TY, RANK>& box, int chunk,
                                              int chunks) const {
        na_cp_async_wait_group<0>();
        if (ASYNC_PROXY) na_fence_proxy_async();
        __syncthreads();
        if (chunk + STAGES - 1 < chunks) load(stages, box, chunk + STAGES - 1);
        return this->stage_of(stages, chunk);
    }
};

// whether rows of a [b, x, y, z, h, head dim] tensor (element strides s_*) can be staged in 16-byte pieces
// (na_rows_vectorizable, with the z stride too; below rank 3 it is 0)
template <class T>
__device__ __forceinline__ bool na_tc_rows_vectorizable(const T* src, long long D, long long s_l, long long s_b,
                                                        long long s_x, long long s_y, long long s_h,
                                                        long long s_z = 0) {
    return na_rows_vectorizable(src, D, s_l, s_b, s_x, s_y, s_h) && s_z % (16 / (long long)sizeof(T)) == 0;
}

// the stream of one (b, h)'s K and V (strides b, x, y, h, head dim; head dims D and DV) over the key box of
// tiles tx, ty (and, in 3D, tz: dilation dz, the tensors' z strides k_z, v_z)
template <class T, int HD, class L, int KC, int TY, int THREADS = NA_TC_THREADS, int STAGES = 2, int RANK = 2>
__device__ __forceinline__ na_tc_kv_stream<T, HD, L, KC, TY, THREADS, STAGES, RANK> na_tc_kv_stream_of(
    const T* k, const long long (&ks)[5], const T* v, const long long (&vs)[5], long long D, long long DV,
    const na_tile_axis& tx, const na_tile_axis& ty, long long dx, long long dy, long long b, long long h,
    const na_tile_axis& tz = NA_TC_NO_Z, long long dz = 1, long long k_z = 0, long long v_z = 0) {
    return {k,
            v,
            ks[4],
            vs[4],
            na_tc_rows_vectorizable(k, D, ks[4], ks[0], ks[1], ks[2], ks[3], k_z),
            na_tc_rows_vectorizable(v, DV, vs[4], vs[0], vs[1], vs[2], vs[3], v_z),
            (int)D,
            (int)DV,
            na_tc_box_rows_of(tx.h0, ty.h0, tx.g, ty.g, dx, dy, b, h, ks[0], ks[1], ks[2], ks[3], tz.h0, tz.g, dz,
                              k_z),
            na_tc_box_rows_of(tx.h0, ty.h0, tx.g, ty.g, dx, dy, b, h, vs[0], vs[1], vs[2], vs[3], tz.h0, tz.g, dz,
                              v_z)};
}

// load the NROWS = TX * TY * TZ rows of a tile of one (b, h) (row (qx * TY + qy) * TZ + qz: group
// coordinates tx.q0 + qx, ty.q0 + qy, tz.q0 + qz; rows of missing queries zero); below rank 3 TZ is 1 and
// the z arguments keep their defaults
template <class T, int HD, class L, int TX, int TY, int THREADS = NA_TC_THREADS, int TZ = 1>
__device__ __forceinline__ void na_tc_load_tile(T* dst, const T* src, long long s_b, long long s_x, long long s_y,
                                                long long s_h, long long s_l, long long b, long long h, int D,
                                                long long dx, long long dy, const na_tile_axis& tx,
                                                const na_tile_axis& ty, const na_tile_axis& tz = NA_TC_NO_Z,
                                                long long dz = 1, long long s_z = 0) {
    const bool vec = na_tc_rows_vectorizable(src, D, s_l, s_b, s_x, s_y, s_h, s_z);
    const na_tc_box_rows rows = na_tc_box_rows_of(tx.q0, ty.q0, tx.g, ty.g, dx, dy, b, h, s_b, s_x, s_y, s_h, tz.q0,
                                                  tz.g, dz, s_z);
    na_tc_load_rows<T, HD, L, TX * TY * TZ, THREADS>(dst, src, s_l, vec, D, [&](int r, long long& at) {
        const int qx = r / (TY * TZ), qy = r / TZ % TY, qz = r % TZ;
        at = rows.at<(TZ == 1 ? 2 : 3)>(qx, qy, qz);
        return qx < tx.n && qy < ty.n && (TZ == 1 || qz < tz.n);
    });
}

// v, opaque to the compiler's code motion (an empty asm on the device; the emulator's build keeps it as is)
template <class V>
__device__ __forceinline__ V na_wg_opaque(V v) {
    static_assert(sizeof(V) == 8, "64-bit values (pointers, offsets)");
#ifdef __CUDA_ARCH__
    asm volatile("" : "+l"(v));
#endif
    return v;
}

// The wgmma kernels' token chunks (the forward's, na_fused_wg.cu, and the dq kernel's, na_fused_wg_bwd.cu).
// Token rows t0 .. t0 + KC - 1 of one tensor of the extra tokens (NA_EXTRA: row n at src + base + n * row,
// head dims `step` apart, n < NX) into KC shared rows of layout L; rows past NX and head dims past len zero. As
// na_tc_load_rows (16-byte cp.async pieces with `vec`, landed at the caller's wait; elements otherwise), one piece
// an iteration without unrolling: the token chunks are few, and unrolled loads held registers in the chunk loop.
template <class T, int HD, class L, int KC, int THREADS>
__device__ __forceinline__ void na_wg_load_tokens(T* dst, const T* src, long long base, long long row,
                                                  long long step, bool vec, int len, long long t0, long long NX) {
    if (vec) {
        constexpr int V = 16 / (int)sizeof(T), PIECES = HD / V;
#pragma unroll 1
        for (int e = (int)threadIdx.x; e < KC * PIECES; e += THREADS) {
            int r, c;
            L::piece(e, PIECES, r, c);
            c *= V;
            const bool ok = t0 + r < NX && c < len;
            na_cp_async_zfill_16(dst + L::at(r, c), ok ? src + base + (t0 + r) * row + c : src, ok ? 16 : 0);
        }
        return;
    }
#pragma unroll 1
    for (int e = (int)threadIdx.x; e < KC * HD; e += THREADS) {
        const int r = e / HD, c = e % HD;
        dst[L::at(r, c)] = t0 + r < NX && c < len ? src[base + (t0 + r) * row + c * step] : T();
    }
}

// The wgmma kernels' loader of token chunk c (>= box_chunks; NA_EXTRA's keys and values of key/value head
// NA_KV_HEAD(h)) into its stage of the stream `kv`, as one cp.async group: a lambda `name(c)` in a kernel that
// takes NA_EXTRA(T) and NA_PROBLEM. Its offsets and checks come from opaque copies (na_wg_opaque), so that what
// is computed from them stays inside the lambda: hoisted out of the chunk loop they held registers in every
// chunk.
#define NA_WG_TOKEN_LOADER(name, T, HD, L, KC, THREADS, kv, stages, box_chunks, d_len)                         \
    const auto name = [&](int c) {                                                                             \
        T* stage = kv.stage_of(stages, c);                                                                     \
        const long long bb = na_wg_opaque(b), kvh = na_wg_opaque(NA_KV_HEAD(h));                               \
        const T *xkp = na_wg_opaque(xk), *xvp = na_wg_opaque(xv);                                              \
        const long long t0 = (long long)(c - (box_chunks)) * (KC);                                             \
        na_wg_load_tokens<T, HD, L, KC, THREADS>(stage, xkp, bb * xk_b + kvh * xk_h, xk_n, xk_l,                \
                                                 na_rows_vectorizable(xkp, D, xk_l, xk_b, xk_n, xk_h, 0),      \
                                                 d_len, t0, NX);                                               \
        na_wg_load_tokens<T, HD, L, KC, THREADS>(stage + L::rows(KC), xvp, bb * xv_b + kvh * xv_h, xv_n,       \
                                                 xv_l, na_rows_vectorizable(xvp, DV, xv_l, xv_b, xv_n, xv_h, 0), \
                                                 (int)DV, t0, NX);                                             \
        na_cp_async_commit();                                                                                  \
    };

