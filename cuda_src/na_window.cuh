// Per-axis neighborhood window math: the CUDA mirror of na_rtc/window.py.
//
// Keep the two in step: every formula here is DESIGN.md section 2 and has the
// same name as its Python twin. Positions are int64; windows are in group
// coordinates (i' = i / dilation) and key positions are j' * dilation + g.
#pragma once

struct na_axis {
    long long length;
    long long kernel;
    long long stride;
    long long dilation;
    long long causal;
};

__device__ __forceinline__ long long na_min(long long a, long long b) { return a < b ? a : b; }
__device__ __forceinline__ long long na_max(long long a, long long b) { return a > b ? a : b; }

__device__ __forceinline__ long long na_group_length(const na_axis& a, long long g) {
    return (a.length - g + a.dilation - 1) / a.dilation;
}

// window [start, end) of query position i, group coordinates
__device__ __forceinline__ void na_window(const na_axis& a, long long i, long long& start, long long& end) {
    const long long g = i % a.dilation, ig = i / a.dilation, lg = na_group_length(a, g);
    const long long block = (ig / a.stride) * a.stride;
    if (a.causal) {
        const long long leader = na_min(block + a.stride - 1, lg - 1);
        start = na_max(leader - a.kernel + 1, 0);
        end = na_min(ig + 1, lg);
    } else {
        const long long leader = na_min(block + a.stride / 2, lg - 1);
        start = na_min(na_max(leader - a.kernel / 2, 0), lg - a.kernel);
        end = start + a.kernel;
    }
}

// queries whose windows contain key position j: [first, last) in j's group
// coordinates. Window bounds never decrease with the query inside a group,
// so two binary searches find the range (O(log L), no loop over the kernel).
__device__ __forceinline__ void na_inverse_range(const na_axis& a, long long j, long long& first, long long& last) {
    const long long g = j % a.dilation, jg = j / a.dilation, lg = na_group_length(a, g);
    long long start, end, lo = 0, hi = lg;
    while (lo < hi) {  // first query whose window ends after j'
        const long long mid = (lo + hi) / 2;
        na_window(a, mid * a.dilation + g, start, end);
        if (end > jg) hi = mid; else lo = mid + 1;
    }
    first = lo;
    lo = first;
    hi = lg;
    while (lo < hi) {  // first query whose window starts after j'
        const long long mid = (lo + hi) / 2;
        na_window(a, mid * a.dilation + g, start, end);
        if (start > jg) hi = mid; else lo = mid + 1;
    }
    last = lo;
}
