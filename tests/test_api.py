"""The public API's contract: outputs keep the input's kind, dtype and device;
backend selection; import hygiene; bounded reference memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import na_rtc
from helpers import assert_close
from na_rtc import backends

RNG = np.random.default_rng(7)

SHAPES = {1: (2, 12, 3, 8), 2: (2, 7, 6, 3, 8), 3: (2, 4, 5, 6, 3, 8)}
KERNEL = {1: 5, 2: (3, 5), 3: (2, 3, 5)}
FUSED = {1: na_rtc.na1d, 2: na_rtc.na2d, 3: na_rtc.na3d}
QK = {1: na_rtc.na1d_qk, 2: na_rtc.na2d_qk, 3: na_rtc.na3d_qk}
AV = {1: na_rtc.na1d_av, 2: na_rtc.na2d_av, 3: na_rtc.na3d_av}
BACKWARD = {1: na_rtc.na1d_backward, 2: na_rtc.na2d_backward, 3: na_rtc.na3d_backward}

NUMPY_DTYPES = [np.float16, np.float32, np.float64]
TORCH_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _numpy(shape, dtype):
    return RNG.standard_normal(shape).astype(dtype)


def _torch(shape, dtype, requires_grad=False):
    return torch.tensor(RNG.standard_normal(shape), dtype=dtype, requires_grad=requires_grad)


@pytest.mark.parametrize("ndim", [1, 2, 3], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=lambda d: np.dtype(d).name)
def test_numpy_in_numpy_out(ndim, dtype):
    q, k, v = (_numpy(SHAPES[ndim], dtype) for _ in range(3))
    out, lse = FUSED[ndim](q, k, v, KERNEL[ndim], return_lse=True)
    assert isinstance(out, np.ndarray) and out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == (np.float64 if dtype == np.float64 else np.float32)
    assert lse.shape == q.shape[:-1]
    attn = QK[ndim](q, k, KERNEL[ndim])
    assert attn.dtype == dtype and attn.shape == (*q.shape[:-1], int(np.prod(KERNEL[ndim])))
    assert AV[ndim](attn, v, KERNEL[ndim]).dtype == dtype


@pytest.mark.parametrize("ndim", [1, 2, 3], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_torch_in_torch_out_with_gradients(ndim, dtype):
    q, k, v = (_torch(SHAPES[ndim], dtype, requires_grad=True) for _ in range(3))
    out, lse = FUSED[ndim](q, k, v, KERNEL[ndim], return_lse=True)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.device == q.device
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert lse.requires_grad  # differentiable: merging partial attentions needs it
    (out.float().square().sum() + lse.sum()).backward()
    for x in (q, k, v):
        assert x.grad is not None and x.grad.dtype == dtype and x.grad.shape == x.shape
        assert torch.isfinite(x.grad).all()


def test_rpb_gradient_flows_and_keeps_its_dtype():
    q, k, v = (_torch(SHAPES[2], torch.float16, requires_grad=True) for _ in range(3))
    rpb = _torch((3, 5, 9), torch.float32, requires_grad=True)  # a float32 parameter with fp16 activations
    na_rtc.na2d(q, k, v, (3, 5), rpb=rpb).float().sum().backward()
    assert rpb.grad is not None and rpb.grad.dtype == torch.float32 and rpb.grad.abs().sum() > 0


def test_no_grad_inputs_give_no_grad_output():
    q = _torch(SHAPES[1], torch.float32)
    assert not na_rtc.na1d(q, q, q, 5).requires_grad


@pytest.mark.parametrize("ndim", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_empty_batch(ndim):
    shape = (0, *SHAPES[ndim][1:])
    q = np.zeros(shape, np.float32)
    out, lse = FUSED[ndim](q, q, q, KERNEL[ndim], return_lse=True)
    assert out.shape == shape and lse.shape == shape[:-1]
    grads = BACKWARD[ndim](q, q, q, q, KERNEL[ndim])
    assert all(g.shape == shape for g in grads[:3])


def test_top_level_and_reference_module_agree():
    q, k, v = (_numpy(SHAPES[2], np.float64) for _ in range(3))
    from na_rtc import reference

    with na_rtc.use_backend("reference"):
        np.testing.assert_array_equal(na_rtc.na2d(q, k, v, (3, 5)), reference.na2d(q, k, v, (3, 5)))
    assert_close(na_rtc.na2d(q, k, v, (3, 5)), reference.na2d(q, k, v, (3, 5)), "float64", "forward")  # blocked
    assert reference.na2d.__name__ == "na2d" and "2D neighborhood attention" in reference.na2d.__doc__


# ---------------------------------------------------------------- backends


def test_default_backend_for_cpu_arrays_is_blocked():
    assert backends.current_backend_name() is None
    problem = na_rtc._args.fused_problem(1, *(np.zeros(SHAPES[1]),) * 3, 5, 1, 1, False, None, None)
    assert backends.select(problem).name == "blocked"


def test_use_backend_as_context_manager_restores():
    with na_rtc.use_backend("emulator"):
        assert backends.current_backend_name() == "emulator"
        with na_rtc.use_backend("reference"):
            assert backends.current_backend_name() == "reference"
        assert backends.current_backend_name() == "emulator"
    assert backends.current_backend_name() is None


def _selected(array) -> str:
    problem = na_rtc._args.fused_problem(1, array, array, array, 5, 1, 1, False, None, None)
    return backends.select(problem).name


def test_use_backend_plain_call_persists_until_reset():
    q = _numpy(SHAPES[1], np.float32)
    token = na_rtc.use_backend("emulator")
    try:
        assert _selected(q) == "emulator"
    finally:
        token.__exit__(None, None, None)
    assert _selected(q) == "blocked"


def test_environment_variable_selects_backend(monkeypatch):
    q = _numpy(SHAPES[1], np.float32)
    monkeypatch.setenv("NA_RTC_BACKEND", "emulator")
    assert _selected(q) == "emulator"
    with na_rtc.use_backend("reference"):  # explicit choice beats the environment
        assert _selected(q) == "reference"
    monkeypatch.setenv("NA_RTC_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        na_rtc.na1d(q, q, q, 5)


def _problem_on(kind, device, ndim):
    """A validated-looking problem placed on ``device`` without needing one (selection reads only this)."""
    from na_rtc._args import FUSED as fused_op, Problem
    from na_rtc.window import Axis

    return Problem(fused_op, (Axis(8, 3),) * ndim, 1, 2, 4, "float32", kind, device)


# (array kind, device, rank) -> the backend automatic selection picks
AUTOMATIC = {
    "numpy-2d": (("numpy", "cpu", 2), "blocked"),
    "numpy-3d": (("numpy", "cpu", 3), "blocked"),
    "torch-cpu-1d": (("torch", "cpu", 1), "blocked"),
    "torch-cuda-2d": (("torch", "cuda:0", 2), "cuda"),
    "torch-cuda-3d": (("torch", "cuda:1", 3), "cuda"),
    "torch-mps-2d": (("torch", "mps", 2), "blocked"),
    "torch-xpu-3d": (("torch", "xpu:0", 3), "blocked"),
    "meta-3d": (("torch", "meta", 3), "blocked"),
}


@pytest.mark.parametrize("placement, expected", AUTOMATIC.values(), ids=AUTOMATIC.keys())
def test_automatic_selection_by_placement_and_rank(placement, expected):
    assert backends.select(_problem_on(*placement)).name == expected


def test_rocm_builds_of_torch_run_their_cuda_devices_on_the_blocked_backend(monkeypatch):
    """A ROCm build reports its AMD GPUs as ``cuda`` devices, which cannot run the kernels' PTX."""
    import torch

    monkeypatch.setattr(torch.version, "hip", "6.2.0", raising=False)
    assert backends.select(_problem_on("torch", "cuda:0", 2)).name == "blocked"
    monkeypatch.setattr(torch.version, "hip", None)
    assert backends.select(_problem_on("torch", "cuda:0", 2)).name == "cuda"


def test_cupy_arrays_in_3d_run_on_the_cuda_backend(monkeypatch):
    monkeypatch.setattr(backends.get("cuda"), "probe", lambda: (True, "a stand-in GPU"))  # CuPy calls probe here
    assert backends.select(_problem_on("cupy", "cuda:0", 3)).name == "cuda"


def test_the_kernel_backends_serve_every_rank():
    for name in ("cuda", "emulator"):
        assert backends.get(name).ranks == {1, 2, 3}
        assert "1D, 2D and 3D" in backends.get(name).summary


@pytest.fixture
def kernels_without_3d(monkeypatch):
    """The kernel backends as a backend that serves fewer ranks looks: 1D and 2D only (the rank mechanism stays,
    whatever today's backends serve)."""
    for name in ("cuda", "emulator"):
        monkeypatch.setattr(backends.get(name), "ranks", frozenset({1, 2}))


@pytest.mark.parametrize("placement, expected", [(("torch", "cuda:1", 3), "reference"), (("numpy", "cpu", 2), "blocked"),
                                                 (("torch", "cuda:0", 2), "cuda")],
                         ids=["torch-cuda-3d", "numpy-2d", "torch-cuda-2d"])
def test_automatic_selection_falls_back_to_the_reference_for_a_rank_the_default_lacks(kernels_without_3d, placement,
                                                                                      expected):
    assert backends.select(_problem_on(*placement)).name == expected


@pytest.mark.parametrize("placement", [("numpy", "cpu"), ("torch", "cpu"), ("torch", "cuda:0"), ("torch", "meta")],
                         ids=["numpy", "torch-cpu", "torch-cuda", "meta"])
@pytest.mark.parametrize("backend", ["cuda", "emulator"])
@pytest.mark.parametrize("how", ["argument", "use_backend", "environment"])
def test_a_backend_forced_for_a_rank_it_lacks_names_the_way_out(kernels_without_3d, monkeypatch, how, backend,
                                                                placement):
    problem = _problem_on(*placement, 3)
    if how == "environment":
        monkeypatch.setenv("NA_RTC_BACKEND", backend)
    with na_rtc.use_backend(backend if how == "use_backend" else None):
        with pytest.raises(ValueError) as raised:
            backends.select(problem, backend if how == "argument" else None)
    text = str(raised.value)
    assert text.startswith(f"the {backend} backend's kernels serve 1D/2D neighborhood attention only, not 3D")
    assert "backend='reference' or na_rtc.use_backend('reference')" in text


def test_cupy_arrays_in_a_rank_the_cuda_backend_lacks_are_refused_with_the_zero_copy_way_to_torch(kernels_without_3d):
    with pytest.raises(ValueError) as raised:
        backends.select(_problem_on("cupy", "cuda:0", 3))
    text = str(raised.value)
    assert "the cuda backend's kernels serve 1D/2D neighborhood attention only, not 3D" in text
    assert "CuPy arrays have no other backend in 3D" in text and "torch.from_dlpack(array)" in text


@pytest.mark.skipif(not backends.get("emulator").probe()[0], reason="emulator needs a C++ compiler")
def test_na3d_runs_on_a_forced_kernel_backend():
    q = _numpy(SHAPES[3], np.float32)
    with na_rtc.use_backend("emulator"):
        assert na_rtc.na3d_qk(q, q, KERNEL[3]).shape[-1] == 30
    assert na_rtc.na3d(q, q, q, KERNEL[3], backend="emulator").shape == q.shape


def test_na3d_on_a_kernel_backend_without_3d_is_refused_before_any_kernel_runs(kernels_without_3d):
    q = _numpy(SHAPES[3], np.float32)
    for backend in ("cuda", "emulator"):
        with pytest.raises(ValueError, match="backend's kernels serve 1D/2D neighborhood attention only, not 3D"):
            na_rtc.na3d(q, q, q, KERNEL[3], backend=backend)
    with na_rtc.use_backend("emulator"):  # 1D/2D calls keep the forced backend's choice
        assert _selected(_numpy(SHAPES[1], np.float32)) == "emulator"
        with pytest.raises(ValueError, match="not 3D"):
            na_rtc.na3d_qk(q, q, KERNEL[3])
        assert na_rtc.na3d_qk(q, q, KERNEL[3], backend="reference").shape[-1] == 30


def test_describe_lists_every_backend_with_a_reason():
    described = {name: (available, reason) for name, available, reason in backends.describe()}
    assert set(described) == {"blocked", "reference", "cuda", "emulator"}
    assert described["reference"][0] is True and described["blocked"][0] is True
    assert all(reason for _, reason in described.values())


# ---------------------------------------------------------------- import hygiene and memory


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_import_does_not_import_torch_or_cupy():
    out = _python(
        """
        import sys, numpy as np, na_rtc
        q = np.zeros((1, 8, 1, 4))
        na_rtc.na1d(q, q, q, 3)
        print(sorted(m for m in ("torch", "cupy") if m in sys.modules))
        """
    )
    assert out.strip() == "[]"


def test_reference_memory_stays_bounded_2d_128x128():
    """Issue 2: 128x128 tokens, 4 heads, head_dim 32, k=13, fp32 forward+backward
    peaks under 1 GB beyond its inputs (a full gather would need ~2.8 GB)."""
    out = _python(
        """
        import json, resource, torch, na_rtc
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 128, 128, 4, 32, requires_grad=True) for _ in range(3))
        grad = torch.randn(1, 128, 128, 4, 32)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        na_rtc.na2d(q, k, v, 13).backward(grad)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"growth_mb": (after - before) / 1024, "finite": bool(torch.isfinite(q.grad).all())}))
        """
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["finite"]
    assert result["growth_mb"] < 1024, result


def test_reference_memory_stays_bounded_3d_with_343_slots():
    """32 x 32 x 32 tokens with a 7 x 7 x 7 window: a table over every (query, slot) pair would alone take
    ~380 MB (NumPy's and torch's copies); built per query chunk (8 MB budget here), forward and backward
    together grow the process by ~130 MB, most of it torch's own first-use allocations."""
    out = _python(
        """
        import json, os, resource, torch
        os.environ["NA_RTC_REFERENCE_CHUNK_MB"] = "8"
        import na_rtc
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 32, 32, 32, 1, 2, requires_grad=True) for _ in range(3))
        grad = torch.randn(1, 32, 32, 32, 1, 2)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        na_rtc.na3d(q, k, v, 7).backward(grad)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"growth_mb": (after - before) / 1024, "finite": bool(torch.isfinite(q.grad).all())}))
        """
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["finite"]
    assert result["growth_mb"] < 300, result


# ---------------------------------------------------------------- autocast


@pytest.mark.parametrize("backend", ["reference", "emulator"])
def test_autocast_runs_in_the_autocast_dtype_and_gradients_reach_fp32_leaves(backend):
    q, k, v = (_torch(SHAPES[2], torch.float32, requires_grad=True) for _ in range(3))
    rpb = _torch((3, 5, 9), torch.float32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = na_rtc.na2d(q, k, v, (3, 5), rpb=rpb, backend=backend)
        attn = na_rtc.na2d_qk(q, k, (3, 5), backend=backend)
        mixed = na_rtc.na2d_av(attn.float().softmax(-1), v, (3, 5), backend=backend)
    assert out.dtype == attn.dtype == mixed.dtype == torch.bfloat16
    (out.float().sum() + mixed.float().sum()).backward()
    for leaf in (q, k, v, rpb):
        assert leaf.grad is not None and leaf.grad.dtype == torch.float32 and torch.isfinite(leaf.grad).all()
    with torch.no_grad():  # same numbers as an explicit bf16 call
        expected = na_rtc.na2d(q.bfloat16(), k.bfloat16(), v.bfloat16(), (3, 5), rpb=rpb, backend=backend)
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=0)
