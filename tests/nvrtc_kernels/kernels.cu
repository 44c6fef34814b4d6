// Test kernels for tests/test_nvrtc.py and tests/test_cache.py (not part of na_rtc).
#include "common.cuh"

template <class T, int N>
__global__ void scale(T* __restrict__ out, const T* __restrict__ in, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = twice(in[i]) * T(N);
}

namespace na_test {
template <class T>
__global__ void block_sum(T* out, const T* in) {
    __shared__ T partial[256];
    partial[threadIdx.x] = in[blockIdx.x * 256 + threadIdx.x];
    __syncthreads();
    for (int half = 128; half > 0; half /= 2) {
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}
}  // namespace na_test

extern "C" __global__ void plain_copy(float* out, const float* in) {
    out[threadIdx.x] = in[threadIdx.x];
}
