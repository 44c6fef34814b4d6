// A deliberately broken tensor-core dq kernel, for the tests of first-use verification (tests/test_verify.py):
// the real na_fused_tc_bwd.cu with an explicit specialization of one dq instantiation that returns plausible
// but wrong numbers (dq = q), while the dK/dV kernel beside it stays correct: verification must condemn the
// dq kernel alone. The specialization's parameters must be the template's.
#include "na_fused_tc_bwd.cu"  // tests/test_verify.py copies cuda_src/ and this file into one folder

template <>
__global__ void na_fused_tc_bwd_dq<fp16_t, 32, 64, 1, 32>(
    const fp16_t* __restrict__ q, NA_TENSOR(q), const fp16_t* __restrict__ k, NA_TENSOR(k),
    const fp16_t* __restrict__ v, NA_TENSOR(v), const fp16_t* __restrict__ g, NA_TENSOR(g),
    const float* __restrict__ lse, NA_ROWS(l), const float* __restrict__ delta, NA_ROWS(e),
    const float* __restrict__ rpb, NA_BIAS(rpb), NA_EXTRA(fp16_t), fp16_t* __restrict__ dq,
    NA_TENSOR(o), float* __restrict__ rpb_partial, double scale, NA_PROBLEM) {
    const long long rows = B * X * Y * H, threads = (long long)gridDim.x * blockDim.x;
    for (long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += threads) {
        const long long h = r % H, y = r / H % Y, x = r / H / Y % X, b = r / H / Y / X;
        for (long long d = 0; d < D; ++d) dq[NA_AT5(o, b, x, y, h, d)] = q[NA_AT5(q, b, x, y, h, d)];
    }
}
