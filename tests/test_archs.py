"""GPU architectures (``na_rtc.runtime.archs``) and what the kernel families promise about them.

* the per-architecture shared-memory table and ``fits``;
* each family runs on exactly the architectures the dispatcher sends it to, and ``check`` /
  ``precompile`` compile exactly those;
* no family's tables admit a launch that exceeds the shared memory of an architecture it runs on;
* CI's rotating class;
* the per-architecture variant of the tensor-core dq kernel (the one sm_100 and newer build) gives the
  same bits as the default one, on the emulator.

None of these needs NVRTC: ``check`` itself compiles and measures (``make check-all``).
"""

from __future__ import annotations

import dataclasses
import io
import types

import pytest

from na_rtc.runtime import archs, check
from na_rtc.runtime.families import (FAMILIES, fused, fused_bwd, fused_tc, fused_tc_bwd, fused_wg, fused_wg_bwd, tiled,
                                     tiled_bwd)

KIB = 1024
TENSOR_CORE = ("fused_tc", "fused_tc_bwd")
MMA_SYNC = TENSOR_CORE + ("fused_tc_3d", "fused_tc_bwd_3d")  # with the 3D twins
WGMMA = ("fused_wg", "fused_wg_bwd", "fused_wg_3d", "fused_wg_bwd_3d", "selftest_wgmma")  # with the 3D twins
#: what check has measured as the most static shared memory any kernel declares (its "smem static" column:
#: 2048 bytes in the naive kernels' reductions, 1104 in the wgmma dK/dV kernel): the families' tables give
#: dynamic sizes only, so the fit below adds this much
STATIC_ALLOWANCE = 2 * KIB


# ---------------------------------------------------------------- the table


@pytest.mark.parametrize("arch, kib", [(75, 64), (80, 163), (86, 99), (87, 163), (89, 99), (90, 227),
                                       (100, 227), (120, 99)])
def test_shared_memory_limits_follow_the_programming_guide(arch, kib):
    assert archs.shared_limit(arch) == kib * KIB and archs.limits_for(arch).known


def test_fits_counts_static_and_dynamic_shared_memory():
    assert archs.fits(86, 0, 99 * KIB) and not archs.fits(86, 0, 99 * KIB + 1)
    assert archs.fits(86, 3 * KIB, 96 * KIB) and not archs.fits(86, 4 * KIB, 96 * KIB)
    assert archs.fits(75, 16 * KIB, 48 * KIB) and not archs.fits(75, 16 * KIB, 48 * KIB + 16)
    assert archs.fits(90, 48 * KIB, 100 * KIB) and not archs.fits(90, 48 * KIB + 1, 0)  # static: 48 KiB at most
    assert not archs.fits(90, 0, -1)


def test_an_architecture_outside_the_table_gets_the_smallest_opt_in_limit():
    assert not archs.limits_for(130).known and archs.shared_limit(130) == 99 * KIB
    assert check.limits_for is archs.limits_for and check.ARCH_LIMITS is archs.LIMITS  # one table


def test_every_class_is_in_the_table_and_ci_checks_two_of_them():
    assert list(archs.CLASSES) == [75, 80, 86, 90, 100, 120]
    assert all(archs.limits_for(arch).known for arch in archs.CLASSES)
    assert set(archs.CI_ARCHS) == {80, 90} and check.DEFAULT_CHECK_ARCHS == archs.CI_ARCHS
    assert check.parse_arch_list("classes") == list(archs.CLASSES)


# ---------------------------------------------------------------- which family runs where


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_family_runs_on_the_architectures_the_dispatcher_sends_it_to(name):
    family = FAMILIES[name]
    if name in MMA_SYNC:  # mma.sync in bf16 and cp.async: sm_80 and newer, newer than NVRTC knows too
        expected = {80, 86, 90, 100, 120, 130}
    elif name in WGMMA:  # sm_90a cubins run on sm_90 only
        expected = {90}
    else:
        expected = {75, 80, 86, 90, 100, 120, 130}
    assert {arch for arch in (*archs.CLASSES, 130) if family.runs_on(arch)} == expected


def _policy_problem():
    return types.SimpleNamespace(device="cuda:0")


@pytest.mark.parametrize("arch", list(archs.CLASSES))
def test_the_dispatch_policies_agree_with_the_families(monkeypatch, arch):
    """A call's dispatch policy on the GPU (runtime/policy.py) allows every route of the dispatch tables on
    exactly the architectures its family runs on (and check compiles), with every path switched on."""
    from na_rtc.runtime import cuda, dispatch
    from na_rtc.runtime.policy import Policy

    monkeypatch.setattr(cuda, "arch_of", lambda device: arch)
    monkeypatch.setenv("NA_RTC_TENSOR_CORES", "1")
    monkeypatch.setenv("NA_RTC_WGMMA", "1")
    policy = Policy.for_call("cuda", _policy_problem())
    routes = [*dispatch.FORWARD, *(route for pair in dispatch.BACKWARD for route in pair),
              *(route for routes in dispatch.SPLIT_KERNELS.values() for route in routes)]
    assert {route.family for route in routes} >= set(TENSOR_CORE) | {"fused_wg", "fused_wg_bwd"}
    for route in routes:
        family = FAMILIES[route.family]
        assert policy.allows(family, route.switches)[0] == family.runs_on(arch), route


def test_check_and_precompile_compile_exactly_what_can_run(monkeypatch):
    compiled = []

    def fake_compile(name, family, arch, cache_root):
        compiled.append((arch, name))
        return None, "not compiled in this test", 0.0

    monkeypatch.setattr(check, "_compile", fake_compile)
    reports = check.check_families(FAMILIES, list(archs.CLASSES))
    expected = [(arch, name) for arch in archs.CLASSES for name, family in FAMILIES.items() if family.runs_on(arch)]
    assert compiled == expected and [(r.arch, r.family) for r in reports] == expected
    assert not any(arch == 75 and name in MMA_SYNC + WGMMA for arch, name in compiled)
    compiled.clear()
    check.precompile(FAMILIES, [75], out=io.StringIO())
    assert sorted(name for _, name in compiled) == sorted(n for n in FAMILIES if n not in MMA_SYNC + WGMMA)


def test_families_of_a_family_module_without_arch_fields_run_everywhere():
    plain = types.SimpleNamespace(source="k.cu", names=("k",))
    assert all(check.runs_on(plain, arch) for arch in archs.CLASSES)
    assert not check.runs_on(types.SimpleNamespace(archs=(90,)), 80)
    assert not check.runs_on(types.SimpleNamespace(min_arch=80), 75)


# ---------------------------------------------------------------- the largest launch of each family fits


#: family -> the dynamic shared memory its coverage rule admits at most (the budgets of its module)
COVERAGE_BUDGETS = {
    "tiled": [tiled.SHARED_BUDGET],
    "tiled_bwd": [tiled_bwd.SHARED_BUDGET],
    "fused": [fused.SHARED_BUDGET],
    "fused_bwd": [fused_bwd.SHARED_BUDGET],
    "fused_tc": [fused_tc.SHARED_BUDGET],
    "fused_tc_bwd": [fused_tc_bwd.SHARED_BUDGET, fused_tc_bwd.DKDV_SHARED_BUDGET],
    "fused_wg": [fused_wg.SHARED_BUDGET],
    "fused_wg_bwd": [fused_wg_bwd.DQ_SHARED_BUDGET, fused_tc_bwd.SHARED_BUDGET],
}


def _largest_launches(name):
    """(what, dynamic bytes) of each kernel's declared largest launch, and of each coverage budget."""
    family = FAMILIES[name]
    launches = [(kernel, family.launch_shared_bytes.get(kernel, 0)) for kernel in family.names]
    return launches + [(f"coverage budget {i}", budget) for i, budget in enumerate(COVERAGE_BUDGETS.get(name, []))]


@pytest.mark.parametrize("name, arch", [(name, arch) for name, family in FAMILIES.items()
                                        for arch in archs.CLASSES if family.runs_on(arch)],
                         ids=lambda value: value if isinstance(value, str) else f"sm_{value}")
def test_no_family_admits_a_launch_beyond_the_shared_memory_of_an_architecture_it_runs_on(name, arch):
    too_big = [(what, size) for what, size in _largest_launches(name)
               if not archs.fits(arch, STATIC_ALLOWANCE, size)]
    assert not too_big, (f"{name} may launch more shared memory than sm_{arch} has "
                         f"({archs.shared_limit(arch)} bytes, {STATIC_ALLOWANCE} of them kept for static): {too_big}")


def test_the_tensor_core_backward_declares_its_largest_launches():
    """The family's sizes (what check and the test above use) are the largest its coverage admits: dq up to the
    budget (bias tables fill it), dK/dV its fixed size, which the budget admits."""
    for dtype in fused_tc.DTYPES:
        for hd in fused_tc.HEAD_DIMS:
            for ndim in (1, 2, 3):
                family = FAMILIES["fused_tc_bwd_3d" if ndim == 3 else "fused_tc_bwd"]
                dq, dkdv = fused_tc_bwd.dq_name_of(hd, dtype, ndim), fused_tc_bwd.dkdv_name_of(hd, dtype, ndim)
                assert (fused_tc_bwd.dq_shared_bytes(hd, dtype) <= family.launch_shared_bytes[dq]
                        == fused_tc_bwd.SHARED_BUDGET)
                size = fused_tc_bwd.dkdv_shared_bytes(hd, dtype, ndim)
                assert family.launch_shared_bytes[dkdv] == size <= fused_tc_bwd.DKDV_SHARED_BUDGET


# ---------------------------------------------------------------- CI's rotating class


def test_the_rotating_class_is_one_ci_does_not_check_and_every_one_comes_up():
    seen = {archs.rotating_class(f"{i:040x}") for i in range(64)}
    assert seen == set(archs.CLASSES) - set(archs.CI_ARCHS)
    assert archs.rotating_class("e8086ab") == archs.rotating_class("e8086ab\n")  # the same commit: the same class


def test_the_rotation_checks_the_tensor_core_families_or_on_sm_75_the_others(monkeypatch):
    for arch in set(archs.CLASSES) - set(archs.CI_ARCHS):
        monkeypatch.setattr(archs, "rotating_class", lambda key, arch=arch: arch)
        got_arch, names = check.rotation("any", FAMILIES)
        assert got_arch == arch
        if arch == 75:
            assert set(names) == {n for n in FAMILIES if n not in MMA_SYNC + WGMMA}
        else:
            assert set(names) == set(MMA_SYNC)


# ---------------------------------------------------------------- per-architecture kernel variants


def _emulator_ok():
    import na_rtc

    return na_rtc.backends.get("emulator").probe()[0]


def _renaming_executor(rename):
    """An executor that runs plans on the emulator, the kernels ``rename`` maps to another name expression
    from a module of their own (the variant is in no family); returns it and the names it renamed to."""
    from na_rtc import emulator
    from na_rtc._resources import cuda_src_dir
    from na_rtc.runtime import emulated

    renamed = []

    def run(plan):
        name = rename(plan.kernel.name)
        if name == plan.kernel.name:
            return emulated.run(plan)
        renamed.append(name)
        plan = dataclasses.replace(plan, kernel=dataclasses.replace(plan.kernel, name=name))
        module = emulator.load_module(cuda_src_dir() / plan.kernel.source, (name,))
        module.launch(plan)
        return module.last_op_counts

    return run, renamed


def _kv_shared(name):
    """The dq kernel as sm_100 and newer build it at head dim 128 (KV_SHARED, na_fused_tc_bwd.cu)."""
    return name[:-1] + ", true>" if name.startswith("na_fused_tc_bwd_dq<") else name


@pytest.mark.skipif(not _emulator_ok(), reason="emulator needs a C++ compiler")
@pytest.mark.parametrize("schedule", ["forward", "reverse"])
@pytest.mark.parametrize("case_index", [2, 5], ids=["1d-hd128-rpb", "2d-hd128-causal"])
def test_the_dq_kernel_of_sm_100_and_newer_gives_the_same_bits(monkeypatch, case_index, schedule):
    """The emulator compiles with no __CUDA_ARCH__, so it builds the default dq kernel; this builds the variant
    that keeps the K/V stream in shared memory (what sm_100 and sm_120 run at head dim 128) and holds it to
    the default's bits, over boxes of many chunks (the stream is read at every one), under both emulator
    schedules (a read of the shared copy before the barrier that publishes it fails under one of them)."""
    import test_fused_bwd
    import test_fused_tc_bwd
    from helpers import assert_close

    import na_rtc
    from na_rtc import config

    assert schedule in config.EMULATOR_SCHEDULES
    case = test_fused_tc_bwd.LONG_BOX_CASES[case_index]
    assert fused_tc.head_dim_bucket(case.head_dim) == 128
    default = test_fused_bwd._run(case, tensor_cores=True)[2]
    monkeypatch.setenv("NA_RTC_EMULATOR_SCHEDULE", schedule)
    run, renamed = _renaming_executor(_kv_shared)
    _, _, variant, inputs = test_fused_bwd._run(case, run, tensor_cores=True)
    assert renamed and all(n.endswith(", true>") for n in renamed)
    for name, got, want in zip(("dq", "dk", "dv", "drpb"), variant, default):
        if want is None:
            assert got is None
            continue
        assert test_fused_bwd._bits(got).tobytes() == test_fused_bwd._bits(want).tobytes(), name
    q64, k64, v64, g64, rpb64 = inputs
    bwd = na_rtc.na1d_backward if case.ndim == 1 else na_rtc.na2d_backward
    ref = bwd(g64, q64, k64, v64, **test_fused_bwd._window(case), rpb=rpb64, backend="reference")
    assert_close(variant[0], ref[0], case.dtype, "grad", "dq")
