// Self-test of the wgmma primitives (na_wgmma.cuh; built for sm_90a, like
// the kernels that use them). One or two warpgroups (128 or 256 threads),
// warpgroup j owning rows 64 j .. 64 j + 63 of A and D as in the kernels with
// two warpgroups: D (64 WG x N) from A (64 WG x 32, row major) and B (32 x N,
// row major [k][n]; bt is B^T, [n][k]) in two k-steps of 16, both B majors:
//   d_kmajor = A B + C   B^T rows ([n][k]) as K-major core matrices, ordered
//                        [n / 8][k / 8]: LBO 128 bytes, SBO 512 (4 along K);
//   d_mnmajor = A B      B's rows ([k][n]) as MN-major core matrices, ordered
//                        [k / 8][n / 8]: SBO 128, LBO 16 N; the first k-step
//                        without accumulation (scale-d 0: C is not added);
//   d_ss = A B           the SS form: A's rows ([m][k]) as K-major core
//                        matrices too (ordered [m / 8][k / 8], the K-major
//                        fields; warpgroup j's descriptor starts at its own
//                        64 rows), B K-major, the first k-step as d_mnmajor's.
// The operands are staged with plain stores (async_copies 0) or, as the
// fused kernels stage theirs (na_fused_wg*.cu), with cp.async, its wait, then
// fence.proxy.async in the copying threads and a barrier (async_copies 1).
// A fragments come from global memory with the documented layout and D goes
// back the same way, so the test checks the fragment layouts, the descriptor
// fields and both flags against one plain matrix product. The LBO / SBO
// values are arguments (the documented ones: 128, 512, 16 N, 128) so that a
// GPU that disagrees can be asked which other reading of the fields it
// follows (na_rtc/verify/primitives.py tries them when the documented one
// fails; the launch's shared memory has room for what such a misreading
// reaches).
#include "na_types.cuh"
#include "na_shared.cuh"
#include "na_wgmma.cuh"

template <class T, int N>
__global__ void __launch_bounds__(256) na_selftest_wgmma(const T* __restrict__ a, const T* __restrict__ b,
                                                         const T* __restrict__ bt, const float* __restrict__ c,
                                                         float* __restrict__ d_kmajor, float* __restrict__ d_mnmajor,
                                                         float* __restrict__ d_ss, int k_lbo, int k_sbo, int m_lbo,
                                                         int m_sbo, int async_copies) {
    constexpr int K = 32;
    const int threads = blockDim.x, rows = threads / 2;  // 64 rows of A and D per warpgroup of 128 threads
    T* sa = reinterpret_cast<T*>(na_dynamic_shared());   // K-major copy of A: rows * K elements
    T* sk = sa + rows * K;                               // K-major copy of B: K * N elements
    T* sm = sk + K * N;                                  // MN-major copy of B
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    if (async_copies) {  // 16-byte pieces: one core-matrix row each, 8 elements contiguous in the source too
        for (int p = tid; p < N * K / 8; p += threads) {
            const int n = p / (K / 8), kc = p % (K / 8);
            na_cp_async_16(sk + ((n / 8) * (K / 8) + kc) * 64 + (n % 8) * 8, bt + n * K + 8 * kc);
        }
        for (int p = tid; p < K * N / 8; p += threads) {
            const int k = p / (N / 8), nc = p % (N / 8);
            na_cp_async_16(sm + ((k / 8) * (N / 8) + nc) * 64 + (k % 8) * 8, b + k * N + 8 * nc);
        }
        for (int p = tid; p < rows * K / 8; p += threads) {
            const int m = p / (K / 8), kc = p % (K / 8);
            na_cp_async_16(sa + ((m / 8) * (K / 8) + kc) * 64 + (m % 8) * 8, a + m * K + 8 * kc);
        }
        na_cp_async_commit();
        na_cp_async_wait_group<0>();
    } else {
        for (int i = tid; i < K * N; i += threads) {
            const int k = i / N, n = i % N;
            sk[((n / 8) * (K / 8) + k / 8) * 64 + (n % 8) * 8 + k % 8] = b[i];
            sm[((k / 8) * (N / 8) + n / 8) * 64 + (k % 8) * 8 + n % 8] = b[i];
        }
        for (int i = tid; i < rows * K; i += threads) {
            const int m = i / K, k = i % K;
            sa[((m / 8) * (K / 8) + k / 8) * 64 + (m % 8) * 8 + k % 8] = a[i];
        }
    }
    na_fence_proxy_async();  // this thread's stores or landed copies, read next by the async proxy
    __syncthreads();

    unsigned fa[2][4];  // the two k-steps' A fragments of this warp's rows 16 warp ..
    for (int ks = 0; ks < 2; ++ks)
        for (int r = 0; r < 4; ++r) {
            const int row = 16 * warp + g + 8 * (r % 2), col = 16 * ks + 2 * t + 8 * (r / 2);
            fa[ks][r] = (unsigned)a[row * K + col].bits | ((unsigned)a[row * K + col + 1].bits << 16);
        }
    const auto at = [&](int i) { return (16 * warp + g + 8 * ((i / 2) % 2)) * N + 8 * (i / 4) + 2 * t + i % 2; };
    float dk[N / 2], dm[N / 2], ds[N / 2];
    for (int i = 0; i < N / 2; ++i) dk[i] = c[at(i)], dm[i] = c[at(i)], ds[i] = c[at(i)];

    // warpgroup j's A rows start 64 j rows (8 row groups of K / 8 core matrices) into the K-major copy
    const unsigned a_base = na_shared_address(sa) + (unsigned)((warp / 4) * 64 * K * (int)sizeof(T)),
                   k_base = na_shared_address(sk), m_base = na_shared_address(sm);
    constexpr unsigned K_STEP = 2 * 128, M_STEP = 2 * 128 * (N / 8);  // two core matrices along K
    na_wgmma_hold(dk);
    na_wgmma_hold(dm);
    na_wgmma_hold(ds);
    na_wgmma_fence();
    for (int ks = 0; ks < 2; ++ks) {
        const unsigned long long kb = na_wgmma_desc(k_base + ks * K_STEP, k_lbo, k_sbo);
        na_wgmma_rs<T, N, false>(dk, fa[ks], kb, true);
        na_wgmma_rs<T, N, true>(dm, fa[ks], na_wgmma_desc(m_base + ks * M_STEP, m_lbo, m_sbo), ks > 0);
        na_wgmma_ss<T, N, false>(ds, na_wgmma_desc(a_base + ks * K_STEP, k_lbo, k_sbo), kb, ks > 0);
    }
    na_wgmma_commit();
    na_wgmma_wait<0>();
    na_wgmma_hold(dk);
    na_wgmma_hold(dm);
    na_wgmma_hold(ds);
    for (int i = 0; i < N / 2; ++i) d_kmajor[at(i)] = dk[i], d_mnmajor[at(i)] = dm[i], d_ss[at(i)] = ds[i];
}
