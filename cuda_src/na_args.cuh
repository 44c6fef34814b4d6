// The argument lists the kernels share, in the order the launch plans pass
// them (na_rtc/runtime/kernel_args.py packs each one):
//   NA_PROBLEM    batch B, query heads H, query heads per key/value head HPK
//                 (grouped-query attention: query head h reads key/value head
//                 h / HPK, NA_KV_HEAD; 1 without grouping), the head dim D of
//                 query and key, the head dim DV of value, output and their
//                 gradients (D without a value head dim of its own; the split
//                 kernels read D only: their launches pass the dim they
//                 reduce over or write), then per axis its length, kernel,
//                 stride, dilation and causal flag (x: X kx sx dx cx;
//                 y: Y ky sy dy cy; z: Z kz sz dz cz). Every kernel takes all
//                 three axes; a problem of lower rank passes trivial axes
//                 (length 1, kernel 1: 1D has Y = Z = 1, 2D has Z = 1), and a
//                 kernel whose RANK template parameter is below 3 never reads
//                 the z axis, so its code is the same as without it.
//   NA_TENSOR(t)  int64 element strides of a [b, x, y, z, h, last] tensor
//                 (q, k, v, outputs, weights): any layout and view, no copies;
//                 the strides of trivial axes are 0
//   NA_ROWS(t)    the same for a per-row table (lse, delta): [b, x, y, z, h]
//   NA_BIAS(t)    the bias table [h, rx, ry, rz]
//   NA_EXTRA(T)   the extra key/value tokens every query of a fused forward attends besides its neighborhood
//                 (one softmax over both): keys xk and values xv [b, token, key/value head, last] as
//                 pointers and int64 element strides, then their count NX (0: none, null pointers); the
//                 kernels read token t of key/value head NA_KV_HEAD(h) at NA_AT_EXTRA(xk, b, t, h, l)
// and NA_AT5 / NA_AT4 (a rank-2 element offset, z = 0) and NA_AT6 / NA_ATR
// (any rank), the element offset of an index in such a tensor.
#pragma once

#define NA_PROBLEM                                                                                        \
    long long B, long long H, long long HPK, long long D, long long DV, long long X, long long kx, long long sx, \
        long long dx, long long cx, long long Y, long long ky, long long sy, long long dy, long long cy,         \
        long long Z, long long kz, long long sz, long long dz, long long cz
// the key/value head query head h reads, and the key/value heads (32-bit divisions: a 64-bit one is a
// subroutine that costs the split kernels up to 32 registers; head counts are far below 2^31)
#define NA_KV_HEAD(h) ((long long)((unsigned)(h) / (unsigned)HPK))
#define NA_KV_HEADS ((long long)((unsigned)H / (unsigned)HPK))
#define NA_TENSOR(t) \
    long long t##_b, long long t##_x, long long t##_y, long long t##_z, long long t##_h, long long t##_l
#define NA_ROWS(t) long long t##_b, long long t##_x, long long t##_y, long long t##_z, long long t##_h
#define NA_BIAS(t) long long t##_h, long long t##_x, long long t##_y, long long t##_z
#define NA_EXTRA(T)                                                                                       \
    const T* __restrict__ xk, long long xk_b, long long xk_n, long long xk_h, long long xk_l,                  \
        const T* __restrict__ xv, long long xv_b, long long xv_n, long long xv_h, long long xv_l, long long NX
#define NA_AT_EXTRA(t, b, n, h, l) ((b) * t##_b + (n) * t##_n + (h) * t##_h + (l) * t##_l)
#define NA_AT5(t, b, x, y, h, l) ((b) * t##_b + (x) * t##_x + (y) * t##_y + (h) * t##_h + (l) * t##_l)
#define NA_AT4(t, b, x, y, h) ((b) * t##_b + (x) * t##_x + (y) * t##_y + (h) * t##_h)
#define NA_AT6(t, b, x, y, z, h, l) (NA_AT5(t, b, x, y, h, l) + (z) * t##_z)
#define NA_ATR(t, b, x, y, z, h) (NA_AT4(t, b, x, y, h) + (z) * t##_z)
