// Tensor-core primitives: warp-wide mma.sync m16n8k16 (fp16 or bf16 inputs,
// fp32 accumulators) and ldmatrix m8n8 (x1/x2/x4, optionally transposed), as
// inline PTX on the GPU. The emulator (na_rtc/emulator/cuda_emu.h) provides
// the same spellings with the PTX ISA fragment layouts, so kernels run
// unchanged there, lane for lane.
//
// Fragments of one warp, g = lane / 4, t = lane % 4 (PTX ISA, "Matrix
// Fragments for mma.m16n8k16 with floating point type"):
//   A 16x16 (row major), unsigned a[4]: a[r] holds the elements
//       (row g + 8 (r % 2), cols 2t + 8 (r / 2) + {0, 1}), low half first;
//   B 16x8 (K x N, "col"), unsigned b[2]: b[r] holds (k = 2t + 8r + {0, 1}, n = g);
//   C, D 16x8 (fp32), float c[4]: c[i] is (row g + 8 (i / 2), col 2t + i % 2).
// ldmatrix: lanes 8j..8j+7 give the row addresses (16 bytes of shared memory,
// 16-byte aligned) of 8x8 matrix j; lane l gets in register j the elements
// (l / 4, 2 (l % 4) + {0, 1}) of matrix j, or (2 (l % 4) + {0, 1}, l / 4) with
// .trans. So an A tile comes from x4 on its rows, a B tile from x2 on the rows
// of B^T ([n][k] storage) or x2.trans on the rows of B ([k][n] storage).
//
// mma needs sm_80 (bf16) and ldmatrix sm_75: the dispatcher only launches
// kernels using them on such GPUs; for older targets these compile to a trap
// so the sources still build everywhere.
#pragma once

#include "na_types.cuh"

#ifndef NA_RTC_EMULATOR

__device__ __forceinline__ unsigned na_shared_address(const void* p) {
    unsigned address;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(address) : "l"(p));
    return address;
}

__device__ __forceinline__ void na_mma_m16n8k16_f16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                                    const float (&c)[4]) {
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#else
    __trap();
#endif
}

__device__ __forceinline__ void na_mma_m16n8k16_bf16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                                     const float (&c)[4]) {
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#else
    __trap();
#endif
}

template <int N, bool TRANS>
__device__ __forceinline__ void na_ldmatrix(unsigned (&r)[N], const void* row) {
    static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
#if __CUDA_ARCH__ >= 750
    const unsigned address = na_shared_address(row);
    if constexpr (N == 4 && !TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address) : "memory");
    else if constexpr (N == 4)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address) : "memory");
    else if constexpr (N == 2 && !TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
                     : "=r"(r[0]), "=r"(r[1]) : "r"(address) : "memory");
    else if constexpr (N == 2)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                     : "=r"(r[0]), "=r"(r[1]) : "r"(address) : "memory");
    else if constexpr (!TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(address) : "memory");
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(address)
                     : "memory");
#else
    __trap();
#endif
}

#endif  // NA_RTC_EMULATOR

// mma for the element type of a kernel (fp16_t or bf16_t)
template <class T> struct na_mma;
template <> struct na_mma<fp16_t> {
    static __device__ __forceinline__ void run(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                               const float (&c)[4]) {
        na_mma_m16n8k16_f16(d, a, b, c);
    }
};
template <> struct na_mma<bf16_t> {
    static __device__ __forceinline__ void run(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                               const float (&c)[4]) {
        na_mma_m16n8k16_bf16(d, a, b, c);
    }
};

// two floats as the packed 16-bit pair of an A or B register (low = first), rounded to nearest even
template <class T> __device__ __forceinline__ unsigned na_pack2(float lo, float hi);
template <> __device__ __forceinline__ unsigned na_pack2<fp16_t>(float lo, float hi) {
    return (unsigned)na_f32_to_f16(lo) | ((unsigned)na_f32_to_f16(hi) << 16);
}
template <> __device__ __forceinline__ unsigned na_pack2<bf16_t>(float lo, float hi) {
    return (unsigned)na_f32_to_bf16(lo) | ((unsigned)na_f32_to_bf16(hi) << 16);
}

// two 8-column accumulator tiles s0, s1 (P or dS of one 16-key step) rounded to T, as an A fragment: the
// accumulator layout of two n8 tiles is the A layout of one k16 step
template <class T>
__device__ __forceinline__ void na_mma_pack_a(unsigned (&pa)[4], const float (&s0)[4], const float (&s1)[4]) {
    pa[0] = na_pack2<T>(s0[0], s0[1]);
    pa[1] = na_pack2<T>(s0[2], s0[3]);
    pa[2] = na_pack2<T>(s1[0], s1[1]);
    pa[3] = na_pack2<T>(s1[2], s1[3]);
}
