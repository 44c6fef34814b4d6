// Test kernels of tests/test_emulator.py: the CUDA execution model of the CPU
// emulator (na_rtc/emulator/cuda_emu.h). Plain CUDA C++; with gpu_shims.cuh
// they also compile with NVRTC.
#include "gpu_shims.cuh"

__device__ __forceinline__ unsigned block_linear() {
    return blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
}
__device__ __forceinline__ unsigned thread_linear() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
__device__ __forceinline__ unsigned block_threads() { return blockDim.x * blockDim.y * blockDim.z; }

// ------------------------------------------------------------ shared memory and barriers

// Every block fills static and dynamic shared memory with its own id, several
// rounds, and counts entries that are not its own (another block's leaking in).
// block: up to 256 threads; dynamic shared memory: block_threads() ints.
__global__ void shared_isolation(int* bad, int rounds) {
    __shared__ int ids[256];
    int* dyn = reinterpret_cast<int*>(na_dynamic_shared());
    const unsigned t = thread_linear(), n = block_threads(), b = block_linear();
    int wrong = 0;
    for (int r = 0; r < rounds; ++r) {
        const int mine = (int)(b * 1000 + r);
        ids[t] = mine;
        dyn[t] = -mine;
        __syncthreads();
        for (unsigned i = 0; i < n; ++i) {
            wrong += ids[i] != mine;
            wrong += dyn[i] != -mine;
        }
        __syncthreads();
    }
    if (wrong) atomicAdd(&bad[b], wrong);
}

// Writes before a barrier are visible after it, in three phases.
// out[b * n + t] = r1 + 1000 * r2 with r1 = (t + 1) % n and r2 = 2 * ((t + 4) % n)
__global__ void barrier_order(int* out) {
    __shared__ int s[1024];
    const unsigned t = thread_linear(), n = block_threads();
    s[t] = (int)t;
    __syncthreads();
    const int r1 = s[(t + 1) % n];
    __syncthreads();
    s[t] = 2 * r1;
    __syncthreads();
    const int r2 = s[(t + 3) % n];
    out[block_linear() * n + t] = r1 + 1000 * r2;
}

// A race on shared memory in one of three forms: every thread stores what it
// reads of word 0 into out[t], and the right answer is 42 for every thread.
// mode 0: thread 0 stores 42, then every thread reads, with no barrier between
//         (read-after-write race: right only if thread 0 runs first);
// mode 1: every thread reads after a barrier, then the last thread stores 9
//         with no barrier between (write-after-read race: right only if the
//         last thread runs last);
// mode 2: mode 0 and mode 1 with their barriers (right in any order).
__global__ void shared_race(int* out, int mode) {
    int* word = reinterpret_cast<int*>(na_dynamic_shared());
    const unsigned t = thread_linear(), n = block_threads();
    if (t == 0) *word = 42;
    if (mode != 0) __syncthreads();
    out[t] = *word;
    if (mode == 2) __syncthreads();
    if (mode != 0 && t == n - 1) *word = 9;
}

// __syncthreads_count / _and / _or with predicate "t % k == 0"
__global__ void barrier_reductions(int* out, int k) {
    const unsigned t = thread_linear();
    const int pred = (int)(t % (unsigned)k) == 0;
    const int count = __syncthreads_count(pred);
    const int all = __syncthreads_and(pred);
    const int any = __syncthreads_or(pred);
    if (t == 0) {
        out[0] = count;
        out[1] = all;
        out[2] = any;
    }
}

// thread 0 skips the barrier
__global__ void diverge_skip(int* out) {
    if (threadIdx.x != 0) __syncthreads();
    out[threadIdx.x] = 1;
}

// the two halves of the block wait at different __syncthreads calls
__global__ void diverge_sites(int* out) {
    if (threadIdx.x < 32) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}

// lane 5 calls __syncwarp while the others shuffle with the full mask
__global__ void diverge_warp(int* out) {
    if (threadIdx.x == 5) {
        __syncwarp();
        return;
    }
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 1);
}

// lane 5 exits, the others shuffle with the full mask: legal in CUDA (exited
// lanes are not waited for); lane 4 reads the exited lane (undefined: poison)
__global__ void exited_lane(int* out) {
    if (threadIdx.x == 5) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 1);
    out[32 + threadIdx.x] = (int)__ballot_sync(0xffffffffu, 1);
}

// lane 0 names lanes {0, 1}, lanes 1 and 2 name {0, 1, 2}: not the same mask
__global__ void mismatched_masks(int* out) {
    const unsigned mask = threadIdx.x == 0 ? 0x3u : 0x7u;
    if (threadIdx.x < 3) out[threadIdx.x] = __shfl_sync(mask, (int)threadIdx.x, 0);
}

// ------------------------------------------------------------ warp collectives

// mode 0 idx, 1 up, 2 down, 3 xor; lanes outside `mask` do not take part and
// write the sentinel 0x7777 / -7.0
__global__ void shuffles(const int* in_i, int* out_i, const double* in_d, double* out_d, int mode, int arg,
                         int width, unsigned mask) {
    const unsigned t = thread_linear(), lane = t % 32;
    if (!(mask >> lane & 1u)) {
        out_i[t] = 0x7777;
        out_d[t] = -7.0;
        return;
    }
    int vi = in_i[t];
    double vd = in_d[t];
    int ri = 0;
    double rd = 0;
    switch (mode) {
        case 0: ri = __shfl_sync(mask, vi, arg, width); rd = __shfl_sync(mask, vd, arg, width); break;
        case 1: ri = __shfl_up_sync(mask, vi, (unsigned)arg, width); rd = __shfl_up_sync(mask, vd, (unsigned)arg, width); break;
        case 2: ri = __shfl_down_sync(mask, vi, (unsigned)arg, width); rd = __shfl_down_sync(mask, vd, (unsigned)arg, width); break;
        default: ri = __shfl_xor_sync(mask, vi, arg, width); rd = __shfl_xor_sync(mask, vd, arg, width); break;
    }
    out_i[t] = ri;
    out_d[t] = rd;
}

// float warp sum with xor shuffles within each half-warp, the halves using
// disjoint partial masks at the same time
__global__ void half_warp_sums(const float* in, float* out) {
    const unsigned t = thread_linear(), lane = t % 32;
    const unsigned mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
    float v = in[t];
    for (int offset = 8; offset > 0; offset /= 2) v += __shfl_xor_sync(mask, v, offset, 16);
    out[t] = v;
}

// ballot / any / all / reduce_add / match_any among the lanes of `mask`;
// the others write the sentinel 0x7777
__global__ void votes(const int* pred, unsigned* ballot, int* any, int* all, unsigned* sum, unsigned* match,
                      unsigned* active, unsigned mask) {
    const unsigned t = thread_linear(), lane = t % 32;
    active[t] = __activemask();
    if (!(mask >> lane & 1u)) {
        ballot[t] = 0x7777;
        any[t] = 0x7777;
        all[t] = 0x7777;
        sum[t] = 0x7777;
        match[t] = 0x7777;
        return;
    }
    const int p = pred[t];
    ballot[t] = __ballot_sync(mask, p);
    any[t] = __any_sync(mask, p);
    all[t] = __all_sync(mask, p);
    sum[t] = __reduce_add_sync(mask, (unsigned)p);
    match[t] = __match_any_sync(mask, p);
    __syncwarp(mask);
}

// ------------------------------------------------------------ atomics

__global__ void atomics(float* f, double* d, int* i, unsigned long long* u, int* imax, int* imin, int* exch,
                        int* cas_wins) {
    const int g = (int)(block_linear() * block_threads() + thread_linear());
    atomicAdd(f, 1.0f);
    atomicAdd(d, 0.5);
    atomicAdd(i, 2);
    atomicAdd(u, 3ull);
    atomicMax(imax, g);
    atomicMin(imin, -g);
    atomicExch(exch, g);
    if (atomicCAS(cas_wins + 1, 0, g + 1) == 0) atomicAdd(cas_wins, 1);
}

// ------------------------------------------------------------ fp16 / bf16

__global__ void narrow(const float* in, unsigned short* h, unsigned short* b, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    h[i] = na_emu_f32_to_f16_rn(in[i]);
    b[i] = na_emu_f32_to_bf16_rn(in[i]);
}

__global__ void widen(const unsigned short* bits, float* from_h, float* from_b, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    from_h[i] = na_emu_f16_to_f32(bits[i]);
    from_b[i] = na_emu_bf16_to_f32(bits[i]);
}

// ------------------------------------------------------------ cp.async

// One warp; dynamic shared memory: 3 * 32 * 16 bytes (regions A, B, Z).
// Per thread (4 floats each), in out[t * 20 + ...]:
//   0..3   A read before any wait (stale: the 0xFF fill)
//   4..7   A after wait_group<1>   (visible)
//   8..11  B after wait_group<1>   (stale: B is the newest group)
//   12..15 B after wait_all        (visible)
//   16..19 Z: zfill of 8 source bytes after wait_all (2 copied floats, 2 zeros)
__global__ void cp_async_groups(const float* src_a, const float* src_b, const float* src_z, float* out) {
    float* smem = reinterpret_cast<float*>(na_dynamic_shared());
    const unsigned t = threadIdx.x;
    float* a = smem + 4 * t;
    float* b = smem + 128 + 4 * t;
    float* z = smem + 256 + 4 * t;
    float* o = out + 20 * t;
    na_cp_async_16(a, src_a + 4 * t);
    na_cp_async_commit();
    for (int k = 0; k < 4; ++k) o[k] = a[k];
    na_cp_async_16(b, src_b + 4 * t);
    na_cp_async_zfill_16(z, src_z + 4 * t, 8);
    na_cp_async_commit();
    na_cp_async_wait_group<1>();
    for (int k = 0; k < 4; ++k) o[4 + k] = a[k];
    for (int k = 0; k < 4; ++k) o[8 + k] = b[k];
    na_cp_async_wait_all();
    for (int k = 0; k < 4; ++k) o[12 + k] = b[k];
    for (int k = 0; k < 4; ++k) o[16 + k] = z[k];
}

// The usual tile pattern: every thread copies its 16 bytes, commits, waits and
// the block reads its neighbour's bytes after the barrier.
__global__ void cp_async_tile(const float* src, float* out) {
    float* smem = reinterpret_cast<float*>(na_dynamic_shared());
    const unsigned t = threadIdx.x, n = blockDim.x;
    na_cp_async_16(smem + 4 * t, src + 4 * (blockIdx.x * n + t));
    na_cp_async_commit();
    na_cp_async_wait_group<0>();
    __syncthreads();
    const unsigned j = (t + 1) % n;
    for (int k = 0; k < 4; ++k) out[4 * (blockIdx.x * n + t) + k] = smem[4 * j + k];
}

#ifdef NA_RTC_EMULATOR
// ldmatrix (emulator-only here: the GPU shims above have no tensor-core
// spellings) reading rows that warp 0 copies with cp.async: mode 0 reads them
// before warp 0's wait and barrier, which the emulator reports as a race;
// mode 1 after both, which reads the copied rows.
__global__ void cp_async_race(const unsigned* src, unsigned* out, long long mode) {
    unsigned char* smem = na_dynamic_shared();
    const unsigned t = threadIdx.x, warp = t / 32, lane = t % 32;
    if (warp == 0) {
        na_cp_async_16(smem + 16 * lane, src + 4 * lane);
        na_cp_async_commit();
        if (mode == 1) na_cp_async_wait_group<0>();
    }
    if (mode == 1) __syncthreads();
    if (warp == 1) {
        unsigned r[4];
        na_ldmatrix<4, false>(r, smem + 16 * lane);
        for (int j = 0; j < 4; ++j) out[4 * lane + j] = r[j];
    }
    if (mode == 0) __syncthreads();  // warp 0 waits here, its copies still pending
}
#endif

#ifdef NA_RTC_EMULATOR
// wgmma (the emulator's spellings of cuda_src/na_wgmma.cuh), one warpgroup: D
// (64 x 8) = ones (64 x 16) B, B (16 x 8) staged by cp.async as two K-major
// core matrices (descriptor by hand: start 0, LBO 128, SBO 256). out[4 t + i]
// = thread t's d[i]. mode 0 is correct; the others break one rule each:
// 1 no wgmma.fence, 2 no fence.proxy.async after the copies landed, 3 no
// cp.async wait (nor barrier) before the wgmma, 4 exit before the wgmma wait,
// 5 D read before the wait (stored then: the old zeros), 8 an A register
// written before the wait.
__global__ void wgmma_misuse(const unsigned char* b, float* out, long long mode) {
    unsigned char* smem = na_dynamic_shared();
    const unsigned t = threadIdx.x;
    if (t < 16) na_cp_async_16(smem + 16 * t, b + 16 * t);
    na_cp_async_commit();
    if (mode != 3) na_cp_async_wait_group<0>();
    if (mode != 2) na_fence_proxy_async();
    if (mode != 3) __syncthreads();
    unsigned a[4] = {0x3F803F80u, 0x3F803F80u, 0x3F803F80u, 0x3F803F80u};  // bf16 ones
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    const unsigned long long desc = (128ull >> 4) << 16 | (256ull >> 4) << 32;
    if (mode != 1) na_wgmma_fence();
    if (mode == 6)  // the SS form with A (64 x 16: 2 KiB) from the 256 bytes of shared memory
        na_wgmma_m64k16_ss<8, false, true>(d, desc, desc, 1);
    else if (mode == 7)  // the SS form with a swizzled A
        na_wgmma_m64k16_ss<8, false, true>(d, desc | 1ull << 62, desc, 1);
    else
        na_wgmma_m64k16<8, false, true>(d, a, desc, 1);
    na_wgmma_commit();
    if (mode == 8) a[t % 4] = 0;
    if (mode == 4) return;
    if (mode == 5)
        for (int i = 0; i < 4; ++i) out[4 * t + i] = d[i];
    na_wgmma_wait<0>();
    if (mode != 5)
        for (int i = 0; i < 4; ++i) out[4 * t + i] = d[i];
    if (mode == 3) __syncthreads();
}
#endif

// ------------------------------------------------------------ dynamic shared memory

// out[0] += bytes that held the 0xFF fill at block start; out[1] += bytes
// that read back what another thread wrote after a barrier
__global__ void dynamic_smem(int* out, long long nbytes) {
    unsigned char* smem = na_dynamic_shared();
    const unsigned t = thread_linear(), n = block_threads();
    int filled = 0, ok = 0;
    for (long long i = t; i < nbytes; i += n) filled += smem[i] == 0xFF;
    __syncthreads();
    for (long long i = t; i < nbytes; i += n) smem[i] = (unsigned char)(i * 7 + 3);
    __syncthreads();
    for (long long i = (t + 1) % n; i < nbytes; i += n) ok += smem[i] == (unsigned char)(i * 7 + 3);
    atomicAdd(out, filled);
    atomicAdd(out + 1, ok);
}

__global__ void dynamic_smem_touch(long long offset) {
    unsigned char* smem = na_dynamic_shared();
    if (threadIdx.x == 0) smem[offset] = 1;
}

// ------------------------------------------------------------ bounds and faults

__global__ void read_at(const float* a, float* out, long long i) { out[0] = a[i]; }

__global__ void write_at(float* a, long long i, float value) { a[i] = value; }

// a[i * sa] = i and b[i * sb] = -i for i < n (element strides)
__global__ void write_two(float* a, float* b, long long n, long long sa, long long sb) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    a[i * sa] = (float)i;
    b[i * sb] = -(float)i;
}

__device__ __noinline__ int deep(int depth, volatile int* sink) {
    volatile int pad[512];
    pad[depth % 512] = depth;
    if (depth == 0) return pad[0];
    const int r = deep(depth - 1, sink) + pad[depth % 512];
    *sink = r;
    return r;
}

__global__ void stack_hog(int* out, int depth) { out[0] = deep(depth, out + 1); }

__global__ void divide(int* out, int num, int den) { out[threadIdx.x] = num / den; }

__global__ void trap_if(int* out, int which) {
    if ((int)threadIdx.x == which) __trap();
    out[threadIdx.x] = 1;
}

// ------------------------------------------------------------ blocks in parallel

// out[y * width + x] = 3 * x + 1000 * y over a 2D grid of 2D blocks; the
// worker thread of each block in workers[block]
__global__ void grid_2d(int* out, int* workers, int width, int height) {
    const int x = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    const int y = (int)(blockIdx.y * blockDim.y + threadIdx.y);
    if (x < width && y < height) out[y * width + x] = 3 * x + 1000 * y;
#ifdef NA_RTC_EMULATOR
    if (threadIdx.x == 0 && threadIdx.y == 0) workers[block_linear()] = na_emu_os_thread_index();
#else
    if (threadIdx.x == 0 && threadIdx.y == 0) workers[block_linear()] = 0;
#endif
}

// Each block announces itself and waits (up to `timeout_ns`; clock64() counts
// nanoseconds in the emulator) until `expected` blocks have: saw[block] = 1
// when it saw them all, which needs the blocks to run at the same time.
__global__ void rendezvous(int* arrived, int* saw, int expected, long long timeout_ns) {
    if (threadIdx.x != 0) return;
    atomicAdd(arrived, 1);
    __threadfence();
    const long long start = clock64();
    int seen = 0;
    while ((seen = atomicAdd(arrived, 0)) < expected && clock64() - start < timeout_ns) {
    }
    saw[blockIdx.x] = seen >= expected;
}
