// Dynamic shared memory, spelled so the same kernel runs on the GPU and in
// the emulator (which provides its own na_dynamic_shared(): per-block, 16-byte
// aligned, guarded against overflow).
#pragma once

#ifndef NA_RTC_EMULATOR
__device__ __forceinline__ unsigned char* na_dynamic_shared() {
    extern __shared__ __align__(16) unsigned char na_smem_[];
    return na_smem_;
}
#endif
