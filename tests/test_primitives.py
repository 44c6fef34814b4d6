"""The primitive self-tests (na_rtc.verify.primitives: conversions, mma.sync and ldmatrix, warp shuffles,
ex2.approx, cp.async, wgmma, the key-loop helpers) must pass on the emulator and, where there is one, on the
GPU (``gpu`` marker; ``make gpu-check`` runs them first). The checks themselves live in the package, so
``python -m na_rtc selftest`` runs the same ones on a user's machine; the tests below also hold the checks to
reporting a wrong result instead of passing it or raising."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import na_rtc
from na_rtc.verify import primitives
from na_rtc.verify.primitives import PRIMITIVES, PrimitiveResult, run_primitives


def _usable(name):
    return na_rtc.backends.get(name).probe()[0]


EMULATOR = pytest.mark.skipif(not _usable("emulator"), reason="no C++ compiler")
BACKENDS = [
    pytest.param("emulator", marks=EMULATOR),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not _usable("cuda"), reason="no usable GPU")]),
]


@pytest.mark.parametrize("check", list(PRIMITIVES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_primitive(backend, check):
    result = PRIMITIVES[check](backend, 0)
    if result.ok is None:
        pytest.skip(result.detail)  # e.g. wgmma on a GPU that is not sm_90
    assert result.ok, f"{result.name}: {result.detail}"


@EMULATOR
@pytest.mark.parametrize("check", list(PRIMITIVES))
def test_a_wrong_result_is_reported_not_raised(check, monkeypatch):
    """Every check fails, with a detail, when what comes back from the kernel is corrupted (the low bit of
    every byte flipped): none passes a wrong result or raises for one."""
    get = primitives._Runner.get

    def corrupted(self, array):
        out = np.array(get(self, array), copy=True)
        out.view(np.uint8)[...] ^= 1
        return out

    monkeypatch.setattr(primitives._Runner, "get", corrupted)
    result = PRIMITIVES[check]("emulator", 0)
    assert result.ok is False and result.detail, result


@EMULATOR
def test_wgmma_on_a_device_reading_the_offset_fields_swapped_is_diagnosed(monkeypatch):
    """A device that reads LBO and SBO the other way round fails the check, and the detail says so for each
    form (imitated by exchanging which fields the check calls documented)."""
    documented, swapped = primitives._wgmma_documented, primitives._wgmma_swapped
    monkeypatch.setattr(primitives, "_wgmma_documented", swapped)
    monkeypatch.setattr(primitives, "_wgmma_swapped", documented)
    result = PRIMITIVES["wgmma_bf16_n64"]("emulator", 0)
    assert result.ok is False
    assert ("K-major + C: matches with LBO and SBO swapped; MN-major: matches with LBO and SBO swapped; "
            "SS (A and B K-major): matches with LBO and SBO swapped") in result.detail


def test_ldmatrix_layout_is_the_ptx_isa_figure():
    """The expected registers of the ldmatrix check, against entries read off the PTX ISA's ldmatrix figure
    (identity row addresses, shared row s holding 8 s .. 8 s + 7): lane l holds row l / 4, columns
    2 (l % 4) and 2 (l % 4) + 1 of matrix j in register j, low half first; .trans reads the transpose."""
    rows = np.arange(32)
    plain, trans = (primitives.ldmatrix_fragments(rows, 4, t) for t in (False, True))
    assert plain[0, 0] == 1 << 16 | 0  # (0, 0), (0, 1)
    assert plain[5, 0] == 11 << 16 | 10  # lane 5: row 1, columns 2 and 3
    assert plain[31, 3] == (8 * 31 + 7) << 16 | (8 * 31 + 6)  # matrix 3, row 7, columns 6 and 7
    assert trans[5, 0] == 24 + 1 << 16 | 16 + 1  # lane 5: rows 2 and 3, column 1
    assert trans[31, 2] == (8 * 23 + 7) << 16 | (8 * 22 + 7)  # matrix 2: rows 6 and 7, column 7
    assert primitives.ldmatrix_fragments(rows, 2, True).shape == (32, 2)


def test_run_primitives_checks_its_arguments():
    with pytest.raises(ValueError, match="backend must be one of 'cuda', 'emulator'"):
        run_primitives("gpu")
    with pytest.raises(TypeError, match="device must be a GPU index"):
        run_primitives("emulator", device="0")
    with pytest.raises(ValueError, match="device must be a GPU index >= 0"):
        run_primitives("emulator", device=-1)
    with pytest.raises(ValueError, match="unknown primitive check.*'mma'.*choose from convert, mma_fp16"):
        run_primitives("emulator", only=["mma"])


@EMULATOR
def test_run_primitives_runs_the_chosen_checks_in_registry_order():
    results = run_primitives("emulator", only=["exp2", "divide"])
    assert [r.name for r in results] == [PRIMITIVES[i]("emulator", 0).name for i in ("divide", "exp2")]
    assert all(isinstance(r, PrimitiveResult) and r.ok and r.seconds >= 0 for r in results)


def test_the_checks_import_neither_torch_nor_cupy():
    code = ("import sys, na_rtc.verify.primitives; "
            "print(sorted(m for m in ('torch', 'cupy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class _FakeGpuArray:
    """A CuPy array stand-in: host memory that remembers the device it was made on."""

    def __init__(self, array, device):
        self.array, self.device = np.array(array, copy=True), device

    def get(self):
        return self.array.copy()


def _fake_gpu(monkeypatch, arch: int, devices: int = 2) -> list:
    """Stands in for CuPy and the GPU (compute capability ``arch``): launches run on the emulator, on the
    arrays the fake made. Returns the log of (device an array was made on) per launch argument."""
    import contextlib
    import types

    from na_rtc.runtime import cuda, emulated

    current, log = [0], []

    @contextlib.contextmanager
    def device(index):
        previous, current[0] = current[0], index
        yield
        current[0] = previous

    cupy = types.ModuleType("cupy")
    cupy.asarray = lambda a: _FakeGpuArray(a, current[0])
    cupy.cuda = types.SimpleNamespace(Device=device, runtime=types.SimpleNamespace(getDeviceCount=lambda: devices))

    def run_on_the_emulator(plan):
        args = []
        for arg in plan.args:
            if isinstance(arg.value, _FakeGpuArray):
                log.append(arg.value.device)
                arg = type(arg)(arg.kind, arg.value.array)
            args.append(arg)
        emulated.run(type(plan)(plan.kernel, plan.grid, plan.block, plan.shared_bytes, tuple(args)))

    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(na_rtc.backends, "executor", lambda name: {"cuda": run_on_the_emulator}[name])
    monkeypatch.setattr(cuda, "arch_of", lambda name: {"cuda:1": arch}[name])
    monkeypatch.setattr(na_rtc.backends.get("cuda"), "probe", lambda: (True, "a stand-in GPU"))
    return log


@EMULATOR
def test_on_a_gpu_every_array_lives_on_the_chosen_device_and_results_come_back(monkeypatch):
    log = _fake_gpu(monkeypatch, arch=90)
    results = run_primitives("cuda", device=1)
    assert [r.ok for r in results] == [True] * len(PRIMITIVES), [r.detail for r in results if not r.ok]
    assert log and set(log) == {1}


@EMULATOR
@pytest.mark.parametrize("arch, skipped", [
    (70, {"mma_fp16", "mma_bf16", "ldmatrix"} | {c for c in PRIMITIVES if c.startswith("wgmma")}),
    (80, {c for c in PRIMITIVES if c.startswith("wgmma")}),
    (120, {c for c in PRIMITIVES if c.startswith("wgmma")}),  # sm_90a code runs on sm_90 only
])
def test_on_a_gpu_without_an_instruction_its_checks_are_skipped_saying_why(monkeypatch, arch, skipped):
    _fake_gpu(monkeypatch, arch=arch)
    results = dict(zip(PRIMITIVES, run_primitives("cuda", device=1)))
    assert {c for c, r in results.items() if r.ok is None} == skipped
    assert all(f"sm_{arch}" in results[c].detail for c in skipped)
    assert all(r.ok for c, r in results.items() if c not in skipped)


def test_a_gpu_that_does_not_exist_is_named(monkeypatch):
    _fake_gpu(monkeypatch, arch=90, devices=1)
    with pytest.raises(ValueError, match="device 1 does not exist: this machine has 1 GPU"):
        run_primitives("cuda", device=1)
