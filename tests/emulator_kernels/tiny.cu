// A small kernel for the emulator's cache tests (fast to compile).
__global__ void tiny_add(float* out, const float* in, float value, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = in[i] + value;
}
