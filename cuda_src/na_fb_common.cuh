// What the SIMT backward kernels share (na_fused_bwd.cu, na_tokens_bwd.cu): their block size, 16-byte
// alignment of shared-memory parts, the row stride of staged rows, and the two dot products of a
// (query, key) pair.
#pragma once

#include "na_types.cuh"

#define NA_FB_THREADS 256

__device__ __forceinline__ long long na_fb_align16(long long n) { return (n + 15) / 16 * 16; }

// row stride (elements) of a staged [rows][D] array: an odd number of 4-byte
// words, so threads reading one dim of consecutive rows hit distinct banks
template <class T> __device__ __forceinline__ long long na_fb_row(long long D) {
    if (sizeof(T) >= 4) return D | 1;
    return (((D * (long long)sizeof(T) + 3) / 4) | 1) * 4 / (long long)sizeof(T);
}

// q . k over the query/key head dim D and dOut . v over the value head dim DV of staged rows, in one loop
template <class T>
__device__ __forceinline__ void na_fb_dots(float& dot, float& dp, const T* qr, const T* kr, const T* gr, const T* vr,
                                           long long D, long long DV) {
    for (long long d = 0; d < D || d < DV; ++d) {
        if (d < D) dot += (float)na_load(qr, d) * (float)na_load(kr, d);
        if (d < DV) dp += (float)na_load(gr, d) * (float)na_load(vr, d);
    }
}
