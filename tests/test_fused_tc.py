"""The tensor-core fused forward (``cuda_src/na_fused_tc.cu``) through the emulator.

* the fp16/bf16 configurations of the fused sweep (tests/test_fused.py: 1D
  and 2D, kernel sizes 2 to 65 and 255, dilation, stride 1 to k, every causal
  combination, rpb, scale, head dims up to 128, heads-first views, sizes that
  are not multiples of the tile) against the float64 reference: output and
  logsumexp within the tolerances of docs/design/testing.md#tolerances; plus LONG_BOXES, key
  boxes of many chunks for every (ndim, head dim), which the random sweep's
  small boxes do not reach;
* the tensor-core and SIMT kernels agree on the same inputs;
* dispatch: tensor cores serve fp16/bf16 with head dim <= 128 where allowed
  (sm_80+, the emulator, NA_RTC_TENSOR_CORES unset or 1), SIMT otherwise;
* run-to-run determinism.
"""

from __future__ import annotations

import pytest
import torch
import test_fused
from helpers import assert_close, kernel_policy, RecordingExecutor, sweep_bias, sweep_inputs

import na_rtc
from na_rtc.runtime import emulated
from na_rtc.runtime.dispatch import Dispatcher
from na_rtc.runtime.families import fused_tc
from na_rtc.runtime.policy import Policy

pytestmark = pytest.mark.skipif(not na_rtc.backends.get("emulator").probe()[0],
                                reason="emulator needs a C++ compiler")

CONFIGS = [c for c in test_fused.CONFIGS if c.dtype in fused_tc.DTYPES and c.head_dim <= 128]


def _run(cfg, tensor_cores=True, executor=emulated.run, arrays=None, wgmma=False):
    """The fused forward of ``cfg`` on the tensor-core kernels (the wgmma one with ``wgmma``) or SIMT."""
    (q, k, v), _ = sweep_inputs(cfg, 3) if arrays is None else (arrays, None)
    bias, _ = sweep_bias(cfg)
    problem = test_fused._problem(cfg, q, k, v, bias)
    kernels = Dispatcher(executor, kernel_policy(tensor_cores, wgmma))
    assert kernels.choose("forward", problem).path is not None
    return kernels.forward(problem, q, k, v, bias)


def _long_box(spatial, kernel, head_dim, dtype, rpb=False, causal=False):
    ndim = len(spatial)
    return test_fused.Config(spatial=spatial, kernel_size=kernel, dilation=(1,) * ndim, causal=(causal,) * ndim,
                             batch=1, heads=2, head_dim=head_dim, rpb=rpb, heads_first=False, dtype=dtype,
                             stride=(1,) * ndim)


#: key boxes of at least four chunks of the wgmma forward (more of the mma.sync one) for every (ndim,
#: head-dim bucket): the random sweep's boxes are mostly one or two chunks, which never reuse a stage of
#: the wgmma forward's three (nor, with two warpgroups in 1D, let one warpgroup start past chunk 0);
#: tests/test_fused_wg.py checks the chunk counts
LONG_BOXES = [
    _long_box((400,), (129,), 32, "float16", rpb=True),
    _long_box((400,), (129,), 64, "bfloat16"),
    _long_box((400,), (129,), 128, "float16"),
    _long_box((300,), (191,), 128, "bfloat16", rpb=True),
    _long_box((330,), (200,), 64, "float16", causal=True),
    _long_box((26, 20), (11, 9), 32, "bfloat16"),
    _long_box((26, 20), (11, 9), 64, "float16", rpb=True),
    _long_box((26, 20), (11, 9), 128, "bfloat16", rpb=True),
    _long_box((30, 22), (13, 13), 128, "float16", causal=True),
]


def test_the_sweep_has_both_dtypes_both_ndims_and_every_bucket():
    assert {c.dtype for c in CONFIGS} == set(fused_tc.DTYPES) and {c.ndim for c in CONFIGS} == {1, 2}
    assert {fused_tc.head_dim_bucket(c.head_dim) for c in CONFIGS} == set(fused_tc.HEAD_DIMS)
    assert any(c.rpb for c in CONFIGS) and any(any(c.causal) for c in CONFIGS)
    assert any(s > 1 for c in CONFIGS for s in c.stride) and any(d > 1 for c in CONFIGS for d in c.dilation)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_tensor_core_forward_matches_reference(cfg):
    recorder = RecordingExecutor()
    out, lse = _run(cfg, executor=recorder)
    assert len(recorder.names) == 1 and recorder.names[0].startswith("na_fused_tc_fwd<")
    test_fused.assert_forward_matches_reference(cfg, out, lse)


@pytest.mark.parametrize("cfg", CONFIGS[::4], ids=str)
def test_tensor_core_and_simt_kernels_agree(cfg):
    tc_out, tc_lse = _run(cfg, tensor_cores=True)
    simt_out, simt_lse = _run(cfg, tensor_cores=False)
    assert_close(tc_out, simt_out.double(), cfg.dtype, "forward", "out")
    assert_close(tc_lse, simt_lse.double(), cfg.dtype, "forward", "lse")


def test_tensor_core_forward_is_deterministic():
    cfg = next(c for c in CONFIGS if c.ndim == 2 and c.rpb)
    first, second = _run(cfg), _run(cfg)
    for a, b in zip(first, second):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _problem(ndim, dtype, head_dim):
    q = torch.empty((1, *(20,) * ndim, 2, head_dim), dtype=getattr(torch, dtype))
    return na_rtc._args.fused_problem(ndim, q, q, q, 5, 1, 1, False, None, None)


@pytest.mark.parametrize("ndim, dtype, head_dim, allowed, expected", [
    (1, "float16", 64, True, "na_fused_tc_fwd<fp16_t, 64, 128, 1, 32, 2>"),
    (2, "bfloat16", 100, True, "na_fused_tc_fwd<bf16_t, 128, 8, 8, 32, 1>"),
    (2, "float16", 24, True, "na_fused_tc_fwd<fp16_t, 32, 16, 8, 64, 2>"),
    (2, "float16", 64, False, "na_fused_fwd<fp16_t, 64, 8, 4>"),     # not allowed (pre-sm_80 GPU, or disabled)
    (1, "float32", 64, True, "na_fused_fwd<float, 64, 32, 1>"),      # fp32: SIMT
    (2, "bfloat16", 256, True, "na_fused_fwd<bf16_t, 256, 4, 2>"),   # head dim > 128: SIMT
])
def test_dispatch(ndim, dtype, head_dim, allowed, expected):
    choice = Dispatcher(emulated.run, Policy.of(tensor_cores=allowed)).choose("forward", _problem(ndim, dtype, head_dim))
    assert choice.kernels == (expected,)
    if not allowed:
        assert dict(choice.skipped)["mma.sync"] == "tensor cores are off (NA_RTC_TENSOR_CORES=0)"


# the instantiations NA_RTC_TC_WARP_ROWS selects (16 rows per warp where the table picks 32): every one
# of them, through a quarter of the sweep
def _instantiation(cfg):
    return cfg.ndim, fused_tc.head_dim_bucket(cfg.head_dim)


def every_nth_covering(configs, n, key):
    """Every n-th of ``configs``, plus the first of each ``key(config)`` value that those miss."""
    chosen = configs[::n]
    seen = {key(c) for c in chosen}
    for c in configs:
        if key(c) not in seen:
            chosen.append(c)
            seen.add(key(c))
    return chosen


ALTERNATIVES = every_nth_covering(
    [c for c in CONFIGS if fused_tc.FORWARD_ALTERNATIVES[fused_tc.head_dim_bucket(c.head_dim)]], 4, _instantiation)


def test_every_alternative_instantiation_is_in_the_sweep():
    assert {_instantiation(c) for c in ALTERNATIVES} == {
        (ndim, hd) for ndim in (1, 2) for hd, alternatives in fused_tc.FORWARD_ALTERNATIVES.items() if alternatives}


@pytest.mark.parametrize("cfg", ALTERNATIVES, ids=str)
def test_sixteen_rows_per_warp_matches_reference(cfg, monkeypatch):
    monkeypatch.setenv("NA_RTC_TC_WARP_ROWS", "16")
    recorder = RecordingExecutor()
    out, lse = _run(cfg, executor=recorder)
    assert recorder.names[0].endswith(", 1>"), recorder.names
    (q, _, _), (q64, k64, v64) = sweep_inputs(cfg, 3)
    _, bias64 = sweep_bias(cfg)
    want_out, want_lse = test_fused._reference(cfg, q64, k64, v64, bias64)
    assert_close(out, want_out, cfg.dtype, "forward", "out")
    assert_close(lse, want_lse, cfg.dtype, "forward", "lse")


def _call_choice(backend, problem):
    """The forward a call of ``problem`` on ``backend`` would run: its policy read from the settings now."""
    return Dispatcher(None, Policy.for_call(backend, problem)).choose("forward", problem)


def test_warp_rows_setting(monkeypatch):
    monkeypatch.setenv("NA_RTC_TC_WARP_ROWS", "16")
    assert _call_choice("emulator", _problem(1, "float16", 64)).kernels == ("na_fused_tc_fwd<fp16_t, 64, 64, 1, 64, 1>",)
    monkeypatch.setenv("NA_RTC_TC_WARP_ROWS", "32")  # not built for head dim 128: the table's choice
    assert _call_choice("emulator", _problem(2, "bfloat16", 128)).kernels == (
        "na_fused_tc_fwd<bf16_t, 128, 8, 8, 32, 1>",)
    monkeypatch.setenv("NA_RTC_TC_WARP_ROWS", "8")
    q = torch.zeros(1, 20, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="NA_RTC_TC_WARP_ROWS"):
        na_rtc.na1d(q, q, q, 5, backend="emulator")


def test_the_emulator_runs_tensor_cores_unless_disabled(monkeypatch):
    problem = _problem(2, "float16", 64)
    assert _call_choice("emulator", problem).path == "mma.sync"
    monkeypatch.setenv("NA_RTC_TENSOR_CORES", "0")
    choice = _call_choice("emulator", problem)
    assert choice.path == "simt" and dict(choice.skipped)["mma.sync"] == "tensor cores are off (NA_RTC_TENSOR_CORES=0)"


def test_cuda_policy_follows_the_device_architecture(monkeypatch):
    from na_rtc.runtime import cuda

    problem = _problem(1, "bfloat16", 64)
    for arch, expected in ((75, "simt"), (80, "mma.sync"), (90, "mma.sync")):
        monkeypatch.setattr(cuda, "arch_of", lambda device, arch=arch: arch)
        choice = _call_choice("cuda", problem)
        assert choice.path == expected
        if arch < 80:
            assert dict(choice.skipped)["mma.sync"] == "its kernels run on sm_80 and newer; this GPU is sm_75"


@pytest.mark.parametrize("poisoned", ["key", "value"])
def test_nan_reach_on_tensor_cores(poisoned):
    """A NaN key poisons exactly the queries that see it (masked logits are replaced, not multiplied);
    a NaN value poisons those and at most other queries of the same block tile (0 * NaN in P V)."""
    check_nan_reach(poisoned, fused_tc.TILES[1, fused_tc.config(32).mma_tiles][0])


def check_nan_reach(poisoned, tile, wgmma=False):
    """The NaN reach of the forward on 150 tokens, k = 9, head dim 32, ``tile`` queries per block."""
    cfg = test_fused.Config((150,), (9,), (1,), (False,), 1, 1, 32, False, False, "float16", (1,))
    (q, k, v), _ = sweep_inputs(cfg, 3)
    k, v = k.clone(), v.clone()
    (k if poisoned == "key" else v)[0, 77, 0, 3] = float("nan")
    out, _ = _run(cfg, arrays=(q, k, v), wgmma=wgmma)
    bad = ~torch.isfinite(out[0, :, 0].float()).all(-1)
    starts = [min(max(i - 4, 0), 150 - 9) for i in range(150)]
    sees = torch.tensor([s <= 77 < s + 9 for s in starts])
    same_tile = torch.tensor([i // tile == 77 // tile for i in range(150)])
    assert sees.any() and bool((bad >= sees).all()), "a query whose window holds the NaN is finite"
    if poisoned == "key":
        assert torch.equal(bad, sees)
    else:
        assert bool((bad <= same_tile).all()), "a query of another tile is poisoned"


@pytest.mark.parametrize("cfg", LONG_BOXES, ids=str)
def test_tensor_core_forward_over_long_key_boxes(cfg):
    """The mma.sync forward streams these boxes through both stages many times over."""
    recorder = RecordingExecutor()
    out, lse = _run(cfg, executor=recorder)
    assert recorder.names[0].startswith("na_fused_tc_fwd<")
    test_fused.assert_forward_matches_reference(cfg, out, lse)
