// Fused neighborhood attention on Hopper's warpgroup tensor cores (wgmma,
// sm_90a; fp16 / bf16): the forward (the backward's dq and dK/dV kernels are
// in na_fused_wg_bwd.cu, a family of its own, so that a forward compiles only
// what it runs).
//
// Same arguments, layouts and results as na_fused_tc_fwd (na_fused_tc.cu),
// whose structure it keeps: one block of WG warpgroups (4 WG warps) per
// (batch, head, query tile of TX x TY = 64 WG group coordinates inside ONE
// dilation group per axis); warp w holds the tile's rows 16 w .. 16 w + 15,
// and warpgroup j (warps 4 j .. 4 j + 3) multiplies its 64 rows. The key box
// is walked in chunks of KC keys, staged by cp.async in three shared-memory
// stages as wgmma core matrices (na_rows_core): while chunk c is computed,
// chunk c + 1 has landed and chunk c + 2 is loading. With WG 2 both
// warpgroups read each staged chunk, and a warpgroup skips the chunks
// outside its own queries' windows (na_tc_warpgroup_chunks): in 1D that
// halves the K and V traffic per query; in 2D (a 16 x 8 tile, warpgroup j
// the x-rows 8 j .. 8 j + 7) a 28 x 20 box feeds 128 queries at k = 13, where
// two 8 x 8 tiles load 2 x 20 x 20 keys, and each warpgroup still multiplies
// only the chunks of its own 20 box rows.
// Per chunk c:
//   S' = Q K'^T  of chunk c + 1, issued first and left running on the tensor
//               cores while this chunk's softmax runs on the other units (chunk
//               0 is multiplied on its own): HD / 16
//               wgmma m64nKCk16, K from shared memory (K-major descriptors),
//               Q fragments from registers (ldmatrix once per block; QS:
//               from shared memory, the SS form, where registers would spill);
//   mask        logits outside each query's window are -inf, scale and bias
//               in log2 units (na_tc_logits); tiles inside the common window
//               of a warp's rows skip the per-element test, and without a
//               bias a whole chunk inside it skips the per-tile test too;
//   softmax     online per row in fp32 (na_tc_softmax_chunk);
//   O += P V    KC / 16 wgmma m64nHDk16: P repacked from the S accumulators
//               into A fragments (registers), V MN-major from shared memory;
//   then both products are waited for and S' becomes the next chunk's S.
// Extra tokens (NA_EXTRA, as in the SIMT forward na_fused.cu): every query
// also attends the NX tokens, in the same softmax. They are one more key range
// after the box: chunk c at or past the box's chunk count holds token rows
// (c - box chunks) KC .. + KC - 1 of key/value head NA_KV_HEAD(h), staged by
// the same three stages, so the pipeline runs on across the boundary; every
// warpgroup with a valid query takes every token chunk (no window), and their
// logits are scale * q.k with no bias and no window test, -inf past NX (whose
// staged rows are zero). Without tokens (NX 0) the chunks are the box's.
// Unlike the mma.sync forward, every warp computes every 8-key tile of a
// chunk (a warpgroup product has no per-warp columns): the work is that of
// the whole box, which pays where the windows of a tile overlap almost
// entirely (1D with large kernels) and less on small 2D windows.
//
// Template parameters: element type T (fp16_t, bf16_t), head-dim bucket HD
// (32, 64 or 128: the N of P V; runtime D <= HD), query tile TX x TY (64 WG),
// keys per chunk KC (32, 64 or 128: the N of Q K^T), QS (Q read from shared
// memory all along), warpgroups WG (1 or 2), then RANK and TZ as in the
// mma.sync forward (3D: a tile of TX x TY x TZ = 64 WG queries, z fastest,
// warpgroup j its x-planes TX / WG j .. TX / WG (j + 1) - 1, boxes walked
// row-major in (x, y, z); below rank 3 every z term folds away). Dynamic shared memory
// (na_rtc/runtime/fused_wg.py mirrors it): with QS, or where the Q tile is
// larger than a stage (KC < 32 WG), the Q tile (64 WG rows of HD, core
// matrices) first; then three stages of a K and a V chunk, 6 KC HD elements;
// otherwise the Q tile is staged in stage 2 until its fragments are in
// registers. Above 48 KiB the launcher opts in.
#include "na_types.cuh"
#include "na_window.cuh"
#include "na_shared.cuh"
#include "na_tile.cuh"
#include "na_wgmma.cuh"
#include "na_tc_softmax.cuh"
#include "na_args.cuh"

template <class T, int HD, int TX, int TY, int KC, bool QS, int WG, int RANK = 2, int TZ = 1>
__global__ void __launch_bounds__(NA_TC_THREADS * WG, 1) na_fused_wg_fwd(
    const T* __restrict__ q, NA_TENSOR(q), const T* __restrict__ k, NA_TENSOR(k), const T* __restrict__ v,
    NA_TENSOR(v), const float* __restrict__ rpb, NA_BIAS(rpb), NA_EXTRA(T),
    T* __restrict__ out, NA_TENSOR(o), float* __restrict__ lse, NA_ROWS(l), double scale, NA_PROBLEM) {
    constexpr int NQ = TX * TY * TZ;
    constexpr int THREADS = NA_TC_THREADS * WG;
    constexpr int KSTEPS = HD / 16;  // k-steps of Q K^T
    constexpr int NT = KC / 8;       // 8-key tiles per chunk
    constexpr int DT = HD / 8;       // 8-dim tiles of the output
    using L = na_rows_core<HD>;
    constexpr int STAGE = L::rows(2 * KC);        // elements of one stage: a K chunk, then a V chunk
    constexpr unsigned ROW_GROUP = 16 * HD;       // bytes of 8 staged rows: SBO of K (and Q), LBO of V
    static_assert(sizeof(T) == 2 && NQ == 64 * WG && NA_TC_THREADS == 128, "64 rows a warpgroup, 16-bit elements");
    static_assert(WG == 1 || WG == 2, "one or two warpgroups");
    static_assert((HD == 32 || HD == 64 || HD == 128) && (KC == 32 || KC == 64 || KC == 128), "wgmma N built");
    static_assert(RANK == 3 || TZ == 1, "a z extent in 3D only");
    // the Q tile in a region of its own, before the stages: read from there all along (QS), or too large
    // for stage 2 (KC < 32 WG); otherwise it borrows stage 2 until its fragments are in registers
    constexpr bool Q_OWN = QS || L::rows(NQ) > STAGE;
    const float NEG_INF = __int_as_float(0xff800000);

    NA_TC_DECODE_BLOCK_RANK(TX, TY, TZ, RANK)
    if (!tile_ok) return;  // uniform over the block
    const na_tc_box<TY, RANK> box = na_tc_box_of<TY, RANK>(tx, ty, tz);
    const int d_len = (int)D;
    // the z strides, constant 0 below rank 3 (the arguments are 0 there too), so that z terms fold away
    const long long q_z3 = RANK == 3 ? q_z : 0, k_z3 = RANK == 3 ? k_z : 0, v_z3 = RANK == 3 ? v_z : 0;
    // the box's chunks, then the extra tokens' (NA_EXTRA): one stream, so that the pipeline runs on across
    // the boundary; chunk c >= box_chunks holds tokens (c - box_chunks) KC .. + KC - 1. An empty box (dense
    // attention: no window) is one chunk of zero rows outside every window, so that chunk 0 is always the box's
    // (loading it from the tokens too costs the one-warpgroup kernels up to 45 registers)
    const int box_chunks = box.keys > 0 ? (box.keys + KC - 1) / KC : 1;
    const int chunks = box_chunks + (int)((NX + KC - 1) / KC);

    T* smem = reinterpret_cast<T*>(na_dynamic_shared());
    T* stages = Q_OWN ? smem + L::rows(NQ) : smem;
    T* sq = Q_OWN ? smem : stages + 2 * STAGE;  // otherwise stage 2 holds Q until chunk 2 loads
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, t = lane & 3;
    const unsigned smem_address = na_shared_address(smem);
    // this warpgroup's 64 rows of the Q tile (QS: the A of Q K^T)
    const unsigned q_address = smem_address + (unsigned)(L::rows(64 * (warp / 4)) * (int)sizeof(T));

    const auto kv = na_tc_kv_stream_of<T, HD, L, KC, TY, THREADS, 3, RANK>(
        k, {k_b, k_x, k_y, k_h, k_l}, v, {v_b, v_x, v_y, v_h, v_l}, D, DV, tx, ty, dx, dy, b, NA_KV_HEAD(h),
        tz, az.dilation, k_z3, v_z3);
    // token chunk c (>= box_chunks) into its stage as one cp.async group (the tokens' strides stay kernel
    // parameters until then)
    NA_WG_TOKEN_LOADER(load_tokens, T, HD, L, KC, THREADS, kv, stages, box_chunks, d_len)
    const auto load_chunk = [&](int c) {
        if (c < box_chunks) kv.load(stages, box, c);
        else load_tokens(c);
    };
    na_tc_load_tile<T, HD, L, TX, TY, THREADS, TZ>(sq, q, q_b, q_x, q_y, q_h, q_l, b, h, d_len, dx, dy, tx, ty, tz,
                                                   az.dilation, q_z3);
    kv.load(stages, box, 0);  // with the Q tile: chunk 0 into stage 0 (a box has a chunk at least)
    if (chunks > 1) {
        load_chunk(1);  // lands during the first iteration's softmax
        na_cp_async_wait_group<1>();
    } else {
        na_cp_async_wait_group<0>();
    }
    na_fence_proxy_async();  // chunk 0 (and with QS the Q tile) is read by wgmma
    __syncthreads();
    unsigned qf[QS ? 1 : KSTEPS][4];
    if constexpr (!QS) {
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ++ks)  // one 8 x 8 core matrix (128 contiguous bytes) per 8 lanes
            na_ldmatrix<4, false>(qf[ks], sq + L::at(16 * warp + (lane & 15), 16 * ks + 8 * (lane >> 4)));
    }
    // the first iteration's barrier orders these reads before chunk 2 overwrites stage 2

    // the chunks holding keys of this warpgroup's queries; none past the last valid query (its whole x-planes
    // of TY TZ queries, each box x-plane hy hz keys)
    int chunk_lo = 0, chunk_hi = box_chunks;
    if (WG > 1) na_tc_warpgroup_chunks<TY * TZ, KC>(ax, tx, dx, box.hy * box.hz, warp / 4, chunk_lo, chunk_hi);
    // warpgroup-uniform: whether this warpgroup multiplies chunk c: box chunks holding keys of its queries, and
    // every token chunk where it has a query (chunk_lo == chunk_hi: none)
    const int tokens_hi = chunk_lo < chunk_hi ? chunks : box_chunks;
    const auto takes = [&](int c) {
        if (WG == 1) return c < chunks;
        return c < box_chunks ? c >= chunk_lo && c < chunk_hi : c < tokens_hi;
    };

    const na_tc_rows rows =
        na_tc_query_rows<TY, TZ, RANK>(16 * warp, lane, ax, ay, tx, ty, h, rpb_h, rpb_x, rpb_y, az, tz, rpb_z);
    const na_tc_warp_window common = na_tc_common_window<1, RANK>(&rows);
    float o[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
    float(&of)[HD / 2] = reinterpret_cast<float(&)[HD / 2]>(o);  // the wgmma view of the same registers
    const float scale2 = (float)scale * NA_TC_LOG2E;

    // S (+)= Q K^T of the chunk staged at `stage` into d, issued as one group (not waited for)
    const auto issue_qk = [&](float(&d)[KC / 2], const T* stage) {
        const unsigned k_address = smem_address + (unsigned)((stage - smem) * (int)sizeof(T));
        na_wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ++ks) {  // a k-step is two core matrices (16 head dims) of every row group
            const unsigned long long kd = na_wgmma_desc(k_address + 256u * ks, 128u, ROW_GROUP);
            if constexpr (QS) na_wgmma_ss<T, KC, false>(d, na_wgmma_desc(q_address + 256u * ks, 128u, ROW_GROUP),
                                                         kd, ks > 0);
            else na_wgmma_rs<T, KC, false>(d, qf[ks], kd, ks > 0);
        }
        na_wgmma_commit();
    };

    float s[NT][4], sn[NT][4];  // this chunk's S; the next chunk's, in flight during this chunk's softmax
    float(&sf)[KC / 2] = reinterpret_cast<float(&)[KC / 2]>(s);
    float(&snf)[KC / 2] = reinterpret_cast<float(&)[KC / 2]>(sn);
    for (int chunk = 0; chunk < chunks; ++chunk) {
        // kv.arrive over both ranges: wait for chunk + 1 (and this one), make them visible to wgmma and the
        // block, then issue chunk + 2 into the stage chunk - 1 held (kv.arrive bounded by the box's chunks and the
        // tokens issued beside it took up to 19 registers more: ptxas wants the loop's own bound here)
        na_cp_async_wait_group<0>();
        na_fence_proxy_async();
        __syncthreads();
        if (chunk + 2 < chunks) load_chunk(chunk + 2);
        const T* stage = kv.stage_of(stages, chunk);
        unsigned pa[KC / 16][4];  // P as the A of P V: read by the product until the wait below
        const bool here = takes(chunk), next_here = takes(chunk + 1);
        // chunk 0 (the first of every warpgroup whose keys start there): nothing to overlap its S with; a
        // warpgroup starting later issued its first S as the S' of the chunk before
        if (here && chunk == 0) {
            issue_qk(sf, stage);
            na_wgmma_wait<0>();
            na_wgmma_hold(sf);
        }
        if (next_here) issue_qk(snf, kv.stage_of(stages, chunk + 1));
        if (here) {
            const unsigned v_address =
                smem_address + (unsigned)((stage - smem + L::rows(KC)) * (int)sizeof(T));
            const int c0 = chunk * KC;
            if (chunk >= box_chunks) {
                // tokens: every valid row sees each one, no window and no bias; -inf past NX (zero rows)
                const int n = (int)na_min((long long)KC, NX - (long long)(chunk - box_chunks) * KC);
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int c = 0; c < 4; ++c)
                        s[nt][c] = rows.valid[c / 2] && 8 * nt + 2 * t + c % 2 < n ? s[nt][c] * scale2 : NEG_INF;
            } else if (!rpb && na_tc_keys_full<TY>(common, c0, KC, box)) {
                // warp-uniform: without a bias, a chunk inside the window of each of the warp's rows needs no
                // test per tile (with one, the per-tile path keeps the bias loads from taking registers for all
                // tiles)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) na_tc_scale_rows(s[nt], rows, scale2);
            } else {
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    const int key0 = c0 + 8 * nt + 2 * t;  // the lane's two columns: keys key0, key0 + 1
                    bool in[1][4];
                    na_tc_visible_elements<TY, 1>(&rows, common, c0 + 8 * nt, key0, box, in);
                    na_tc_logits(s[nt], in[0], rows, key0, box, rpb, rpb_x, rpb_y, scale2, rpb_z);
                }
            }
            na_tc_softmax_chunk<NT, DT>(s, o, m, l);

            // O += P V over 16-key steps: P from registers, V's k-step is two row groups
            na_wgmma_rs_tiles<T, HD, KC>(of, pa, s, v_address, ROW_GROUP);
        }
        na_wgmma_wait<0>();  // S' and P V: the next arrive reuses this chunk's stage
        na_wgmma_hold(of);
        na_wgmma_hold(snf);
        if (next_here) {
#pragma unroll
            for (int i = 0; i < KC / 2; ++i) sf[i] = snf[i];
        }
    }

    const na_tc_output<T> dst = {out, o_b, o_x, o_y, o_h, o_l, lse, l_b, l_x, l_y, l_h, b, h, DV, o_z, l_z};
    na_tc_store_rows<T, DT, TY, TZ, RANK>(dst, o, m, l, rows, 16 * warp, lane, tx, ty, dx, dy, tz, az.dilation);
}
