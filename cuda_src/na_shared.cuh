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

// Staging rows of global memory into shared memory, 16 bytes per load where
// the layout allows it.
//
// A row is `len` elements (element stride `step` in global memory). When the
// rows are contiguous (step 1), `len` is a multiple of 16 / sizeof(T) and every
// row starts 16-byte aligned, each thread moves 16 bytes with one vector load
// (ld.global.v4: 8x fewer load instructions than element loads for 16-bit
// types) and stores them as four 32-bit words, so shared rows only need word
// alignment and keep their bank-conflict padding. Otherwise element by
// element. Either way consecutive threads take consecutive pieces of a row
// (coalesced) and the shared contents are identical.
struct __align__(16) na_bytes16 {
    unsigned int w[4];
};

// global element offset of a staged row and its row index in shared memory
struct na_row_ref {
    long long src, dst;
};

// Rows start 16-byte aligned if the base pointer does and every stride that
// moves between rows is a multiple of 16 bytes (pass 0 for unused strides).
template <class T>
__device__ __forceinline__ bool na_rows_vectorizable(const T* base, long long len, long long step, long long s0,
                                                     long long s1, long long s2, long long s3) {
    constexpr long long V = 16 / (long long)sizeof(T);
    return step == 1 && len % V == 0 && (reinterpret_cast<unsigned long long>(base) & 15ull) == 0 && s0 % V == 0 &&
           s1 % V == 0 && s2 % V == 0 && s3 % V == 0;
}

// n / d for 0 <= n < 2^32, 1 <= d < 2^32: a 32-bit division, inline, where a 64-bit one is a subroutine whose
// calls cost registers saved around them (reported as spills); a staged chunk's pieces are far below 2^32
__device__ __forceinline__ long long na_div32(long long n, long long d) {
    return (long long)((unsigned)n / (unsigned)d);
}

// copy `rows` rows of `len` elements: row r comes from src + ref(r).src (element
// stride `step`) and goes to dst + ref(r).dst * pitch (`pitch` elements, a
// whole number of 32-bit words when `vec`); `vec` must be block-uniform and
// true only where na_rows_vectorizable holds
template <class T, class Ref>
__device__ __forceinline__ void na_copy_rows(T* dst, long long pitch, const T* src, long long rows, long long len,
                                             long long step, bool vec, Ref ref) {
    if (vec) {
        constexpr long long V = 16 / (long long)sizeof(T);
        const long long pieces = len / V;
        for (long long e = threadIdx.x; e < rows * pieces; e += blockDim.x) {
            const long long r = na_div32(e, pieces), c = (e - r * pieces) * V;
            const na_row_ref at = ref(r);
            const na_bytes16 piece = *reinterpret_cast<const na_bytes16*>(src + at.src + c);
            unsigned int* to = reinterpret_cast<unsigned int*>(dst + at.dst * pitch + c);
            to[0] = piece.w[0];
            to[1] = piece.w[1];
            to[2] = piece.w[2];
            to[3] = piece.w[3];
        }
        return;
    }
    for (long long e = threadIdx.x; e < rows * len; e += blockDim.x) {
        const long long r = na_div32(e, len), c = e - r * len;
        const na_row_ref at = ref(r);
        dst[at.dst * pitch + c] = src[at.src + c * step];
    }
}

// The extra key/value tokens (NA_EXTRA, na_args.cuh) as the SIMT kernels stage them: whether their rows allow
// 16-byte loads (block-uniform bools k_vec, v_vec), and rows t0 .. t0 + rows - 1 of key/value head kvh of
// batch b copied into sk (keys, D elements) and sv (values, DV elements), row pitch `pitch`. In a kernel that
// takes NA_EXTRA(T) and NA_PROBLEM.
#define NA_EXTRA_VECTORIZABLE(k_vec, v_vec)                                                    \
    const bool k_vec = NX > 0 && na_rows_vectorizable(xk, D, xk_l, xk_b, xk_n, xk_h, 0);       \
    const bool v_vec = NX > 0 && na_rows_vectorizable(xv, DV, xv_l, xv_b, xv_n, xv_h, 0);
#define NA_STAGE_EXTRA_ROWS(sk, sv, pitch, t0, rows, b, kvh, k_vec, v_vec)                                     \
    na_copy_rows(sk, pitch, xk, rows, D, xk_l, k_vec,                                                          \
                 [&](long long r_) { return na_row_ref{NA_AT_EXTRA(xk, b, (t0) + r_, kvh, 0), r_}; });         \
    na_copy_rows(sv, pitch, xv, rows, DV, xv_l, v_vec,                                                         \
                 [&](long long r_) { return na_row_ref{NA_AT_EXTRA(xv, b, (t0) + r_, kvh, 0), r_}; });

