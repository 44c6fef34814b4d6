// Hopper warpgroup tensor-core primitives (wgmma, sm_90a): one warpgroup of 4
// consecutive warps (threads 128 j .. 128 j + 127) computes D (64 x N, fp32)
// += A (64 x 16) x B (16 x N) asynchronously, B from shared memory through a
// matrix descriptor, A from registers (na_wgmma_rs, the RS form) or from
// shared memory through a second descriptor (na_wgmma_ss, the SS form; A
// K-major, read as B K-major with A's rows in place of B's columns). As inline PTX on the GPU; the emulator
// (na_rtc/emulator/cuda_emu.h) provides the same spellings, computing each
// warp's rows at the matching wait, so a missing wait, fence or barrier shows.
//
// Fragments (PTX ISA, "Register Fragments and Shared Memory Matrix Layouts"
// of wgmma .m64nNk16): warp w of the warpgroup owns rows 16 w .. 16 w + 15 of
// A and D, laid out per warp exactly as mma.m16n8k16 (na_mma.cuh):
//   A, unsigned a[4]: a[r] = (row g + 8 (r % 2), cols 2t + 8 (r / 2) + {0, 1});
//   D, float d[N / 2]: d[i] = (row g + 8 ((i / 2) % 2), col 8 (i / 4) + 2t + i % 2),
// g = lane / 4, t = lane % 4: D is the N / 8 mma C tiles of 8 columns in a row.
//
// B in shared memory, no swizzle: "core matrices" of 8 rows x 16 bytes stored
// as 128 contiguous bytes; the descriptor gives the start address, LBO (bytes
// between core matrices adjacent along K) and SBO (adjacent along N):
//   K-major (TRANS_B false; B^T rows, [n][k] storage):
//       (k, n) at start + (n / 8) SBO + (k / 8) LBO + (n % 8) 16 + (k % 8) 2
//   MN-major (TRANS_B true; B's own rows, [k][n] storage):
//       (k, n) at start + (n / 8) SBO + (k / 8) LBO + (k % 8) 16 + (n % 8) 2
// A in the SS form, K-major (A's rows, [m][k] storage), as B K-major:
//       (m, k) at start + (m / 8) SBO + (k / 8) LBO + (m % 8) 16 + (k % 8) 2
// The tensor-core kernels stage K and V rows as na_rows_core (na_tc_load.cuh):
// core matrices of 8 consecutive rows x 8 head dims, the HD / 8 of a row group
// in a row, so Q K^T reads K K-major (LBO 128, SBO 16 HD) and P V reads V
// MN-major (LBO 16 HD, SBO 128).
//
// Ordering (PTX ISA): na_wgmma_fence() before the first na_wgmma_rs and after
// any other access to the registers it uses (A, D); na_wgmma_commit() closes a
// group; na_wgmma_wait<N>() waits for all but the newest N groups: until then
// the A and D registers and B's shared memory must not be touched.
// na_wgmma_hold(d) keeps the compiler from moving register accesses across the
// asynchronous instructions (after a wait, before an issue). Shared memory
// written through the generic proxy (plain stores, cp.async) needs
// na_fence_proxy_async() (na_async.cuh) in the writing threads, then a
// barrier, before wgmma reads it.
//
// Outside sm_90a (a plain sm_90 or sm_80 build) these compile to a trap, so the
// sources build everywhere; the dispatcher launches them only on sm_90a builds.
#pragma once

#include "na_async.cuh"
#include "na_mma.cuh"

#if !defined(NA_RTC_EMULATOR) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define NA_WGMMA_AVAILABLE 1
#endif

template <class T> struct na_wgmma_bf16 { static constexpr bool value = false; };  // fp16_t
template <> struct na_wgmma_bf16<bf16_t> { static constexpr bool value = true; };

// the descriptor of a no-swizzle B operand at shared address `address` (16-byte aligned)
__device__ __forceinline__ unsigned long long na_wgmma_desc(unsigned address, unsigned lbo, unsigned sbo) {
    return (unsigned long long)((address >> 4) & 0x3fffu) | ((unsigned long long)((lbo >> 4) & 0x3fffu) << 16) |
           ((unsigned long long)((sbo >> 4) & 0x3fffu) << 32);  // base offset 0, swizzle mode 0 (none)
}

#ifndef NA_RTC_EMULATOR

__device__ __forceinline__ void na_wgmma_fence() {
#ifdef NA_WGMMA_AVAILABLE
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#else
    __trap();
#endif
}

__device__ __forceinline__ void na_wgmma_commit() {
#ifdef NA_WGMMA_AVAILABLE
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
#else
    __trap();
#endif
}

template <int N>
__device__ __forceinline__ void na_wgmma_wait() {
#ifdef NA_WGMMA_AVAILABLE
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
#else
    __trap();
#endif
}

template <int K>
__device__ __forceinline__ void na_wgmma_hold(float (&d)[K]) {
#pragma unroll
    for (int i = 0; i < K; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

template <int K>
__device__ __forceinline__ void na_wgmma_hold(unsigned (&a)[K]) {
#pragma unroll
    for (int i = 0; i < K; ++i) asm volatile("" : "+r"(a[i])::"memory");
}

// The operand lists: D registers first (%0 .. %(N/2 - 1)), then a[4], the
// descriptor, the accumulate flag (scale-d: 0 means D = A B) and .trans-b.
#define NA_WG_D8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                    "+f"(d[i + 6]), "+f"(d[i + 7])
#define NA_WG_IN "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate), "n"(TRANS_B ? 1 : 0)
#define NA_WG_R16 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define NA_WG_R32                                                                                                   \
    NA_WG_R16 ", %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define NA_WG_R64                                                                                                   \
    NA_WG_R32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, "   \
              "%51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"

// the instruction text of m64nNk16 for one element type: "{d}, {a}, desc, p, 1, 1, trans-b"
#define NA_WG_TEXT(SHAPE, TYPE, DREGS, A0, A1, A2, A3, DESC, ACC, TR)                                       \
    "{\n.reg .pred p;\nsetp.ne.b32 p, %" ACC ", 0;\nwgmma.mma_async.sync.aligned." SHAPE ".f32." TYPE "." TYPE \
    " {" DREGS "}, {%" A0 ", %" A1 ", %" A2 ", %" A3 "}, %" DESC ", p, 1, 1, %" TR ";\n}\n"

template <int N, bool TRANS_B, bool BF16>
__device__ __forceinline__ void na_wgmma_m64k16(float (&d)[N / 2], const unsigned (&a)[4], unsigned long long desc,
                                                int accumulate) {
#ifdef NA_WGMMA_AVAILABLE
    if constexpr (N == 32 && BF16)
        asm volatile(NA_WG_TEXT("m64n32k16", "bf16", NA_WG_R16, "16", "17", "18", "19", "20", "21", "22")
                     : NA_WG_D8(0), NA_WG_D8(8) : NA_WG_IN);
    else if constexpr (N == 32)
        asm volatile(NA_WG_TEXT("m64n32k16", "f16", NA_WG_R16, "16", "17", "18", "19", "20", "21", "22")
                     : NA_WG_D8(0), NA_WG_D8(8) : NA_WG_IN);
    else if constexpr (N == 64 && BF16)
        asm volatile(NA_WG_TEXT("m64n64k16", "bf16", NA_WG_R32, "32", "33", "34", "35", "36", "37", "38")
                     : NA_WG_D8(0), NA_WG_D8(8), NA_WG_D8(16), NA_WG_D8(24) : NA_WG_IN);
    else if constexpr (N == 64)
        asm volatile(NA_WG_TEXT("m64n64k16", "f16", NA_WG_R32, "32", "33", "34", "35", "36", "37", "38")
                     : NA_WG_D8(0), NA_WG_D8(8), NA_WG_D8(16), NA_WG_D8(24) : NA_WG_IN);
    else if constexpr (N == 128 && BF16)
        asm volatile(NA_WG_TEXT("m64n128k16", "bf16", NA_WG_R64, "64", "65", "66", "67", "68", "69", "70")
                     : NA_WG_D8(0), NA_WG_D8(8), NA_WG_D8(16), NA_WG_D8(24), NA_WG_D8(32), NA_WG_D8(40),
                       NA_WG_D8(48), NA_WG_D8(56) : NA_WG_IN);
    else if constexpr (N == 128)
        asm volatile(NA_WG_TEXT("m64n128k16", "f16", NA_WG_R64, "64", "65", "66", "67", "68", "69", "70")
                     : NA_WG_D8(0), NA_WG_D8(8), NA_WG_D8(16), NA_WG_D8(24), NA_WG_D8(32), NA_WG_D8(40),
                       NA_WG_D8(48), NA_WG_D8(56) : NA_WG_IN);
    else
        static_assert(N == 32, "wgmma shapes built: N = 32, 64, 128");
#else
    __trap();
#endif
}

// The SS form: A (64 x 16, K-major, no transpose) from shared memory through its own descriptor; the
// operands after the D registers are the A descriptor, the B descriptor, scale-d and .trans-b.
#define NA_WG_SS_IN "l"(a_desc), "l"(desc), "r"(accumulate), "n"(TRANS_B ? 1 : 0)
#define NA_WG_SS_TEXT(SHAPE, TYPE, DREGS, ADESC, BDESC, ACC, TR)                                             \
    "{\n.reg .pred p;\nsetp.ne.b32 p, %" ACC ", 0;\nwgmma.mma_async.sync.aligned." SHAPE ".f32." TYPE "." TYPE \
    " {" DREGS "}, %" ADESC ", %" BDESC ", p, 1, 1, 0, %" TR ";\n}\n"

template <int N, bool TRANS_B, bool BF16>
__device__ __forceinline__ void na_wgmma_m64k16_ss(float (&d)[N / 2], unsigned long long a_desc,
                                                   unsigned long long desc, int accumulate) {
#ifdef NA_WGMMA_AVAILABLE
    if constexpr (N == 32 && BF16)
        asm volatile(NA_WG_SS_TEXT("m64n32k16", "bf16", NA_WG_R16, "16", "17", "18", "19")
                     : NA_WG_D8(0), NA_WG_D8(8) : NA_WG_SS_IN);
    else if constexpr (N == 32)
        asm volatile(NA_WG_SS_TEXT("m64n32k16", "f16", NA_WG_R16, "16", "17", "18", "19")
                     : NA_WG_D8(0), NA_WG_D8(8) : NA_WG_SS_IN);
    else if constexpr (N == 64 && BF16)
        asm volatile(NA_WG_SS_TEXT("m64n64k16", "bf16", NA_WG_R32, "32", "33", "34", "35")
                     : NA_WG_D8(0), NA_WG_D8(8), NA_WG_D8(16), NA_WG_D8(24) : NA_WG_SS_IN);
    else if constexpr (N == 64)
        asm volatile(NA_WG_SS_TEXT("m64n64k16", "f16", NA_WG_R32, "32", "33", "34", "35")
                     : NA_WG_D8(0), NA_WG_D8(8), NA_WG_D8(16), NA_WG_D8(24) : NA_WG_SS_IN);
    else if constexpr (N == 128 && BF16)
        asm volatile(NA_WG_SS_TEXT("m64n128k16", "bf16", NA_WG_R64, "64", "65", "66", "67")
                     : NA_WG_D8(0), NA_WG_D8(8), NA_WG_D8(16), NA_WG_D8(24), NA_WG_D8(32), NA_WG_D8(40),
                       NA_WG_D8(48), NA_WG_D8(56) : NA_WG_SS_IN);
    else if constexpr (N == 128)
        asm volatile(NA_WG_SS_TEXT("m64n128k16", "f16", NA_WG_R64, "64", "65", "66", "67")
                     : NA_WG_D8(0), NA_WG_D8(8), NA_WG_D8(16), NA_WG_D8(24), NA_WG_D8(32), NA_WG_D8(40),
                       NA_WG_D8(48), NA_WG_D8(56) : NA_WG_SS_IN);
    else
        static_assert(N == 32, "wgmma shapes built: N = 32, 64, 128");
#else
    __trap();
#endif
}

#undef NA_WG_D8
#undef NA_WG_IN
#undef NA_WG_SS_IN
#undef NA_WG_SS_TEXT
#undef NA_WG_R16
#undef NA_WG_R32
#undef NA_WG_R64
#undef NA_WG_TEXT

#endif  // NA_RTC_EMULATOR

// D (this warp's 16 rows of 64 x N) = A B + (accumulate ? D : 0), asynchronously
template <class T, int N, bool TRANS_B>
__device__ __forceinline__ void na_wgmma_rs(float (&d)[N / 2], const unsigned (&a)[4], unsigned long long desc,
                                            bool accumulate) {
    na_wgmma_m64k16<N, TRANS_B, na_wgmma_bf16<T>::value>(d, a, desc, accumulate ? 1 : 0);
}

// D (this warp's 16 rows of 64 x N) = A B + (accumulate ? D : 0), asynchronously, with A (64 x 16 of the
// whole warpgroup) K-major in shared memory too: the warp's rows are 16 w .. 16 w + 15 of it
template <class T, int N, bool TRANS_B>
__device__ __forceinline__ void na_wgmma_ss(float (&d)[N / 2], unsigned long long a_desc, unsigned long long desc,
                                            bool accumulate) {
    na_wgmma_m64k16_ss<N, TRANS_B, na_wgmma_bf16<T>::value>(d, a_desc, desc, accumulate ? 1 : 0);
}

// D += A B as one group, issued and not waited for, where A (this warp's 16 rows x K) is fp32 tiles in the
// D layout (tiles[K / 8][4]: P in the forward's P V, dS in dq's dS K) rounded to T into `a`: the D layout
// of two 8-column tiles is the A fragment of one k16 step. The caller keeps `a` alive (in scope, untouched)
// until the wait: the product reads it asynchronously (the emulator at the wait). B (K x N) is staged as
// MN-major core matrices at shared address b_address, a k-step being two row groups of `row_group` bytes
// (LBO row_group, SBO 128).
template <class T, int N, int K>
__device__ __forceinline__ void na_wgmma_rs_tiles(float (&d)[N / 2], unsigned (&a)[K / 16][4],
                                                  const float (&tiles)[K / 8][4], unsigned b_address,
                                                  unsigned row_group) {
#pragma unroll
    for (int ks = 0; ks < K / 16; ++ks) na_mma_pack_a<T>(a[ks], tiles[2 * ks], tiles[2 * ks + 1]);
    na_wgmma_hold(d);
    na_wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < K / 16; ++ks)
        na_wgmma_rs<T, N, true>(d, a[ks], na_wgmma_desc(b_address + 2u * row_group * ks, row_group, 128u), true);
    na_wgmma_commit();
}
