// Fused neighborhood attention forward on tensor cores (fp16 / bf16, sm_80+).
//
// Same arguments, layouts and results as na_fused_fwd (na_fused.cu): out in
// the input dtype, lse in float32; with NX extra tokens (NA_EXTRA) every query
// also attends each of them, in the same softmax: after the box, the tokens
// are one more key range of the same chunk stream (chunks past the box's
// address token rows, so that the double-buffering runs on across the two),
// whose logits are scale * q.k without window or bias, -inf past the last
// token. One block of 4 warps per (batch, head,
// query tile of TX x TY (x TZ in 3D) = 64 MT group coordinates inside ONE
// dilation group per axis); warp w owns the tile's queries 16 MT w .. 16 MT
// (w + 1) - 1 (tile order, the last axis fastest): MT mma tiles of 16 rows,
// which share every K and V fragment the warp loads (MT = 2 halves the
// shared-memory reads per mma). The key box (union of the tile's windows,
// docs/design/definition.md) is walked in row-major order in chunks of KC keys,
// double-buffered in shared memory: while the warps compute on chunk c,
// cp.async copies bring chunk c + 1 (na_async.cuh; element copies instead
// where rows are strided or unaligned). Per chunk and warp:
//   S = Q K^T    mma.m16n8k16: Q fragments (ldmatrix.x4, kept in registers
//                for the whole block) x K rows (ldmatrix.x4 on [key][d] rows:
//                two k-steps a load);
//                8-key column tiles that none of the warp's queries sees
//                are skipped (warp-uniform);
//   mask         logits outside each query's own window are -inf (exact
//                causal / strided / dilated windows), then scale and bias,
//                in log2 units (scale and bias times log2 e) so that the
//                softmax needs one ex2 per logit; tiles inside the common
//                window of the warp's rows skip the per-element test, and
//                without a bias a whole chunk inside it skips the per-tile
//                tests and votes;
//   softmax      online per row in fp32 (the 4 lanes of a quad share a row:
//                max and sum reduced with __shfl_xor_sync), never exp(-inf - -inf);
//   O += P V     P rounded to T and repacked from the accumulator layout
//                into A fragments, V with ldmatrix.x4.trans on [key][d] rows.
// Rows of K/V past the chunk's end (the box's or the tokens') and head dims
// past D are zero in shared memory, so padding contributes exact zeros. A NaN or Inf in a key poisons
// exactly the queries whose windows hold it; a NaN or Inf in a value can also
// reach the other queries of the block's tile whose 16-row mma tile sees a
// key of the 16-key step that holds it (as 0 * NaN in P V): fused kernels
// may poison queries of the same tile (docs/design/testing.md#non-finite-inputs).
//
// Template parameters: element type T (fp16_t, bf16_t), head-dim bucket HD
// (32 | HD; runtime D <= HD), query tile TX x TY (TX * TY = 64 MT; 1D: TY =
// 1), keys per chunk KC (16 | KC, 4 KC >= 64 MT), mma tiles per warp MT (1 or
// 2), then RANK (3: a 3D problem, whose tile is TX x TY x TZ = 64 MT queries,
// z fastest, and whose box is walked row-major in (x, y, z); below 3 the z
// axis is the trivial one and every z term folds away) and TZ. Dynamic shared
// memory (na_rtc/runtime/fused_tc.py mirrors it): 4 KC rows of HD + 8
// elements, two stages of a K and a V chunk; the Q tile is staged there until
// its fragments are in registers (in stage 1's rows when it fits, so that
// chunk 0 loads at the same time). Static shared memory: the tokens' addresses
// (na_tc_token_rows).
#include "na_types.cuh"
#include "na_window.cuh"
#include "na_shared.cuh"
#include "na_tile.cuh"
#include "na_mma.cuh"
#include "na_tc_softmax.cuh"
#include "na_args.cuh"

template <class T, int HD, int TX, int TY, int KC, int MT, int RANK = 2, int TZ = 1>
__global__ void __launch_bounds__(NA_TC_THREADS, 1) na_fused_tc_fwd(
    const T* __restrict__ q, NA_TENSOR(q), const T* __restrict__ k, NA_TENSOR(k), const T* __restrict__ v,
    NA_TENSOR(v), const float* __restrict__ rpb, NA_BIAS(rpb), NA_EXTRA(T),
    T* __restrict__ out, NA_TENSOR(o), float* __restrict__ lse, NA_ROWS(l), double scale, NA_PROBLEM) {
    constexpr int NQ = TX * TY * TZ;
    constexpr int P = HD + 8;         // row pitch: 16-byte rows, shifted 4 banks per row for ldmatrix
    constexpr int KSTEPS = HD / 16;   // k-steps of Q K^T over head dims
    constexpr int NT = KC / 8;        // 8-key column tiles per chunk
    constexpr int DT = HD / 8;        // 8-dim column tiles of the output
    constexpr int STAGE = 2 * KC;     // rows of one pipeline stage: a K chunk, then a V chunk
    constexpr bool Q_IN_STAGE1 = NQ <= STAGE;  // else Q takes both stages before chunk 0 loads
    static_assert((MT == 1 || MT == 2) && NQ == 16 * MT * NA_TC_WARPS, "MT mma tiles of 16 rows per warp");
    static_assert(HD % 32 == 0 && KC % 16 == 0 && NQ <= 2 * STAGE, "mma shapes; the Q tile fits in the stages");
    static_assert(RANK == 3 || TZ == 1, "a z extent in 3D only");
    const float NEG_INF = __int_as_float(0xff800000);

    NA_TC_DECODE_BLOCK_RANK(TX, TY, TZ, RANK)
    if (!tile_ok) return;  // uniform over the block
    const na_tc_box<TY, RANK> box = na_tc_box_of<TY, RANK>(tx, ty, tz);
    const int d_len = (int)D;
    // the z strides, constant 0 below rank 3 (the arguments are 0 there too), so that z terms fold away
    const long long q_z3 = RANK == 3 ? q_z : 0, k_z3 = RANK == 3 ? k_z : 0, v_z3 = RANK == 3 ? v_z : 0;

    T* smem = reinterpret_cast<T*>(na_dynamic_shared());
    T* sq = Q_IN_STAGE1 ? smem + STAGE * P : smem;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, t = lane & 3;

    // the box's chunks, then the extra tokens' (none without tokens), whose addresses thread 0 leaves in shared
    // memory (read after the barrier below that frees the Q rows)
    __shared__ na_tc_token_rows<T> tokens;
    if (tid == 0)
        tokens = na_tc_token_rows_of(xk, xk_b, xk_n, xk_h, xk_l, xv, xv_b, xv_n, xv_h, xv_l, NX, D, DV, b,
                                     NA_KV_HEAD(h), box);
    const int box_chunks = (box.keys + KC - 1) / KC;
    const na_tc_kv_token_stream<T, HD, na_rows_pitch<P>, KC, TY, NA_TC_THREADS, 2, RANK> kv = {
        na_tc_kv_stream_of<T, HD, na_rows_pitch<P>, KC, TY, NA_TC_THREADS, 2, RANK>(
            k, {k_b, k_x, k_y, k_h, k_l}, v, {v_b, v_x, v_y, v_h, v_l}, D, DV, tx, ty, dx, dy, b, NA_KV_HEAD(h), tz,
            az.dilation, k_z3, v_z3),
        &tokens, box_chunks};

    // the tile's queries (valid ones at row qx * TY + qy, zeros elsewhere), with chunk 0 if Q leaves stage 0 free
    na_tc_load_tile<T, HD, na_rows_pitch<P>, TX, TY, NA_TC_THREADS, TZ>(sq, q, q_b, q_x, q_y, q_h, q_l, b, h, d_len,
                                                                       dx, dy, tx, ty, tz, az.dilation, q_z3);
    if (Q_IN_STAGE1) kv.load(smem, box, 0);
    else na_cp_async_commit();
    na_cp_async_wait_group<0>();
    __syncthreads();
    unsigned qf[MT][KSTEPS][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ++ks)
            na_ldmatrix<4, false>(qf[mt][ks], sq + (16 * (MT * warp + mt) + (lane & 15)) * P + 16 * ks + 8 * (lane >> 4));

    // this lane's two query rows in each of its mma tiles: windows in box coordinates
    na_tc_rows rows[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        rows[mt] = na_tc_query_rows<TY, TZ, RANK>(16 * (MT * warp + mt), lane, ax, ay, tx, ty, h, rpb_h, rpb_x, rpb_y,
                                                  az, tz, rpb_z);
    const na_tc_warp_window common = na_tc_common_window<MT, RANK>(rows);

    float o[MT][DT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.f;
    float m[MT][2], l[MT][2];  // running max (log2 units) and sum per row
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) m[mt][0] = m[mt][1] = NEG_INF, l[mt][0] = l[mt][1] = 0.f;
    const float scale2 = (float)scale * NA_TC_LOG2E;
    const int chunks = kv.chunks((int)NX);
    __syncthreads();  // every warp holds its Q fragments: the Q rows are free
    if (!Q_IN_STAGE1) kv.load(smem, box, 0);

    for (int chunk = 0; chunk < chunks; ++chunk) {
        const T* sk = kv.arrive(smem, box, chunk, chunks);
        const T* sv = sk + KC * P;
        // the chunk's first key: a box key, or past the box's chunks a token (block-uniform)
        const bool token_chunk = chunk >= box_chunks;
        const int c0 = (token_chunk ? chunk - box_chunks : chunk) * KC;

        // S = Q K^T for the chunk's 8-key tiles this warp's queries see; masked logits -inf. Without a
        // bias, a chunk inside the window of each of the warp's rows takes no test per tile (warp-uniform).
        // Every query sees every token (no window, no bias): a chunk of tokens is full but for the last
        const bool chunk_full = token_chunk ? c0 + KC <= NX : !rpb && na_tc_keys_full(common, c0, KC, box);
        float s[MT][NT][4];
        bool tile_live[NT];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const int key0 = c0 + 8 * nt + 2 * t;  // the lane's two columns: keys key0, key0 + 1
            bool in[MT][4];
            if (token_chunk) tile_live[nt] = chunk_full || c0 + 8 * nt < NX;
            else tile_live[nt] = chunk_full || na_tc_visible_tile<TY, MT>(rows, common, c0 + 8 * nt, key0, box, in);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
            if (tile_live[nt]) {  // warp-uniform: ldmatrix and mma need every lane
#pragma unroll
                for (int ks = 0; ks < KSTEPS; ks += 2) {  // x4: the B fragments of k-steps ks and ks + 1
                    unsigned kf[4];
                    na_ldmatrix<4, false>(kf, sk + (8 * nt + (lane & 7)) * P + 16 * ks + 8 * (lane >> 3));
                    const unsigned k0[2] = {kf[0], kf[1]}, k1[2] = {kf[2], kf[3]};
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        na_mma<T>::run(s[mt][nt], qf[mt][ks], k0, s[mt][nt]);
                        na_mma<T>::run(s[mt][nt], qf[mt][ks + 1], k1, s[mt][nt]);
                    }
                }
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if (chunk_full) na_tc_scale_rows(s[mt][nt], rows[mt], scale2);
                // tokens past the last are zero rows, whose logit 0 would count without the column test
                else if (token_chunk) na_tc_scale_columns(s[mt][nt], rows[mt], key0, (int)NX, scale2);
                else na_tc_logits(s[mt][nt], in[mt], rows[mt], key0, box, rpb, rpb_x, rpb_y, scale2, rpb_z);
            }
        }

        // online softmax, row i of this lane = rows g and g + 8 of each mma tile
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) na_tc_softmax_chunk<NT, DT>(s[mt], o[mt], m[mt], l[mt]);

        // O += P V over 16-key steps (pairs of 8-key tiles); steps no query of the warp sees add nothing
#pragma unroll
        for (int ps = 0; ps < KC / 16; ++ps) {
            if (!tile_live[2 * ps] && !tile_live[2 * ps + 1]) continue;  // warp-uniform
            unsigned pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) na_mma_pack_a<T>(pa[mt], s[mt][2 * ps], s[mt][2 * ps + 1]);
#pragma unroll
            for (int dt = 0; dt < DT; dt += 2) {  // x4.trans: the B fragments of dim tiles dt and dt + 1
                unsigned vf[4];
                na_ldmatrix<4, true>(vf, sv + (16 * ps + (lane & 15)) * P + 8 * dt + 8 * (lane >> 4));
                const unsigned v0[2] = {vf[0], vf[1]}, v1[2] = {vf[2], vf[3]};
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    na_mma<T>::run(o[mt][dt], pa[mt], v0, o[mt][dt]);
                    na_mma<T>::run(o[mt][dt + 1], pa[mt], v1, o[mt][dt + 1]);
                }
            }
        }
    }

    const na_tc_output<T> dst = {out, o_b, o_x, o_y, o_h, o_l, lse, l_b, l_x, l_y, l_h, b, h, DV, o_z, l_z};
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        na_tc_store_rows<T, DT, TY, TZ, RANK>(dst, o[mt], m[mt], l[mt], rows[mt], 16 * (MT * warp + mt), lane, tx, ty,
                                              dx, dy, tz, az.dilation);
}
