"""Which GPU and which stream a launch uses, without touching any other GPU.

Since CUDA 12, ``cudaSetDevice`` creates the primary context (about 0.5 GB)
of a device that has none. CuPy's ``with cupy.cuda.Device(i)`` always sets
the previous device back on exit, and ``Device(i).compute_capability``
switches to ``i`` and back on its first call per device: a process that only
uses GPU 1 (a data-parallel rank that never called
``torch.cuda.set_device``) would get a context on GPU 0 from every such
call. So here:

- capabilities are read with ``cudaDeviceGetAttribute``, which needs no
  current device;
- :func:`guard` switches only when the device differs, and switches back
  only to a device whose primary context is already active, as torch's own
  device guard does (for torch tensors it *is* torch's guard, which also
  keeps torch's idea of the current device). When the previous device had
  no context, the CUDA runtime stays on the array's device;
- a launch goes on the stream the array's library would use on that
  device: torch's current stream of the tensor's device, or CuPy's current
  stream of the array's device.

Nothing here imports torch or cupy at module import: a torch tensor or CuPy
array can only exist once its library is imported.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading

#: cudaErrorStreamCaptureImplicit: the legacy stream was queried while another stream captures
_CAPTURE_IMPLICIT = 906

_capabilities: dict[int, int] = {}
_streams: dict[tuple[int, int], object] = {}
_driver_ready = False
_lock = threading.Lock()


def _torch_tensor(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _cupy():
    return sys.modules.get("cupy") or importlib.import_module("cupy")


def device_index(array) -> int:
    """The CUDA device index of a CUDA torch tensor or a CuPy array."""
    if _torch_tensor(array):
        if array.device.type != "cuda":
            raise ValueError(f"expected a CUDA tensor, got one on {array.device}")
        index = array.device.index
        return int(index) if index is not None else int(sys.modules["torch"].cuda.current_device())
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(array, cupy.ndarray):
        return int(array.device.id)
    raise TypeError(f"expected a CUDA torch tensor or a CuPy array, got {type(array).__qualname__}")


def _index_of(array_or_index) -> int:
    if isinstance(array_or_index, bool):
        raise TypeError("expected a device index or a CUDA array, got a bool")
    if isinstance(array_or_index, int):
        if array_or_index < 0:
            raise ValueError(f"a device index is 0 or more, got {array_or_index}")
        return array_or_index
    return device_index(array_or_index)


def compute_capability(index: int) -> int:
    """The compute capability of GPU ``index`` as one number (90 for sm_90, 120 for sm_120).

    Read through ``cudaDeviceGetAttribute``, which needs no current device, so no
    context is created anywhere; remembered per device (it cannot change in a process).
    """
    index = _index_of(index)
    known = _capabilities.get(index)
    if known is not None:
        return known
    runtime = _cupy().cuda.runtime
    major = runtime.deviceGetAttribute(runtime.deviceAttributeComputeCapabilityMajor, index)
    minor = runtime.deviceGetAttribute(runtime.deviceAttributeComputeCapabilityMinor, index)
    return _capabilities.setdefault(index, 10 * int(major) + int(minor))


def _driver():
    """``cuda.bindings.driver``, initialized once (its calls fail before ``cuInit``)."""
    global _driver_ready
    driver = importlib.import_module("cuda.bindings.driver")
    if not _driver_ready:
        (status,) = driver.cuInit(0)
        if status != driver.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"cuInit failed: {status!r}")
        _driver_ready = True
    return driver


def has_primary_context(index: int) -> bool:
    """Whether GPU ``index``'s primary context is active (making it current would create none)."""
    driver = _driver()
    status, _flags, active = driver.cuDevicePrimaryCtxGetState(int(index))
    if status != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuDevicePrimaryCtxGetState({index}) failed: {status!r}")
    return bool(active)


@contextlib.contextmanager
def _runtime_guard(index: int):
    """Make ``index`` the CUDA runtime's current device; afterwards, the previous one if that creates no
    context (c10's ExchangeDevice / MaybeExchangeDevice, without torch's lazy target device)."""
    runtime = _cupy().cuda.runtime
    previous = runtime.getDevice()
    if previous == index:
        yield
        return
    runtime.setDevice(index)
    try:
        yield
    finally:
        if has_primary_context(previous):
            runtime.setDevice(previous)


def guard(array_or_index):
    """A context manager that makes the device of ``array_or_index`` (a CUDA torch tensor, a CuPy array or
    a device index) current without creating a context on any other device: torch's device guard for torch
    tensors, the same rules through the CUDA runtime otherwise."""
    if _torch_tensor(array_or_index):
        return sys.modules["torch"].cuda.device(device_index(array_or_index))
    return _runtime_guard(_index_of(array_or_index))


class _StreamHandle:
    """The CUDA stream protocol (``__cuda_stream__``) for a raw handle, what ``Stream.from_external`` takes."""

    def __init__(self, handle: int):
        self.handle = handle

    def __cuda_stream__(self):
        return (0, self.handle)


def _external_stream(index: int, handle: int):
    """A CuPy stream object for torch's stream ``handle`` on GPU ``index``, one per (device, handle).

    CuPy 14 deprecates ``ExternalStream`` (a warning on every construction) in favour of
    ``Stream.from_external``, which CuPy 13 lacks.
    """
    key = (index, handle)
    stream = _streams.get(key)
    if stream is None:
        cuda = _cupy().cuda
        from_external = getattr(cuda.Stream, "from_external", None)
        if from_external is not None:
            made = from_external(_StreamHandle(handle))
        else:
            made = cuda.ExternalStream(handle, index)
        with _lock:
            stream = _streams.setdefault(key, made)
    return stream


def launch_stream(array):
    """The CuPy stream object a launch on ``array`` uses: torch's current stream of the tensor's device, or
    CuPy's current stream of the array's device (not of the current device)."""
    return _stream_on(_torch_tensor(array), device_index(array))


def _stream_on(torch_stream: bool, index: int):
    """The stream launches on GPU ``index`` use: torch's current stream there, or CuPy's."""
    if torch_stream:
        handle = sys.modules["torch"].cuda.current_stream(index).cuda_stream
        return _external_stream(index, int(handle))
    return _cupy().cuda.get_current_stream(index)


def is_capturing(array) -> bool:
    """Whether the stream a launch on ``array`` uses is being captured into a CUDA graph now.

    Querying the legacy default stream while another stream captures is itself an error
    (``cudaErrorStreamCaptureImplicit``): that counts as capturing, since work there would break the capture.
    """
    return _capturing(_stream_on(_torch_tensor(array), device_index(array)))


def stream_capturing(kind: str, index: int) -> bool:
    """:func:`is_capturing` for the arrays of library ``kind`` ("torch" or "cupy") on GPU ``index``, before
    any array exists (the dispatcher asks before it allocates)."""
    return _capturing(_stream_on(kind == "torch", index))


def _capturing(stream) -> bool:
    runtime = _cupy().cuda.runtime
    try:
        return bool(runtime.streamIsCapturing(stream.ptr))
    except runtime.CUDARuntimeError as error:
        if getattr(error, "status", None) == _CAPTURE_IMPLICIT:
            return True
        raise
