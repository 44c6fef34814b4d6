"""Shared test helpers: the tolerance table (docs/design/testing.md#tolerances), comparison
and input generation. Import as ``from helpers import ...`` (pytest puts the
``tests/`` directory on ``sys.path``; there is no ``tests/__init__.py``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from na_rtc.verify.tolerances import TOLERANCES

__all__ = [
    "TOLERANCES",
    "dtype_name",
    "tolerance",
    "to_numpy64",
    "assert_close",
    "make_inputs",
    "noncontiguous",
    "requires_nvrtc",
    "SweepConfig",
    "RecordingExecutor",
    "sweep_inputs",
    "sweep_bias",
]

# docs/design/testing.md#tolerances, the one table: dtype -> kind -> (atol, rtol).
# "forward": out, lse, attn.  "grad": dq, dk, dv, dattn, drpb. TOLERANCES (imported above) lives in the
# package, because first-use kernel verification on a user's GPU holds the kernels to the same table.

_ALIASES = {"fp64": "float64", "fp32": "float32", "fp16": "float16", "half": "float16",
            "bf16": "bfloat16", "double": "float64", "float": "float32"}


def dtype_name(dtype) -> str:
    """Canonical name (``float64``/``float32``/``float16``/``bfloat16``) of a
    NumPy dtype, torch dtype, array, tensor or string."""
    if not isinstance(dtype, type) and hasattr(dtype, "dtype"):  # an array or tensor
        dtype = dtype.dtype
    name = str(dtype)
    if name.startswith("torch."):
        name = name[len("torch."):]
    elif not isinstance(dtype, str):
        name = np.dtype(dtype).name
    name = _ALIASES.get(name, name)
    if name not in TOLERANCES:
        raise KeyError(f"no tolerance for dtype {dtype!r}")
    return name


def tolerance(dtype, kind: str) -> tuple[float, float]:
    """``(atol, rtol)`` for ``kind`` in ``{"forward", "grad"}``."""
    return TOLERANCES[dtype_name(dtype)][kind]


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def to_numpy64(x) -> np.ndarray:
    """Any torch tensor (any device/dtype, bf16 too) or array-like as float64 NumPy."""
    if _is_torch(x):
        return x.detach().to("cpu").double().numpy()
    if hasattr(x, "get") and type(x).__module__.startswith("cupy"):
        x = x.get()
    return np.asarray(x, dtype=np.float64)


def assert_close(actual, expected, dtype, kind: str, name: str = "value") -> None:
    """Elementwise ``|actual - expected| <= atol + rtol * |expected|`` with the
    tolerances of ``dtype``/``kind``. Non-finite entries must match exactly
    (same positions, same value; NaN matches NaN)."""
    atol, rtol = tolerance(dtype, kind)
    a = to_numpy64(actual)
    e = to_numpy64(expected)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != expected {e.shape}"
    a_fin, e_fin = np.isfinite(a), np.isfinite(e)
    nonfinite_bad = (a_fin != e_fin) | (~e_fin & ~((a == e) | (np.isnan(a) & np.isnan(e))))
    if nonfinite_bad.any():
        idx = tuple(int(i) for i in np.argwhere(nonfinite_bad)[0])
        raise AssertionError(
            f"{name} ({dtype_name(dtype)}, {kind}): {int(nonfinite_bad.sum())} non-finite "
            f"mismatches; first at {idx}: actual {a[idx]!r}, expected {e[idx]!r}")
    both = a_fin & e_fin
    a_safe, e_safe = np.where(both, a, 0.0), np.where(both, e, 0.0)
    err = np.abs(a_safe - e_safe)
    allowed = atol + rtol * np.abs(e_safe)
    bad = err > allowed
    if bad.any():
        ratio = np.where(both, err / allowed, 0.0)
        worst = np.unravel_index(int(np.argmax(ratio)), a.shape)
        worst = tuple(int(i) for i in worst)
        raise AssertionError(
            f"{name} ({dtype_name(dtype)}, {kind}: atol={atol:g}, rtol={rtol:g}): "
            f"{int(bad.sum())}/{bad.size} elements out of tolerance; "
            f"max abs error {float(err.max()):.3e}; worst at {worst}: "
            f"actual {a[worst]!r}, expected {e[worst]!r}, error {err[worst]:.3e} "
            f"(allowed {allowed[worst]:.3e})")


def make_inputs(rng: np.random.Generator, shape, dtype, count: int = 1, *, requires_grad=False):
    """Draw ``count`` arrays of ``shape`` from N(0, 1), rounded to ``dtype``
    (docs/design/testing.md#tolerances).

    ``dtype`` is a torch dtype (gives torch CPU tensors, rounded by torch, so
    bf16 works) or a NumPy dtype / name (gives NumPy arrays rounded by
    ``astype``). Returns ``(arrays, arrays64)``: lists of the inputs in the
    tested dtype and of the same rounded values as float64 NumPy, the input of
    the float64 reference::

        (q, k, v), (q64, k64, v64) = make_inputs(rng, shape, torch.float16, 3)
    """
    shape = tuple(shape)
    arrays, arrays64 = [], []
    for _ in range(count):
        x = rng.standard_normal(shape)
        if _is_torch(dtype):
            import torch

            t = torch.from_numpy(x).to(dtype)
            x64 = t.double().numpy()
            if requires_grad:
                t.requires_grad_(True)
            arrays.append(t)
        else:
            assert not requires_grad, "requires_grad needs a torch dtype"
            a = x.astype(np.dtype(dtype))
            x64 = a.astype(np.float64)
            arrays.append(a)
        arrays64.append(x64)
    return arrays, arrays64


def noncontiguous(x):
    """Same values as heads-last ``x`` (``[batch, *spatial, heads, dim]``), as a
    non-contiguous heads-last view of a heads-first buffer."""
    ndim = x.ndim
    heads_first_order = (0, ndim - 2, *range(1, ndim - 2), ndim - 1)
    back = (0, *range(2, ndim - 1), 1, ndim - 1)
    if _is_torch(x):
        view = x.permute(heads_first_order).contiguous().permute(back)
        assert not view.is_contiguous() or x.shape[-2] == 1
    else:
        view = np.ascontiguousarray(x.transpose(heads_first_order)).transpose(back)
        assert not view.flags.c_contiguous or x.shape[-2] == 1
    return view


def _nvrtc_missing() -> str | None:
    """Why NVRTC cannot compile here, or None when it can."""
    from na_rtc.runtime import nvrtc

    try:
        nvrtc.nvrtc_version()
    except nvrtc.NvrtcUnavailable as error:
        return str(error)
    return None


requires_nvrtc = pytest.mark.skipif(_nvrtc_missing() is not None, reason=f"NVRTC unavailable: {_nvrtc_missing()}")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """One configuration of a kernel sweep; ``str()`` is its readable test id."""

    spatial: tuple
    kernel_size: tuple
    dilation: tuple
    causal: tuple
    batch: int
    heads: int
    head_dim: int
    rpb: bool
    heads_first: bool
    dtype: str
    stride: tuple | None = None  # fused ops only; None means 1 on every axis

    @property
    def ndim(self):
        return len(self.spatial)

    @property
    def shape(self):
        return (self.batch, *self.spatial, self.heads, self.head_dim)

    @property
    def window(self):
        return dict(kernel_size=self.kernel_size, dilation=self.dilation, is_causal=self.causal)

    def __str__(self):
        axes = ",".join(f"L{n}k{k}d{d}{'c' if c else ''}" for n, k, d, c in
                        zip(self.spatial, self.kernel_size, self.dilation, self.causal))
        stride = f"-s{'x'.join(map(str, self.stride))}" if self.stride and max(self.stride) > 1 else ""
        return (f"{self.ndim}d-{axes}{stride}-b{self.batch}h{self.heads}D{self.head_dim}-{self.dtype}"
                f"{'-rpb' if self.rpb else ''}{'-headsfirst' if self.heads_first else ''}")


class RecordingExecutor:
    """An executor that runs launch plans on the emulator and remembers the kernel names and, per launch, the
    tensor-core instructions executed (``{"mma.sync": n, "wgmma": n}``, one per warp)."""

    def __init__(self):
        self.names = []
        self.op_counts = []

    def __call__(self, plan):
        from na_rtc.runtime import emulated

        self.names.append(plan.kernel.name)
        self.op_counts.append(emulated.run(plan))


def sweep_inputs(cfg: SweepConfig, count: int, shape=None, seed: int = 0):
    """``count`` torch inputs of ``shape`` (default ``cfg.shape``) in ``cfg.dtype``,
    as heads-first views when the config says so, plus their float64 copies."""
    import torch

    arrays, arrays64 = make_inputs(np.random.default_rng(seed), shape or cfg.shape, getattr(torch, cfg.dtype), count)
    if cfg.heads_first:
        arrays = [noncontiguous(a) for a in arrays]
    return arrays, arrays64


def sweep_bias(cfg: SweepConfig):
    """A float32 bias table (the accumulator dtype the ops hand to kernels) and its
    float64 copy, or ``(None, None)`` when the config has no bias."""
    import torch

    if not cfg.rpb:
        return None, None
    shape = (cfg.heads, *(2 * k - 1 for k in cfg.kernel_size))
    (bias,), (bias64,) = make_inputs(np.random.default_rng(99), shape, torch.float32)
    return bias, bias64


def misaligned_copy(x):
    """``x``'s values in storage shifted by one element, so rows no longer start 16-byte aligned.

    Kernels stage 16-byte-aligned contiguous rows with vector loads and
    anything else element by element; comparing a result on ``x`` with the
    result on this copy compares the two staging paths.
    """
    import torch

    flat = torch.empty(x.numel() + 1, dtype=x.dtype)[1:]
    return flat.view(x.shape).copy_(x)


def kernel_policy(tensor_cores=False, wgmma=False):
    """The dispatch policy kernel tests run under: the environment's settings (rows per warp, warpgroups and
    chunk sizes, which tests set with monkeypatch.setenv) with the tensor-core and wgmma paths on or off as
    given, no verification, on the emulator (every architecture's kernels)."""
    import dataclasses

    from na_rtc.runtime.policy import Policy, Settings

    settings = dataclasses.replace(Settings.read(), tensor_cores=bool(tensor_cores), wgmma=bool(wgmma), verify=False)
    return Policy("emulator", None, settings)


@dataclasses.dataclass(frozen=True)
class KernelCase:
    """One fused problem of the kernel sweeps (tests/test_kernels_*.py): spatial shape, query and key/value
    heads, the window arguments, head dims, a bias, and extra key/value tokens (0: none)."""

    spatial: tuple
    heads: int
    heads_kv: int
    window: dict = dataclasses.field(default_factory=dict, hash=False)
    head_dim: int = 16
    rpb: bool = False
    head_dim_v: int | None = None  # None: head_dim
    tokens: int = 0

    @property
    def ndim(self):
        return len(self.spatial)

    @property
    def kernel_size(self):
        k = self.window["kernel_size"]
        return (k,) * self.ndim if isinstance(k, int) else tuple(k)

    def __str__(self):
        window = ",".join(f"{key[:4]}{value}" for key, value in self.window.items())
        dv = "" if self.head_dim_v is None else f"v{self.head_dim_v}"
        tokens = f"-t{self.tokens}" if self.tokens else ""
        return (f"{self.ndim}d-{'x'.join(map(str, self.spatial))}-h{self.heads}kv{self.heads_kv}{tokens}-"
                f"D{self.head_dim}{dv}-{window}{'-rpb' if self.rpb else ''}")

