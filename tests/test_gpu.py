"""GPU placement: streams, devices, CuPy arrays, no hidden copies (``gpu`` marker)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_close

import na_rtc

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not na_rtc.backends.get("cuda").probe()[0], reason="no usable GPU")]

SHAPE = (2, 24, 20, 3, 32)


def _qkv(dtype=torch.float32, device="cuda"):
    torch.manual_seed(0)
    return [torch.randn(SHAPE, dtype=dtype, device=device) for _ in range(3)]


def test_cuda_tensors_default_to_the_cuda_backend_and_match_the_reference():
    q, k, v = _qkv()
    out = na_rtc.na2d(q, k, v, 7, dilation=2)
    assert out.device == q.device and out.dtype == q.dtype
    ref = na_rtc.na2d(q.cpu().double(), k.cpu().double(), v.cpu().double(), 7, dilation=2)
    assert_close(out, ref, "float32", "forward")


def test_launches_follow_torchs_current_stream():
    q, k, v = _qkv()
    expected = na_rtc.na2d(q, k, v, 5)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        q2 = q * 1.0  # produced on the side stream: the kernel must wait for it
        out = na_rtc.na2d(q2, k, v, 5)
    stream.synchronize()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_outputs_come_from_torchs_allocator_and_inputs_are_not_copied():
    q, k, _ = _qkv()
    heads_first = q.permute(0, 3, 1, 2, 4).contiguous().permute(0, 2, 3, 1, 4)  # strided view, no copy
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    attn = na_rtc.na2d_qk(heads_first, k, 7)
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - before
    assert grown == attn.untyped_storage().nbytes()  # only the output: the strided input was used in place
    assert_close(attn, na_rtc.na2d_qk(q.cpu().double(), k.cpu().double(), 7), "float32", "forward")


def test_cupy_arrays_in_cupy_out():
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(3))
    out = na_rtc.na2d(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v), 5)
    assert isinstance(out, cupy.ndarray)
    assert_close(out.get(), na_rtc.na2d(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), 5),
                 "float32", "forward")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_autograd(dtype):
    q, k, v = (x.requires_grad_() for x in _qkv(dtype))
    out = na_rtc.na2d(q, k, v, 5)
    out.float().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    q, k, v = _qkv(device="cuda:1")
    out = na_rtc.na2d(q, k, v, 5)
    assert out.device == q.device
    assert_close(out, na_rtc.na2d(q.cpu().double(), k.cpu().double(), v.cpu().double(), 5), "float32", "forward")


def test_cpu_tensors_are_refused_by_the_cuda_backend():
    q, k, v = _qkv(device="cpu")
    with pytest.raises(ValueError, match="cuda backend cannot run torch arrays on CPU"):
        na_rtc.na2d(q, k, v, 5, backend="cuda")


# ---------------------------------------------------------------- CUDA graphs, torch.compile, autocast (issue 6)


def _layer():
    torch.manual_seed(0)
    layer = na_rtc.NeighborhoodAttention2D(64, 4, 7, rel_pos_bias=True).cuda()
    with torch.no_grad():
        layer.rpb.normal_()
    return layer


def test_cuda_graph_capture_and_replay_of_forward_and_backward_equals_eager():
    layer = _layer()
    x = torch.randn(2, 20, 24, 64, device="cuda", requires_grad=True)
    grad = torch.randn(2, 20, 24, 64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up: kernels compiled and loaded, allocator pools populated
        for _ in range(3):
            layer(x).backward(grad)
    torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    layer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a host sync, a compile or a foreign allocation here fails the capture
        out = layer(x)
        out.backward(grad)
    new_x, new_grad = torch.randn_like(x), torch.randn_like(grad)
    with torch.no_grad():
        x.copy_(new_x)
        grad.copy_(new_grad)
    graph.replay()
    torch.cuda.synchronize()
    got = (out.clone(), x.grad.clone(), layer.rpb.grad.clone())
    x2 = new_x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    eager = layer(x2)
    eager.backward(new_grad)
    for a, b in zip(got, (eager, x2.grad, layer.rpb.grad)):
        torch.testing.assert_close(a, b)


def test_compile_reduce_overhead_equals_eager():
    layer = _layer()
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(2, 20, 24, 64, device="cuda")
    for _ in range(3):  # record, then replay the CUDA graph
        out = compiled(x)
    torch.testing.assert_close(out, layer(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_autocast_on_cuda(dtype):
    layer = _layer()
    x = torch.randn(2, 20, 24, 64, device="cuda")
    expected = layer(x)
    with torch.autocast("cuda", dtype=dtype):
        out = layer(x)
    assert out.dtype == dtype
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in layer.parameters())
    assert_close(out, expected, dtype, "forward", "output")
