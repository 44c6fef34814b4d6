"""Heads-first tensors given to heads-last ops (and the reverse in na_rtc.compat): the
shape errors say which layout the call takes and where the other layout's code goes,
and a shape that strongly suggests the other layout gets one LayoutWarning.

The guess must never fire on a shape the project itself uses. The test suite checks
that as it runs (pyproject.toml turns a LayoutWarning into an error in every test);
the last tests here collect the shapes the examples and the benchmark presets give
na_rtc and assert that the guess stays silent on each.
"""

from __future__ import annotations

import builtins
import importlib.util
import runpy
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import na_rtc
from na_rtc import _layouts
from na_rtc.compat import natten014, natten017

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_memory(monkeypatch):
    """Each test starts with no shape warned about yet (the warning is once per shape and process)."""
    monkeypatch.setattr(_layouts, "_warned", set())


def _layout_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [w for w in caught if issubclass(w.category, na_rtc.LayoutWarning)]


HEADS_FIRST_2D = np.zeros((1, 4, 20, 20, 32), np.float32)  # NATTEN 0.14's [B, H, X, Y, D]
HEADS_LAST_2D = np.zeros((1, 20, 20, 4, 32), np.float32)


# ---------------------------------------------------------------- na_rtc's ops given heads-first tensors


def test_the_issue_example_warns_once_naming_the_mix_up_and_the_silencer():
    caught = _layout_warnings(lambda: na_rtc.na2d(HEADS_FIRST_2D, HEADS_FIRST_2D, HEADS_FIRST_2D, 3))
    assert len(caught) == 1
    text = str(caught[0].message)
    for part in ("(1, 4, 20, 20, 32)", "20 heads on a 4 x 20 map", "looks heads-first", "4 heads on a 20 x 20 map",
                 "x.permute(0, 2, 3, 1, 4)", "na_rtc.compat.natten014",
                 "warnings.filterwarnings('ignore', category=na_rtc.LayoutWarning)"):
        assert part in text, part
    assert caught[0].filename == __file__  # points at the caller's line, not into na_rtc
    # once per shape: the next calls of the training loop stay quiet, whatever the op
    assert not _layout_warnings(lambda: na_rtc.na2d(HEADS_FIRST_2D, HEADS_FIRST_2D, HEADS_FIRST_2D, 3))
    assert not _layout_warnings(lambda: na_rtc.na2d_qk(HEADS_FIRST_2D, HEADS_FIRST_2D, 3))


@pytest.mark.parametrize("op", ["fused", "qk", "av", "fused-backward"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_every_op_warns_on_a_heads_first_looking_tensor(op, kind):
    x = HEADS_FIRST_2D if kind == "numpy" else torch.from_numpy(HEADS_FIRST_2D)
    attn = x[..., :9]
    calls = {"fused": lambda: na_rtc.na2d(x, x, x, 3), "qk": lambda: na_rtc.na2d_qk(x, x, 3),
             "av": lambda: na_rtc.na2d_av(attn, x, 3), "fused-backward": lambda: na_rtc.na2d_backward(x, x, x, x, 3)}
    assert len(_layout_warnings(calls[op])) == 1


HEADS_FIRST_3D = np.zeros((1, 8, 16, 32, 32, 4), np.float32)  # [B, H=8, T=16, 32, 32, D]


def test_3d_heads_first_warns_and_shape_errors_spot_it():
    (caught,) = _layout_warnings(lambda: na_rtc.na3d_qk(HEADS_FIRST_3D, HEADS_FIRST_3D, 3))
    text = str(caught.message)
    assert "32 heads on a 8 x 16 x 32 volume" in text and "8 heads on a 16 x 32 x 32 volume" in text
    assert "x.permute(0, 2, 3, 4, 1, 5)" in text
    with pytest.raises(ValueError) as raised:
        na_rtc.na3d(HEADS_FIRST_3D, HEADS_FIRST_3D, HEADS_FIRST_3D, (9, 3, 3))
    text = str(raised.value)
    assert "looks heads-first" in text and "na_rtc.compat.natten017" in text and "natten014" not in text


def test_3d_compat_warns_on_a_heads_last_looking_tensor():
    x = torch.zeros(1, 16, 32, 32, 8, 4)  # heads-last: 8 heads on 16 frames of 32 x 32
    (caught,) = _layout_warnings(lambda: natten017.na3d_qk(x, x, 3))
    assert "looks heads-last" in str(caught.message) and "na_rtc.na3d_qk / na3d_av" in str(caught.message)
    y = torch.zeros(1, 8, 16, 32, 32, 4)  # NATTEN's own heads-first layout: silent
    assert not _layout_warnings(lambda: natten017.na3d_av(natten017.na3d_qk(y, y, 3), y, 3, 1))


def test_1d_heads_first_warns():
    x = np.zeros((2, 4, 64, 8), np.float32)  # [B, H=4, L=64, D] read as 4 tokens with 64 heads
    (caught,) = _layout_warnings(lambda: na_rtc.na1d(x, x, x, 3))
    assert "64 heads on a sequence of 4" in str(caught.message) and "x.permute(0, 2, 1, 3)" in str(caught.message)


def test_a_view_permuted_from_heads_first_is_deliberate_and_silent():
    # NATTEN-style contiguous heads-first tensors moved to heads-last correctly: the guess reads the
    # strides and keeps quiet even where the heads-last shape alone would look odd ([B, 8, 16, 16, D]).
    x = torch.zeros(1, 16, 8, 16, 4).permute(0, 2, 3, 1, 4)  # heads-last view of 16 heads on 8 x 16
    assert _layouts.looks_transposed(tuple(x.shape[1:-1]), _layouts.HEADS_LAST)
    assert not _layout_warnings(lambda: na_rtc.na2d(x, x, x, 3))
    # NATTEN's own module code makes heads-first views of a heads-last qkv buffer: still caught
    qkv = torch.zeros(1, 20, 20, 3, 4, 8).permute(3, 0, 4, 1, 2, 5)  # [3, B, H, X, Y, D]
    assert len(_layout_warnings(lambda: na_rtc.na2d(qkv[0], qkv[1], qkv[2], 3))) == 1


def test_the_documented_filter_silences_it():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=na_rtc.LayoutWarning)
        na_rtc.na2d(HEADS_FIRST_2D, HEADS_FIRST_2D, HEADS_FIRST_2D, 3)
    assert not caught


def test_torch_compile_traces_the_call_and_the_op_still_warns():
    na_rtc.use_backend("reference")
    try:
        x = torch.from_numpy(HEADS_FIRST_2D)
        compiled = torch.compile(lambda q: na_rtc.na2d(q, q, q, 3), fullgraph=True)  # warnings.warn would break it
        assert len(_layout_warnings(lambda: compiled(x))) == 1  # raised by the op when it runs
    finally:
        na_rtc.use_backend(None)


# ---------------------------------------------------------------- shape errors name the layout


NATIVE_ERRORS = {  # the heads-first tensor of the issue, with a window that does not fit its 4 "rows"
    "kernel-too-large": lambda: na_rtc.na2d(HEADS_FIRST_2D, HEADS_FIRST_2D, HEADS_FIRST_2D, 7),
    "key-shape": lambda: na_rtc.na2d(HEADS_FIRST_2D, HEADS_LAST_2D, HEADS_FIRST_2D, 3),
    "rpb-heads": lambda: na_rtc.na2d(HEADS_FIRST_2D, HEADS_FIRST_2D, HEADS_FIRST_2D, 3,
                                     rpb=np.zeros((4, 5, 5), np.float32)),
    "attn-shape": lambda: na_rtc.na2d_av(np.zeros((1, 20, 20, 4, 9), np.float32), HEADS_FIRST_2D, 3),
}


@pytest.mark.parametrize("call", NATIVE_ERRORS.values(), ids=NATIVE_ERRORS.keys())
def test_native_shape_errors_spot_the_heads_first_tensor(call):
    with pytest.raises(ValueError) as raised:
        call()
    text = str(raised.value)
    assert "looks heads-first" in text and "4 heads on a 20 x 20 map" in text
    assert "na_rtc's ops take heads-last tensors [batch, height, width, heads, head_dim]" in text
    assert "na_rtc.compat.natten014 / natten017" in text


COMPAT_ERRORS = {  # a heads-last tensor given to NATTEN's heads-first split ops
    "014-kernel-too-large": lambda x: natten014.natten2dqkrpb(x, x, None, 7, 1),
    "014-key-shape": lambda x: natten014.natten2dqk(x, x[:, :, :-1], 3, 1),
    "014-rpb-heads": lambda x: natten014.natten2dqkrpb(x, x, torch.zeros(4, 5, 5), 3, 1),
    "014-attn-shape": lambda x: natten014.natten2dav(torch.zeros(1, 4, 20, 20, 9), x, 3, 1),
    "017-kernel-too-large": lambda x: natten017.na2d_qk(x, x, 7),
    "017-av-kernel-too-large": lambda x: natten017.na2d_av(torch.zeros(1, 20, 20, 4, 49), x, 7),
}


@pytest.mark.parametrize("call", COMPAT_ERRORS.values(), ids=COMPAT_ERRORS.keys())
def test_compat_shape_errors_spot_the_heads_last_tensor(call):
    with pytest.raises(ValueError) as raised:
        call(torch.from_numpy(HEADS_LAST_2D))
    text = str(raised.value)
    assert "looks heads-last" in text and "4 heads on a 20 x 20 map" in text
    assert "na_rtc.compat's split ops take NATTEN's heads-first tensors" in text
    assert "na_rtc.na2d_qk / na2d_av" in text
    assert "na_rtc's ops take heads-last" not in text  # never the advice for the other side


# ---------------------------------------------------------------- na_rtc.compat given heads-last tensors


HEADS_LAST_1D = (1, 64, 4, 32)  # [B, L=64, H=4, D], read heads-first as 64 heads on 4 tokens


@pytest.mark.parametrize("call, shape", [
    (lambda x: natten014.natten2dqkrpb(x, x, torch.zeros(20, 5, 5), 3, 1), HEADS_LAST_2D.shape),
    (lambda x: natten014.natten2dav(x[..., :9], x, 3, 1), HEADS_LAST_2D.shape),
    (lambda x: natten017.na2d_qk(x, x, 3), HEADS_LAST_2D.shape),
    (lambda x: natten017.na2d_av(x[..., :9], x, 3), HEADS_LAST_2D.shape),
    (lambda x: natten014.natten1dqk(x, x, 3, 1), HEADS_LAST_1D),
    (lambda x: natten017.na1d_av(x[..., :3], x, 3), HEADS_LAST_1D),
], ids=["014-qk", "014-av", "017-qk", "017-av", "014-1d-qk", "017-1d-av"])
def test_compat_warns_on_a_heads_last_looking_tensor(call, shape):
    (caught,) = _layout_warnings(lambda: call(torch.zeros(shape)))
    text = str(caught.message)
    assert "looks heads-last" in text and "The call ran as heads-first" in text and "na_rtc.LayoutWarning" in text
    assert caught.filename == __file__


def test_compat_is_silent_on_natten_shapes_and_its_own_views():
    # NATTEN-layout inputs, contiguous and as NATTEN's module code makes them; the heads-last views the
    # compat functions hand to na_rtc's ops must not trip the heads-last guess either
    x = torch.zeros(1, 4, 20, 20, 32)
    qkv = torch.zeros(1, 16, 8, 3, 16, 4).permute(3, 0, 4, 1, 2, 5)  # 16 heads on 16 x 8, heads-first views
    rpb = torch.zeros(16, 5, 5)
    assert not _layout_warnings(lambda: natten014.natten2dav(natten014.natten2dqkrpb(x, x, None, 3, 1), x, 3, 1))
    assert not _layout_warnings(lambda: natten014.natten2dqkrpb(qkv[0], qkv[1], rpb, 3, 1))
    y = torch.zeros(1, 16, 8, 16, 4)  # contiguous 16 heads on 8 x 16: its heads-last view reads (8, 16, 16)
    assert not _layout_warnings(lambda: natten017.na2d_av(natten017.na2d_qk(y, y, 3), y, 3))


# ---------------------------------------------------------------- the rule, and silence on the project's shapes


@pytest.mark.parametrize("middle, reading, fires", [
    ((4, 20, 20), "heads-last", True),    # the issue: NATTEN's 4 heads on 20 x 20
    ((2, 56, 56), "heads-last", True),    # NAT stage 1, heads-first
    ((8, 14, 14), "heads-last", True),    # NAT stage 3, heads-first
    ((56, 56, 2), "heads-last", False),   # the same stages, heads-last as meant
    ((14, 14, 8), "heads-last", False),
    ((7, 7, 16), "heads-last", False),    # NAT stage 4: more heads than the map side
    ((7, 7, 48), "heads-last", False),    # DiNAT-L stage 4
    ((3, 5, 5), "heads-last", False),     # small: both readings plausible
    ((4096, 4), "heads-last", False),     # 1D, as meant
    ((4, 4096), "heads-last", True),      # 1D heads-first
    ((16, 32), "heads-last", False),      # 1D, 32 heads on 16 tokens: unusual, but not 4 times
    ((20, 20, 4), "heads-first", True),   # heads-last given to compat
    ((4, 20, 20), "heads-first", False),
    ((4096, 4), "heads-first", True),
    # 3D: [batch, time/depth, height, width, heads, dim]; only the frames (last two spatial axes) count
    ((8, 16, 32, 32), "heads-last", True),   # 8 heads on 16 frames of 32 x 32, heads-first
    ((16, 32, 32, 8), "heads-last", False),  # the same, heads-last as meant
    ((16, 24, 32, 8), "heads-last", False),  # frames not square: no evidence either way
    ((4, 32, 32, 32), "heads-last", False),  # a cube: 32 heads on 4 x 32 x 32 is as plausible as 4 on 32^3
    ((32, 16, 16, 48), "heads-last", False),  # more heads than the frame side
    ((2, 4, 4, 3), "heads-last", False),     # small
    ((16, 32, 32, 8), "heads-first", True),  # heads-last given to compat's 3D split ops
    ((8, 16, 32, 32), "heads-first", False),
])
def test_the_rule(middle, reading, fires):
    assert _layouts.looks_transposed(middle, reading) is fires


@pytest.fixture
def recorded(monkeypatch):
    """Every (middle axes, reading, verdict) the guess is asked about."""
    seen = []
    rule = _layouts.looks_transposed

    def recording(middle, reading):
        verdict = rule(middle, reading)
        seen.append((tuple(middle), reading, verdict))
        return verdict

    monkeypatch.setattr(_layouts, "looks_transposed", recording)
    return seen


def test_silent_on_every_benchmark_preset(recorded):
    from na_rtc.bench import presets

    specs = {spec.key: spec for group in presets.PRESETS.values() for spec in group}
    for spec in specs.values():
        _layouts.looks_transposed(spec.qkv_shape[1:-1], _layouts.HEADS_LAST)
    assert len(recorded) == len(specs) > 10
    assert [r for r in recorded if r[2]] == []


def _short_range(n, *rest):
    """``range`` for an example's training loop: one step shows every shape its calls use."""
    return builtins.range(n, *rest) if rest else builtins.range(min(n, 1))


def test_silent_on_every_shape_the_examples_use(recorded, capsys):
    runpy.run_path(str(ROOT / "examples" / "numpy_na2d.py"), run_name="__main__")
    runpy.run_path(str(ROOT / "examples" / "torch_na2d_layer.py"), init_globals={"range": _short_range},
                   run_name="__main__")
    spec = importlib.util.spec_from_file_location("nat_digits_shapes", ROOT / "examples" / "nat_digits.py")
    nat_digits = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = nat_digits  # its dataclasses look the module up while it executes
    try:
        spec.loader.exec_module(nat_digits)
        for config in (nat_digits.QUICK, nat_digits.FULL):
            for variant in ("nat", "dinat"):
                model = nat_digits.NATClassifier(config, variant).eval()
                with torch.no_grad():
                    model(torch.zeros(2, 1, config.image_size, config.image_size))
    finally:
        del sys.modules[spec.name]
    capsys.readouterr()
    shapes = {(middle, reading) for middle, reading, _ in recorded}
    assert len(shapes) >= 6  # the numpy and torch examples and every level of both digit models
    assert [r for r in recorded if r[2]] == []
