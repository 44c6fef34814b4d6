// Self-tests of the inline-PTX and emulated primitives the kernels rely on.
// `make gpu-check` runs them first on the GPU; the emulator runs the same
// source, so both are checked against one Python definition.
#include "na_types.cuh"

// float32 -> fp16 / bf16 bits (round to nearest even) and back to float32
__global__ void na_selftest_convert(const float* __restrict__ in, unsigned short* __restrict__ f16,
                                    unsigned short* __restrict__ bf16, float* __restrict__ f16_back,
                                    float* __restrict__ bf16_back, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    f16[i] = na_f32_to_f16(in[i]);
    bf16[i] = na_f32_to_bf16(in[i]);
    f16_back[i] = na_f16_to_f32(f16[i]);
    bf16_back[i] = na_bf16_to_f32(bf16[i]);
}

// mma.sync m16n8k16 and ldmatrix, one warp: D = A (16 x 32, row major) x B (32 x 16, row major [k][n]) +
// C (16 x 16), two k-steps of two 8-column tiles, five ways, each D written back with the documented C/D
// layout into d[path][16][16]:
//   0  fragments built from global memory with the documented layout (na_mma.cuh)
//   1  A through ldmatrix.x4 (one per k-step, as the kernels load Q, dOut, K and V tiles as A), B through
//      ldmatrix.x2 on the rows of B^T ([n][k] storage: the backward's K and V)
//   2  B through ldmatrix.x2.trans on B's own [k][n] rows (the backward's dQ and dK/dV products)
//   3  B through ldmatrix.x4 on the rows of B^T, both k-steps of a column tile at once (the forward's K)
//   4  B through ldmatrix.x4.trans on B's rows, both column tiles of a k-step at once (the forward's V)
#include "na_mma.cuh"

template <class T>
__global__ void __launch_bounds__(32) na_selftest_mma(const T* __restrict__ a, const T* __restrict__ b,
                                                      const float* __restrict__ c, float* __restrict__ d) {
    constexpr int K = 32, N = 16;
    // rows padded by 8 elements: 16-byte multiples, as the kernels' staged rows (ldmatrix needs 16-byte rows)
    __shared__ __align__(16) T sa[16][K + 8], sbt[N][K + 8], sb[K][N + 8];
    const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
    for (int i = lane; i < 16 * K; i += 32) sa[i / K][i % K] = a[i];
    for (int i = lane; i < K * N; i += 32) {
        sbt[i % N][i / N] = b[i];  // b[k][n] -> sbt[n][k]
        sb[i / N][i % N] = b[i];
    }
    __syncthreads();
    const auto bits = [](T x) { return (unsigned)x.bits; };
    unsigned fa[2][4], fb[2][2][2];  // [k-step][register], [k-step][column tile][register]
    for (int ks = 0; ks < 2; ++ks) {
        for (int r = 0; r < 4; ++r) {
            const int row = g + 8 * (r % 2), col = 16 * ks + 2 * t + 8 * (r / 2);
            fa[ks][r] = bits(a[row * K + col]) | (bits(a[row * K + col + 1]) << 16);
        }
        for (int nt = 0; nt < 2; ++nt)
            for (int r = 0; r < 2; ++r) {
                const int k = 16 * ks + 2 * t + 8 * r, n = 8 * nt + g;
                fb[ks][nt][r] = bits(b[k * N + n]) | (bits(b[(k + 1) * N + n]) << 16);
            }
    }
    float acc[2][4];
    const auto at = [&](int nt, int i) { return (g + 8 * (i / 2)) * N + 8 * nt + 2 * t + i % 2; };
    const auto start = [&]() {
        for (int nt = 0; nt < 2; ++nt)
            for (int i = 0; i < 4; ++i) acc[nt][i] = c[at(nt, i)];
    };
    const auto store = [&](int path) {
        for (int nt = 0; nt < 2; ++nt)
            for (int i = 0; i < 4; ++i) d[256 * path + at(nt, i)] = acc[nt][i];
    };

    start();
    for (int ks = 0; ks < 2; ++ks)
        for (int nt = 0; nt < 2; ++nt) na_mma<T>::run(acc[nt], fa[ks], fb[ks][nt], acc[nt]);
    store(0);

    unsigned la[2][4];
    for (int ks = 0; ks < 2; ++ks) na_ldmatrix<4, false>(la[ks], &sa[lane % 16][16 * ks + 8 * (lane / 16)]);
    start();
    for (int ks = 0; ks < 2; ++ks)
        for (int nt = 0; nt < 2; ++nt) {
            unsigned f[2];  // lanes 16..31: addresses unused
            na_ldmatrix<2, false>(f, &sbt[8 * nt + lane % 8][16 * ks + 8 * ((lane / 8) % 2)]);
            na_mma<T>::run(acc[nt], la[ks], f, acc[nt]);
        }
    store(1);

    start();
    for (int ks = 0; ks < 2; ++ks)
        for (int nt = 0; nt < 2; ++nt) {
            unsigned f[2];  // matrix j: k rows 16 ks + 8 j .. + 7 of column tile nt
            na_ldmatrix<2, true>(f, &sb[16 * ks + lane % 16][8 * nt]);
            na_mma<T>::run(acc[nt], la[ks], f, acc[nt]);
        }
    store(2);

    start();
    for (int nt = 0; nt < 2; ++nt) {
        unsigned f[4];  // matrix j: columns 8 j .. 8 j + 7 of B^T's rows 8 nt ..: registers 0, 1 k-step 0; 2, 3 k-step 1
        na_ldmatrix<4, false>(f, &sbt[8 * nt + lane % 8][8 * (lane / 8)]);
        const unsigned f0[2] = {f[0], f[1]}, f1[2] = {f[2], f[3]};
        na_mma<T>::run(acc[nt], la[0], f0, acc[nt]);
        na_mma<T>::run(acc[nt], la[1], f1, acc[nt]);
    }
    store(3);

    start();
    for (int ks = 0; ks < 2; ++ks) {
        unsigned f[4];  // lanes 0..15: column tile 0's k rows, lanes 16..31: column tile 1's
        na_ldmatrix<4, true>(f, &sb[16 * ks + lane % 16][8 * (lane / 16)]);
        const unsigned f0[2] = {f[0], f[1]}, f1[2] = {f[2], f[3]};
        na_mma<T>::run(acc[0], la[ks], f0, acc[0]);
        na_mma<T>::run(acc[1], la[ks], f1, acc[1]);
    }
    store(4);
}

// ldmatrix m8n8 fragment layout, every variant (x1, x2, x4, each plain and .trans), one warp. Shared row s
// (of 32, 16 bytes each) holds the 16-bit values 8 s .. 8 s + 7; lane l gives the address of row rows[l] (a
// permutation from the caller, so that every lane's address matters and none is in lane order).
// out[v][l][j] is register j of lane l for variant v = 2 log2(count) + trans (registers past the count are
// not written). The caller compares them with the PTX ISA's layout.
__global__ void __launch_bounds__(32) na_selftest_ldmatrix(const int* __restrict__ rows,
                                                           unsigned* __restrict__ out) {
    __shared__ __align__(16) unsigned short m[32][8];
    const int lane = threadIdx.x;
    for (int i = 0; i < 8; ++i) m[lane][i] = (unsigned short)(8 * lane + i);
    __syncthreads();
    const unsigned short* row = m[rows[lane]];
    unsigned r1[1], r2[2], r4[4];
    const auto put = [&](int variant, const unsigned* r, int count) {
        for (int j = 0; j < count; ++j) out[(variant * 32 + lane) * 4 + j] = r[j];
    };
    na_ldmatrix<1, false>(r1, row);
    put(0, r1, 1);
    na_ldmatrix<1, true>(r1, row);
    put(1, r1, 1);
    na_ldmatrix<2, false>(r2, row);
    put(2, r2, 2);
    na_ldmatrix<2, true>(r2, row);
    put(3, r2, 2);
    na_ldmatrix<4, false>(r4, row);
    put(4, r4, 4);
    na_ldmatrix<4, true>(r4, row);
    put(5, r4, 4);
}

// Warp shuffles and votes in the forms the kernels use: full mask, __shfl_xor_sync on int (na_tc_common.cuh)
// and float (na_fused.cu, na_tc_softmax.cuh), __any_sync (na_fused.cu, na_tc_common.cuh); no kernel uses a
// partial mask. Two warps, so that a lane is threadIdx.x % 32 and a vote stays inside its warp:
//   xi[o][i] = __shfl_xor_sync(~0, vi[i], o), xf likewise for floats (bits must move unchanged: NaN
//   payloads, -0, subnormals, inf), for every lane mask o = 0 .. 31;
//   any[p][i] = __any_sync(~0, i == p) for p = 0 .. 64 (p = 64: no thread's predicate holds).
__global__ void __launch_bounds__(64) na_selftest_shuffle(const int* __restrict__ vi, const float* __restrict__ vf,
                                                          int* __restrict__ xi, float* __restrict__ xf,
                                                          int* __restrict__ any) {
    const int i = threadIdx.x;
    const int v = vi[i];
    const float f = vf[i];
    for (int o = 0; o < 32; ++o) {
        xi[64 * o + i] = __shfl_xor_sync(0xffffffffu, v, o);
        xf[64 * o + i] = __shfl_xor_sync(0xffffffffu, f, o);
    }
    for (int p = 0; p <= 64; ++p) any[64 * p + i] = __any_sync(0xffffffffu, i == p);
}

// na_divisor (na_tc_box.cuh): q[i] = n[i] / d[i] through the multiply-high, for 0 <= n < 2^31, 1 <= d < 2^31
#include "na_tc_box.cuh"
#include "na_async.cuh"
#include "na_shared.cuh"

__global__ void na_selftest_divide(const int* __restrict__ n, const int* __restrict__ d, int* __restrict__ q,
                                   long long count) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) q[i] = na_divide(na_make_divisor((unsigned)d[i]), n[i]);
}

// na_exp2_fast (na_types.cuh): ex2.approx on the GPU
__global__ void na_selftest_exp2(const float* __restrict__ x, float* __restrict__ y, long long count) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) y[i] = na_exp2_fast(x[i]);
}

// cp.async (na_async.cuh), one block of 128 threads: thread i copies bytes 16 i .. 16 i + 15 of src into
// shared memory, the first i % 17 of them for real and the rest zero-filled, in two groups (even threads'
// pieces first, then odd threads'): after wait_group<1> the first group has landed; after wait_group<0>
// both. out[0 .. 2047] is the shared copy after the first wait for even threads' pieces (odd ones
// unspecified there: they may land early), out[2048 .. 4095] after the second.
__global__ void __launch_bounds__(128) na_selftest_cp_async(const unsigned char* __restrict__ src,
                                                            unsigned char* __restrict__ out) {
    __shared__ __align__(16) unsigned char piece[128 * 16];
    const int i = threadIdx.x;
    const auto issue = [&]() { na_cp_async_zfill_16(piece + 16 * i, src + 16 * i, i % 17); };
    if (i % 2 == 0) issue();
    na_cp_async_commit();
    if (i % 2 == 1) issue();
    na_cp_async_commit();
    na_cp_async_wait_group<1>();
    if (i % 2 == 0)
        for (int b = 0; b < 16; ++b) out[16 * i + b] = piece[16 * i + b];
    na_cp_async_wait_group<0>();
    __syncthreads();
    for (int b = 0; b < 16; ++b) out[2048 + 16 * i + b] = piece[16 * i + b];
}

// na_tc_group_window (na_tc_box.cuh) on every position of each axis: axes[a] = (length, kernel, stride,
// dilation, causal); window[a][i] = (start, end) of position i, group coordinates; one block per axis
__global__ void na_selftest_group_window(const long long* __restrict__ axes, int* __restrict__ window,
                                         long long max_length) {
    const long long* c = axes + 5 * blockIdx.x;
    const na_axis a = {c[0], c[1], c[2], c[3], c[4]};
    for (long long i = threadIdx.x; i < a.length; i += blockDim.x) {
        na_tile_axis t;
        t.g = i % a.dilation;
        t.lg = na_group_length(a, t.g);
        int start, end;
        na_tc_group_window(na_tc_group_axis_of(a, t), (int)(i / a.dilation), start, end);
        window[2 * (blockIdx.x * max_length + i)] = start;
        window[2 * (blockIdx.x * max_length + i) + 1] = end;
    }
}
