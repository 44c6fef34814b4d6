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
