// GPU definitions of the emulator-specific spellings (na_rtc/emulator/cuda_emu.h
// defines them on the CPU), so that these test kernels also compile with NVRTC.
#pragma once

#ifndef NA_RTC_EMULATOR
__device__ __forceinline__ unsigned char* na_dynamic_shared() {
    extern __shared__ __align__(16) unsigned char na_smem_[];
    return na_smem_;
}
__device__ __forceinline__ void na_cp_async_16(void* dst, const void* src) {
    unsigned s = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(src));
}
__device__ __forceinline__ void na_cp_async_zfill_16(void* dst, const void* src, int src_bytes) {
    unsigned s = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void na_cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void na_cp_async_wait_group() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}
__device__ __forceinline__ void na_cp_async_wait_all() { asm volatile("cp.async.wait_all;"); }
__device__ __forceinline__ unsigned short na_emu_f32_to_f16_rn(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float na_emu_f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ unsigned short na_emu_f32_to_bf16_rn(float f) {
    unsigned short b;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(f));
    return b;
}
__device__ __forceinline__ float na_emu_bf16_to_f32(unsigned short b) { return __uint_as_float(((unsigned)b) << 16); }
#endif
