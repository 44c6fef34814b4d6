// A kernel that spills: __launch_bounds__(1024, 2) caps it at 32 registers,
// and pressure<96> keeps 96 floats live across a loop (tests/test_nvrtc.py).
template <int N>
__global__ void __launch_bounds__(1024, 2) pressure(float* x) {
    float acc[N];
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] = x[i * blockDim.x + threadIdx.x];
#pragma unroll 1
    for (int r = 0; r < 8; ++r) {
#pragma unroll
        for (int i = 0; i < N; ++i) acc[i] = acc[i] * acc[(i + 1) % N] + x[r + i];
    }
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) s += acc[i] * (i + 1);
    x[threadIdx.x] = s;
}

// Many live doubles without a launch bound: fine at 128 threads, too many
// registers for a 1024-thread block.
template <int N>
__global__ void heavy(double* x) {
    double acc[N];
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] = x[i * blockDim.x + threadIdx.x];
#pragma unroll 1
    for (int r = 0; r < 4; ++r) {
#pragma unroll
        for (int i = 0; i < N; ++i) acc[i] = acc[i] * acc[(i + 3) % N] + x[r];
    }
    double s = 0.0;
#pragma unroll
    for (int i = 0; i < N; ++i) s += acc[i] * (i + 1);
    x[threadIdx.x] = s;
}
