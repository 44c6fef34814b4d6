"""Meta tensors: shapes without data, how large models are initialized
(``torch.device("meta")`` then ``to_empty``, FSDP) and how shapes are traced.

Every op and layer runs on meta tensors, forward and backward (autograd on
meta tensors), under any backend (no backend code runs: the custom ops' fake
implementations compute the shapes), and gives what the same call gives on
the CPU, in shape and dtype.
"""

from __future__ import annotations

import pytest
import torch

import na_rtc

torch.manual_seed(0)


def _qkv(device, spatial, heads=2, dim=8, n=3, dtype=torch.float32):
    return tuple(torch.randn(1, *spatial, heads, dim, dtype=dtype).to(device) for _ in range(n))


def _rpb(device, heads, *kernel):
    return torch.randn(heads, *(2 * k - 1 for k in kernel)).to(device)


def _attn(device, spatial, slots, heads=2):
    return torch.randn(1, *spatial, heads, slots).softmax(-1).to(device)


# name -> (device -> (function, differentiable inputs)); a function returns a tensor or a tuple (None allowed)
FORWARD = {
    "na1d-rpb-dilation": lambda d: (lambda q, k, v, r: na_rtc.na1d(q, k, v, 5, dilation=2, rpb=r),
                                    [*_qkv(d, (12,)), _rpb(d, 2, 5)]),
    "na1d-causal-stride-lse": lambda d: (lambda q, k, v: na_rtc.na1d(q, k, v, 4, stride=2, is_causal=True,
                                                                     return_lse=True), list(_qkv(d, (11,)))),
    "na2d-rpb": lambda d: (lambda q, k, v, r: na_rtc.na2d(q, k, v, (3, 5), rpb=r), [*_qkv(d, (6, 7)), _rpb(d, 2, 3, 5)]),
    "na2d-stride-causal-bf16": lambda d: (lambda q, k, v: na_rtc.na2d(q, k, v, (3, 4), stride=(2, 3),
                                                                      is_causal=(True, False)),
                                          list(_qkv(d, (6, 7), dtype=torch.bfloat16))),
    "na1d_qk-rpb": lambda d: (lambda q, k, r: na_rtc.na1d_qk(q, k, 5, rpb=r), [*_qkv(d, (12,), n=2), _rpb(d, 2, 5)]),
    "na2d_qk-causal": lambda d: (lambda q, k: na_rtc.na2d_qk(q, k, (3, 2), dilation=(1, 2), is_causal=(False, True)),
                                 list(_qkv(d, (6, 7), n=2))),
    "na1d_av": lambda d: (lambda a, v: na_rtc.na1d_av(a, v, 5, is_causal=True),
                          [_attn(d, (12,), 5), *_qkv(d, (12,), n=1)]),
    "na2d_av": lambda d: (lambda a, v: na_rtc.na2d_av(a, v, (3, 5), dilation=(2, 1)),
                          [_attn(d, (6, 7), 15), *_qkv(d, (6, 7), n=1)]),
    "na3d-rpb-lse": lambda d: (lambda q, k, v, r: na_rtc.na3d(q, k, v, 3, dilation=(1, 2, 1), rpb=r, return_lse=True),
                               [*_qkv(d, (3, 6, 4)), _rpb(d, 2, 3, 3, 3)]),
    "na3d-causal-in-time-stride": lambda d: (lambda q, k, v: na_rtc.na3d(q, k, v, (2, 3, 3), stride=(2, 1, 3),
                                                                         is_causal=(True, False, False)),
                                             list(_qkv(d, (4, 3, 5)))),
    "na3d_qk-rpb": lambda d: (lambda q, k, r: na_rtc.na3d_qk(q, k, 3, rpb=r), [*_qkv(d, (3, 4, 5), n=2),
                                                                             _rpb(d, 2, 3, 3, 3)]),
    "na3d_av-causal": lambda d: (lambda a, v: na_rtc.na3d_av(a, v, (2, 3, 2), is_causal=(True, False, True)),
                                 [_attn(d, (3, 4, 5), 12), *_qkv(d, (3, 4, 5), n=1)]),
}

# plain backward functions: name -> (device -> (function, inputs)); no autograd involved
BACKWARD = {
    "na1d_backward-rpb-recompute": lambda d: (lambda g, q, k, v, r: na_rtc.na1d_backward(g, q, k, v, 5, rpb=r),
                                              [*_qkv(d, (12,), n=4), _rpb(d, 2, 5)]),
    "na2d_backward-saved-output": lambda d: (_na2d_backward_with_output, list(_qkv(d, (6, 7), n=4))),
    "na1d_qk_backward-rpb": lambda d: (lambda g, q, k, r: na_rtc.na1d_qk_backward(g, q, k, 5, rpb=r),
                                       [_attn(d, (12,), 5), *_qkv(d, (12,), n=2), _rpb(d, 2, 5)]),
    "na2d_qk_backward-causal": lambda d: (lambda g, q, k: na_rtc.na2d_qk_backward(g, q, k, (3, 4), is_causal=True),
                                          [_attn(d, (6, 7), 12), *_qkv(d, (6, 7), n=2)]),
    "na1d_av_backward": lambda d: (lambda g, a, v: na_rtc.na1d_av_backward(g, a, v, 5),
                                   [*_qkv(d, (12,), n=1), _attn(d, (12,), 5), *_qkv(d, (12,), n=1)]),
    "na2d_av_backward": lambda d: (lambda g, a, v: na_rtc.na2d_av_backward(g, a, v, (3, 5), is_causal=(True, False)),
                                   [*_qkv(d, (6, 7), n=1), _attn(d, (6, 7), 15), *_qkv(d, (6, 7), n=1)]),
    "na3d_backward-rpb": lambda d: (lambda g, q, k, v, r: na_rtc.na3d_backward(g, q, k, v, 3, rpb=r),
                                    [*_qkv(d, (3, 4, 5), n=4), _rpb(d, 2, 3, 3, 3)]),
    "na3d_qk_backward-causal": lambda d: (lambda g, q, k: na_rtc.na3d_qk_backward(g, q, k, (2, 3, 2),
                                                                                  is_causal=(True, False, False)),
                                          [_attn(d, (3, 4, 5), 12), *_qkv(d, (3, 4, 5), n=2)]),
    "na3d_av_backward": lambda d: (lambda g, a, v: na_rtc.na3d_av_backward(g, a, v, (2, 3, 2)),
                                   [*_qkv(d, (3, 4, 5), n=1), _attn(d, (3, 4, 5), 12), *_qkv(d, (3, 4, 5), n=1)]),
}


def _na2d_backward_with_output(grad, q, k, v):
    out, lse = na_rtc.na2d(q, k, v, 3, stride=2, return_lse=True)
    return na_rtc.na2d_backward(grad, q, k, v, 3, stride=2, output=out, logsumexp=lse)


def _tensors(result):
    return result if isinstance(result, tuple) else (result,)


def _assert_like(meta, cpu, what):
    """``meta`` is a meta tensor with the shape and dtype of ``cpu`` (None where ``cpu`` is None)."""
    if cpu is None:
        assert meta is None, f"{what}: expected None, got {meta!r}"
        return
    assert meta.device.type == "meta", f"{what} is on {meta.device}"
    assert (tuple(meta.shape), meta.dtype) == (tuple(cpu.shape), cpu.dtype), what


@pytest.mark.parametrize("case", FORWARD.values(), ids=FORWARD.keys())
def test_every_op_runs_forward_and_backward_on_meta_tensors(case):
    results = {}
    for device in ("cpu", "meta"):
        function, inputs = case(device)
        inputs = [x.requires_grad_() for x in inputs]
        outputs = _tensors(function(*inputs))
        outputs[0].float().sum().backward()
        results[device] = outputs, [x.grad for x in inputs]
    (meta_out, meta_grads), (cpu_out, cpu_grads) = results["meta"], results["cpu"]
    for i, (m, c) in enumerate(zip(meta_out, cpu_out, strict=True)):
        _assert_like(m, c, f"output {i}")
    for i, (m, c) in enumerate(zip(meta_grads, cpu_grads, strict=True)):
        _assert_like(m, c, f"gradient of input {i}")


@pytest.mark.parametrize("case", BACKWARD.values(), ids=BACKWARD.keys())
def test_plain_backward_functions_run_on_meta_tensors(case):
    cpu_function, cpu_inputs = case("cpu")
    meta_function, meta_inputs = case("meta")
    cpu = _tensors(cpu_function(*cpu_inputs))
    meta = _tensors(meta_function(*meta_inputs))
    assert len(meta) == len(cpu)
    for i, (m, c) in enumerate(zip(meta, cpu)):
        _assert_like(m, c, f"gradient {i}")


def test_3d_meta_tensors_run_on_the_reference_and_on_a_forced_kernel_backend():
    # automatic selection for meta tensors is the reference; the kernel backends serve 3D too, so a model traced
    # on meta under a forced kernel backend gets the shapes it will get when run
    q, k, v = (torch.empty(1, 3, 4, 5, 2, 8, device="meta", requires_grad=True) for _ in range(3))
    na_rtc.na3d(q, k, v, 3).sum().backward()
    assert q.grad.device.type == "meta"
    with na_rtc.use_backend("cuda"):
        assert na_rtc.na3d(q, k, v, 3).shape == q.shape


@pytest.mark.parametrize("backend", ["reference", "emulator", "cuda"])
def test_meta_tensors_are_served_by_every_backend(backend):
    # no backend code runs for meta tensors, so the cuda backend needs no GPU and the emulator no compiler
    q, k, v = (torch.empty(2, 9, 3, 8, device="meta", requires_grad=True) for _ in range(3))
    with na_rtc.use_backend(backend):
        out = na_rtc.na1d(q, k, v, 3)
        attn = na_rtc.na1d_qk(q, k, 3, backend=backend)
    out.sum().backward()
    assert (out.device.type, tuple(out.shape)) == ("meta", (2, 9, 3, 8))
    assert tuple(attn.shape) == (2, 9, 3, 3)
    assert q.grad.device.type == "meta" and tuple(q.grad.shape) == tuple(q.shape)


LAYERS = {
    "1d": lambda: na_rtc.NeighborhoodAttention1D(16, 2, kernel_size=5, dilation=2),
    "1d-rpb": lambda: na_rtc.NeighborhoodAttention1D(16, 2, kernel_size=5, rel_pos_bias=True),
    "2d": lambda: na_rtc.NeighborhoodAttention2D(16, 2, kernel_size=(3, 5), stride=2, is_causal=(True, False)),
    "2d-rpb-split-path": lambda: na_rtc.NeighborhoodAttention2D(16, 2, kernel_size=3, rel_pos_bias=True,
                                                                attn_drop=0.1),
    "3d-rpb": lambda: na_rtc.NeighborhoodAttention3D(16, 2, kernel_size=(3, 3, 5), rel_pos_bias=True),
    "3d-causal-in-time-split-path": lambda: na_rtc.NeighborhoodAttention3D(16, 2, kernel_size=(2, 3, 3),
                                                                           is_causal=(True, False, False),
                                                                           attn_drop=0.1),
}
SPATIAL = {"1d": (12,), "1d-rpb": (7,), "2d": (6, 7), "2d-rpb-split-path": (2, 5), "3d-rpb": (3, 4, 6),
           "3d-causal-in-time-split-path": (4, 2, 5)}  # some padded to the window


@pytest.mark.parametrize("name", LAYERS)
def test_layers_run_forward_and_backward_on_meta_tensors(name):
    with torch.device("meta"):
        layer = LAYERS[name]()
    layer.train()
    x = torch.empty(2, *SPATIAL[name], 16, device="meta", requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert (y.device.type, tuple(y.shape)) == ("meta", tuple(x.shape))
    assert x.grad.device.type == "meta" and tuple(x.grad.shape) == tuple(x.shape)
    for pname, p in layer.named_parameters():
        assert p.grad is not None and tuple(p.grad.shape) == tuple(p.shape), pname


@pytest.mark.parametrize("name", ["1d-rpb", "2d", "3d-rpb"])
def test_a_layer_built_on_meta_then_materialized_computes_like_one_built_on_the_cpu(name):
    torch.manual_seed(1)
    cpu_layer = LAYERS[name]().eval()
    with torch.device("meta"):
        meta_layer = LAYERS[name]()
    meta_layer = meta_layer.to_empty(device="cpu").eval()
    meta_layer.load_state_dict(cpu_layer.state_dict())
    x = torch.randn(2, *SPATIAL[name], 16)
    torch.testing.assert_close(meta_layer(x), cpu_layer(x), rtol=0, atol=0)


def test_double_backward_runs_on_meta_tensors():
    q, k, v = (torch.empty(1, 6, 7, 2, 8, device="meta", requires_grad=True) for _ in range(3))
    rpb = torch.empty(2, 5, 5, device="meta", requires_grad=True)
    out = na_rtc.na2d(q, k, v, 3, dilation=(2, 1), rpb=rpb)
    first = torch.autograd.grad(out.sum(), (q, k, v, rpb), create_graph=True)
    second = torch.autograd.grad(sum(g.square().sum() for g in first), (q, k, v, rpb))
    for x, g in zip((q, k, v, rpb), second):
        assert g.device.type == "meta" and tuple(g.shape) == tuple(x.shape)
