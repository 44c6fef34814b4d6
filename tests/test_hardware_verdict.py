"""The supported-hardware table (docs/getting-started.md), as ``info`` applies it; the install commands its verdicts and
the errors give; what ``info`` says runs CPU arrays."""

import json
import re
import types
from pathlib import Path

import pytest

import na_rtc
from na_rtc import _arrays, _environment, _install, backends
from na_rtc._environment import _device_verdict
from na_rtc._install import EXTRAS, Source, install_command, source

ROOT = Path(__file__).resolve().parent.parent

ARCHS_13 = [75, 80, 86, 87, 89, 90, 100, 120, 121]
ARCHS_12 = [50, 60, 70, 72, 75, 80, 86, 89, 90]

CASES = {
    "h100-nvrtc13": (90, (13, 5), ARCHS_13, 13000, "supported: cubin for sm_90"),
    "v100-nvrtc13": (70, (13, 5), ARCHS_13, 13000, install_command("cuda12")),
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


# ---------------------------------------------------------------- install commands that work where na_rtc is


def _hint_cupy_missing_cuda13_driver(monkeypatch):
    monkeypatch.setattr(_install, "_libcuda_probe", lambda: (13000, [90]))
    return _environment.cuda_install_hint()


def _hint_cupy_missing_no_driver(monkeypatch):
    monkeypatch.setattr(_install, "_libcuda_probe", lambda: (None, []))
    return _environment.cuda_install_hint()


def _hint_nvrtc_missing(monkeypatch):
    from na_rtc.runtime import nvrtc

    return nvrtc.install_hint()


def _hint_too_old_for_nvrtc_13(monkeypatch):
    from na_rtc.runtime import nvrtc

    with pytest.raises(nvrtc.ArchUnsupported) as info:
        nvrtc.target_for(70, ARCHS_13)
    return str(info.value) + " | " + _device_verdict(70, (13, 5), ARCHS_13, 13000)


HINTS = {"cupy-missing": _hint_cupy_missing_cuda13_driver, "cupy-missing-no-driver": _hint_cupy_missing_no_driver,
         "nvrtc-missing": _hint_nvrtc_missing, "gpu-too-old-for-nvrtc-13": _hint_too_old_for_nvrtc_13}


@pytest.mark.parametrize("hint", HINTS.values(), ids=HINTS.keys())
def test_hints_from_a_checkout_install_the_extra_from_the_checkout(monkeypatch, hint):
    """na_rtc is not on a package index: 'pip install na_rtc[cuda13]' finds nothing. The tests run from a
    checkout, so every hint installs the extra from this folder."""
    assert Path(na_rtc.__file__).resolve().parent == ROOT / "na_rtc"
    text = hint(monkeypatch)
    assert "na_rtc[" not in text
    assert re.search(r"pip install (-e )?'" + re.escape(str(ROOT)) + r"\[cuda1[23]\]'", text), text


def _checkout(folder: Path) -> Path:
    (folder / "na_rtc").mkdir(parents=True)
    (folder / "na_rtc" / "__init__.py").write_text("")
    (folder / "cuda_src").mkdir()
    (folder / "pyproject.toml").write_text('[project]\nname = "na_rtc"\n')
    return folder


def test_the_source_of_an_installation_is_told_apart(tmp_path):
    checkout = _checkout(tmp_path / "my checkout")
    copy = tmp_path / "site-packages" / "na_rtc"  # what `pip install .` or a wheel leaves
    copy.mkdir(parents=True)
    from_folder = {"url": checkout.as_uri(), "dir_info": {}}
    editable = {"url": checkout.as_uri(), "dir_info": {"editable": True}}
    wheel = {"url": (tmp_path / "na_rtc-0.1.0-py3-none-any.whl").as_uri(), "archive_info": {}}
    # run from the checkout (PYTHONPATH, the current folder), editable or not
    assert source(checkout / "na_rtc", read_record=False) == Source(checkout, False)
    assert source(checkout / "na_rtc", editable) == Source(checkout, True)
    # a copy in site-packages: installed from the checkout, which is still there; or from a wheel
    assert source(copy, from_folder) == Source(checkout, False)
    assert source(copy, wheel) == Source(None)
    assert source(copy, read_record=False) == Source(None)
    # the checkout it came from is gone: only the packages can be named
    assert source(copy, {"url": (tmp_path / "gone").as_uri(), "dir_info": {}}) == Source(None)


def test_the_install_record_is_found_past_a_checkouts_own_metadata(tmp_path, monkeypatch):
    """Run from a checkout, the checkout's na_rtc.egg-info (no record) comes first on the path; pip's record
    of the editable install is in site-packages."""
    import sys

    from na_rtc._install import installed_from

    checkout, site = tmp_path / "checkout", tmp_path / "site-packages"
    (checkout / "na_rtc.egg-info").mkdir(parents=True)
    (checkout / "na_rtc.egg-info" / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: na_rtc\nVersion: 0.1.0\n")
    (site / "na_rtc-0.1.0.dist-info").mkdir(parents=True)
    (site / "na_rtc-0.1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: na_rtc\nVersion: 0.1.0\n")
    record = {"url": checkout.as_uri(), "dir_info": {"editable": True}}
    (site / "na_rtc-0.1.0.dist-info" / "direct_url.json").write_text(json.dumps(record))
    monkeypatch.setattr(sys, "path", [str(checkout), str(site)])
    assert installed_from() == record


def test_install_commands_for_each_kind_of_installation(tmp_path):
    checkout = tmp_path / "my checkout"
    assert install_command("cuda13", Source(checkout, True)) == f"pip install -e '{checkout}[cuda13]'"
    assert install_command("cuda12", Source(checkout, False)) == f"pip install '{checkout}[cuda12]'"
    assert install_command("cuda13", Source(None)) == ("pip install 'cupy-cuda13x>=14' 'nvidia-cuda-nvrtc>=13' "
                                                       "'cuda-bindings>=13,<14'")
    assert install_command("nvrtc", Source(None)) == "pip install 'nvidia-cuda-nvrtc>=13' 'cuda-bindings>=13,<14'"
    with pytest.raises(ValueError, match="extra must be one of cuda12, cuda13, nvrtc"):
        install_command("cuda11", Source(None))


def test_the_packages_named_are_the_extras_of_pyproject():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {name: tuple(extras[name]) for name in EXTRAS} == EXTRAS


# ---------------------------------------------------------------- info's verdict agrees with its backend table


def _cpu_arrays_backend() -> str:
    return backends.select(types.SimpleNamespace(kind=_arrays.NUMPY, device="cpu", ndim=2, group=1)).name


@pytest.mark.parametrize("forced", [None, "emulator", "reference"])
def test_the_no_gpu_verdict_names_the_backend_cpu_arrays_get(monkeypatch, forced):
    monkeypatch.setattr(_environment, "gpus", lambda: _environment.Probe(False, None, "no GPU"))
    monkeypatch.delenv("NA_RTC_BACKEND", raising=False)
    if forced == "emulator" and not backends.get("emulator").probe()[0]:
        pytest.skip("the emulator needs a C++ compiler")
    with na_rtc.use_backend(forced):
        chosen = _cpu_arrays_backend()
        verdict = _environment.hardware_verdict().text
        selected = _environment.selected_backend().text
    assert chosen == (forced or "blocked")
    assert verdict.startswith(f"no GPU: CPU arrays run on the {chosen} backend"), verdict
    assert selected == forced or f"{chosen} for CPU arrays" in selected
