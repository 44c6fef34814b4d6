// The fused backward on Hopper's warpgroup tensor cores (wgmma, sm_90a; fp16 /
// bf16): the dq kernel (which also streams the extra key/value tokens after
// its key box), then the dK/dV kernel. They keep the steps of the
// mma.sync backward (na_fused_tc_bwd.cu), with the products as warpgroup
// products, and share the forward's block decode, staging and core-matrix
// layouts (na_fused_wg.cu, na_tc_load.cuh); every kernel has blocks of WG
// warpgroups, 64 queries or keys each (na_rtc/runtime/fused_wg.py's WARPGROUPS).
#include "na_types.cuh"
#include "na_window.cuh"
#include "na_shared.cuh"
#include "na_tile.cuh"
#include "na_wgmma.cuh"
#include "na_tc_softmax.cuh"
#include "na_tc_dq.cuh"
#include "na_tc_dkdv.cuh"
#include "na_args.cuh"

// dq of the fused backward on wgmma: same arguments, layouts and results as
// na_fused_tc_bwd_dq (na_fused_tc_bwd.cu), whose steps it keeps, with the
// products as warpgroup products. One block of WG warpgroups per (b, h,
// query tile of 64 WG; see WG below); Q and dOut fragments from registers; K
// and V chunks of KC keys staged as core matrices in two stages (in the rows
// the Q and dOut tiles held), chunk c + 1 loading during chunk c. Per chunk:
//   S = Q K^T, dP = dOut V^T   HD / 16 wgmma m64nKCk16 each, K and V K-major;
//   ds = p (dp - delta)         p from the logit and the lse (na_tc_dq_ds),
//                               0 outside each query's window;
//   dQ += ds K                  KC / 16 wgmma m64nHDk16, ds from registers, K
//                               MN-major (as V in the forward's P V);
// with a bias, ds also goes to shared memory for the per-tile partials.
// Extra tokens (NA_EXTRA, as in the wgmma forward na_fused_wg.cu): streamed
// after the box as one more key range: chunk c at or past the box's chunk
// count holds token rows (c - box chunks) KC .. + KC - 1 of key/value head
// NA_KV_HEAD(h), staged by the same two stages (rows past NX zero); every
// warpgroup with a valid query takes every token chunk, whose ds is
// p (dp - delta) with p = exp(scale q.k - lse) (no bias, no window test; 0
// past NX), and dQ += ds K as for the box. The bias partials are the box's
// keys' alone. Without tokens (NX 0) the chunks are the box's.
// Every warp multiplies every key of the chunk (see the forward): a NaN in a
// K or V row can reach every query of the tile. QS (operands in shared
// memory): S and dP in the SS form, Q and dOut read as core matrices from
// shared memory all along instead of 2 HD / 4 fragment registers, for the
// instantiations that would spill otherwise (2D and 3D at head dim 128). WG 2 (as
// in the forward: 128 queries in 1D, a 16 x 8 tile in 2D, 4 x 8 x 4 in 3D): both warpgroups
// read every staged K/V chunk, each skipping the chunks outside its queries'
// windows (its ds rows zero there for the bias partials). Dynamic shared memory
// (na_rtc/runtime/fused_wg.py mirrors it): without QS, 2 x 64 WG rows of
// HD + 8 (Q, dOut; then the two stages, 4 KC HD elements); with QS, 2 x 64
// rows of HD (Q, dOut as core matrices) and then the stages; then 64 WG x
// (KC + 1) floats of ds, one float per bias entry.
template <class T, int HD, int TX, int TY, int KC, bool QS, int WG, int RANK = 2, int TZ = 1>
__global__ void __launch_bounds__(NA_TC_THREADS * WG, 1) na_fused_wg_bwd_dq(
    const T* __restrict__ q, NA_TENSOR(q), const T* __restrict__ k, NA_TENSOR(k), const T* __restrict__ v,
    NA_TENSOR(v), const T* __restrict__ g, NA_TENSOR(g), const float* __restrict__ lse, NA_ROWS(l), const float* __restrict__ delta, NA_ROWS(e), const float* __restrict__ rpb, NA_BIAS(rpb),
    NA_EXTRA(T), T* __restrict__ dq, NA_TENSOR(o), float* __restrict__ rpb_partial, double scale, NA_PROBLEM) {
    constexpr int NQ = TX * TY * TZ;
    constexpr int THREADS = NA_TC_THREADS * WG;
    constexpr int P = HD + 8;
    constexpr int KSTEPS = HD / 16, NT = KC / 8, DT = HD / 8, KS = KC + 1;
    using L = na_rows_core<HD>;
    constexpr unsigned ROW_GROUP = 16 * HD;  // bytes of 8 staged rows
    static_assert(sizeof(T) == 2 && NQ == 64 * WG && NA_TC_THREADS == 128, "64 rows a warpgroup, 16-bit elements");
    static_assert(WG == 1 || WG == 2, "one or two warpgroups");
    static_assert((HD == 32 || HD == 64 || HD == 128) && (KC == 32 || KC == 64 || KC == 128), "wgmma N built");
    static_assert(QS || L::rows(4 * KC) <= 2 * NQ * P, "the two stages fit in the rows of the Q and dOut tiles");
    static_assert(RANK == 3 || TZ == 1, "a z extent in 3D only");
    // elements before the ds floats: the Q and dOut tiles (pitch P; with QS core matrices, then the stages)
    constexpr int TILE_ELEMENTS = QS ? 2 * L::rows(NQ) + L::rows(4 * KC) : 2 * NQ * P;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gq = lane >> 2, t = lane & 3;
    NA_TC_DQ_DECODE_BLOCK_RANK(TX, TY, TZ, RANK, THREADS)
    const na_tc_box<TY, RANK> box = na_tc_box_of<TY, RANK>(tx, ty, tz);
    const int d_len = (int)D;
    // the z strides, constant 0 below rank 3 (as az.dilation is 1 there), so that z terms fold away
    const long long q_z3 = RANK == 3 ? q_z : 0, k_z3 = RANK == 3 ? k_z : 0, v_z3 = RANK == 3 ? v_z : 0;
    const long long g_z3 = RANK == 3 ? g_z : 0;
    // WG > 1: the chunks [lo, hi) holding keys of each warpgroup's queries (na_tc_warpgroup_chunks; x-planes of
    // TY TZ queries in 3D); in shared memory (HD 128 is at 252 registers), visible from the first chunk's
    // barrier on
    __shared__ int wg_chunks[WG][2];
    if (WG > 1 && tid < WG)
        na_tc_warpgroup_chunks<TY * TZ, KC>(ax, tx, dx, box.hy * box.hz, tid, wg_chunks[tid][0], wg_chunks[tid][1]);

    unsigned char* smem = na_dynamic_shared();
    T* tiles_q_g = reinterpret_cast<T*>(smem);  // Q then dOut tiles
    T* stages = QS ? tiles_q_g + 2 * L::rows(NQ) : tiles_q_g;  // without QS, the stages reuse the tiles' rows
    float* sds = reinterpret_cast<float*>(smem + (TILE_ELEMENTS * (int)sizeof(T) + 15) / 16 * 16);
    float* racc = sds + NQ * KS;
    const unsigned smem_address = na_shared_address(smem);
    // QS: this warpgroup's 64 rows of the Q and dOut tiles (the A of S and dP)
    const unsigned q_address = smem_address + (unsigned)(L::rows(64 * (warp / 4)) * (int)sizeof(T));
    const unsigned g_address = q_address + (unsigned)(L::rows(NQ) * (int)sizeof(T));

    unsigned qf[KSTEPS][4], gf[KSTEPS][4];  // without QS
    if constexpr (QS) {  // the tiles' group lands with chunk 0 (the first wait); the stages are apart
        na_tc_load_tile<T, HD, L, TX, TY, THREADS, TZ>(tiles_q_g, q, q_b, q_x, q_y, q_h, q_l, b, h, d_len, dx, dy, tx,
                                                       ty, tz, az.dilation, q_z3);
        na_tc_load_tile<T, HD, L, TX, TY, THREADS, TZ>(tiles_q_g + L::rows(NQ), g, g_b, g_x, g_y, g_h, g_l, b, h,
                                                       (int)DV, dx, dy, tx, ty, tz, az.dilation, g_z3);
        na_cp_async_commit();
        for (long long i = tid; i < (partial_out ? entries : 0); i += THREADS) racc[i] = 0.0f;
    } else {
        na_tc_dq_fragments<T, HD, P, TX, TY, THREADS, TZ>(qf, gf, tiles_q_g, q, {q_b, q_x, q_y, q_h, q_l}, g,
                                                          {g_b, g_x, g_y, g_h, g_l}, racc, partial_out ? entries : 0,
                                                          b, h, d_len, (int)DV, dx, dy, tx, ty, tz, az.dilation, q_z3,
                                                          g_z3);
    }

    const na_tc_rows rows =
        na_tc_query_rows<TY, TZ, RANK>(16 * warp, lane, ax, ay, tx, ty, h, rpb_h, rpb_x, rpb_y, az, tz, rpb_z);
    // the common-window shortcuts cost 4 registers (6 in 3D): HD 128 without QS (at 252) would spill, and in 3D
    // with QS too (8 bytes with one warpgroup); an empty window never holds a tile
    const na_tc_warp_window common = HD < 128 || (QS && RANK < 3) ? na_tc_common_window<1, RANK>(&rows)
                                                                  : na_tc_warp_window{1, 0, 1, 0, 1, 0};
    // the box's chunks, then the extra tokens' (NA_EXTRA; as in the forward): one stream, so that the
    // pipeline runs on across the boundary; chunk c >= box_chunks holds tokens (c - box_chunks) KC .. + KC - 1;
    // an empty box (dense attention) is one chunk of zero rows outside every window, as in the forward
    const int box_chunks = box.keys > 0 ? (box.keys + KC - 1) / KC : 1;
    const int chunks = box_chunks + (int)((NX + KC - 1) / KC);
    float row_lse[2], row_delta[2];
    na_tc_row_stats<TY, TZ, RANK>(row_lse, row_delta, rows, 16 * warp, lane, lse, {l_b, l_x, l_y, l_h}, delta,
                                  {e_b, e_x, e_y, e_h}, tx, ty, dx, dy, b, h, tz, az.dilation, l_z, e_z);
    float acc[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;
    float(&accf)[HD / 2] = reinterpret_cast<float(&)[HD / 2]>(acc);
    const auto kv = na_tc_kv_stream_of<T, HD, L, KC, TY, THREADS, 2, RANK>(
        k, {k_b, k_x, k_y, k_h, k_l}, v, {v_b, v_x, v_y, v_h, v_l}, D, DV, tx, ty, dx, dy, b, NA_KV_HEAD(h),
        tz, az.dilation, k_z3, v_z3);
    // token chunk c (>= box_chunks) into its stage as one cp.async group (as the forward's)
    NA_WG_TOKEN_LOADER(load_tokens, T, HD, L, KC, THREADS, kv, stages, box_chunks, d_len)
    if (!QS) __syncthreads();  // every warp holds its Q and dOut fragments: the stages are free
    kv.load(stages, box, 0);  // a box has a chunk at least
    // this lane's 4 values of 8-key tile nt into its rows of sds (the bias partials' ds)
    const auto put_ds = [&](int nt, const float(&d)[4]) {
#pragma unroll
        for (int c = 0; c < 4; ++c) sds[(16 * warp + gq + 8 * (c / 2)) * KS + 8 * nt + 2 * t + c % 2] = d[c];
    };

    for (int chunk = 0; chunk < chunks; ++chunk) {
        const int c0 = chunk * KC, cn = box.keys - c0 < KC ? box.keys - c0 : KC;
        // kv.arrive over both ranges: wait for this chunk, make it visible to wgmma and the block, then issue
        // chunk + 1 (of the box or of the tokens) into the stage chunk - 1 held
        na_cp_async_wait_group<0>();
        na_fence_proxy_async();
        __syncthreads();
        if (chunk + 1 < chunks) {
            if (chunk + 1 < box_chunks) kv.load(stages, box, chunk + 1);
            else load_tokens(chunk + 1);
        }
        const T* sk = kv.stage_of(stages, chunk);
        const bool tokens = chunk >= box_chunks;  // block-uniform
        // warpgroup-uniform: keys of its queries here (otherwise its ds rows are zero for the bias partials);
        // every token chunk where it has a query (lo == hi: none)
        if (WG == 1 || (tokens ? wg_chunks[warp / 4][0] < wg_chunks[warp / 4][1]
                               : chunk >= wg_chunks[warp / 4][0] && chunk < wg_chunks[warp / 4][1])) {
            const unsigned k_address = smem_address + (unsigned)((sk - tiles_q_g) * (int)sizeof(T));
            const unsigned v_address = k_address + (unsigned)(L::rows(KC) * (int)sizeof(T));

            // S = Q K^T and dP = dOut V^T over the chunk's KC keys, one group
            float s[NT][4], dp[NT][4];
            float(&sf)[KC / 2] = reinterpret_cast<float(&)[KC / 2]>(s);
            float(&dpf)[KC / 2] = reinterpret_cast<float(&)[KC / 2]>(dp);
            na_wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < KSTEPS; ++ks) {
                const unsigned long long kd = na_wgmma_desc(k_address + 256u * ks, 128u, ROW_GROUP);
                const unsigned long long vd = na_wgmma_desc(v_address + 256u * ks, 128u, ROW_GROUP);
                if constexpr (QS) {
                    na_wgmma_ss<T, KC, false>(sf, na_wgmma_desc(q_address + 256u * ks, 128u, ROW_GROUP), kd, ks > 0);
                    na_wgmma_ss<T, KC, false>(dpf, na_wgmma_desc(g_address + 256u * ks, 128u, ROW_GROUP), vd, ks > 0);
                } else {
                    na_wgmma_rs<T, KC, false>(sf, qf[ks], kd, ks > 0);
                    na_wgmma_rs<T, KC, false>(dpf, gf[ks], vd, ks > 0);
                }
            }
            na_wgmma_commit();
            na_wgmma_wait<0>();
            na_wgmma_hold(sf);
            na_wgmma_hold(dpf);

            float ds[NT][4];
            if (tokens) {
                // tokens: every valid row sees each one, no window and no bias; p = 0 past NX (zero rows)
                const int n = (int)na_min((long long)KC, NX - (long long)(chunk - box_chunks) * KC);
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int c = 0; c < 4; ++c)
                        ds[nt][c] = rows.valid[c / 2] && 8 * nt + 2 * t + c % 2 < n
                                        ? na_exp(s[nt][c] * (float)scale - row_lse[c / 2]) *
                                              (dp[nt][c] - row_delta[c / 2])
                                        : 0.f;
            } else {
                const bool chunk_full = !rpb && na_tc_keys_full<TY>(common, c0, KC, box);  // warp-uniform
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    const int key0 = c0 + 8 * nt + 2 * t;
                    bool in[1][4];
                    if (chunk_full) in[0][0] = in[0][1] = rows.valid[0], in[0][2] = in[0][3] = rows.valid[1];
                    else na_tc_visible_elements<TY, 1>(&rows, common, c0 + 8 * nt, key0, box, in);
                    na_tc_dq_ds(ds[nt], s[nt], dp[nt], in[0], rows, key0, box, rpb, rpb_x, rpb_y, (float)scale,
                                row_lse, row_delta, rpb_z);
                    if (partial_out) put_ds(nt, ds[nt]);
                }
            }

            // dQ += ds K over 16-key steps: ds from registers, K's k-step is two row groups
            unsigned da[KC / 16][4];  // ds as the A of ds K: read by the product until the wait
            na_wgmma_rs_tiles<T, HD, KC>(accf, da, ds, k_address, ROW_GROUP);
            na_wgmma_wait<0>();
            na_wgmma_hold(accf);
        } else if (partial_out && !tokens) {
            const float zero[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) put_ds(nt, zero);
        }
        if (partial_out && !tokens) {  // the bias partials: the box's keys only
            __syncthreads();  // every warp's ds of this chunk is in sds
            na_tc_dq_bias_chunk<TY, KS, THREADS, RANK, TZ>(racc, sds, entries, kx, ky, tx, ty, box, c0, cn, az.kernel,
                                                           tz);
        }
    }

    na_tc_dq_finish<T, DT, TY, THREADS, TZ, RANK>(dq, {o_b, o_x, o_y, o_h, o_l}, acc, rows, 16 * warp, lane, tx, ty, dx,
                                                  dy, b, h, D, (float)scale, partial_out, racc, entries, tz,
                                                  az.dilation, o_z);
}

// dK and dV of the fused backward on wgmma: same arguments, layouts and
// results as na_fused_tc_bwd_dkdv (na_fused_tc_bwd.cu), whose steps it keeps
// (na_tc_dkdv.cuh), with keys as the M of every product. One block of WG
// warpgroups per (b, h, key tile of 64 WG); the K and V tiles stay in shared
// memory as core matrices, the query box is streamed QC queries at a time
// (Q and dOut rows as core matrices, with their windows, lse and delta) in two
// stages, chunk c + 1 loading during chunk c. Per chunk:
//   S^T = K Q^T, dP^T = V dOut^T   HD / 16 wgmma m64nQCk16 each, in the SS form:
//                                   K and V (A) and Q and dOut (B) K-major from
//                                   shared memory, no fragments in registers;
//   p, ds = p (dp - delta)          from the logit and the lse, 0 outside each
//                                   query's window (na_tc_dkdv_p_ds);
//   dV += p^T dOut, dK += ds^T Q    QC / 16 wgmma m64nHDk16 each: p and ds
//                                   repacked from the accumulators into A
//                                   fragments, dOut and Q MN-major (as V in the
//                                   forward's P V).
// With WG 2 a block owns 128 keys (1D; a 16 x 8 tile in 2D, 4 x 8 x 4 in 3D), warpgroup j the
// tile rows 64 j .. 64 j + 63: both read every staged chunk (in 1D half the
// Q and dOut traffic per key), and a warpgroup skips the chunks outside its
// own keys' queries. Every key row
// meets every query of the chunk in the products (masked after): a NaN in a
// Q or dOut row can reach every key of the warpgroup. Dynamic shared memory
// (na_rtc/runtime/fused_wg.py mirrors it): K and V tiles (2 x 64 WG rows),
// two stages of a Q and a dOut chunk (4 QC rows), HD elements a row; then
// 2 x 6 QC words of chunk tables (2 x 8 QC in 3D). Above 48 KiB the launcher
// opts in. Both kernels take RANK and TZ last, as the forward does (3D tiles
// TX x TY x TZ, z fastest; below rank 3 every z term folds away).
template <class T, int HD, int TX, int TY, int QC, int WG, int RANK = 2, int TZ = 1>
__global__ void __launch_bounds__(NA_TC_THREADS * WG, 1) na_fused_wg_bwd_dkdv(
    const T* __restrict__ q, NA_TENSOR(q), const T* __restrict__ k, NA_TENSOR(k), const T* __restrict__ v,
    NA_TENSOR(v), const T* __restrict__ g, NA_TENSOR(g), const float* __restrict__ lse, NA_ROWS(l), const float* __restrict__ delta, NA_ROWS(e), const float* __restrict__ rpb, NA_BIAS(rpb),
    T* __restrict__ dk, NA_TENSOR(dk), T* __restrict__ dv, NA_TENSOR(dv), double scale, NA_PROBLEM) {
    constexpr int NK = TX * TY * TZ;
    constexpr int THREADS = NA_TC_THREADS * WG;
    constexpr int KSTEPS = HD / 16, NT = QC / 8, DT = HD / 8;
    constexpr int TABLE = RANK == 3 ? 8 : 6;  // words of a chunk's tables per query (na_tc_dkdv.cuh)
    using L = na_rows_core<HD>;
    constexpr unsigned ROW_GROUP = 16 * HD;  // bytes of 8 staged rows
    constexpr int STAGE = L::rows(2 * QC);   // elements of one stage: a Q chunk, then a dOut chunk
    static_assert(sizeof(T) == 2 && NK == 64 * WG && NA_TC_THREADS == 128, "64 keys a warpgroup, 16-bit elements");
    static_assert(WG == 1 || WG == 2, "one or two warpgroups");
    static_assert((HD == 32 || HD == 64 || HD == 128) && (QC == 32 || QC == 64 || QC == 128), "wgmma N built");
    static_assert(RANK == 3 || TZ == 1, "a z extent in 3D only");
    __shared__ na_tc_key_ranges<TX, TY, TZ, RANK> ranges;

    NA_TC_DECODE_BLOCK_HEADS(TX, TY, TZ, RANK, NA_KV_HEADS)  // h: the key/value head
    if (!tile_ok) return;  // an empty tile of a shorter group: no keys here
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gq = lane >> 2, t = lane & 3;
    na_tc_key_ranges_fill<TX, TY, THREADS>(ranges, ax, ay, tx, ty, dx, dy, az, tz);
    T* sk = reinterpret_cast<T*>(na_dynamic_shared());
    T* sv = sk + L::rows(NK);
    T* stages = sv + L::rows(NK);
    float* tables = reinterpret_cast<float*>(stages + 2 * STAGE);  // TABLE QC words a stage (na_tc_dkdv.cuh)
    const unsigned smem_address = na_shared_address(sk);
    // this warpgroup's 64 rows of the K (tile 0) or V (tile 1) tile, the A of its products: made where used,
    // from threadIdx, not kept across the chunk loop (2D at head dim 128 with two warpgroups would spill)
    const auto kv_tile_address = [&](int tile) {
        const int rows = L::rows(NK) * tile + (WG > 1 ? L::rows(64 * (int)(threadIdx.x / 128)) : 0);
        return smem_address + (unsigned)(rows * (int)sizeof(T));
    };

    const int d_len = (int)D;
    na_tc_dkdv_z z;  // the z axis (RANK 3; below it the default, never read)
    if constexpr (RANK == 3) z = {tz, az.dilation, 0, q_z, g_z, l_z, e_z};
    na_tc_load_tile<T, HD, L, TX, TY, THREADS, TZ>(sk, k, k_b, k_x, k_y, k_h, k_l, b, h, d_len, dx, dy, tx, ty, tz, z.dz,
                                                   RANK == 3 ? k_z : 0);
    na_tc_load_tile<T, HD, L, TX, TY, THREADS, TZ>(sv, v, v_b, v_x, v_y, v_h, v_l, b, h, (int)DV, dx, dy, tx, ty, tz, z.dz,
                                                   RANK == 3 ? v_z : 0);
    na_cp_async_commit();
    __syncthreads();  // the inverse ranges
    int bx0, by0;  // the query box origin (group coordinates; z.bz0 in 3D)
    const na_tc_box<TY, RANK> qbox = na_tc_query_box_of(ranges, tx, ty, bx0, by0, &z.bz0, tz);
    // WG > 1: the chunks [lo, hi) holding queries of each warpgroup's keys: its whole key x-rows (as for the
    // queries in na_tc_warpgroup_chunks; the inverse ranges are monotone along the tile), from the first
    // x-row's first query row to the last one's end, each query row hy queries (in 3D x-planes: TY TZ keys, hy hz
    // queries); none past the last valid key. In shared memory, read per chunk (HD 128 is at 255 registers)
    __shared__ int wg_chunks[WG][2];
    if (WG > 1 && tid < WG) {
        int first, last;
        na_tc_warpgroup_x_rows<TY * TZ>(tx, tid, first, last);
        const int plane = qbox.hy * qbox.hz;
        wg_chunks[tid][0] = first > last ? 0 : (ranges.first_x[first] - bx0) * plane / QC;
        wg_chunks[tid][1] = first > last ? 0 : ((ranges.last_x[last] - bx0) * plane + QC - 1) / QC;
    }
    const na_tc_key_rows keys = na_tc_key_rows_of<TY, TZ, RANK>(warp, gq, tx, ty, tz);
    const bool q_vec = na_tc_rows_vectorizable(q, D, q_l, q_b, q_x, q_y, q_h, z.q);
    const bool g_vec = na_tc_rows_vectorizable(g, DV, g_l, g_b, g_x, g_y, g_h, z.g);
    const float scale2 = (float)scale * NA_TC_LOG2E;  // logits in log2 units
    float acc_k[DT][4], acc_v[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc_k[dt][c] = acc_v[dt][c] = 0.f;
    float(&akf)[HD / 2] = reinterpret_cast<float(&)[HD / 2]>(acc_k);  // the wgmma views of the same registers
    float(&avf)[HD / 2] = reinterpret_cast<float(&)[HD / 2]>(acc_v);

    // the box once per query head of the group (na_tc_dkdv.cuh)
    const int box_chunks = (qbox.keys + QC - 1) / QC, chunks = box_chunks * (int)HPK;
    const auto load_chunk = [&](int chunk) {
        const na_tc_group_chunk at = na_tc_group_chunk_of(chunk, box_chunks, h, HPK);
        return na_tc_dkdv_load_chunk<T, HD, L, QC, TY, THREADS, RANK>(
            stages + (chunk & 1) * STAGE, tables + (chunk & 1) * TABLE * QC, at.local * QC, qbox, bx0, by0,
            ranges.group_axes, q, {q_b, q_x, q_y, q_h, q_l}, q_vec, g, {g_b, g_x, g_y, g_h, g_l}, g_vec, d_len,
            (int)DV, lse, {l_b, l_x, l_y, l_h}, delta, {e_b, e_x, e_y, e_h}, tx, ty, dx, dy, b, at.head, z);
    };
    // chunk c + 1 is issued right after the barrier that makes chunk c visible (every warp is past chunk
    // c - 1 there, so its stage is free) and lands during chunk c: one barrier a chunk
    bool covers = chunks > 0 && load_chunk(0);  // this thread's table entries of the next chunk to compute
    for (int chunk = 0; chunk < chunks; ++chunk) {
        const na_tc_group_chunk at = na_tc_group_chunk_of(chunk, box_chunks, h, HPK);
        const int c0 = at.local * QC;
        na_cp_async_wait_group<0>();  // this chunk's rows (and, at chunk 0, the K and V tiles)
        na_fence_proxy_async();       // ... read next by wgmma
        // rows and tables of this chunk are visible to every warp; whether every query of it sees every key
        const bool chunk_full = __syncthreads_and(covers) != 0;
        if (chunk + 1 < chunks) covers = load_chunk(chunk + 1);
        // warpgroup-uniform: no query of its keys here (wg_chunks was written before this chunk's barrier)
        if (WG > 1 && (at.local < wg_chunks[warp / 4][0] || at.local >= wg_chunks[warp / 4][1])) continue;
        const T* sq = stages + (chunk & 1) * STAGE;
        const unsigned q_address = smem_address + (unsigned)((sq - sk) * (int)sizeof(T));
        const unsigned g_address = q_address + (unsigned)(L::rows(QC) * (int)sizeof(T));
        const float* c_lse = tables + (chunk & 1) * TABLE * QC;
        const float* c_delta = c_lse + QC;
        const int* c_win = reinterpret_cast<const int*>(c_delta + QC);

        // S^T = K Q^T and dP^T = V dOut^T over the chunk's QC queries, one group: a k-step is two core
        // matrices (16 head dims) of every row group of both operands
        float s[NT][4], dp[NT][4];
        float(&sf)[QC / 2] = reinterpret_cast<float(&)[QC / 2]>(s);
        float(&dpf)[QC / 2] = reinterpret_cast<float(&)[QC / 2]>(dp);
        na_wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ++ks) {
            const unsigned step = 256u * ks;
            na_wgmma_ss<T, QC, false>(sf, na_wgmma_desc(kv_tile_address(0) + step, 128u, ROW_GROUP),
                                      na_wgmma_desc(q_address + step, 128u, ROW_GROUP), ks > 0);
            na_wgmma_ss<T, QC, false>(dpf, na_wgmma_desc(kv_tile_address(1) + step, 128u, ROW_GROUP),
                                      na_wgmma_desc(g_address + step, 128u, ROW_GROUP), ks > 0);
        }
        na_wgmma_commit();
        na_wgmma_wait<0>();
        na_wgmma_hold(sf);
        na_wgmma_hold(dpf);

        // p and ds in place of S^T and dP^T (block-uniform branch: in 1D without a bias, a chunk whose every
        // query sees every key needs no window test; in 2D such chunks are rare, and the path would spill at
        // QC 64), then as A fragments of 16-query steps
        if (TY == 1 && !rpb && chunk_full) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
                na_tc_dkdv_p_ds_all(s[nt], dp[nt], s[nt], dp[nt], 8 * nt + 2 * t, scale2, c_lse, c_delta);
        } else {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                bool in[4];
                na_tc_dkdv_visible<TY, RANK>(in, c_win, 8 * nt + 2 * t, keys, c_win + 4 * QC);
                na_tc_dkdv_p_ds(s[nt], dp[nt], s[nt], dp[nt], in, c0, 8 * nt + 2 * t, qbox, bx0, by0, keys, rpb,
                                (long long)at.head * rpb_h, rpb_x, rpb_y, kx, ky, scale2, c_lse, c_delta, z.bz0, rpb_z, az.kernel);
            }
        }
        unsigned pa[QC / 16][4], da[QC / 16][4];
#pragma unroll
        for (int ps = 0; ps < QC / 16; ++ps) {
            na_mma_pack_a<T>(pa[ps], s[2 * ps], s[2 * ps + 1]);
            na_mma_pack_a<T>(da[ps], dp[2 * ps], dp[2 * ps + 1]);
        }

        // dV += p^T dOut and dK += ds^T Q over 16-query steps: dOut's and Q's k-step is two row groups
        na_wgmma_hold(akf);
        na_wgmma_hold(avf);
        na_wgmma_fence();
#pragma unroll
        for (int ps = 0; ps < QC / 16; ++ps) {
            const unsigned step = 2u * ROW_GROUP * ps;
            na_wgmma_rs<T, HD, true>(avf, pa[ps], na_wgmma_desc(g_address + step, ROW_GROUP, 128u), true);
            na_wgmma_rs<T, HD, true>(akf, da[ps], na_wgmma_desc(q_address + step, ROW_GROUP, 128u), true);
        }
        na_wgmma_commit();
        na_wgmma_wait<0>();
        na_wgmma_hold(akf);
        na_wgmma_hold(avf);
    }

    na_tc_dkdv_store<T, DT, RANK>(dk, {dk_b, dk_x, dk_y, dk_h, dk_l}, acc_k, dv, {dv_b, dv_x, dv_y, dv_h, dv_l}, acc_v,
                                  keys, t, tx, ty, dx, dy, b, h, D, DV, (float)scale, tz, z.dz, dk_z,
                                  dv_z);
}
