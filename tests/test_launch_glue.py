"""The GPU launch path on machines of several GPUs, checked without one.

A recording stand-in (``tests/fake_cuda.py``) plays CuPy 13/14, the CUDA
driver and torch.cuda over two simulated GPUs, so these tests hold the
``cuda`` executor, ``_arrays`` and the compile benchmark to what a real
multi-GPU machine needs: no context on a GPU the caller does not use, the
current device left as it was, all work on the array's GPU and on the stream
its library launches on there, a shared-memory opt-in whenever static plus
dynamic shared memory passes 48 KiB, no deprecated CuPy API, and a clear error
instead of a broken CUDA graph capture.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
from fake_cuda import cuda_tensor, install, torch_use_stream
from fake_cuda import fake_cuda_fixture  # noqa: F401 - the fake_cuda fixture
from helpers import requires_nvrtc

from na_rtc import _arrays
from na_rtc.runtime import cuda, device
from na_rtc.runtime.families import fused_wg, fused_wg_bwd
from na_rtc.runtime import plan as P

CUPY_VERSIONS = pytest.mark.parametrize("fake_cuda", ["13.6.0", "14.2.0"], indirect=True,
                                        ids=["cupy13", "cupy14"])
KERNEL = fused_wg.kernel_name_of(128, "bfloat16", 1)  # any kernel of a family built for sm_90


def plan_for(array, kernel: str = KERNEL, shared: int = 0) -> P.LaunchPlan:
    return P.LaunchPlan(P.Kernel(fused_wg.SOURCE, kernel), (2, 1, 1), (128, 1, 1), shared,
                        (P.ptr(array), P.i64(7)))


def driver_devices(machine, *calls: str) -> set[int]:
    """The devices that were current at each of these driver calls."""
    return {device_ for call, device_ in machine.driver_calls if call in calls}


# ---------------------------------------------------------------- no context on another GPU


def test_a_capability_is_read_without_switching_devices(monkeypatch):
    """cupy.cuda.Device(i).compute_capability switches to i and back: contexts on both GPUs. The
    attribute query touches neither, and is asked once per GPU."""
    machine = install(monkeypatch, archs=(80, 90))
    assert cuda.arch_of("cuda:1") == 90 and cuda.arch_of("cuda:0") == 80
    assert machine.contexts == set() and machine.set_device_calls == []
    queried = []
    runtime = machine.cupy.cuda.runtime
    monkeypatch.setattr(runtime, "deviceGetAttribute",
                        lambda attribute, index, real=runtime.deviceGetAttribute: queried.append(index)
                        or real(attribute, index))
    assert device.compute_capability(1) == 90 and queried == []  # remembered


@CUPY_VERSIONS
def test_a_cupy_launch_on_gpu_1_creates_no_context_on_gpu_0(fake_cuda):
    """A rank that only uses GPU 1 (GPU 0 current by default, never used): a launch leaves GPU 0 without a
    context; the runtime stays on GPU 1 (there is no way back to 'GPU 0, no context' that creates none)."""
    x = fake_cuda.cupy_array(1, (4, 8))
    stream = fake_cuda.cupy_stream(1)  # CuPy's current stream of GPU 1, while GPU 0 is current
    cuda.run(plan_for(x))
    assert fake_cuda.contexts == {1}, fake_cuda.context_log
    (launch,) = fake_cuda.launches()
    assert (launch.device, launch.stream) == (1, stream.ptr)
    assert fake_cuda.modules == [1] and fake_cuda.devices_touched() == {1}


@CUPY_VERSIONS
def test_a_cupy_launch_on_gpu_1_leaves_gpu_0_current_and_runs_every_call_on_gpu_1(fake_cuda):
    """With GPU 0 in use too, the launch switches to GPU 1 and back once, and the module load, function
    lookup, attribute queries and opt-in, and the launch all happen while GPU 1 is current."""
    fake_cuda._create_context(0, "the caller's own work")
    x = fake_cuda.cupy_array(1, (4, 8))
    cuda.run(plan_for(x, shared=64 * 1024))
    assert fake_cuda.current_device() == 0 and fake_cuda.set_device_calls == [1, 0]
    calls = ("cuModuleLoadData", "cuModuleGetFunction", "cuFuncGetAttribute", "cuFuncSetAttribute", "cuLaunchKernel")
    assert {call for call, _ in fake_cuda.driver_calls} == set(calls)
    assert driver_devices(fake_cuda, *calls) == {1}


def test_a_torch_launch_on_cuda_1_creates_no_context_on_gpu_0(fake_cuda):
    """torch tensors go through torch's device guard: no context on GPU 0, torch still reports GPU 0 as
    current, and the launch goes on torch's current stream of cuda:1."""
    import torch

    fake_cuda._create_context(1, "torch's allocation of the tensor")
    handle = torch_use_stream(fake_cuda, 1)
    x = cuda_tensor((4, 8), index=1)
    cuda.run(plan_for(x))
    assert fake_cuda.contexts == {1}, fake_cuda.context_log
    assert torch.cuda.current_device() == 0
    (launch,) = fake_cuda.launches()
    assert (launch.device, launch.stream) == (1, handle)


# ---------------------------------------------------------------- device guard


def test_the_guard_switches_only_to_a_different_device(fake_cuda):
    """Already on the array's GPU: no cudaSetDevice at all (CuPy's Device.__exit__ sets it again, which
    creates the context of a current device that had none)."""
    with device.guard(0):
        pass
    assert fake_cuda.set_device_calls == [] and fake_cuda.contexts == set()


@pytest.mark.parametrize("previous_has_context", [True, False], ids=["back", "stays"])
def test_the_guard_goes_back_only_to_a_device_with_a_context(fake_cuda, previous_has_context):
    if previous_has_context:
        fake_cuda._create_context(0, "the caller")
    with pytest.raises(KeyError), device.guard(1):  # also on the way out of an error
        assert fake_cuda.current_device() == 1
        raise KeyError
    assert fake_cuda.current_device() == (0 if previous_has_context else 1)
    assert fake_cuda.contexts == ({0, 1} if previous_has_context else {1})


def test_device_queries_reject_what_is_not_a_gpu_array(fake_cuda):
    with pytest.raises(TypeError, match="CUDA torch tensor or a CuPy array"):
        device.device_index(np.zeros(3))
    with pytest.raises(ValueError, match="0 or more"):
        device.guard(-1)
    with pytest.raises(TypeError, match="bool"):
        device.guard(True)
    assert device.device_index(fake_cuda.cupy_array(1, (2,))) == 1
    assert device.device_index(cuda_tensor((2,), index=1)) == 1


# ---------------------------------------------------------------- allocations, copies, fills


@CUPY_VERSIONS
def test_cupy_casts_and_fills_run_on_the_arrays_device_and_launch_stream(fake_cuda):
    """cupy's astype and fills run on the *current* device's current stream: here GPU 0 with its own
    stream. Every allocation, copy and fill for an array on GPU 1 must run on GPU 1, on the stream the
    launch there uses, reading no peer memory, and leave GPU 0 current."""
    fake_cuda._create_context(0, "the caller")
    fake_cuda.cupy_stream(0)
    stream = fake_cuda.cupy_stream(1)
    x = fake_cuda.cupy_array(1, (4, 8), "float16")
    made = [_arrays.cast(x, "float32"), _arrays.zeros(x, (3,), "float32"), _arrays.empty(x, (5,), "float32")]
    assert [m.device.id for m in made] == [1, 1, 1] and made[0].dtype == np.float32
    assert [w.what for w in fake_cuda.work] == ["alloc", "copy", "alloc", "fill", "alloc"]
    assert {(w.device, w.stream) for w in fake_cuda.work} == {(1, stream.ptr)}
    assert all(w.detail["peers"] == () for w in fake_cuda.work if w.what in ("copy", "fill"))
    assert fake_cuda.current_device() == 0 and fake_cuda.contexts == {0, 1}
    assert _arrays.cast(x, "float16") is x and len(fake_cuda.work) == 5  # no copy when the dtype matches
    assert device.launch_stream(x) is stream  # the stream those ran on is the one a launch takes


# ---------------------------------------------------------------- streams


@CUPY_VERSIONS
def test_torch_launches_warn_nothing_and_reuse_one_stream_object_per_stream(fake_cuda):
    """CuPy 14 deprecates ExternalStream and warns on each construction, i.e. on each torch launch; with
    -W error that is a failure. Stream.from_external (14) or ExternalStream (13) once per (GPU, stream)."""
    fake_cuda._create_context(1, "torch")
    x = cuda_tensor((4, 8), index=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cuda.run(plan_for(x))
        cuda.run(plan_for(x))
        assert fake_cuda.external_streams_made == 1
        handle = torch_use_stream(fake_cuda, 1)
        cuda.run(plan_for(x))
    assert fake_cuda.external_streams_made == 2
    assert [launch.stream for launch in fake_cuda.launches()] == [0, 0, handle]


# ---------------------------------------------------------------- shared memory opt-in


def test_static_shared_memory_counts_toward_the_48_kib_opt_in(monkeypatch):
    """The wgmma dq kernel at head dim 32 (fp16, 1D) has 16 bytes of static shared memory; a kernel of 1471
    with a positional bias needs 49,140 bytes dynamic: 49,156 in all, over 48 KiB although the dynamic part
    is not, so it must opt in (without, the launch fails: CUDA_ERROR_INVALID_VALUE)."""
    name = fused_wg_bwd.dq_name_of(32, "float16", 1)
    shared = fused_wg_bwd.dq_shared_bytes(32, "float16", 1, bias_entries=2 * 1471 - 1)
    assert (name, shared) == ("na_fused_wg_bwd_dq<fp16_t, 32, 128, 1, 32, 0, 2>", 49_140)
    machine = install(monkeypatch, static_shared={name: 16})
    x = machine.cupy_array(0, (4, 8))
    cuda.run(plan_for(x, name, 48 * 1024 - 16))  # fits without opting in
    assert machine.attribute_sets == []
    cuda.run(plan_for(x, name, shared))
    assert machine.attribute_sets == [(name, shared)]
    assert [launch.detail["shared"] for launch in machine.launches()] == [48 * 1024 - 16, shared]


@requires_nvrtc
def test_the_wgmma_dq_kernel_has_the_static_shared_memory_the_opt_in_test_gives_it():
    """The 16 bytes above are what ptxas reports for that kernel on sm_90a."""
    from na_rtc._resources import cuda_src_dir
    from na_rtc.runtime import check, nvrtc

    name = fused_wg_bwd.dq_name_of(32, "float16", 1)
    program = nvrtc.compile_program(cuda_src_dir() / fused_wg_bwd.SOURCE, [name], 90, options=("-Xptxas=-v",),
                                    arch_specific=True)
    assert check.parse_ptxas_log(program.log)[program.lowered[name]].static_shared == 16


def test_concurrent_opt_ins_leave_the_attribute_at_the_largest(fake_cuda):
    """Two threads opting the same function in to 64 and 96 KiB while the first one's driver call is slow:
    the attribute must end at 96 KiB. Checking and raising outside the lock let the slower, smaller call
    land last, and later 96 KiB launches fail."""
    x = fake_cuda.cupy_array(0, (4, 8))
    cuda.run(plan_for(x))  # loaded, not yet opted in
    inside = threading.Event()

    def slow_small_call(function, value):
        if value == 64 * 1024:
            inside.set()
            threading.Event().wait(0.3)

    fake_cuda.on_set_attribute = slow_small_call
    errors = []

    def launch(shared, wait_for=None):
        try:
            if wait_for is not None:
                assert wait_for.wait(10)
            cuda.run(plan_for(x, shared=shared))
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=launch, args=(64 * 1024,)),
               threading.Thread(target=launch, args=(96 * 1024, inside))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    (function,) = fake_cuda.functions.values()
    assert function.max_dynamic == 96 * 1024
    cuda.run(plan_for(x, shared=96 * 1024))  # and a later launch of that size still works


# ---------------------------------------------------------------- CUDA graph capture


def _capturing_cupy(machine):
    x = machine.cupy_array(0, (4, 8))
    return x, machine.cupy_stream(0).ptr


def _capturing_torch(machine):
    machine._create_context(0, "torch")
    return cuda_tensor((4, 8), index=0), torch_use_stream(machine, 0)


def _legacy_stream_beside_a_capture(machine):
    """The array's launch stream is the legacy default stream while another stream captures (global mode):
    work there would join or break that capture."""
    return machine.cupy_array(0, (4, 8)), machine.new_stream(0)


CAPTURES = {"cupy": _capturing_cupy, "torch": _capturing_torch, "legacy-stream": _legacy_stream_beside_a_capture}


@pytest.mark.parametrize("setup", CAPTURES.values(), ids=CAPTURES.keys())
def test_a_first_launch_during_capture_raises_and_leaves_the_capture_intact(fake_cuda, setup):
    """Loading a module is not allowed during a global-mode capture (torch.cuda.graph's default): the
    driver would fail and invalidate the capture. The first use of a kernel there must say to run one eager
    call first, before compiling or loading anything, and leave the capture valid and empty."""
    x, capturing = setup(fake_cuda)
    fake_cuda.begin_capture(capturing)
    with pytest.raises(RuntimeError, match=r"while its stream is being captured into a CUDA graph.*Run the same "
                                           r"call once eagerly, outside the capture"):
        cuda.run(plan_for(x))
    assert fake_cuda.compiles == [] and fake_cuda.modules == []
    assert fake_cuda.end_capture(capturing).work == []  # valid (no CUDA_ERROR_STREAM_CAPTURE_INVALIDATED)


@pytest.mark.parametrize("setup", [_capturing_cupy, _capturing_torch], ids=["cupy", "torch"])
def test_a_kernel_loaded_by_an_eager_call_is_captured(fake_cuda, setup):
    x, capturing = setup(fake_cuda)
    cuda.run(plan_for(x))  # the eager warm-up
    fake_cuda.begin_capture(capturing)
    cuda.run(plan_for(x))
    capture = fake_cuda.end_capture(capturing)
    assert [(w.what, w.stream, w.captured) for w in capture.work] == [("launch", capturing, True)]
    assert len(fake_cuda.compiles) == 1 and fake_cuda.modules == [0]


def test_is_capturing_asks_about_the_launch_stream(fake_cuda):
    """Whether the array's own launch stream captures, not the current device's."""
    x, capturing = _capturing_cupy(fake_cuda)
    y = fake_cuda.cupy_array(1, (2,))
    fake_cuda.cupy_stream(1)
    assert not device.is_capturing(x)
    fake_cuda.begin_capture(capturing)
    assert device.is_capturing(x) and not device.is_capturing(y)


# ---------------------------------------------------------------- the compile benchmark


def test_the_compile_benchmark_loads_on_its_gpu_only(fake_cuda, monkeypatch, tmp_path):
    """`bench` times a family's load on GPU 1: no context on GPU 0, and the load happens on GPU 1."""
    from na_rtc.bench import compile as bench_compile
    from na_rtc.runtime import cache
    from na_rtc.runtime.families import FAMILIES

    fake_cuda._create_context(1, "the benchmark's arrays")
    program = cuda.program_for(FAMILIES["fused_wg"], KERNEL, 90)
    monkeypatch.setattr(cache, "lookup", lambda *args, **kwargs: (program, "compiled"))
    tool = bench_compile._Cuda(tmp_path, 1)
    assert tool.arch == 90
    tool.load(FAMILIES["fused_wg"])
    assert fake_cuda.contexts == {1} and fake_cuda.modules == [1]
