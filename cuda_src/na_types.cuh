// Element types and conversions shared by every na_rtc kernel.
//
// NVRTC ships no cuda_fp16.h / cuda_bf16.h, so 16-bit types are our own:
// plain 16-bit payloads converted with inline PTX on the GPU (round to
// nearest even, like the hardware) and with the emulator's bit-exact software
// conversions on the CPU. Accumulation is float (double for double inputs).
#pragma once

struct fp16_t {
    unsigned short bits;
};
struct bf16_t {
    unsigned short bits;
};

template <class T> struct na_acc { typedef float type; };
template <> struct na_acc<double> { typedef double type; };

#if defined(__CUDA_ARCH__)

__device__ __forceinline__ float na_f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ unsigned short na_f32_to_f16(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float na_bf16_to_f32(unsigned short b) {
    return __uint_as_float(((unsigned int)b) << 16);
}
__device__ __forceinline__ unsigned short na_f32_to_bf16(float f) {
#if __CUDA_ARCH__ >= 800
    unsigned short b;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(f));
    return b;
#else
    // exact software round-to-nearest-even (no bf16 cvt below sm_80)
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return (unsigned short)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
#endif
}

#else  // the CPU emulator provides bit-exact software conversions

__device__ __forceinline__ float na_f16_to_f32(unsigned short h) { return na_emu_f16_to_f32(h); }
__device__ __forceinline__ unsigned short na_f32_to_f16(float f) { return na_emu_f32_to_f16_rn(f); }
__device__ __forceinline__ float na_bf16_to_f32(unsigned short b) { return na_emu_bf16_to_f32(b); }
__device__ __forceinline__ unsigned short na_f32_to_bf16(float f) { return na_emu_f32_to_bf16_rn(f); }

#endif

// load an element as its accumulator type; store an accumulator as an element
template <class T> __device__ __forceinline__ typename na_acc<T>::type na_load(const T* p, long long i) { return p[i]; }
template <> __device__ __forceinline__ float na_load<fp16_t>(const fp16_t* p, long long i) { return na_f16_to_f32(p[i].bits); }
template <> __device__ __forceinline__ float na_load<bf16_t>(const bf16_t* p, long long i) { return na_bf16_to_f32(p[i].bits); }

template <class T, class A> __device__ __forceinline__ void na_store(T* p, long long i, A v) { p[i] = (T)v; }
template <> __device__ __forceinline__ void na_store<fp16_t, float>(fp16_t* p, long long i, float v) { p[i].bits = na_f32_to_f16(v); }
template <> __device__ __forceinline__ void na_store<bf16_t, float>(bf16_t* p, long long i, float v) { p[i].bits = na_f32_to_bf16(v); }

// math on the accumulator type (NVRTC has no <cmath> overloads without headers)
__device__ __forceinline__ float na_exp(float x) { return expf(x); }
__device__ __forceinline__ double na_exp(double x) { return exp(x); }
__device__ __forceinline__ float na_log(float x) { return logf(x); }
__device__ __forceinline__ double na_log(double x) { return log(x); }

// 2^x for the tensor-core softmax, whose logits are kept in log2 units:
// ex2.approx.ftz on the GPU (one instruction, within 2 ulp of the correctly
// rounded result, subnormal results flushed to 0); in the emulator the C
// library's exp2f with the same flush; 2^-inf = 0 and NaN stays NaN on both.
#if defined(__CUDA_ARCH__)
__device__ __forceinline__ float na_exp2_fast(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
#else
__device__ __forceinline__ float na_exp2_fast(float x) { return na_emu_ex2_approx_ftz(x); }
#endif
__device__ __forceinline__ float na_log2(float x) { return log2f(x); }
