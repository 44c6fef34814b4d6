"""A recording stand-in for the CUDA machinery under na_rtc's GPU launch path.

It replaces, for one test, the parts of CuPy, the CUDA driver bindings and
``torch.cuda`` that ``na_rtc.runtime.cuda``, ``na_rtc.runtime.device``,
``na_rtc._arrays`` and ``na_rtc.bench.compile`` call, with one simulated
machine of several GPUs behind them that records what happens where: which
device is current (per thread), which primary contexts exist and what created
them, allocations, copies and fills per device and stream, module loads,
function attributes, launches, streams and CUDA graph capture. So the launch
path runs in CI without a GPU, and tests can check that it touches only the
array's GPU, on the right stream.

What each part copies (from the sources, not from guesses):

- CUDA runtime and driver, CUDA 12 or newer: the current device is per
  thread and is 0 until set; ``cudaSetDevice`` creates the primary context of
  a device that has none (the CUDA 12.0 change), and so does any work
  (allocation, kernel, module load) on a current device without one;
  ``cudaDeviceGetAttribute`` needs no context. ``cuDevicePrimaryCtxGetState``
  (``cuda.bindings.driver``) fails with ``CUDA_ERROR_NOT_INITIALIZED`` before
  ``cuInit``. ``cuModuleLoadData`` loads into the current device's context
  and, while a capture that forbids unsafe calls is under way (this thread's
  capture not in relaxed mode, or another thread's in global mode), fails with
  ``CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED`` and invalidates that capture.
  ``cuFuncGetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)`` starts at 48 KiB less
  the function's static shared memory; a launch asking for more dynamic shared
  memory than that attribute fails (``CUDA_ERROR_INVALID_VALUE``), and so does
  an opt-in past the device's per-block maximum (227 KiB on sm_90). A launch
  whose function or stream belongs to a device other than the current one
  fails (``CUDA_ERROR_INVALID_HANDLE``). Work on a capturing stream is
  recorded into the capture instead of run; ``cudaStreamIsCapturing`` on the
  legacy stream (handle 0) while a capture is under way fails with
  ``cudaErrorStreamCaptureImplicit``.
- CuPy 13.6 and 14.2 (``cupy/cuda/device.pyx``, ``stream.pyx``,
  ``function.pyx``, ``cupy_backends/cuda/api/driver.pyx`` and
  ``runtime.pyx``): ``Device.__enter__`` switches only to a different device
  and remembers the previous one, ``__exit__`` always calls
  ``setDevice(previous)``; ``Device.compute_capability`` calls
  ``setDevice(id)`` and then ``setDevice(previous)`` on its first call per
  device; the current stream is per thread and per device
  (``get_current_stream(device_id)``), ``Stream()`` is made on the current
  device and ``with stream`` requires it to be current; ``Module.load``
  establishes a context on the current device, then ``cuModuleLoadData``;
  ``Function.__call__`` reads only ``stream.ptr`` (the current device's
  current stream when ``stream`` is None); ``ndarray.astype``, ``cupy.empty``
  and ``a[...] = v`` allocate and run on the *current* device's current
  stream, whatever device the array is on (an array on another device is read
  through peer access, recorded as such). ``funcGetAttribute(attribute, f)``
  and ``funcSetAttribute(f, attribute, value)`` take their arguments in that
  order. ``ExternalStream(ptr, device_id)`` is plain in 13 and warns
  ``DeprecationWarning`` on every construction in 14; ``Stream.from_external``
  (14 only) takes an object with ``__cuda_stream__`` and has device_id -1.
- torch 2.x on CUDA 12 or newer (``torch/cuda/__init__.py`` and
  ``c10/cuda/CUDAFunctions.cpp``): ``torch.cuda.device``'s enter is
  ``ExchangeDevice`` (``cudaSetDevice`` when the device differs, creating its
  context) and its exit is ``MaybeExchangeDevice``, which sets the previous
  device back only when it has a primary context and otherwise records it as
  the thread's target device, which ``torch.cuda.current_device()`` then
  reports; ``torch.cuda.current_stream(device)`` is per thread and per device,
  the default stream's handle being 0. :func:`cuda_tensor` makes a CPU tensor
  that reports a CUDA device, for the launch path only (its pointer is a CPU
  address; nothing dereferences it).

``cuda.program_for`` (the NVRTC compile) is replaced by a recording stand-in
that returns a cubin whose lowered names are the kernel names themselves.
"""

from __future__ import annotations

import sys
import threading
import types
import warnings
from dataclasses import dataclass, field

import numpy as np
import pytest

#: CUresult / cudaError_t values the stand-in raises
CUDA_SUCCESS = 0
CUDA_ERROR_INVALID_VALUE = 1
CUDA_ERROR_NOT_INITIALIZED = 3
CUDA_ERROR_INVALID_HANDLE = 400
CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900
CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901
CUDA_ERROR_STREAM_CAPTURE_IMPLICIT = 906
_NAMES = {1: "CUDA_ERROR_INVALID_VALUE", 3: "CUDA_ERROR_NOT_INITIALIZED", 400: "CUDA_ERROR_INVALID_HANDLE",
          900: "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED", 901: "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED",
          906: "CUDA_ERROR_STREAM_CAPTURE_IMPLICIT"}

SHARED_SIZE_BYTES = 1  # CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES
MAX_DYNAMIC_SHARED_SIZE_BYTES = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
DEFAULT_SHARED = 48 * 1024
OPTIN_SHARED = {90: 227 * 1024, 80: 163 * 1024}  # cudaDevAttrMaxSharedMemoryPerBlockOptin


class CUDARuntimeError(RuntimeError):
    def __init__(self, status: int):
        self.status = status
        super().__init__(f"{_NAMES.get(status, status)} (runtime)")


class CUDADriverError(RuntimeError):
    def __init__(self, status: int):
        self.status = status
        super().__init__(f"{_NAMES.get(status, status)}: (driver)")


@dataclass
class Capture:
    handle: int
    mode: str  # "global", "thread_local" or "relaxed"
    thread: int
    invalidated: bool = False
    work: list = field(default_factory=list)  # what was recorded into the graph


@dataclass
class Work:
    """One piece of GPU work: an allocation, an elementwise kernel (copy, fill) or a launch."""

    what: str  # "alloc", "copy", "fill", "launch"
    device: int  # the device it ran on (the current device)
    stream: int  # the stream handle it was ordered on
    detail: object = None  # kernel name, byte count, the devices of the arrays it read
    captured: bool = False


@dataclass
class Function:
    ptr: int
    name: str
    device: int  # the device whose context holds its module
    static: int
    max_dynamic: int


class _Thread(threading.local):
    def __init__(self):
        self.device = 0  # cudaGetDevice before any cudaSetDevice
        self.torch_target = -1  # c10's thread-local targetDeviceIndex
        self.cupy_device_stack: list[int] = []
        self.cupy_streams: dict[int, object] = {}  # device -> CuPy stream object
        self.cupy_stream_stacks: list = []
        self.torch_streams: dict[int, int] = {}  # device -> handle


class Machine:
    """The simulated GPUs and what happened on them. ``archs`` gives one compute capability per GPU."""

    def __init__(self, archs=(90, 90), cupy_version: str = "14.2.0", static_shared: dict | None = None):
        self.archs = tuple(archs)
        self.cupy_version = cupy_version
        #: static shared memory per kernel (lowered) name; others have none
        self.static_shared = dict(static_shared or {})
        self.lock = threading.RLock()
        self.thread = _Thread()
        self.contexts: set[int] = set()
        self.context_log: list[tuple[int, str]] = []  # (device, what created its context)
        self.set_device_calls: list[int] = []
        self.work: list[Work] = []
        self.modules: list[int] = []  # the device of each loaded module
        self.driver_calls: list[tuple[str, int]] = []  # (call, current device at the call)
        self.functions: dict[int, Function] = {}
        self.stream_devices: dict[int, int] = {}  # handle -> device (0, the legacy stream, is absent)
        self.captures: dict[int, Capture] = {}
        self.compiles: list[tuple[str, str, int]] = []  # (source, kernel, arch) of each compile
        self.driver_initialized = False
        self.external_streams_made = 0
        self.attribute_sets: list[tuple[str, int]] = []  # (kernel, value) of each dynamic shared-memory opt-in
        self.cupy = None  # the fake cupy module, once installed
        #: called with (function, value) inside funcSetAttribute before the value is stored (a slow call)
        self.on_set_attribute = None
        self._next = 0x10000

    # ------------------------------------------------------------ runtime state
    def new_handle(self) -> int:
        with self.lock:
            self._next += 0x100
            return self._next

    def current_device(self) -> int:
        return self.thread.device

    def _create_context(self, device: int, why: str) -> None:
        with self.lock:
            if device not in self.contexts:
                self.contexts.add(device)
                self.context_log.append((device, why))

    def set_device(self, device: int) -> None:
        """cudaSetDevice: since CUDA 12 it initializes the device's primary context."""
        if not 0 <= device < len(self.archs):
            raise CUDARuntimeError(101)  # cudaErrorInvalidDevice
        self.set_device_calls.append(device)
        self._create_context(device, "cudaSetDevice")
        self.thread.device = device

    def use_current(self, why: str) -> int:
        """Work on the current device needs its context: the runtime creates it lazily."""
        device = self.thread.device
        self._create_context(device, why)
        return device

    def new_stream(self, device: int) -> int:
        handle = self.new_handle()
        self.stream_devices[handle] = device
        return handle

    # ------------------------------------------------------------ capture
    def begin_capture(self, handle: int, mode: str = "global") -> Capture:
        """cudaStreamBeginCapture on ``handle`` (torch.cuda.graph captures in global mode by default)."""
        if handle == 0:
            raise CUDARuntimeError(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED)
        capture = Capture(handle, mode, threading.get_ident())
        self.captures[handle] = capture
        return capture

    def end_capture(self, handle: int) -> Capture:
        capture = self.captures.pop(handle)
        if capture.invalidated:
            raise CUDARuntimeError(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED)
        return capture

    def _forbidding_captures(self) -> list[Capture]:
        me = threading.get_ident()
        return [c for c in self.captures.values()
                if (c.thread == me and c.mode != "relaxed") or (c.thread != me and c.mode == "global")]

    def unsafe_call(self, name: str) -> None:
        """A call that capture forbids (module load): it invalidates the captures that forbid it, and fails."""
        forbidding = self._forbidding_captures()
        if forbidding:
            for capture in forbidding:
                capture.invalidated = True
            raise CUDADriverError(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED)

    def stream_is_capturing(self, handle: int) -> int:
        """cudaStreamIsCapturing's status: 0 none, 1 active, 2 invalidated."""
        if handle == 0:
            if self.captures:
                raise CUDARuntimeError(CUDA_ERROR_STREAM_CAPTURE_IMPLICIT)
            return 0
        capture = self.captures.get(handle)
        return 0 if capture is None else (2 if capture.invalidated else 1)

    def submit(self, what: str, device: int, handle: int, detail=None) -> Work:
        """Order ``what`` on stream ``handle`` of ``device``: into its capture when one records it."""
        if handle == 0 and self.captures:
            for capture in self.captures.values():
                capture.invalidated = True
            raise CUDARuntimeError(CUDA_ERROR_STREAM_CAPTURE_IMPLICIT)
        if handle and self.stream_devices.get(handle, device) != device:
            raise CUDADriverError(CUDA_ERROR_INVALID_HANDLE)
        capture = self.captures.get(handle)
        work = Work(what, device, handle, detail, captured=capture is not None)
        if capture is not None:
            capture.work.append(work)
        with self.lock:
            self.work.append(work)
        return work

    # ------------------------------------------------------------ set-ups for tests
    def cupy_array(self, device: int, shape, dtype="float16"):
        """A CuPy array on ``device``, made earlier by code that left no trace here but the context it needed."""
        self._create_context(device, "an earlier allocation")
        return self.cupy.ndarray(shape, dtype, device, self.new_handle())

    def cupy_stream(self, device: int):
        """A new CuPy stream on ``device``, made CuPy's current stream of that device in this thread."""
        return self.cupy.cuda._make_current_stream(device)

    # ------------------------------------------------------------ queries for tests
    def launches(self) -> list[Work]:
        return [w for w in self.work if w.what == "launch"]

    def devices_touched(self) -> set[int]:
        """Every device that got a context, was made current, or ran work."""
        return set(self.contexts) | set(self.set_device_calls) | {w.device for w in self.work}


# ---------------------------------------------------------------- CuPy


def _fake_cupy(machine: Machine):
    """``cupy`` and ``cupy_backends.cuda.api.{runtime,driver}`` modules over ``machine``."""
    thread = machine.thread
    major_version = int(machine.cupy_version.split(".")[0])

    runtime = types.ModuleType("cupy_backends.cuda.api.runtime")
    runtime.CUDARuntimeError = CUDARuntimeError
    runtime.deviceAttributeComputeCapabilityMajor = 75
    runtime.deviceAttributeComputeCapabilityMinor = 76
    runtime.getDevice = machine.current_device
    runtime.setDevice = machine.set_device
    runtime.getDeviceCount = lambda: len(machine.archs)
    runtime.driverGetVersion = lambda: 13000
    runtime.runtimeGetVersion = lambda: 13000

    def device_get_attribute(attribute, device):
        if not 0 <= device < len(machine.archs):
            raise CUDARuntimeError(101)
        arch = machine.archs[device]
        return {75: arch // 10, 76: arch % 10}[attribute]

    def get_device_properties(device):
        arch = machine.archs[device]
        return {"name": b"Fake GPU", "major": arch // 10, "minor": arch % 10, "totalGlobalMem": 80 * 2**30}

    def stream_is_capturing(ptr):
        status = machine.stream_is_capturing(ptr)
        if status == 2:  # as CuPy's runtime.streamIsCapturing does
            raise RuntimeError("the stream was capturing, but an error has invalidated the capture sequence")
        return bool(status)

    runtime.deviceGetAttribute = device_get_attribute
    runtime.getDeviceProperties = get_device_properties
    runtime.streamIsCapturing = stream_is_capturing

    driver = types.ModuleType("cupy_backends.cuda.api.driver")
    driver.CUDADriverError = CUDADriverError
    driver.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES = SHARED_SIZE_BYTES
    driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = MAX_DYNAMIC_SHARED_SIZE_BYTES

    def func_get_attribute(attribute, ptr):
        machine.driver_calls.append(("cuFuncGetAttribute", machine.current_device()))
        function = machine.functions[ptr]
        if attribute == SHARED_SIZE_BYTES:
            return function.static
        if attribute == MAX_DYNAMIC_SHARED_SIZE_BYTES:
            return function.max_dynamic
        raise CUDADriverError(CUDA_ERROR_INVALID_VALUE)

    def func_set_attribute(ptr, attribute, value):
        machine.driver_calls.append(("cuFuncSetAttribute", machine.current_device()))
        function = machine.functions[ptr]
        if attribute != MAX_DYNAMIC_SHARED_SIZE_BYTES:
            raise CUDADriverError(CUDA_ERROR_INVALID_VALUE)
        if function.static + value > OPTIN_SHARED.get(machine.archs[function.device], DEFAULT_SHARED):
            raise CUDADriverError(CUDA_ERROR_INVALID_VALUE)
        if machine.on_set_attribute is not None:
            machine.on_set_attribute(function, value)
        function.max_dynamic = value
        machine.attribute_sets.append((function.name, value))

    driver.funcGetAttribute = func_get_attribute
    driver.funcSetAttribute = func_set_attribute

    compute_capabilities: dict[int, str] = {}

    class Device:
        def __init__(self, device=None):
            self.id = machine.current_device() if device is None else int(device)

        def __int__(self):
            return self.id

        def __enter__(self):
            current = runtime.getDevice()
            thread.cupy_device_stack.append(current)
            if self.id != current:
                runtime.setDevice(self.id)
            return self

        def __exit__(self, *exc_info):
            runtime.setDevice(thread.cupy_device_stack.pop())

        def use(self):
            runtime.setDevice(self.id)
            return self

        @property
        def compute_capability(self):
            if self.id in compute_capabilities:
                return compute_capabilities[self.id]
            previous = runtime.getDevice()
            try:
                runtime.setDevice(self.id)
                major = runtime.deviceGetAttribute(75, self.id)
                minor = runtime.deviceGetAttribute(76, self.id)
                compute_capabilities[self.id] = f"{major}{minor}"
                return compute_capabilities[self.id]
            finally:
                runtime.setDevice(previous)

    class _BaseStream:
        def __init__(self, ptr, device_id):
            self.ptr, self.device_id = ptr, device_id

        def __eq__(self, other):
            return isinstance(other, _BaseStream) and self.ptr == other.ptr

        def __hash__(self):
            return self.ptr

        def _check_device(self) -> int:
            current = runtime.getDevice()
            device = current if self.device_id == -1 else self.device_id
            if device != current:
                raise RuntimeError(f"The device that the stream is created on ({device}) does not match with "
                                   f"the current device ({current})")
            return device

        def __enter__(self):
            device = self._check_device()
            thread.cupy_stream_stacks.append((device, thread.cupy_streams.get(device)))
            thread.cupy_streams[device] = self
            return self

        def __exit__(self, *exc_info):
            device, previous = thread.cupy_stream_stacks.pop()
            if previous is None:
                thread.cupy_streams.pop(device, None)
            else:
                thread.cupy_streams[device] = previous

        def use(self):
            thread.cupy_streams[self._check_device()] = self
            return self

        def is_capturing(self):
            return runtime.streamIsCapturing(self.ptr)

    class Stream(_BaseStream):
        null = None

        def __init__(self, null=False, non_blocking=False, ptds=False, priority=None):
            if null:
                super().__init__(0, -1)
            else:
                device = runtime.getDevice()
                machine.use_current("cudaStreamCreate")
                super().__init__(machine.new_stream(device), device)

    class ExternalStream(_BaseStream):
        def __init__(self, ptr, device_id=-1):
            if major_version >= 14:
                warnings.warn("ExternalStream is deprecated. Use Stream.from_external() instead to interoperate "
                              "with external streams that implement the CUDA stream protocol.",
                              DeprecationWarning, stacklevel=2)
            machine.external_streams_made += 1
            super().__init__(ptr, device_id)

    if major_version >= 14:
        def from_external(cls, obj):
            version, ptr = obj.__cuda_stream__()
            if version != 0 or not isinstance(ptr, int):
                raise TypeError("__cuda_stream__() must return (0, int)")
            stream = cls.__new__(cls)
            _BaseStream.__init__(stream, ptr, -1)
            stream._foreign_stream_ref = obj
            machine.external_streams_made += 1
            return stream

        Stream.from_external = classmethod(from_external)
        _BaseStream.__cuda_stream__ = lambda self: (0, self.ptr)

    Stream.null = Stream(null=True)

    def get_current_stream(device_id=-1):
        device = runtime.getDevice() if device_id == -1 else device_id
        return thread.cupy_streams.get(device, Stream.null)

    def make_current_stream(device):
        stream = Stream.__new__(Stream)
        _BaseStream.__init__(stream, machine.new_stream(device), device)
        thread.cupy_streams[device] = stream
        return stream

    def current_stream_ptr() -> int:
        return get_current_stream().ptr

    class _Data:
        def __init__(self, ptr):
            self.ptr = ptr

    class ndarray:
        def __init__(self, shape, dtype, device_id, ptr):
            self.shape, self.dtype = tuple(shape), np.dtype(dtype)
            self._device_id, self.data = device_id, _Data(ptr)
            self.itemsize = self.dtype.itemsize
            strides, step = [], self.itemsize
            for extent in reversed(self.shape):
                strides.append(step)
                step *= extent
            self.strides = tuple(reversed(strides))
            self.size = int(np.prod(self.shape, dtype=np.int64))
            self.ndim = len(self.shape)

        @property
        def device(self):
            return Device(self._device_id)

        def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
            if not copy and np.dtype(dtype) == self.dtype:
                return self
            out = empty(self.shape, dtype)
            elementwise("copy", out, self)
            return out

        def __setitem__(self, key, value):
            elementwise("fill", self)

    def empty(shape, dtype=float, order="C"):
        """cupy.empty: the current device's memory pool, ordered on its current stream."""
        device = machine.use_current("cudaMalloc")
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        machine.submit("alloc", device, current_stream_ptr(), nbytes)
        return ndarray(shape, dtype, device, machine.new_handle())

    def elementwise(name, out, *inputs):
        """An elementwise kernel: on the current device's current stream; arrays elsewhere read as peers."""
        device = machine.use_current("elementwise kernel")
        peers = tuple(a._device_id for a in (out, *inputs) if a._device_id != device)
        machine.submit(name, device, current_stream_ptr(), {"peers": peers})

    class FakeFunction:
        def __init__(self, module, name):
            machine.driver_calls.append(("cuModuleGetFunction", machine.current_device()))
            self.module = module
            self.ptr = machine.new_handle()
            static = machine.static_shared.get(name, 0)
            machine.functions[self.ptr] = Function(self.ptr, name, module.device, static, DEFAULT_SHARED - static)
            self.name = name

        def __call__(self, grid, block, args, shared_mem=0, stream=None, enable_cooperative_groups=False):
            handle = current_stream_ptr() if stream is None else stream.ptr
            device = machine.use_current("cuLaunchKernel")
            machine.driver_calls.append(("cuLaunchKernel", device))
            function = machine.functions[self.ptr]
            if function.device != device:
                raise CUDADriverError(CUDA_ERROR_INVALID_HANDLE)
            if shared_mem > function.max_dynamic:
                raise CUDADriverError(CUDA_ERROR_INVALID_VALUE)
            machine.submit("launch", device, handle, {"kernel": self.name, "shared": shared_mem,
                                                      "grid": grid, "block": block, "args": args})

    class Module:
        def __init__(self):
            self.ptr, self.device = 0, None

        def load(self, image):
            device = machine.use_current("cuModuleLoadData")  # runtime._ensure_context()
            machine.driver_calls.append(("cuModuleLoadData", device))
            machine.unsafe_call("cuModuleLoadData")
            self.ptr, self.device = machine.new_handle(), device
            machine.modules.append(device)

        def get_function(self, name):
            return FakeFunction(self, name)

    cupy = types.ModuleType("cupy")
    cupy.__version__ = machine.cupy_version
    cupy.ndarray = ndarray
    cupy.empty = empty
    cupy.cuda = types.SimpleNamespace(
        runtime=runtime, driver=driver, Device=Device, Stream=Stream, ExternalStream=ExternalStream,
        get_current_stream=get_current_stream, function=types.SimpleNamespace(Module=Module, Function=FakeFunction),
        _make_current_stream=make_current_stream)
    return cupy, runtime, driver


def _fake_driver_bindings(machine: Machine):
    """``cuda.bindings.driver``: cuInit and cuDevicePrimaryCtxGetState."""
    module = types.ModuleType("cuda.bindings.driver")

    class CUresult(int):
        CUDA_SUCCESS = None

    CUresult.CUDA_SUCCESS = CUresult(CUDA_SUCCESS)
    module.CUresult = CUresult

    def cu_init(flags):
        machine.driver_initialized = True
        return (CUresult(CUDA_SUCCESS),)

    def primary_context_state(device):
        if not machine.driver_initialized:
            return (CUresult(CUDA_ERROR_NOT_INITIALIZED), 0, 0)
        if not 0 <= int(device) < len(machine.archs):
            return (CUresult(101), 0, 0)
        return (CUresult(CUDA_SUCCESS), 0, int(int(device) in machine.contexts))

    module.cuInit = cu_init
    module.cuDevicePrimaryCtxGetState = primary_context_state
    return module


# ---------------------------------------------------------------- torch


class _TorchStream:
    def __init__(self, handle: int, index: int):
        self.cuda_stream, self.device_index = handle, index


def _patch_torch(machine: Machine, monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    thread = machine.thread

    def exchange_device(index: int) -> int:
        if index < 0:
            return -1
        current, thread.torch_target = thread.torch_target, -1
        if current < 0:
            current = machine.current_device()
            if index == current:
                return current
        machine.set_device(index)
        return current

    def maybe_exchange_device(index: int) -> int:
        if index < 0:
            return -1
        current = machine.current_device()
        if index == current:
            return current
        if index in machine.contexts:
            machine.set_device(index)
        else:
            thread.torch_target = index
        return current

    def current_device() -> int:
        return thread.torch_target if thread.torch_target >= 0 else machine.current_device()

    def current_stream(device=None):
        if device is None:
            index = current_device()
        elif isinstance(device, int):
            index = device
        else:
            index = torch.device(device).index
            index = current_device() if index is None else index
        return _TorchStream(thread.torch_streams.get(index, 0), index)

    monkeypatch.setattr(torch.cuda, "_exchange_device", exchange_device)
    monkeypatch.setattr(torch.cuda, "_maybe_exchange_device", maybe_exchange_device)
    monkeypatch.setattr(torch.cuda, "current_device", current_device)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)


def torch_use_stream(machine: Machine, index: int) -> int:
    """Make a new stream torch's current stream of GPU ``index`` in this thread (``torch.cuda.set_stream``)."""
    handle = machine.new_stream(index)
    machine.thread.torch_streams[index] = handle
    return handle


def cuda_tensor(shape, dtype="float16", index: int = 0):
    """A torch tensor that reports ``cuda:<index>`` (a CPU tensor underneath, for the launch path only)."""
    import torch

    class FakeCudaTensor(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", self._cuda_index)

    tensor = torch.Tensor._make_subclass(FakeCudaTensor, torch.zeros(shape, dtype=getattr(torch, dtype)))
    tensor._cuda_index = index
    return tensor


# ---------------------------------------------------------------- installation


def install(monkeypatch, *, archs=(90, 90), cupy_version: str = "14.2.0", static_shared=None,
            torch: bool = True) -> Machine:
    """Install a fresh :class:`Machine` behind cupy, cupy_backends, cuda.bindings.driver, torch.cuda and
    na_rtc's NVRTC step, with na_rtc's per-process GPU caches emptied; ``monkeypatch`` undoes it all."""
    from na_rtc.runtime import cuda, device, nvrtc

    machine = Machine(archs, cupy_version, static_shared)
    if torch:  # first: importing torch imports the real cuda.bindings, which must not meet the stand-in
        _patch_torch(machine, monkeypatch)
    cupy, runtime, driver = _fake_cupy(machine)
    machine.cupy = cupy
    api = types.ModuleType("cupy_backends.cuda.api")
    api.runtime, api.driver = runtime, driver
    backends_cuda = types.ModuleType("cupy_backends.cuda")
    backends_cuda.api = api
    backends = types.ModuleType("cupy_backends")
    backends.cuda = backends_cuda
    for name, module in (("cupy", cupy), ("cupy_backends", backends), ("cupy_backends.cuda", backends_cuda),
                         ("cupy_backends.cuda.api", api), ("cupy_backends.cuda.api.runtime", runtime),
                         ("cupy_backends.cuda.api.driver", driver),
                         ("cuda.bindings.driver", _fake_driver_bindings(machine))):
        monkeypatch.setitem(sys.modules, name, module)

    def program_for(family, name, arch):
        machine.compiles.append((family.source, name, arch))
        return nvrtc.CompiledProgram(binary=f"cubin {name}".encode(), kind="cubin", lowered={name: name}, log="",
                                     compile_seconds=0.0, arch=arch, target=f"sm_{arch}", options=())

    monkeypatch.setattr(cuda, "program_for", program_for)
    for module, name, empty in ((cuda, "_modules", {}), (cuda, "_functions", {}), (device, "_capabilities", {}),
                                (device, "_streams", {}), (device, "_driver_ready", False)):
        monkeypatch.setattr(module, name, empty)
    return machine


@pytest.fixture(name="fake_cuda")
def fake_cuda_fixture(request, monkeypatch) -> Machine:
    """Two sm_90 GPUs behind CuPy 14 (or the version given by indirect parametrization), with torch.cuda."""
    return install(monkeypatch, cupy_version=getattr(request, "param", "14.2.0"))
