// The forward's per-row math on accumulator tiles, shared by the mma.sync
// forward (na_fused_tc.cu) and the wgmma forward (na_fused_wg.cu), whose
// logits and outputs have the same per-warp layout: a lane holds rows g and
// g + 8 (g = lane / 4) of a 16-row tile, in 8-column tiles of 4 floats
// (element 2 i + e: row g + 8 i, column 2 (lane % 4) + e).
//
//   na_tc_logits         one 8-key tile: scale and bias in log2 units, -inf
//                        outside each row's window
//   na_tc_scale_rows     the same for a tile inside both rows' windows, no bias
//   na_tc_scale_columns  the same for a tile of extra tokens, -inf past the last
//   na_tc_softmax_chunk  online softmax over a chunk's tiles: logits become
//                        probabilities, the output and the row sums rescale
//   na_tc_store_rows     the normalized output and the logsumexp of both rows
// (the probabilities of a 16-key step become an mma A fragment with
// na_mma_pack_a, na_mma.cuh)
#pragma once

#include "na_mma.cuh"
#include "na_tc_common.cuh"

// the logits of one 8-key tile (box keys key0, key0 + 1 for this lane): in[c] says which are visible
// (rpb_z: the bias's z stride, RANK 3 only)
template <int TY, int RANK = 2>
__device__ __forceinline__ void na_tc_logits(float (&s)[4], const bool (&in)[4], const na_tc_rows& rows, int key0,
                                             const na_tc_box<TY, RANK>& box, const float* __restrict__ rpb,
                                             long long rpb_x, long long rpb_y, float scale2, long long rpb_z = 0) {
    const float NEG_INF = __int_as_float(0xff800000);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        float x = s[c] * scale2;
        if (rpb && in[c]) x += rpb[na_tc_bias_index(rows, c / 2, key0 + c % 2, box, rpb_x, rpb_y, rpb_z)] * NA_TC_LOG2E;
        s[c] = in[c] ? x : NEG_INF;
    }
}

// the logits of an 8-key tile that lies inside the window of both of the lane's rows, without a bias:
// scaled (log2 units), -inf in a row that does not exist
__device__ __forceinline__ void na_tc_scale_rows(float (&s)[4], const na_tc_rows& rows, float scale2) {
    const float NEG_INF = __int_as_float(0xff800000);
#pragma unroll
    for (int c = 0; c < 4; ++c) s[c] = rows.valid[c / 2] ? s[c] * scale2 : NEG_INF;
}

// the same for an 8-key tile of which only the columns (this lane's key0, key0 + 1) below `count` exist (the
// extra tokens' last chunk): -inf past them too
__device__ __forceinline__ void na_tc_scale_columns(float (&s)[4], const na_tc_rows& rows, int key0, int count,
                                                    float scale2) {
    const float NEG_INF = __int_as_float(0xff800000);
#pragma unroll
    for (int c = 0; c < 4; ++c) s[c] = rows.valid[c / 2] && key0 + c % 2 < count ? s[c] * scale2 : NEG_INF;
}

// One chunk of the online softmax of a lane's two rows: s (log2-unit logits of
// NT 8-key tiles) becomes exp2(s - m), m the running row max; o (DT 8-dim
// tiles) and the running sum l are rescaled. The 4 lanes of a quad share a row.
template <int NT, int DT>
__device__ __forceinline__ void na_tc_softmax_chunk(float (&s)[NT][4], float (&o)[DT][4], float (&m)[2],
                                                    float (&l)[2]) {
    const float NEG_INF = __int_as_float(0xff800000);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        // fmaxf passes over a NaN logit like a comparison would (one instruction instead of two); a NaN
        // reaches the output through its probability instead
        float cmax = NEG_INF;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) cmax = fmaxf(cmax, s[nt][2 * i + e]);
        for (int off = 1; off < 4; off *= 2) cmax = fmaxf(cmax, __shfl_xor_sync(NA_TC_FULL, cmax, off));
        const float mnew = fmaxf(cmax, m[i]);
        // a row with no visible key yet keeps m = -inf (p = alpha = 0, o and l stay 0): never -inf - -inf
        const float mref = mnew == NEG_INF ? 0.f : mnew;
        const float alpha = na_exp2_fast(m[i] - mref);  // m = -inf: 0
        float rowsum = 0.f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float p = na_exp2_fast(s[nt][2 * i + e] - mref);  // -inf: 0; NaN stays NaN
                s[nt][2 * i + e] = p;
                rowsum += p;
            }
        l[i] = l[i] * alpha + rowsum;
        m[i] = mnew;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            o[dt][2 * i] *= alpha;
            o[dt][2 * i + 1] *= alpha;
        }
    }
}

// Where the forward writes: out (strides b, x, y, h, head dim) and lse (b, x, y, h), one (b, h); the z
// strides of out and lse last (RANK 3 only: lower ranks leave them 0).
template <class T>
struct na_tc_output {
    T* out;
    long long o_b, o_x, o_y, o_h, o_l;
    float* lse;
    long long l_b, l_x, l_y, l_h;
    long long b, h, D;
    long long o_z = 0, l_z = 0;
};

// out = o / l and lse = (m + log2 l) ln 2 of the lane's valid rows of the 16-row tile at tile row row0 (tz,
// dz: the z axis of a 3D tile of TZ rows; lower ranks keep the defaults)
template <class T, int DT, int TY, int TZ = 1, int RANK = 2>
__device__ __forceinline__ void na_tc_store_rows(const na_tc_output<T>& w, const float (&o)[DT][4],
                                                 const float (&m)[2], const float (&l)[2], const na_tc_rows& rows,
                                                 int row0, int lane, const na_tile_axis& tx, const na_tile_axis& ty,
                                                 long long dx, long long dy, const na_tile_axis& tz = NA_TC_NO_Z,
                                                 long long dz = 1) {
    const int t = lane & 3;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        float sum = l[i];  // the row sum is spread over the quad
        sum += __shfl_xor_sync(NA_TC_FULL, sum, 1);
        sum += __shfl_xor_sync(NA_TC_FULL, sum, 2);
        if (!rows.valid[i]) continue;
        long long x, y, z;
        na_tc_row_position<TY, TZ>(row0 + (lane >> 2) + 8 * i, tx, ty, tz, dx, dy, dz, x, y, z);
        const long long at = w.b * w.o_b + x * w.o_x + y * w.o_y + w.h * w.o_h + (RANK == 3 ? z * w.o_z : 0);
        const float inv = 1.f / sum;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const long long d = 8 * dt + 2 * t + e;
                if (d < w.D) na_store<T, float>(w.out, at + d * w.o_l, o[dt][2 * i + e] * inv);
            }
        if (t == 0)
            w.lse[w.b * w.l_b + x * w.l_x + y * w.l_y + w.h * w.l_h + (RANK == 3 ? z * w.l_z : 0)] =
                (m[i] + na_log2(sum)) * NA_TC_LN2;
    }
}
