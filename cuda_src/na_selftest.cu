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

// mma.sync m16n8k16 and ldmatrix, one warp: D = A (16x16, row major) x B
// (16x8, row major [k][n]) + C (16x8), three ways:
//   d_layout: fragments built from global memory with the documented layout (na_mma.cuh)
//   d_ldm:    A with ldmatrix.x4, B with ldmatrix.x2 on B^T ([n][k] rows)
//   d_trans:  A with ldmatrix.x4, B with ldmatrix.x2.trans on B's own [k][n] rows
// and every D written back with the documented C/D layout.
#include "na_mma.cuh"

template <class T>
__global__ void __launch_bounds__(32) na_selftest_mma(const T* __restrict__ a, const T* __restrict__ b,
                                                      const float* __restrict__ c, float* __restrict__ d_layout,
                                                      float* __restrict__ d_ldm, float* __restrict__ d_trans) {
    __shared__ __align__(16) T sa[16][24], sbt[8][24], sb[16][16];  // rows padded to 16-byte multiples
    const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
    for (int i = lane; i < 256; i += 32) sa[i / 16][i % 16] = a[i];
    for (int i = lane; i < 128; i += 32) {
        sbt[i % 8][i / 8] = b[i];  // b[k][n] -> sbt[n][k]
        sb[i / 8][i % 8] = b[i];
    }
    __syncthreads();
    const auto bits = [](T x) { return (unsigned)x.bits; };
    unsigned fa[4], fb[2];
    for (int r = 0; r < 4; ++r) {
        const int row = g + 8 * (r % 2), col = 2 * t + 8 * (r / 2);
        fa[r] = bits(a[row * 16 + col]) | (bits(a[row * 16 + col + 1]) << 16);
    }
    for (int r = 0; r < 2; ++r) {
        const int k = 2 * t + 8 * r;
        fb[r] = bits(b[k * 8 + g]) | (bits(b[(k + 1) * 8 + g]) << 16);
    }
    float fc[4], out[4];
    for (int i = 0; i < 4; ++i) fc[i] = c[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
    const auto store = [&](float* dst) {
        for (int i = 0; i < 4; ++i) dst[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = out[i];
    };
    na_mma<T>::run(out, fa, fb, fc);
    store(d_layout);

    unsigned la[4], lb[2], tb[2];
    na_ldmatrix<4, false>(la, &sa[lane % 16][8 * (lane / 16)]);
    na_ldmatrix<2, false>(lb, &sbt[lane % 8][8 * ((lane / 8) % 2)]);  // lanes 16..31: addresses unused
    na_ldmatrix<2, true>(tb, &sb[lane % 16][0]);                      // matrix j = rows 8j..8j+7 of B
    na_mma<T>::run(out, la, lb, fc);
    store(d_ldm);
    na_mma<T>::run(out, la, tb, fc);
    store(d_trans);
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
