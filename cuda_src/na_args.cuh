// The argument lists the kernels share, in the order the launch plans pass
// them (na_rtc/runtime/plan.py):
//   NA_PROBLEM      batch B, heads H, head dim D, then per axis its length,
//                   kernel, stride, dilation and causal flag (x: X kx sx dx
//                   cx; y: Y ky sy dy cy; 1D problems pass Y = 1)
//   NA_STRIDES5(t)  int64 element strides of tensor t: batch, x, y, head,
//                   head dim (any layout and view, no copies)
//   NA_STRIDES4(t)  the same for a per-row table (lse, delta): batch, x, y,
//                   head
// and NA_AT5 / NA_AT4, the element offset of an index in such a tensor.
#pragma once

#define NA_PROBLEM                                                                                \
    long long B, long long H, long long D, long long X, long long kx, long long sx, long long dx, \
        long long cx, long long Y, long long ky, long long sy, long long dy, long long cy
#define NA_STRIDES5(t) long long t##_b, long long t##_x, long long t##_y, long long t##_h, long long t##_l
#define NA_STRIDES4(t) long long t##_b, long long t##_x, long long t##_y, long long t##_h
#define NA_AT5(t, b, x, y, h, l) ((b) * t##_b + (x) * t##_x + (y) * t##_y + (h) * t##_h + (l) * t##_l)
#define NA_AT4(t, b, x, y, h) ((b) * t##_b + (x) * t##_x + (y) * t##_y + (h) * t##_h)
