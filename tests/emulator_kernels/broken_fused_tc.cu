// A deliberately broken tensor-core forward, for the tests of first-use verification (tests/test_verify.py):
// the real na_fused_tc.cu with an explicit specialization of one instantiation that returns plausible but
// wrong numbers, as a GPU that misreads a fragment layout would. The specialization's parameters must be the
// template's.
#include "na_fused_tc.cu"  // tests/test_verify.py copies cuda_src/ and this file into one folder

// Every output row is the value row of its own query (as if the softmax put all weight on the query's own
// key; its key/value head's, value head dims) and the logsumexp is 0.
template <>
__global__ void na_fused_tc_fwd<fp16_t, 32, 128, 1, 64, 2>(
    const fp16_t* __restrict__ q, NA_TENSOR(q), const fp16_t* __restrict__ k, NA_TENSOR(k),
    const fp16_t* __restrict__ v, NA_TENSOR(v), const float* __restrict__ rpb, NA_BIAS(rpb), NA_EXTRA(fp16_t), fp16_t* __restrict__ out, NA_TENSOR(o), float* __restrict__ lse, NA_ROWS(l), double scale, NA_PROBLEM) {
    const long long rows = B * X * Y * H, threads = (long long)gridDim.x * blockDim.x;
    for (long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += threads) {
        const long long h = r % H, y = r / H % Y, x = r / H / Y % X, b = r / H / Y / X;
        for (long long d = 0; d < DV; ++d) out[NA_AT5(o, b, x, y, h, d)] = v[NA_AT5(v, b, x, y, NA_KV_HEAD(h), d)];
        lse[NA_AT4(l, b, x, y, h)] = 0.0f;
    }
}
