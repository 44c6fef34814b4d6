// Asynchronous global -> shared copies (cp.async, sm_80+): a thread issues
// 16-byte copies that land in shared memory without passing through its
// registers, groups them with commit, and waits for all but the newest N
// groups. Kernels use them to load chunk c + 1 while computing on chunk c.
// The emulator (na_rtc/emulator/cuda_emu.h) provides the same spellings and
// performs a group's copies only at the matching wait, so a missing wait
// shows up as stale data in the emulator tests.
//
//   na_cp_async_16(dst, src)               16 bytes, both 16-byte aligned
//   na_cp_async_zfill_16(dst, src, bytes)  copy `bytes` (0..16), zero the rest
//                                          (src is not read when bytes == 0)
//   na_cp_async_commit()                   close the current group
//   na_cp_async_wait_group<N>()            all but the newest N groups landed
//                                          (for this thread: a barrier makes
//                                          them visible to the block)
//   na_fence_proxy_async()                 this thread's shared-memory writes so
//                                          far (landed copies too) become visible
//                                          to the async proxy (wgmma, sm_90):
//                                          before the barrier that precedes the
//                                          wgmma reading them
// Below sm_80 the copies are plain loads and stores (the kernels that use
// them are only launched on sm_80+, but the sources build everywhere).
#pragma once

#ifndef NA_RTC_EMULATOR

__device__ __forceinline__ void na_cp_async_zfill_16(void* dst, const void* src, int bytes) {
#if __CUDA_ARCH__ >= 800
    const unsigned address = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(address), "l"(src), "r"(bytes) : "memory");
#else
    unsigned* to = reinterpret_cast<unsigned*>(dst);
    const unsigned char* from = reinterpret_cast<const unsigned char*>(src);
    for (int w = 0; w < 4; ++w) {
        unsigned word = 0;
        for (int i = 0; i < 4; ++i)
            if (4 * w + i < bytes) word |= (unsigned)from[4 * w + i] << (8 * i);
        to[w] = word;
    }
#endif
}

__device__ __forceinline__ void na_cp_async_16(void* dst, const void* src) { na_cp_async_zfill_16(dst, src, 16); }

__device__ __forceinline__ void na_cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void na_cp_async_wait_group() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

__device__ __forceinline__ void na_fence_proxy_async() {
#if __CUDA_ARCH__ >= 900
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

#endif  // NA_RTC_EMULATOR
