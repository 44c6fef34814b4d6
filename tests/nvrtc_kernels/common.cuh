// Test header for tests/test_nvrtc.py: included by kernels.cu from the same folder.
#pragma once

template <class T>
__device__ __forceinline__ T twice(T x) {
    return x + x;
}

#ifndef NA_RTC_NVRTC
#error "NA_RTC_NVRTC is defined by na_rtc's NVRTC options"
#endif
