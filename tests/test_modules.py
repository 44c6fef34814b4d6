"""NeighborhoodAttention1D/2D/3D (docs/design/api.md#functions): the layer against a dense
masked-attention layer written by hand from docs/design/definition.md, the choice between the
fused and the split path, padding of small inputs, state dicts across
backends, validation, torch.compile and autocast."""

from __future__ import annotations

import inspect

import io
import math
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import na_rtc
from na_rtc import backends
from na_rtc.modules import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D

from helpers import assert_close
from oracle import oracle_neighbor_mask

MODULES = {1: NeighborhoodAttention1D, 2: NeighborhoodAttention2D, 3: NeighborhoodAttention3D}


@dataclass(frozen=True)
class Layer:
    """One layer configuration and the input size it is run on."""

    spatial: tuple
    kernel_size: tuple
    stride: tuple = None
    dilation: tuple = None
    causal: tuple = None
    rpb: bool = False
    embed_dim: int = 12
    heads: int = 3

    @property
    def ndim(self):
        return len(self.spatial)

    def kwargs(self):
        n = self.ndim
        return dict(stride=self.stride or (1,) * n, dilation=self.dilation or (1,) * n,
                    is_causal=self.causal or (False,) * n, rel_pos_bias=self.rpb)

    def build(self, **extra):
        return MODULES[self.ndim](self.embed_dim, self.heads, self.kernel_size, **self.kwargs(), **extra)

    def __str__(self):
        kw = self.kwargs()
        axes = ",".join(f"L{L}k{k}" + (f"s{s}" if s > 1 else "") + (f"d{d}" if d > 1 else "") + ("c" if c else "")
                        for L, k, s, d, c in zip(self.spatial, self.kernel_size, kw["stride"], kw["dilation"],
                                                 kw["is_causal"]))
        padded = any(L < k * d for L, k, d in zip(self.spatial, self.kernel_size, kw["dilation"]))
        return f"{self.ndim}d-{axes}{'-rpb' if self.rpb else ''}{'-padded' if padded else ''}"


LAYERS = [
    Layer((11,), (5,)),
    Layer((13,), (5,), dilation=(2,), rpb=True),
    Layer((9,), (4,), causal=(True,)),
    Layer((10,), (3,), stride=(2,)),
    Layer((6,), (5,), dilation=(2,), rpb=True),           # shorter than kernel_size * dilation
    Layer((6, 7), (3, 3), rpb=True),
    Layer((7, 6), (3, 5), dilation=(2, 1), rpb=True),
    Layer((5, 6), (3, 4), stride=(1, 2), causal=(True, False)),
    Layer((4, 9), (3, 3), dilation=(2, 2), rpb=True),     # padded on the first axis only
    Layer((2, 2), (3, 3)),                                # padded on both axes
    # 3D: [batch, depth/time, height, width, channels]
    Layer((3, 4, 5), (3, 3, 3), rpb=True),
    Layer((4, 3, 5), (2, 3, 4), stride=(2, 1, 2), causal=(True, False, False)),  # causal in time only
    Layer((3, 4, 4), (3, 3, 3), dilation=(1, 2, 1), rpb=True),  # padded on the height axis only
    Layer((2, 3, 4), (3, 3, 5)),                                # padded on every axis
]
SMALL = [c for c in LAYERS if str(c) in ("1d-L13k5d2-rpb", "2d-L4k3d2,L9k3d2-rpb-padded")]


def dense_layer(module, x):
    """The layer by hand: zero-pad, project, dense attention masked to the
    neighborhoods of section 2 (plus the bias), crop, project back."""
    kernel, stride, dilation, causal = module.kernel_size, module.stride, module.dilation, module.is_causal
    batch, *spatial, channels = x.shape
    padded = [max(n, k * d) for n, k, d in zip(spatial, kernel, dilation)]
    xp = x.new_zeros(batch, *padded, channels)
    xp[(slice(None), *(slice(0, n) for n in spatial))] = x
    tokens = math.prod(padded)
    mask, bias_index = oracle_neighbor_mask(tuple(padded), kernel, stride, dilation, causal)
    heads, dim = module.num_heads, module.head_dim
    qkv = F.linear(xp.reshape(batch, tokens, channels), module.qkv.weight, module.qkv.bias)
    q, k, v = qkv.reshape(batch, tokens, 3, heads, dim).unbind(2)
    logits = torch.einsum("bnhd,bmhd->bhnm", q, k) * module.scale
    if module.rpb is not None:
        index = torch.from_numpy(bias_index)
        logits = logits + module.rpb[(slice(None), *index.unbind(-1))]
    logits = logits.masked_fill(~torch.from_numpy(mask), -math.inf)
    out = torch.einsum("bhnm,bmhd->bnhd", logits.softmax(-1), v).reshape(batch, *padded, channels)
    out = out[(slice(None), *(slice(0, n) for n in spatial))]
    return F.linear(out, module.proj.weight, module.proj.bias)


def _input(cfg, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, *cfg.spatial, cfg.embed_dim, generator=g, dtype=torch.float64).to(dtype)


def _randomize_rpb(module):
    # The default init (std 0.02) hides a wrong bias index; make the bias matter.
    if module.rpb is not None:
        with torch.no_grad():
            module.rpb.normal_()


class Recorder:
    """Counts calls of a backend's op table, by default the one CPU tensors run on (and keeps the arguments)."""

    def __init__(self, monkeypatch, backend="blocked"):
        self.calls = []
        ops = backends.get(backend).ops
        for name, op in list(ops.items()):
            monkeypatch.setitem(ops, name, self._wrap(name, op))

    def _wrap(self, name, op):
        def run(problem, *arrays):
            self.calls.append((name, arrays))
            return op(problem, *arrays)

        return run

    def names(self):
        return [name for name, _ in self.calls]


# ---------------------------------------------------------------- numbers


@pytest.mark.parametrize("cfg", LAYERS, ids=str)
def test_layer_matches_dense_reference(cfg):
    torch.manual_seed(0)
    module = cfg.build().double().eval()
    _randomize_rpb(module)
    x = _input(cfg).requires_grad_(True)
    with na_rtc.use_backend("reference"):
        out = module(x)
    expected = dense_layer(module, x)
    assert out.shape == x.shape
    assert_close(out, expected, torch.float64, "forward", "output")

    grad = torch.randn_like(out)
    params = [p for p in (x, module.qkv.weight, module.qkv.bias, module.rpb) if p is not None]
    got = torch.autograd.grad(out, params, grad)
    want = torch.autograd.grad(expected, params, grad)
    for name, a, b in zip(("x", "qkv.weight", "qkv.bias", "rpb"), got, want):
        assert_close(a, b, torch.float64, "grad", name)


@pytest.mark.parametrize("cfg", SMALL, ids=str)
def test_layer_on_emulator_matches_dense_reference(cfg):
    torch.manual_seed(0)
    module = cfg.build().eval()
    _randomize_rpb(module)
    x = _input(cfg, torch.float32)
    with na_rtc.use_backend("emulator"):
        out = module(x)
    assert_close(out, dense_layer(module.double(), x.double()), torch.float32, "forward", "output")


@pytest.mark.parametrize("cfg", [c for c in LAYERS if max(c.kwargs()["stride"]) == 1], ids=str)
def test_split_and_fused_paths_agree(cfg, monkeypatch):
    torch.manual_seed(0)
    module = cfg.build().double()
    _randomize_rpb(module)
    x = _input(cfg).requires_grad_(True)
    fused = module(x)
    fused_grads = torch.autograd.grad(fused.square().sum(), [x, *module.parameters()])
    recorder = Recorder(monkeypatch)
    monkeypatch.setattr(module, "_use_split_path", lambda: True)
    split = module(x)
    split_grads = torch.autograd.grad(split.square().sum(), [x, *module.parameters()])
    assert "qk_forward" in recorder.names() and "fused_forward" not in recorder.names()
    assert_close(split, fused, torch.float64, "forward", "output")
    for a, b in zip(split_grads, fused_grads):
        assert_close(a, b, torch.float64, "grad", "gradient")


def test_padding_equals_explicit_zero_padding():
    module = NeighborhoodAttention2D(8, 2, 3, dilation=(2, 1), rel_pos_bias=True).double().eval()
    x = torch.randn(1, 4, 2, 8, dtype=torch.float64)
    padded = F.pad(x, (0, 0, 0, 1, 0, 2))  # to 6 x 3 = kernel_size * dilation
    torch.testing.assert_close(module(x), module(padded)[:, :4, :2], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- paths


@pytest.mark.parametrize("training, attn_drop, expected", [
    (True, 0.3, "split"),
    (False, 0.3, "fused"),
    (True, 0.0, "fused"),
], ids=["train-dropout", "eval-dropout", "train-no-dropout"])
def test_path_choice(training, attn_drop, expected, monkeypatch):
    module = NeighborhoodAttention2D(8, 2, 3, rel_pos_bias=True, attn_drop=attn_drop).train(training)
    recorder = Recorder(monkeypatch)
    module(torch.randn(1, 5, 5, 8)).sum().backward()
    names = recorder.names()
    if expected == "split":
        assert names == ["qk_forward", "av_forward", "av_backward", "qk_backward"]
    else:
        assert names == ["fused_forward", "fused_backward"]


def test_attention_dropout_is_applied_in_training_only():
    torch.manual_seed(0)
    module = NeighborhoodAttention1D(8, 2, 5, attn_drop=0.5)
    x = torch.randn(2, 16, 8)
    a, b = module(x), module(x)
    assert not torch.allclose(a, b)  # a fresh dropout mask each call
    module.eval()
    torch.testing.assert_close(module(x), module(x))
    assert not torch.allclose(module(x), a)


def test_qkv_reaches_the_op_as_views_of_one_buffer(monkeypatch):
    recorder = Recorder(monkeypatch)
    NeighborhoodAttention2D(8, 2, 3).eval()(torch.randn(1, 5, 6, 8))
    (name, (q, k, v, _)), = recorder.calls
    assert name == "fused_forward"
    storage = {t.untyped_storage().data_ptr() for t in (q, k, v)}
    assert len(storage) == 1, "q, k and v were copied out of the qkv projection"
    assert not q.is_contiguous()


def test_stride_with_attention_dropout_in_training_is_an_error():
    module = NeighborhoodAttention2D(8, 2, 3, stride=2, attn_drop=0.1)
    with pytest.raises(ValueError, match="attn_drop.*stride"):
        module(torch.randn(1, 6, 6, 8))
    assert module.eval()(torch.randn(1, 6, 6, 8)).shape == (1, 6, 6, 8)


# ---------------------------------------------------------------- parameters and state


@pytest.mark.parametrize("ndim, kwargs, expected", [
    # qkv (C*3C + 3C) + proj (C*C + C) + rpb (heads * (2k-1)^ndim), C = 16, heads = 2, k = 5;
    # the same counts NATTEN 0.14/0.17's modules give for these arguments.
    (1, dict(rel_pos_bias=True), 16 * 48 + 48 + 16 * 16 + 16 + 2 * 9),
    (1, dict(qkv_bias=False), 16 * 48 + 16 * 16 + 16),
    (2, dict(rel_pos_bias=True), 16 * 48 + 48 + 16 * 16 + 16 + 2 * 9 * 9),
    (2, dict(), 16 * 48 + 48 + 16 * 16 + 16),
    (3, dict(rel_pos_bias=True), 16 * 48 + 48 + 16 * 16 + 16 + 2 * 9 * 9 * 9),
], ids=["1d-rpb", "1d-no-qkv-bias", "2d-rpb", "2d", "3d-rpb"])
def test_parameter_count(ndim, kwargs, expected):
    module = MODULES[ndim](16, 2, 5, **kwargs)
    assert sum(p.numel() for p in module.parameters()) == expected


def test_state_dict_keys_and_rpb_shape():
    module = NeighborhoodAttention2D(16, 4, (3, 5), rel_pos_bias=True)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes == {"rpb": (4, 5, 9), "qkv.weight": (48, 16), "qkv.bias": (48,), "proj.weight": (16, 16),
                      "proj.bias": (16,)}
    assert "rpb" not in NeighborhoodAttention2D(16, 4, 3).state_dict()


def test_3d_state_dict_keys_and_rpb_shape():
    # NATTEN's [heads, 2kd - 1, 2k - 1, 2k - 1] for a depth window and a square one, or any per-axis sizes
    module = NeighborhoodAttention3D(16, 4, (3, 5, 5), rel_pos_bias=True)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes == {"rpb": (4, 5, 9, 9), "qkv.weight": (48, 16), "qkv.bias": (48,), "proj.weight": (16, 16),
                      "proj.bias": (16,)}
    assert tuple(NeighborhoodAttention3D(16, 4, (3, 5, 7), rel_pos_bias=True).rpb.shape) == (4, 5, 9, 13)
    assert "rpb" not in NeighborhoodAttention3D(16, 4, 3).state_dict()


def test_rpb_init_is_normal_with_std_002():
    torch.manual_seed(0)
    rpb = NeighborhoodAttention2D(64, 64, 13, rel_pos_bias=True).rpb.detach()
    assert rpb.numel() == 64 * 25 * 25
    assert abs(rpb.std().item() - 0.02) < 0.001 and abs(rpb.mean().item()) < 0.001


def test_state_dict_round_trip_from_reference_to_emulator():
    torch.manual_seed(0)
    source = NeighborhoodAttention2D(12, 3, 3, dilation=(1, 2), rel_pos_bias=True).eval()
    _randomize_rpb(source)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target = NeighborhoodAttention2D(12, 3, 3, dilation=(1, 2), rel_pos_bias=True).eval()
    target.load_state_dict(torch.load(buffer, map_location="cpu"))
    x = torch.randn(2, 5, 7, 12)
    with na_rtc.use_backend("reference"):
        expected = source(x)
    with na_rtc.use_backend("emulator"):
        got = target(x)
    assert_close(got, expected, torch.float32, "forward", "output")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_state_dict_round_trip_between_cpu_and_cuda():
    torch.manual_seed(0)
    source = NeighborhoodAttention2D(16, 2, 5, rel_pos_bias=True).cuda().eval()
    target = NeighborhoodAttention2D(16, 2, 5, rel_pos_bias=True).eval()
    target.load_state_dict({k: v.cpu() for k, v in source.state_dict().items()})
    x = torch.randn(2, 9, 9, 16)
    assert_close(source(x.cuda()), target(x), torch.float32, "forward", "output")


def test_extra_repr_shows_the_window():
    text = repr(NeighborhoodAttention1D(16, 2, 5, dilation=2, rel_pos_bias=True))
    for part in ("embed_dim=16", "num_heads=2", "head_dim=8", "kernel_size=(5,)", "dilation=(2,)",
                 "rel_pos_bias=True"):
        assert part in text


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((16, 3, 5), {}, ValueError, "embed_dim.*divisible by num_heads"),
    ((16, 0, 5), {}, ValueError, "num_heads"),
    ((16.0, 2, 5), {}, TypeError, "embed_dim"),
    ((16, 2, 1), {}, ValueError, "kernel_size"),
    ((16, 2, 2.5), {}, TypeError, "kernel_size"),
    ((16, 2, 5), dict(stride=6), ValueError, "stride"),
    ((16, 2, 5), dict(dilation=0), ValueError, "dilation"),
    ((16, 2, 4), dict(rel_pos_bias=True), ValueError, "rel_pos_bias.*odd"),
    ((16, 2, 5), dict(rel_pos_bias=True, is_causal=True), ValueError, "rel_pos_bias.*is_causal"),
    ((16, 2, 5), dict(is_causal=1), TypeError, "is_causal"),
    ((16, 2, 5), dict(attn_drop=1.0), ValueError, "attn_drop"),
    ((16, 2, 5), dict(proj_drop="0.1"), TypeError, "proj_drop"),
    ((16, 2, 5), dict(qk_scale="x"), TypeError, "qk_scale"),
], ids=["heads-divide", "zero-heads", "float-dim", "kernel-1", "float-kernel", "stride", "dilation", "rpb-even",
        "rpb-causal", "causal-int", "attn-drop", "proj-drop-str", "qk-scale"])
def test_constructor_rejects_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        NeighborhoodAttention1D(*args, **kwargs)


@pytest.mark.parametrize("layer", [NeighborhoodAttention1D, NeighborhoodAttention2D], ids=["1d", "2d"])
def test_natten_style_positional_arguments_say_which_keyword_and_where_natten_order_lives(layer):
    # NATTEN 0.14/0.17 code: NeighborhoodAttention2D(dim, num_heads, kernel_size, dilation)
    with pytest.raises(TypeError) as raised:
        layer(16, 2, 5, 2)
    text = str(raised.value)
    name = layer.__name__
    assert text.startswith(f"{name}() takes embed_dim, num_heads and kernel_size positionally, but got 4")
    assert "_NeighborhoodAttention" not in text
    assert f"{name}(embed_dim, num_heads, kernel_size, dilation=2)" in text and "stride=2" in text
    assert "NATTEN releases disagree on the fourth argument" in text
    assert f"na_rtc.compat.natten014.{name}" in text and f"na_rtc.compat.natten017.{name}" in text
    # the layers named there do take NATTEN's positional order
    from na_rtc.compat import natten014, natten017

    for compat in (natten014, natten017):
        assert getattr(compat, name)(16, 2, 5, 2)._window[2] == (2,) * layer.ndim  # normalized dilation


def test_3d_positional_arguments_name_every_natten_meaning_of_the_fourth():
    # NATTEN 0.15: NeighborhoodAttention3D(dim, num_heads, kernel_size, kernel_size_d, ...); 0.17: dilation fourth
    with pytest.raises(TypeError) as raised:
        NeighborhoodAttention3D(16, 2, 5, 3)
    text = str(raised.value)
    assert text.startswith("NeighborhoodAttention3D() takes embed_dim, num_heads and kernel_size positionally")
    assert "(kernel_size_d in 0.15, dilation in 0.17, stride in later ones)" in text
    assert "na_rtc.compat.natten017.NeighborhoodAttention3D, which also keeps" in text and "natten014" not in text
    from na_rtc.compat import natten017

    assert natten017.NeighborhoodAttention3D(16, 2, 5, 3)._window[2] == (3, 3, 3)


@pytest.mark.parametrize("args, kwargs, match", [
    ((16, 2), {}, "missing 1 required positional argument: 'kernel_size'"),
    ((16, 2, 5), dict(bias=True), "got an unexpected keyword argument 'bias'"),
], ids=["missing-kernel-size", "natten-014-keyword"])
def test_python_argument_errors_name_the_public_class(args, kwargs, match):
    for layer in (NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D):
        with pytest.raises(TypeError, match=rf"^{layer.__name__}\.__init__\(\) {match}"):
            layer(*args, **kwargs)


def test_the_signature_shows_keyword_only_arguments():
    text = str(inspect.signature(NeighborhoodAttention2D))
    assert text.startswith("(embed_dim, num_heads, kernel_size, *, stride=1, dilation=1, is_causal=False")


@pytest.mark.parametrize("shape, match", [((1, 8, 16), "rank 4"), ((1, 8, 8, 12), "embed_dim=16")],
                         ids=["rank", "channels"])
def test_forward_rejects_bad_input(shape, match):
    with pytest.raises(ValueError, match=match):
        NeighborhoodAttention2D(16, 2, 3)(torch.randn(*shape))


def test_3d_forward_rejects_a_2d_input_naming_the_layout():
    with pytest.raises(ValueError, match=r"rank 5 \[batch, depth, height, width, embed_dim\], got shape \(1, 8, 8, 16\)"):
        NeighborhoodAttention3D(16, 2, 3)(torch.randn(1, 8, 8, 16))


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((16, 2, (3, 3)), {}, TypeError, "kernel_size must be an int or a tuple of 3 ints"),
    ((16, 2, 3), dict(is_causal=(True, False)), TypeError, "is_causal must be a bool or a tuple of 3 bools"),
    ((16, 2, (3, 4, 3)), dict(rel_pos_bias=True), ValueError, "rel_pos_bias needs an odd kernel_size"),
    ((16, 2, 3), dict(rel_pos_bias=True, is_causal=(True, False, False)), ValueError, "rel_pos_bias.*is_causal"),
    ((16, 2, 3), dict(stride=(1, 4, 1)), ValueError, "stride"),
], ids=["kernel-pair", "causal-pair", "rpb-even", "rpb-causal-in-time", "stride"])
def test_3d_constructor_rejects_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        NeighborhoodAttention3D(*args, **kwargs)


@pytest.mark.skipif(not na_rtc.backends.get("emulator").probe()[0], reason="emulator needs a C++ compiler")
def test_3d_layer_runs_on_a_forced_kernel_backend():
    module = NeighborhoodAttention3D(8, 2, 3, rel_pos_bias=True).eval()
    x = torch.randn(1, 3, 4, 5, 8)
    with torch.no_grad():
        with na_rtc.use_backend("emulator"):
            got = module(x)
        want = module(x)  # automatic selection: the reference
    assert_close(got, want, "float32", "forward", "out")


def test_exported_lazily_from_na_rtc():
    code = textwrap.dedent("""
        import sys, na_rtc
        assert "torch" not in sys.modules
        assert "NeighborhoodAttention2D" in dir(na_rtc) and "NeighborhoodAttention1D" not in na_rtc.__all__
        assert "NeighborhoodAttention3D" in dir(na_rtc) and "NeighborhoodAttention3D" not in na_rtc.__all__
        exec("from na_rtc import *", {})  # a star import stays free of torch too
        assert "torch" not in sys.modules
        cls = na_rtc.NeighborhoodAttention2D
        from na_rtc.modules import NeighborhoodAttention2D
        assert cls is NeighborhoodAttention2D and "torch" in sys.modules
    """)
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- torch.compile and autocast


class _Model(torch.nn.Module):
    def __init__(self, attn_drop=0.0, stride=2):
        super().__init__()
        self.na2d = NeighborhoodAttention2D(8, 2, 3, dilation=(1, 2), rel_pos_bias=True, attn_drop=attn_drop)
        self.na1d = NeighborhoodAttention1D(8, 2, 5, stride=stride, is_causal=True, attn_drop=attn_drop)

    def forward(self, x):
        x = x + self.na2d(x)
        return x + self.na1d(x.flatten(1, 2))[:, :, None].reshape(x.shape)


@pytest.mark.parametrize("backend", ["reference", pytest.param("emulator", marks=pytest.mark.skipif(
    not na_rtc.backends.get("emulator").probe()[0], reason="emulator needs a C++ compiler"))])
def test_compiled_model_matches_eager(backend):
    torch.manual_seed(0)
    model = _Model().eval()
    x = torch.randn(2, 3, 4, 8, requires_grad=True)  # 3 x 4 < 3 x 6: padded on the second axis
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with na_rtc.use_backend(backend):
        out = compiled(x)  # first: tracing must not depend on an earlier eager call
        grads = torch.autograd.grad(out.square().sum(), [x, *model.parameters()])
        eager = model(x)
        eager_grads = torch.autograd.grad(eager.square().sum(), [x, *model.parameters()])
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


class _Video(torch.nn.Module):
    """A 3D layer causal in time with a bias-carrying one after it."""

    def __init__(self, attn_drop=0.0):
        super().__init__()
        self.causal = NeighborhoodAttention3D(8, 2, (2, 3, 3), stride=(1, 2, 1), is_causal=(True, False, False))
        self.biased = NeighborhoodAttention3D(8, 2, 3, dilation=(1, 1, 2), rel_pos_bias=True, attn_drop=attn_drop)

    def forward(self, x):
        x = x + self.causal(x)
        return x + self.biased(x)


def test_compiled_3d_model_matches_eager():
    torch.manual_seed(0)
    model = _Video().eval()
    x = torch.randn(2, 3, 4, 5, 8, requires_grad=True)  # width 5 < 3 * 2: padded on the last axis
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *model.parameters()])
    eager = model(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), [x, *model.parameters()])
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)
    model.train()  # and the split path, with attention dropout, traces too
    model.biased.attn_drop.p = 0.2
    torch._dynamo.reset()
    torch.compile(model, fullgraph=True, backend="aot_eager")(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_compiled_split_path_traces_without_graph_breaks():
    model = _Model(attn_drop=0.2, stride=1).train()  # the split path has no stride
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 4, 8, requires_grad=True)
    compiled(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend, dtype, ndim", [("reference", torch.bfloat16, 2), ("reference", torch.float16, 2),
                                                  ("emulator", torch.bfloat16, 2), ("reference", torch.bfloat16, 3)],
                         ids=["reference-bf16", "reference-fp16", "emulator-bf16", "3d-reference-bf16"])
def test_autocast(backend, dtype, ndim):
    torch.manual_seed(0)
    module = MODULES[ndim](16, 2, 3, rel_pos_bias=True).eval()
    _randomize_rpb(module)
    x = torch.randn(2, *(3, 5, 6)[-ndim:], 16)
    with na_rtc.use_backend(backend):
        expected = module(x)
        with torch.autocast("cpu", dtype=dtype):
            out = module(x)
        assert out.dtype == dtype
        out.float().square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
    assert module.rpb.grad.abs().sum() > 0
    # Activations rounded to dtype at each step (qkv, attention, proj): a few
    # roundings of O(1) values, within the forward tolerance of the dtype.
    assert_close(out, expected, dtype, "forward", "output")
