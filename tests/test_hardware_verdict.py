"""The supported-hardware table of DESIGN.md section 3, as ``info`` applies it."""

import pytest

from na_rtc._environment import _device_verdict

ARCHS_13 = [75, 80, 86, 87, 89, 90, 100, 120, 121]
ARCHS_12 = [50, 60, 70, 72, 75, 80, 86, 89, 90]

CASES = {
    "h100-nvrtc13": (90, (13, 5), ARCHS_13, 13000, "supported: cubin for sm_90"),
    "v100-nvrtc13": (70, (13, 5), ARCHS_13, 13000, "pip install 'na_rtc[cuda12]'"),
    "v100-nvrtc12": (70, (12, 9), ARCHS_12, 12080, "supported: cubin for sm_70"),
    "pascal": (61, (12, 9), ARCHS_12, 12080, "unsupported: na_rtc needs sm_70"),
    "old-driver": (90, (13, 0), ARCHS_13, 12040, "older than NVRTC 13"),
    "newer-than-nvrtc": (130, (13, 5), ARCHS_13, 13050, "supported through PTX"),
    "newer-than-nvrtc-old-driver": (130, (13, 5), ARCHS_13, 13000, "cannot JIT it: update the driver to CUDA 13.5+"),
    "gap-in-nvrtc-list": (88, (13, 5), ARCHS_13, 13050, "supported through PTX"),
    "no-driver-known": (90, (13, 0), ARCHS_13, None, "supported: cubin for sm_90"),
    "older-than-nvrtc-12-knows": (70, (12, 9), [75, 80, 90], 12080, "sm_75+ only"),
}


@pytest.mark.parametrize("arch, nvrtc, archs, driver, expected", CASES.values(), ids=CASES.keys())
def test_device_verdict(arch, nvrtc, archs, driver, expected):
    assert expected in _device_verdict(arch, nvrtc, archs, driver)


@pytest.mark.parametrize("arch, expected", [(70, "on the SIMT kernels"), (75, "need sm_80+"),
                                            (80, "on mma.sync tensor cores"), (90, "NA_RTC_WGMMA=1"),
                                            (120, "on mma.sync tensor cores")])
def test_the_verdict_says_which_kernels_serve_fp16_and_bf16(arch, expected):
    nvrtc, archs = ((12, 9), ARCHS_12 + [120]) if arch < 75 else ((13, 5), ARCHS_13)
    verdict = _device_verdict(arch, nvrtc, archs, 13050 if nvrtc[0] == 13 else 12090)
    assert verdict.startswith("supported") and expected in verdict
    assert ("NA_RTC_WGMMA" in verdict) == (arch == 90)
