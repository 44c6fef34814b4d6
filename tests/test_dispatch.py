"""The dispatch (na_rtc/runtime/dispatch.py): its cost per call and what it tells the user.

* each coverage rule runs at most once per call, and each setting is read once per call (counted by
  wrapping the rules and ``na_rtc.config``'s readers);
* ``na_rtc.explain`` names exactly the kernels the call launches, and for every candidate passed over the
  reason: a setting, the architecture, what a family does not cover, a failed first-use verification;
* the ``na_rtc.dispatch`` logger reports each decision at debug level;
* ``python -m na_rtc bench --explain`` and the benchmark's host-overhead entry.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter

import numpy as np
import pytest
import torch
from helpers import requires_nvrtc

import na_rtc
from na_rtc import backends, config
from na_rtc.runtime import ops, registry
from na_rtc.runtime.families import FAMILIES

EMULATOR = pytest.mark.skipif(not backends.get("emulator").probe()[0], reason="emulator needs a C++ compiler")


class Recorder:
    """An executor that runs nothing and remembers the kernels of the plans it is given."""

    def __init__(self):
        self.names = []

    def __call__(self, plan):
        self.names.append(plan.kernel.name)


@pytest.fixture
def recorded(monkeypatch) -> Recorder:
    """The emulator backend's op table on a recorder: the dispatch runs as on any call, nothing is launched."""
    recorder = Recorder()
    monkeypatch.setattr(backends.get("emulator"), "_ops", ops.make_ops(recorder, "emulator"))
    monkeypatch.delenv("NA_RTC_WGMMA", raising=False)
    monkeypatch.delenv("NA_RTC_TENSOR_CORES", raising=False)
    return recorder


@pytest.fixture
def counted_rules(request) -> Counter:
    """Every coverage rule of every family wrapped: (family, role, dtype arguments) -> calls."""
    calls = Counter()

    def counting(key, covers):
        def rule(problem, policy, *args):
            calls[(*key, args)] += 1
            return covers(problem, policy, *args)
        return rule

    for name, family in list(FAMILIES.items()):
        if not family.roles:
            continue
        shared = {}  # roles sharing one rule share one wrapper: the dispatcher's memo sees them as one rule
        roles = {}
        for role_name, role in family.roles.items():
            if role.covers not in shared:
                shared[role.covers] = counting((name, role_name), role.covers)
            roles[role_name] = role._replace(covers=shared[role.covers])
        previous = registry.replace(dataclasses.replace(family, roles=roles))
        request.addfinalizer(lambda previous=previous: registry.replace(previous))
    return calls


def _arrays(shape, dtype, count=3, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(dtype) for _ in range(count)]


# ---------------------------------------------------------------- cost per call

CALLS = {
    "2d-fp16-mma.sync": (2, np.float16, (1, 12, 10, 2, 32), 5, 1),
    "1d-fp32-simt": (1, np.float32, (1, 40, 2, 24), 7, 1),
    "1d-fp64-composed": (1, np.float64, (1, 30, 2, 16), 5, 1),
    "2d-fp16-strided": (2, np.float16, (1, 12, 10, 2, 32), 5, 2),
}


@pytest.mark.parametrize("wgmma", ["0", "1"])
@pytest.mark.parametrize("name", CALLS)
def test_each_coverage_rule_runs_at_most_once_per_call(recorded, counted_rules, monkeypatch, name, wgmma):
    monkeypatch.setenv("NA_RTC_WGMMA", wgmma)
    ndim, dtype, shape, kernel, stride = CALLS[name]
    fn, bwd = (na_rtc.na1d, na_rtc.na1d_backward) if ndim == 1 else (na_rtc.na2d, na_rtc.na2d_backward)
    q, k, v = _arrays(shape, dtype)
    out, lse = fn(q, k, v, kernel, stride, return_lse=True, backend="emulator")
    assert counted_rules and max(counted_rules.values()) == 1, counted_rules
    forward = set(counted_rules)
    counted_rules.clear()
    bwd(out, q, k, v, kernel, stride, backend="emulator")  # no output given: the backward runs the forward too
    assert counted_rules and max(counted_rules.values()) == 1, counted_rules
    if dtype != np.float64:  # a fused backward runs the fused forward first: its rules, evaluated once for both
        assert forward <= set(counted_rules)
    counted_rules.clear()
    fn(q, k, v, kernel, stride, backend="emulator")
    fn(q, k, v, kernel, stride, backend="emulator")
    assert set(counted_rules.values()) == {2}  # counted per call: two calls, twice each


def test_split_ops_run_each_rule_once_per_dtype_they_launch_with(recorded, counted_rules):
    q, k = _arrays((1, 30, 2, 16), np.float16, 2)
    attn = na_rtc.na1d_qk(q, k, 5, rpb=np.zeros((2, 9), np.float32), backend="emulator")
    na_rtc.na1d_qk_backward(attn, q, k, 5, rpb=np.zeros((2, 9), np.float32), backend="emulator")
    assert counted_rules and max(counted_rules.values()) == 1, counted_rules


def _counting_readers(monkeypatch) -> Counter:
    reads = Counter()
    for name in dir(config):
        reader = getattr(config, name)
        if callable(reader) and getattr(reader, "__module__", None) == config.__name__ and not name.startswith("_"):
            def counting(*args, _name=name, _reader=reader, **kwargs):
                reads[_name] += 1
                return _reader(*args, **kwargs)
            monkeypatch.setattr(config, name, counting)
    return reads


@pytest.mark.parametrize("name", CALLS)
def test_each_setting_is_read_once_per_call(recorded, monkeypatch, name):
    ndim, dtype, shape, kernel, stride = CALLS[name]
    fn, bwd = (na_rtc.na1d, na_rtc.na1d_backward) if ndim == 1 else (na_rtc.na2d, na_rtc.na2d_backward)
    q, k, v = _arrays(shape, dtype)
    out, lse = fn(q, k, v, kernel, stride, return_lse=True, backend="emulator")
    reads = _counting_readers(monkeypatch)
    fn(q, k, v, kernel, stride, backend="emulator")
    assert reads["tensor_cores"] == reads["wgmma"] == reads["tc_warp_rows"] == reads["verify"] == 1, reads
    assert max(reads.values()) == 1, reads
    reads.clear()
    bwd(out, q, k, v, kernel, stride, backend="emulator")
    assert reads["tensor_cores"] == 1 and max(reads.values()) == 1, reads


# ---------------------------------------------------------------- explain


def _explained_and_launched(recorded, name, *args, backward=False, **kwargs):
    """The kernels ``explain`` names and the kernels the call (and its gradient, given the forward's results)
    hands to the executor."""
    explanation = na_rtc.explain(name, *args, backward=backward, backend="emulator", **kwargs)
    recorded.names.clear()
    fused = name in ("na1d", "na2d")
    result = getattr(na_rtc, name)(*args, backend="emulator", **kwargs, **({"return_lse": True} if fused else {}))
    if backward:
        gradient = getattr(na_rtc, f"{name}_backward")
        if fused:
            out, lse = result
            gradient(out, *args, backend="emulator", output=out, logsumexp=lse, **kwargs)
        else:
            gradient(result, *args, backend="emulator", **kwargs)
    return explanation, list(recorded.names)


EXPLAINED = {
    "2d-fp16-tensor-cores": ("na2d", (1, 12, 10, 2, 32), np.float16, {"kernel_size": 5}),
    "1d-fp16-bias": ("na1d", (1, 40, 2, 32), np.float16, {"kernel_size": 5, "rpb": np.zeros((2, 9), np.float32)}),
    "1d-fp32-causal-dilated": ("na1d", (1, 40, 2, 24), np.float32, {"kernel_size": 7, "dilation": 2,
                                                                        "is_causal": True}),
    "2d-fp64-composed-bias": ("na2d", (1, 9, 8, 2, 16), np.float64, {"kernel_size": 3,
                                                                         "rpb": np.zeros((2, 5, 5))}),
    "1d-fp16-head-dim-300-composed": ("na1d", (1, 20, 2, 300), np.float16, {"kernel_size": 5}),
}


@EMULATOR
@pytest.mark.parametrize("key", EXPLAINED)
def test_explain_names_exactly_the_kernels_a_call_launches(recorded, key):
    name, shape, dtype, kwargs = EXPLAINED[key]
    q, k, v = _arrays(shape, dtype)
    explanation, launched = _explained_and_launched(recorded, name, q, k, v, backward=True, **kwargs)
    assert explanation.kernels == tuple(launched) and launched
    assert [step.op for step in explanation.steps] == ["forward", "backward"]


@EMULATOR
@pytest.mark.parametrize("ndim", [1, 2])
def test_explain_names_the_kernels_of_the_split_ops(recorded, ndim):
    shape = (1, 20, 2, 32) if ndim == 1 else (1, 9, 8, 2, 32)
    q, k, v = _arrays(shape, np.float16)
    qk = getattr(na_rtc, f"na{ndim}d_qk")
    bias = np.zeros((2, *(5,) * ndim), np.float32)
    explanation, launched = _explained_and_launched(recorded, f"na{ndim}d_qk", q, k, 3, rpb=bias, backward=True)
    assert explanation.kernels == tuple(launched) and [s.op for s in explanation.steps] == ["qk", "qk_backward"]
    attn = qk(q, k, 3, backend="reference")
    explanation, launched = _explained_and_launched(recorded, f"na{ndim}d_av", attn, v, 3, backward=True)
    assert explanation.kernels == tuple(launched) and [s.op for s in explanation.steps] == ["av", "av_backward"]
    assert launched[0].startswith("na_tiled_av<fp16_t, fp16_t, 32")


def test_explain_names_grouped_heads_and_the_value_head_dim():
    """Grouped key/value heads and a value head dim of its own pick the same kernels (the bucket of the larger
    head dim), and the description says both."""
    q = torch.zeros(1, 16, 4, 32, dtype=torch.float16)
    k, v = torch.zeros(1, 16, 2, 32, dtype=torch.float16), torch.zeros(1, 16, 2, 24, dtype=torch.float16)
    explanation = na_rtc.explain(na_rtc.na1d, q, k, v, kernel_size=7, backend="emulator")
    assert str(explanation).startswith("na_rtc.na1d: float16, batch 1, 4 heads (2 key/value heads), head_dim 32 "
                                       "(value 24), axes 16 (kernel 7)")
    assert explanation.steps[0].choice.kernels[0].startswith("na_fused_tc_fwd<fp16_t, 32")


def test_explain_reports_each_skipped_candidate_with_its_reason(monkeypatch):
    monkeypatch.delenv("NA_RTC_WGMMA", raising=False)
    q = torch.zeros(1, 16, 16, 2, 32, dtype=torch.float16)
    explanation = na_rtc.explain(na_rtc.na2d, q, q, q, kernel_size=7, backward=True, backend="emulator")
    forward, backward = explanation.steps
    assert forward.choice.path == "mma.sync" and forward.choice.kernels[0].startswith("na_fused_tc_fwd<fp16_t, 32")
    assert forward.choice.skipped == (("wgmma", "opt-in: NA_RTC_WGMMA=1 turns the wgmma kernels on"),)
    assert backward.choice.path == "mma.sync" and len(backward.choice.skipped) == 3  # the pairs with a wgmma kernel
    text = str(explanation)
    assert text.startswith("na_rtc.na2d: float16, batch 1, 2 heads, head_dim 32, axes 16 (kernel 7), 16 (kernel 7)")
    assert "forward: mma.sync" in text and "skipped wgmma: opt-in: NA_RTC_WGMMA=1" in text
    assert "backward: mma.sync" in text and "launches na_fused_delta<fp16_t>, na_fused_tc_bwd_dq<" in text
    monkeypatch.setenv("NA_RTC_TENSOR_CORES", "0")
    simt = na_rtc.explain("na2d", q, q, q, 7, backend="emulator").steps[0].choice
    assert simt.path == "simt" and dict(simt.skipped)["mma.sync"] == "tensor cores are off (NA_RTC_TENSOR_CORES=0)"


def test_explain_says_why_no_fused_kernel_serves_and_what_the_call_raises():
    q = np.zeros((1, 20, 2, 16))  # float64: no fused kernel; stride 2: no split kernels either
    explanation = na_rtc.explain("na1d", q, q, q, 5, stride=2, backend="emulator")
    (forward,) = explanation.steps
    assert forward.choice.path is None and forward.launches == ()
    assert "dtype float64 (the tensor-core kernels take float16 and bfloat16)" in dict(forward.choice.skipped)["mma.sync"]
    assert "no fused kernel for 1D float64" in dict(forward.choice.skipped)["simt"]
    assert "stride (2,) needs the fused forward kernels" in forward.error
    with pytest.raises(ValueError, match=r"stride \(2,\) needs the fused forward kernels"):
        na_rtc.na1d(q, q, q, 5, stride=2, backend="emulator")
    composed = na_rtc.explain("na1d", q, q, q, 5, backend="emulator").steps[0]
    assert composed.choice.path is None and [launch.op for launch in composed.launches] == ["qk", "softmax", "av"]
    assert "the split kernels composed" in str(na_rtc.explain("na1d", q, q, q, 5, backend="emulator"))


def test_explain_follows_the_backend_choice_and_checks_the_arguments():
    q = np.zeros((1, 20, 2, 16), np.float32)
    blocked = na_rtc.explain("na1d", q, q, q, 5)  # CPU arrays: the blocked backend by default
    assert blocked.backend == "blocked" and blocked.steps == () and "block-sparse" in str(blocked)
    reference = na_rtc.explain("na1d", q, q, q, 5, backend="reference")
    assert reference.backend == "reference" and reference.steps == () and "reference" in str(reference)
    with pytest.raises(ValueError, match="explain takes one of na1d, na1d_qk"):
        na_rtc.explain("na4d_qk", q, q, 5)
    with pytest.raises(ValueError, match="kernel_size"):
        na_rtc.explain("na1d", q, q, q, 50, backend="emulator")  # the call's own validation and message
    with pytest.raises(TypeError, match="explain\\('na1d', ...\\)"):
        na_rtc.explain("na1d", q, q, backend="emulator")


@EMULATOR
def test_explain_shows_kernels_that_failed_first_use_verification(tmp_path, monkeypatch):
    """After a call whose fused canaries failed (verified on the emulator, as a GPU would), explain reports
    those paths as skipped for that reason and the composed split kernels as what serves."""
    from na_rtc.verify import canary, gate
    from na_rtc.verify.verdicts import VerdictStore

    monkeypatch.setattr(gate, "_store", VerdictStore(tmp_path / "verdicts"))
    monkeypatch.setattr(backends.get("emulator"), "_ops", None)
    monkeypatch.delenv("NA_RTC_VERIFY", raising=False)
    real = canary.check

    def fused_wrong(op, problem, run):
        results = real(op, problem, run)
        if getattr(run, "__qualname__", "").startswith("composed_candidates"):
            return results
        return {name: f"{name}: wrong on purpose" for name in results}

    monkeypatch.setattr(canary, "check", fused_wrong)
    q = torch.randn(1, 40, 2, 32, generator=torch.Generator().manual_seed(0)).half()
    with gate.verify_automatically_on("emulator"):
        before = na_rtc.explain("na1d", q, q, q, 5, backend="emulator").steps[0].choice
        assert before.path == "mma.sync" and before.note == "verified against the reference at its first use on this GPU"
        with pytest.warns(gate.KernelVerificationWarning):
            na_rtc.na1d(q, q, q, 5, backend="emulator")
        after = na_rtc.explain("na1d", q, q, q, 5, backend="emulator")
    forward = after.steps[0]
    assert forward.choice.path is None and [launch.op for launch in forward.launches] == ["qk", "softmax", "av"]
    skipped = dict(forward.choice.skipped)
    assert skipped["mma.sync"].startswith("failed first-use verification: na_fused_tc_fwd<fp16_t, 32")
    assert skipped["simt"].startswith("failed first-use verification: na_fused_fwd<fp16_t, 32")
    assert "out: wrong on purpose" in skipped["simt"]
    assert "first-use verification on" in str(after) and "skipped simt: failed first-use verification" in str(after)


@EMULATOR
def test_the_dispatch_logger_reports_each_decision(recorded, caplog):
    q, k, v = _arrays((1, 30, 2, 32), np.float16)
    with caplog.at_level(logging.DEBUG, logger="na_rtc"):
        na_rtc.na1d(q, k, v, 5, backend="emulator")
    records = [r for r in caplog.records if r.name == "na_rtc.dispatch"]
    assert len(records) == 1 and records[0].levelno == logging.DEBUG
    message = records[0].getMessage()
    assert message.startswith("forward (1D float16 head_dim 32): forward: mma.sync: na_fused_tc_fwd<fp16_t, 32")
    assert "skipped wgmma: opt-in" in message
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="na_rtc"):
        na_rtc.na1d(q, k, v, 5, backend="emulator")
    assert not [r for r in caplog.records if r.name == "na_rtc.dispatch"]


# ---------------------------------------------------------------- the benchmark


def test_bench_explain_prints_the_dispatch_of_each_problem(capsys):
    from na_rtc.bench import cli

    assert cli.main(["--shape", "24x20", "--kernel", "5", "--dtype", "fp16", "--head-dim", "32", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "2D 24x20 k=5 b1 h4 D32 fp16" in out
    assert "forward: mma.sync" in out and "backward: mma.sync" in out and "qk: " in out


def test_the_host_overhead_entry_builds_plans_and_runs_nothing():
    from na_rtc.bench import runner
    from na_rtc.bench.entries import make_inputs
    from na_rtc.bench.presets import spec

    machine = runner.Machine("cpu", "emulator")
    (entry,) = runner.select_entries(["host_overhead"], machine).run
    problem = spec((24, 20), (5, 5), dtype="float16", head_dim=32)
    prepared = entry.prepare(problem, make_inputs(problem, "cpu", "emulator"))
    assert not prepared.comparable and not entry.uses_kernels and not entry.computes  # no output check, no TFLOP/s
    out = prepared.forward()
    assert tuple(out.shape) == problem.qkv_shape
    notes = prepared.notes
    assert notes["plans_forward"] == 1 and notes["plans_forward_backward"] == 4  # fused forward; delta, dq, dK/dV + it
    assert math.isfinite(notes["host_us_forward"]) and notes["host_us_forward"] > 0
    assert notes["host_us_forward_backward"] > notes["host_us_forward"]
    from na_rtc.bench import timing

    settings = timing.Settings(warmup=0, repeat=2, min_repeat=1, min_time=0.0)
    record = runner.run_entry(entry, problem, make_inputs(problem, "cpu", "emulator"), machine, settings, 10**6, None)
    assert record["status"] == "ok" and record["forward"]["tflops"] is None  # its time is no attention's


# ---------------------------------------------------------------- on the GPU launch path's stand-in


@requires_nvrtc  # a verdict's key holds the NVRTC version (read before the stand-in replaces the CUDA bindings)
@pytest.mark.parametrize("arch, forward", [(75, "simt"), (80, "mma.sync"), (90, "mma.sync")])
def test_explain_on_a_gpu_follows_its_architecture_and_touches_nothing(monkeypatch, tmp_path, arch, forward):
    """On the cuda backend explain reads the call's GPU (its architecture picks the paths, its kernels are marked
    for first-use verification) without a context, a device switch, a compile or a launch anywhere."""
    from fake_cuda import install

    from na_rtc.verify import gate
    from na_rtc.verify.verdicts import VerdictStore

    machine = install(monkeypatch, archs=(90, arch))
    monkeypatch.setattr(backends, "_probe", lambda name: (True, "a stand-in GPU"))
    monkeypatch.setattr(gate, "_store", VerdictStore(tmp_path / "verdicts"))
    monkeypatch.delenv("NA_RTC_VERIFY", raising=False)
    monkeypatch.delenv("NA_RTC_WGMMA", raising=False)
    x = machine.cupy_array(1, (1, 64, 2, 32))
    contexts = set(machine.contexts)
    explanation = na_rtc.explain("na1d", x, x, x, 7, backward=True)
    assert explanation.backend == "cuda" and f"GPU cuda:1, sm_{arch}" in str(explanation)
    step = explanation.steps[0]
    assert step.choice.path == forward
    assert step.choice.note == "verified against the reference at its first use on this GPU"
    if arch < 80:
        assert dict(step.choice.skipped)["mma.sync"] == "its kernels run on sm_80 and newer; this GPU is sm_75"
    else:
        assert dict(step.choice.skipped)["wgmma"].startswith("opt-in: NA_RTC_WGMMA=1")
    assert "first-use verification on" in str(explanation)
    assert machine.contexts == contexts and machine.set_device_calls == []
    assert machine.compiles == [] and machine.launches() == []


def test_a_3d_call_passes_over_every_family_without_3d_kernels_and_says_so():
    """The dispatch tables name the 1D/2D families; a 3D call reaches their 3D twins, and a route whose family
    has none is skipped with the ranks it serves (never planned with a 2D instantiation)."""
    from na_rtc._args import FUSED, Problem
    from na_rtc.runtime import dispatch
    from na_rtc.window import Axis

    problem = Problem(FUSED, (Axis(6, 3), Axis(7, 3), Axis(5, 3)), 1, 2, 32, "float16", "numpy", "cpu")
    dispatcher = dispatch.Dispatcher(policy=dispatch.Policy(arch=90))
    without = [route for route in dispatch.FORWARD if registry.for_rank(route.family, 3) is None]
    choice = dispatcher.choose("forward", problem)
    skipped = dict(choice.skipped)
    paths = [route.path for route in dispatch.FORWARD]
    passed_over = paths[:paths.index(choice.path)] if choice.path else paths  # the routes after it are not asked
    for route in without:
        if route.path in passed_over:
            assert skipped[route.path] == f"the {route.family} kernels serve 1D/2D, not 3D"
    for route in dispatch.FORWARD:
        if route.path == choice.path:
            assert registry.for_rank(route.family, 3).ranks == {3}
            assert all(name in registry.for_rank(route.family, 3).names for name in choice.kernels)
    assert choice.path is not None or len(skipped) == len(dispatch.FORWARD)
