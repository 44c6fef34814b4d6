// Fused neighborhood attention backward on tensor cores (fp16 / bf16, sm_80+).
//
// Same arguments, layouts and results as na_fused_bwd_dq / na_fused_bwd_dkdv
// (na_fused_bwd.cu), which also give the math; delta = rowsum(dOut * out) and
// the bias-gradient reduce are that file's kernels. Probabilities are
// recomputed from the logsumexp, p = exp(scale q.k + bias - lse) (the dkdv
// kernel: one ex2 of logit and lse in log2 units, as the forward's softmax;
// the dq kernel keeps expf, as its HD-128 instantiations have no register
// left for the log2 factors), and
// ds = p (dOut.v - delta). Blocks of 4 warps; every product is an
// mma.m16n8k16 with fp32 accumulators; p and ds are rounded to T as A
// operands (as in FlashAttention 2). Deterministic: fixed summation orders,
// no atomics.
//
// na_fused_tc_bwd_dq<T, HD, TX, TY, KC>: one block per (b, h, query tile of
//   64 group coordinates, as the forward); warp w owns queries 16w..16w+15.
//   Q and dOut fragments stay in registers; the key box is streamed KC keys
//   at a time, double-buffered as in the forward (cp.async loads chunk c + 1
//   while the warps compute on chunk c); per chunk:
//   S = Q K^T and dP = dOut V^T (K, V rows through ldmatrix.x2), ds in
//   registers, dQ += ds K (K through ldmatrix.x2.trans). With a bias, ds also
//   goes to shared memory and the block adds, per relative offset, the ds of
//   its queries in tile order (the order of the SIMT kernel) into per-tile
//   partials [h, tiles, entries]. With NX extra tokens (NA_EXTRA) the tokens
//   of the query head's key/value head follow the box as one more key range of
//   the same chunk stream (na_tc_kv_token_stream: chunks past the box's
//   address token rows, so that the double-buffering runs on across the two;
//   their addresses in static shared memory): S and dP as for the box, ds =
//   exp(scale q.k - lse) (dOut.v - delta) for every valid query, without window
//   or bias, 0 past the last token, and dQ += ds K; the bias partials take the
//   box's chunks only. The tokens' own dK and dV are na_tokens_bwd_dkdv's
//   (na_tokens_bwd.cu).
// na_fused_tc_bwd_dkdv<T, HD, TX, TY, QC>: one block per (b, h, key
//   tile of 64 group coordinates); warp w owns keys 16w..16w+15. The queries
//   whose windows can hold a key of the tile (one box, na_inverse_range per
//   axis) are streamed QC at a time with their windows, lse and delta, through
//   two shared-memory stages (chunk c + 1 loads during chunk c): S^T = K Q^T,
//   dP^T = V dOut^T, then dV += p^T dOut and dK += ds^T Q (Q and dOut rows
//   through ldmatrix.x2.trans).
// Pairs outside a query's window have p = ds = 0 but still pass through the
// mma, so a NaN or Inf in a K, V, Q or dOut row can reach the gradients of
// other rows of the same warp tile (docs/design/testing.md#non-finite-inputs: fused kernels may
// poison the queries of a tile); the SIMT backward skips such pairs.
//
// Dynamic shared memory (na_rtc/runtime/fused_tc.py mirrors it), rows of
// P = HD + 8 elements:
//   dq:   2 x 64 rows (Q, dOut; then two stages of a K and a V chunk, 4 KC <= 128),
//         then 64 x (KC + 1) floats of ds and one float per bias entry;
//   dkdv: 2 x 64 rows (K, V), 2 x 2 x QC rows (Q, dOut: two stages), then per stage
//         QC floats of lse, QC of delta and 4 QC ints of window bounds (in 3D 6 QC).
// Static shared memory of the dq kernel: the extra tokens' addresses (na_tc_token_rows), and where its
// template says so the K/V stream (KV_SHARED) and the rows' lse and delta (STATS_SHARED).
// In 3D (RANK 3) both kernels take tiles of TX x TY x TZ = 64 queries or keys
// (z fastest) and walk 3D boxes row-major; below rank 3 the z axis is the
// trivial one and every z term is a compile-time constant.
#include "na_types.cuh"
#include "na_window.cuh"
#include "na_shared.cuh"
#include "na_tile.cuh"
#include "na_mma.cuh"
#include "na_tc_common.cuh"
#include "na_tc_dq.cuh"
#include "na_tc_dkdv.cuh"
#include "na_args.cuh"

__device__ __forceinline__ long long na_tcb_align16(long long n) { return (n + 15) / 16 * 16; }

// KV_SHARED: the K/V stream's addresses and strides (block-uniform, about 24 registers: na_tc_kv_stream) are
// kept in static shared memory and read once a chunk, instead of in registers through the chunk loop. At
// head dim 128 the kernel is at 255 registers, and ptxas for sm_100 and sm_120 spills 4 to 16 bytes with
// them in registers; so does sm_80 to sm_90 in 1D and 2D (4 to 8 bytes) since the chunk loop runs on into
// the extra tokens. The 3D kernel on sm_80 to sm_90 keeps them in registers: with them in shared memory
// sm_90 spills 4 bytes there.
template <class T, int HD, int TX, int TY, int KC, int RANK = 2, int TZ = 1,
          bool KV_SHARED = (HD == 128 && (RANK < 3 || NA_TC_ARCH >= 1000))>
__global__ void __launch_bounds__(NA_TC_THREADS, 1) na_fused_tc_bwd_dq(
    const T* __restrict__ q, NA_TENSOR(q), const T* __restrict__ k, NA_TENSOR(k),
    const T* __restrict__ v, NA_TENSOR(v), const T* __restrict__ g, NA_TENSOR(g),
    const float* __restrict__ lse, NA_ROWS(l), const float* __restrict__ delta, NA_ROWS(e),
    const float* __restrict__ rpb, NA_BIAS(rpb), NA_EXTRA(T), T* __restrict__ dq,
    NA_TENSOR(o), float* __restrict__ rpb_partial, double scale, NA_PROBLEM) {
    constexpr int NQ = TX * TY * TZ;
    constexpr int P = HD + 8;
    constexpr int KSTEPS = HD / 16, NT = KC / 8, DT = HD / 8, KS = KC + 1;
    constexpr int STAGE = 2 * KC;  // rows of one pipeline stage: a K chunk, then a V chunk
    static_assert(NQ == 16 * NA_TC_WARPS && HD % 16 == 0 && KC % 16 == 0 && 2 * STAGE <= 2 * NQ,
                  "tile shapes; the two stages fit in the rows of the Q and dOut tiles");

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gq = lane >> 2, t = lane & 3;
    NA_TC_DQ_DECODE_BLOCK_RANK(TX, TY, TZ, RANK, NA_TC_THREADS)
    const na_tc_box<TY, RANK> box = na_tc_box_of<TY, RANK>(tx, ty, tz);
    const int d_len = (int)D;
    // the z strides, constant 0 below rank 3 (as az.dilation is 1 there), so that z terms fold away
    const long long q_z3 = RANK == 3 ? q_z : 0, k_z3 = RANK == 3 ? k_z : 0, v_z3 = RANK == 3 ? v_z : 0;
    const long long g_z3 = RANK == 3 ? g_z : 0;

    unsigned char* smem = na_dynamic_shared();
    T* tiles_q_g = reinterpret_cast<T*>(smem);  // Q then dOut tiles; later the two stages of K and V chunks
    float* sds = reinterpret_cast<float*>(smem + na_tcb_align16(2LL * NQ * P * (long long)sizeof(T)));
    float* racc = sds + NQ * KS;

    unsigned qf[KSTEPS][4], gf[KSTEPS][4];
    na_tc_dq_fragments<T, HD, P, TX, TY, NA_TC_THREADS, TZ>(qf, gf, tiles_q_g, q, {q_b, q_x, q_y, q_h, q_l}, g,
                                                            {g_b, g_x, g_y, g_h, g_l}, racc, partial_out ? entries : 0,
                                                            b, h, d_len, (int)DV, dx, dy, tx, ty, tz, az.dilation, q_z3,
                                                            g_z3);

    // this lane's rows g and g + 8 of the warp's 16 queries, with their lse and delta
    const na_tc_rows rows = na_tc_query_rows<TY, TZ, RANK>(16 * warp, lane, ax, ay, tx, ty, h, rpb_h, rpb_x, rpb_y, az,
                                                           tz, rpb_z);
    // the common-window shortcut costs 4 registers: HD 128 (at 255) would spill
    const na_tc_warp_window common =
        HD < 128 ? na_tc_common_window<1, RANK>(&rows) : na_tc_warp_window{1, 0, 1, 0, 1, 0};
    // STATS_SHARED: the lane's lse and delta stay in static shared memory (each thread its own four words, read
    // at every use: the barriers of the chunk loop keep them from being hoisted into registers). The 3D kernel
    // at head dim 128 spills 4 bytes on sm_90 with them in registers.
    constexpr bool STATS_SHARED = HD == 128 && RANK == 3;
    __shared__ float stats_block[STATS_SHARED ? NA_TC_THREADS : 1][2][2];
    float stats_own[2][2];
    float(&stats)[2][2] = STATS_SHARED ? stats_block[tid] : stats_own;
    float(&row_lse)[2] = stats[0];
    float(&row_delta)[2] = stats[1];
    na_tc_row_stats<TY, TZ, RANK>(row_lse, row_delta, rows, 16 * warp, lane, lse, {l_b, l_x, l_y, l_h}, delta,
                                  {e_b, e_x, e_y, e_h}, tx, ty, dx, dy, b, h, tz, az.dilation, l_z, e_z);
    float acc[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;
    // the box's chunks, then the extra tokens' (none without tokens), whose addresses thread 0 leaves in shared
    // memory (read after the barrier below, where a chunk of tokens is issued: na_tc_kv_token_stream)
    __shared__ na_tc_token_rows<T> tokens;
    if (tid == 0)
        tokens = na_tc_token_rows_of(xk, xk_b, xk_n, xk_h, xk_l, xv, xv_b, xv_n, xv_h, xv_l, NX, D, DV, b,
                                     NA_KV_HEAD(h), box);
    const int box_chunks = (box.keys + KC - 1) / KC;
    using kv_stream = na_tc_kv_token_stream<T, HD, na_rows_pitch<P>, KC, TY, NA_TC_THREADS, 2, RANK>;
    const kv_stream kv_own = {na_tc_kv_stream_of<T, HD, na_rows_pitch<P>, KC, TY, NA_TC_THREADS, 2, RANK>(
                                  k, {k_b, k_x, k_y, k_h, k_l}, v, {v_b, v_x, v_y, v_h, v_l}, D, DV, tx, ty, dx, dy, b,
                                  NA_KV_HEAD(h), tz, az.dilation, k_z3, v_z3),
                              &tokens, box_chunks};
    __shared__ kv_stream kv_block;  // KV_SHARED: written by thread 0, read after the barrier below
    if (KV_SHARED && tid == 0) kv_block = kv_own;
    const kv_stream& kv = KV_SHARED ? kv_block : kv_own;
    __syncthreads();  // every warp holds its Q and dOut fragments: the stages are free
    const int chunks = kv.chunks((int)NX);  // (KV_SHARED: read after the barrier)
    kv.load(tiles_q_g, box, 0);

    for (int chunk = 0; chunk < chunks; ++chunk) {
        const T* sk = kv.arrive(tiles_q_g, box, chunk, chunks);
        const T* sv = sk + KC * P;
        // the chunk's first key: a box key, or past the box's chunks a token (block-uniform)
        const bool token_chunk = chunk >= box_chunks;
        const int c0 = (token_chunk ? chunk - box_chunks : chunk) * KC;

        float ds[NT][4];
        bool live[NT];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const int key0 = c0 + 8 * nt + 2 * t;
            bool in_tiles[1][4];
            if (token_chunk) {  // every valid query sees every token (no window, no bias); none past the last
                live[nt] = c0 + 8 * nt < NX;
#pragma unroll
                for (int c = 0; c < 4; ++c) in_tiles[0][c] = rows.valid[c / 2] && key0 + c % 2 < NX;
            } else {
                live[nt] = na_tc_visible_tile(&rows, common, c0 + 8 * nt, key0, box, in_tiles);
            }
            const bool (&in)[4] = in_tiles[0];
            float s[4] = {0.f, 0.f, 0.f, 0.f}, dp[4] = {0.f, 0.f, 0.f, 0.f};
            if (live[nt]) {  // warp-uniform
#pragma unroll
                for (int ks = 0; ks < KSTEPS; ++ks) {
                    unsigned kb[2], vb[2];
                    const int r = 8 * nt + (lane & 7), c = 16 * ks + 8 * ((lane >> 3) & 1);
                    na_ldmatrix<2, false>(kb, sk + r * P + c);
                    na_ldmatrix<2, false>(vb, sv + r * P + c);
                    na_mma<T>::run(s, qf[ks], kb, s);
                    na_mma<T>::run(dp, gf[ks], vb, dp);
                }
            }
            na_tc_dq_ds(ds[nt], s, dp, in, rows, key0, box, token_chunk ? nullptr : rpb, rpb_x, rpb_y, (float)scale,
                        row_lse, row_delta, rpb_z);
            if (partial_out && !token_chunk)
#pragma unroll
                for (int c = 0; c < 4; ++c) sds[(16 * warp + gq + 8 * (c / 2)) * KS + 8 * nt + 2 * t + c % 2] = ds[nt][c];
        }
        // dQ += ds K over 16-key steps
#pragma unroll
        for (int ps = 0; ps < KC / 16; ++ps) {
            if (!live[2 * ps] && !live[2 * ps + 1]) continue;  // warp-uniform
            unsigned pa[4];
            na_mma_pack_a<T>(pa, ds[2 * ps], ds[2 * ps + 1]);
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                unsigned kb[2];
                na_ldmatrix<2, true>(kb, sk + (16 * ps + (lane & 15)) * P + 8 * dt);
                na_mma<T>::run(acc[dt], pa, kb, acc[dt]);
            }
        }
        // bias partials (the box's chunks: the tokens have no bias): entry (rx, ry) gets the ds of every query of
        // the tile whose key at that offset is in the chunk
        if (partial_out && !token_chunk) {
            const int cn = box.keys - c0 < KC ? box.keys - c0 : KC;
            __syncthreads();  // every warp's ds of this chunk is in sds
            na_tc_dq_bias_chunk<TY, KS, NA_TC_THREADS, RANK, TZ>(racc, sds, entries, kx, ky, tx, ty, box, c0, cn,
                                                                  az.kernel, tz);
        }
    }

    na_tc_dq_finish<T, DT, TY, NA_TC_THREADS, TZ, RANK>(dq, {o_b, o_x, o_y, o_h, o_l}, acc, rows, 16 * warp, lane, tx,
                                                        ty, dx, dy, b, h, D, (float)scale, partial_out, racc, entries,
                                                        tz, az.dilation, o_z);
}

template <class T, int HD, int TX, int TY, int QC, int RANK = 2, int TZ = 1>
__global__ void __launch_bounds__(NA_TC_THREADS, 1) na_fused_tc_bwd_dkdv(
    const T* __restrict__ q, NA_TENSOR(q), const T* __restrict__ k, NA_TENSOR(k),
    const T* __restrict__ v, NA_TENSOR(v), const T* __restrict__ g, NA_TENSOR(g),
    const float* __restrict__ lse, NA_ROWS(l), const float* __restrict__ delta, NA_ROWS(e),
    const float* __restrict__ rpb, NA_BIAS(rpb), T* __restrict__ dk,
    NA_TENSOR(dk), T* __restrict__ dv, NA_TENSOR(dv), double scale, NA_PROBLEM) {
    constexpr int NK = TX * TY * TZ;
    constexpr int P = HD + 8;
    constexpr int KSTEPS = HD / 16, NT = QC / 8, DT = HD / 8;
    constexpr int TABLE = RANK == 3 ? 8 : 6;  // words of a chunk's tables per query (na_tc_dkdv.cuh)
    // k-steps of S^T and dP^T unrolled at once: at head dim 128 all 8 (their fragments loaded ahead) spill in
    // 2D on sm_90 (12 bytes), in 1D on sm_100 (24 bytes) and, since the chunk stream runs over the query heads
    // of a key/value head, in 1D on sm_90 (24 bytes); 4 at a time fit (only unrolling changes, not the math)
    constexpr int KS_UNROLL = HD == 128 ? 4 : KSTEPS;
    static_assert(NK == 16 * NA_TC_WARPS && HD % 16 == 0 && QC % 16 == 0, "tile shapes");
    __shared__ na_tc_key_ranges<TX, TY, TZ, RANK> ranges;

    NA_TC_DECODE_BLOCK_HEADS(TX, TY, TZ, RANK, NA_KV_HEADS)  // h: the key/value head
    if (!tile_ok) return;  // an empty tile of a shorter group: no keys here
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gq = lane >> 2, t = lane & 3;
    na_tc_key_ranges_fill(ranges, ax, ay, tx, ty, dx, dy, az, tz);
    unsigned char* smem = na_dynamic_shared();
    T* sk = reinterpret_cast<T*>(smem);
    T* sv = sk + NK * P;
    T* stage_rows = sv + NK * P;  // stage s: Q chunk at s * 2 QC rows, dOut chunk QC rows further
    // stage s's chunk tables at TABLE QC s words (na_tc_dkdv.cuh)
    float* tables = reinterpret_cast<float*>(
        smem + na_tcb_align16((2LL * NK + 4LL * QC) * P * (long long)sizeof(T)));

    const int d_len = (int)D;
    na_tc_dkdv_z z;  // the z axis (RANK 3; below it the default, never read)
    if constexpr (RANK == 3) z = {tz, az.dilation, 0, q_z, g_z, l_z, e_z};
    na_tc_load_tile<T, HD, na_rows_pitch<P>, TX, TY, NA_TC_THREADS, TZ>(sk, k, k_b, k_x, k_y, k_h, k_l, b, h, d_len, dx,
                                                                       dy, tx, ty, tz, z.dz, RANK == 3 ? k_z : 0);
    na_tc_load_tile<T, HD, na_rows_pitch<P>, TX, TY, NA_TC_THREADS, TZ>(sv, v, v_b, v_x, v_y, v_h, v_l, b, h, (int)DV, dx,
                                                                       dy, tx, ty, tz, z.dz, RANK == 3 ? v_z : 0);
    na_cp_async_commit();
    __syncthreads();  // the inverse ranges
    int bx0, by0;  // the query box origin (group coordinates; z.bz0 in 3D)
    const na_tc_box<TY, RANK> qbox = na_tc_query_box_of(ranges, tx, ty, bx0, by0, &z.bz0, tz);
    const int nqueries = qbox.keys;
    const na_tc_key_rows keys = na_tc_key_rows_of<TY, TZ, RANK>(warp, gq, tx, ty, tz);
    const bool q_vec = na_tc_rows_vectorizable(q, D, q_l, q_b, q_x, q_y, q_h, z.q);
    const bool g_vec = na_tc_rows_vectorizable(g, DV, g_l, g_b, g_x, g_y, g_h, z.g);
    const float scale2 = (float)scale * NA_TC_LOG2E;  // logits in log2 units
    float acc_k[DT][4], acc_v[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc_k[dt][c] = acc_v[dt][c] = 0.f;

    // the box once per query head of the group (na_tc_dkdv.cuh)
    const int box_chunks = (nqueries + QC - 1) / QC, chunks = box_chunks * (int)HPK;
    // chunk -> its stage: the Q and dOut rows as one cp.async group, then the window, lse and delta tables
    const auto load_chunk = [&](int chunk) {
        const int st = chunk & 1;
        const na_tc_group_chunk at = na_tc_group_chunk_of(chunk, box_chunks, h, HPK);
        na_tc_dkdv_load_chunk<T, HD, na_rows_pitch<P>, QC, TY, NA_TC_THREADS, RANK>(
            stage_rows + st * 2 * QC * P, tables + st * TABLE * QC, at.local * QC, qbox, bx0, by0, ranges.group_axes,
            q, {q_b, q_x, q_y, q_h, q_l}, q_vec, g, {g_b, g_x, g_y, g_h, g_l}, g_vec, d_len, (int)DV, lse,
            {l_b, l_x, l_y, l_h}, delta, {e_b, e_x, e_y, e_h}, tx, ty, dx, dy, b, at.head, z);
    };

    // chunk c + 1 is issued right after the barrier that makes chunk c visible (every warp is past chunk
    // c - 1 there, so its stage is free) and lands during chunk c: one barrier a chunk
    if (chunks > 0) load_chunk(0);
    for (int chunk = 0; chunk < chunks; ++chunk) {
        const na_tc_group_chunk at = na_tc_group_chunk_of(chunk, box_chunks, h, HPK);
        const int c0 = at.local * QC, st = chunk & 1;
        na_cp_async_wait_group<0>();  // this chunk's rows (and, at chunk 0, the K and V tiles)
        __syncthreads();  // rows and tables of this chunk are visible to every warp
        if (chunk + 1 < chunks) load_chunk(chunk + 1);
        const T* sq = stage_rows + st * 2 * QC * P;
        const T* sg = sq + QC * P;
        const float* c_lse = tables + st * TABLE * QC;
        const float* c_delta = c_lse + QC;
        const int* c_win = reinterpret_cast<const int*>(c_delta + QC);

        float pr[NT][4], ds[NT][4];
        bool live[NT];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            bool in[4];
            na_tc_dkdv_visible<TY, RANK>(in, c_win, 8 * nt + 2 * t, keys, c_win + 4 * QC);
            live[nt] = __any_sync(NA_TC_FULL, in[0] | in[1] | in[2] | in[3]);
            float s[4] = {0.f, 0.f, 0.f, 0.f}, dp[4] = {0.f, 0.f, 0.f, 0.f};
            if (live[nt]) {  // warp-uniform
#pragma unroll KS_UNROLL
                for (int ks = 0; ks < KSTEPS; ++ks) {
                    unsigned ka[4], va[4], qb[2], gb[2];
                    const int r = 16 * warp + (lane & 15), c = 16 * ks + 8 * (lane >> 4);
                    na_ldmatrix<4, false>(ka, sk + r * P + c);
                    na_ldmatrix<4, false>(va, sv + r * P + c);
                    const int qr = 8 * nt + (lane & 7), qc = 16 * ks + 8 * ((lane >> 3) & 1);
                    na_ldmatrix<2, false>(qb, sq + qr * P + qc);
                    na_ldmatrix<2, false>(gb, sg + qr * P + qc);
                    na_mma<T>::run(s, ka, qb, s);
                    na_mma<T>::run(dp, va, gb, dp);
                }
            }
            na_tc_dkdv_p_ds(pr[nt], ds[nt], s, dp, in, c0, 8 * nt + 2 * t, qbox, bx0, by0, keys, rpb, (long long)at.head * rpb_h,
                            rpb_x, rpb_y, kx, ky, scale2, c_lse, c_delta, z.bz0, rpb_z, az.kernel);
        }
        // dV += p^T dOut and dK += ds^T Q over 16-query steps
#pragma unroll
        for (int ps = 0; ps < QC / 16; ++ps) {
            if (!live[2 * ps] && !live[2 * ps + 1]) continue;  // warp-uniform
            unsigned pa[4];
            na_mma_pack_a<T>(pa, pr[2 * ps], pr[2 * ps + 1]);
            unsigned da[4];
            na_mma_pack_a<T>(da, ds[2 * ps], ds[2 * ps + 1]);
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                unsigned gb[2], qb[2];
                na_ldmatrix<2, true>(gb, sg + (16 * ps + (lane & 15)) * P + 8 * dt);
                na_ldmatrix<2, true>(qb, sq + (16 * ps + (lane & 15)) * P + 8 * dt);
                na_mma<T>::run(acc_v[dt], pa, gb, acc_v[dt]);
                na_mma<T>::run(acc_k[dt], da, qb, acc_k[dt]);
            }
        }
    }

    na_tc_dkdv_store<T, DT, RANK>(dk, {dk_b, dk_x, dk_y, dk_h, dk_l}, acc_k, dv, {dv_b, dv_x, dv_y, dv_h, dv_l}, acc_v,
                                  keys, t, tx, ty, dx, dy, b, h, D, DV, (float)scale, tz, z.dz, dk_z,
                                  dv_z);
}
