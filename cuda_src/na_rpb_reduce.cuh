// Pass 2 of the deterministic bias gradients (tiled split ops and fused
// backward): drpb[h, rx, ry, rz] = sum over tiles of the float32 partials
// [h, tiles, entries], in a fixed order: a block holds 32 entries of one head
// (lane = entry) and THREADS / 32 parts, part p summing tiles p, p + parts,
// ... in increasing order; then the parts in order.
// Grid: H * ceil(entries / 32) blocks of THREADS.
#pragma once

template <int THREADS>
__device__ __forceinline__ void na_rpb_reduce(const float* __restrict__ partial, long long tiles,
                                              float* __restrict__ drpb, long long rpb_h, long long rpb_x,
                                              long long rpb_y, long long rpb_z, long long H, long long kx,
                                              long long ky, long long kz) {
    constexpr int PARTS = THREADS / 32;
    __shared__ float red[PARTS][32];
    const long long rd = 2 * kz - 1, rw = (2 * ky - 1) * rd, entries = (2 * kx - 1) * rw;  // 1D/2D: kz = 1
    const long long chunks = (entries + 31) / 32;
    const long long h = blockIdx.x / chunks, e = (blockIdx.x % chunks) * 32 + threadIdx.x % 32;
    const int part = threadIdx.x / 32;
    float sum = 0.0f;
    if (e < entries) {
        const float* p = partial + h * tiles * entries + e;
        for (long long t = part; t < tiles; t += PARTS) sum += p[t * entries];
    }
    red[part][threadIdx.x % 32] = sum;
    __syncthreads();
    if (part == 0 && e < entries) {
        float total = red[0][threadIdx.x];
        for (int q = 1; q < PARTS; ++q) total += red[q][threadIdx.x];
        drpb[h * rpb_h + (e / rw) * rpb_x + (e % rw / rd) * rpb_y + (e % rd) * rpb_z] = total;
    }
}
