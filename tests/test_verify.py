"""First-use kernel verification (na_rtc/verify/), on the emulator with deliberately broken kernels.

On a GPU the dispatchers verify each kernel instantiation before its first use; here the emulator runs the
same machinery (``gate.verify_automatically_on("emulator")``) with tensor-core kernels that return wrong
numbers (tests/emulator_kernels/broken_fused_tc*.cu, explicit specializations of one instantiation each): a
broken kernel must be caught, disabled, warned about once, the call must still be right through the next
path, and a second process must read the recorded verdict instead of running the canary again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_close, kernel_policy

import na_rtc
from na_rtc import backends
from na_rtc._args import Problem
from na_rtc._resources import cuda_src_dir
from na_rtc.runtime import registry
from na_rtc.runtime.dispatch import Dispatcher
from na_rtc.runtime.families import fused, fused_bwd, fused_tc, fused_tc_bwd, fused_wg, fused_wg_bwd
from na_rtc.runtime.policy import Policy
from na_rtc.runtime.tiling import accumulator_dtype
from na_rtc.verify import canary, gate
from na_rtc.verify.verdicts import Verdict, VerdictStore, VerdictStoreWarning, verdict_key
from na_rtc.window import Axis, window

pytestmark = pytest.mark.skipif(not backends.get("emulator").probe()[0], reason="no C++ compiler")

TESTS = Path(__file__).resolve().parent
BROKEN_FORWARD = "na_fused_tc_fwd<fp16_t, 32, 128, 1, 64, 2>"  # 1D, float16, head dim 32
BROKEN_DQ = "na_fused_tc_bwd_dq<fp16_t, 32, 64, 1, 32>"
GOOD_DKDV = "na_fused_tc_bwd_dkdv<fp16_t, 32, 64, 1, 64>"
SIMT_FORWARD = "na_fused_fwd<fp16_t, 32, 64, 1>"


def _broken_folder(folder: Path) -> Path:
    """cuda_src/ and the broken sources in one folder: the emulator's build key covers every file there, so
    an edit of the real kernels rebuilds the broken ones too."""
    for path in cuda_src_dir().iterdir():
        if path.suffix in (".cu", ".cuh", ".h"):
            shutil.copy(path, folder / path.name)
    for name in ("broken_fused_tc.cu", "broken_fused_tc_bwd.cu"):
        shutil.copy(TESTS / "emulator_kernels" / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def broken_sources(tmp_path_factory) -> Path:
    return _broken_folder(tmp_path_factory.mktemp("broken_cuda_src"))


def _install_broken_families(folder: Path, swap) -> None:
    """The tensor-core families of the 1D float16 head-dim-32 kernels, from the broken sources, in the registry
    (their rules and planners unchanged: the dispatcher picks them as it would the real ones). ``swap(family)``
    puts a family in place of the registered one of its name (and in a test, back afterwards)."""
    forward, backward = str(folder / "broken_fused_tc.cu"), str(folder / "broken_fused_tc_bwd.cu")
    swap(dataclasses.replace(registry.get("fused_tc"), source=forward, names=(BROKEN_FORWARD,),
                             launch_threads={BROKEN_FORWARD: 128}, launch_shared_bytes={BROKEN_FORWARD: 0}))
    swap(dataclasses.replace(registry.get("fused_tc_bwd"), source=backward, names=(BROKEN_DQ, GOOD_DKDV),
                             launch_threads={BROKEN_DQ: 128, GOOD_DKDV: 128},
                             launch_shared_bytes={BROKEN_DQ: 0, GOOD_DKDV: 0}))


def _fresh_ops(patch) -> None:
    """A new op table (and gate, which remembers verdicts per process) for the emulator backend."""
    patch(backends.get("emulator"), "_ops", None)


@pytest.fixture
def verdict_store(tmp_path, monkeypatch) -> VerdictStore:
    store = VerdictStore(tmp_path / "verdicts")
    monkeypatch.setattr(gate, "_store", store)
    _fresh_ops(lambda obj, name, value: monkeypatch.setattr(obj, name, value))
    monkeypatch.delenv("NA_RTC_VERIFY", raising=False)
    with gate.verify_automatically_on("emulator"):
        yield store


def _swapper(request):
    def swap(family):
        previous = registry.replace(family)
        request.addfinalizer(lambda: registry.replace(previous))
    return swap


@pytest.fixture
def broken(broken_sources, verdict_store, request) -> VerdictStore:
    _install_broken_families(broken_sources, _swapper(request))
    return verdict_store


def _current_gate() -> gate.Gate:
    """The gate of the emulator's op table."""
    backends.get("emulator").ops  # builds the table (and its gate) if needed
    return gate.Gate.of("emulator")


def _inputs(seed=0, length=40, dtype=torch.float16, grad=False):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, length, 2, 32, generator=generator).to(dtype).requires_grad_(grad) for _ in range(3)]


def _reference(q, k, v, kernel_size):
    return na_rtc.na1d(*(t.detach().double() for t in (q, k, v)), kernel_size, backend="reference")


def _verification_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, gate.KernelVerificationWarning)]


# ---------------------------------------------------------------- a broken kernel is caught


def test_a_broken_forward_is_disabled_with_one_warning_and_the_call_stays_right(broken):
    q, k, v = _inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = na_rtc.na1d(q, k, v, 5, backend="emulator")
        second = na_rtc.na1d(*_inputs(seed=1), 5, backend="emulator")
    messages = _verification_warnings(caught)
    assert len(messages) == 1, messages
    assert BROKEN_FORWARD in messages[0] and "python -m na_rtc selftest" in messages[0]
    assert "out:" in messages[0] and "NA_RTC_VERIFY=0" in messages[0]
    assert_close(first, _reference(q, k, v, 5), "float16", "forward")
    assert_close(second, _reference(*_inputs(seed=1), 5), "float16", "forward")
    verdicts = {v.kernel: v for v in broken.recorded()}
    assert not verdicts[BROKEN_FORWARD].ok and verdicts[BROKEN_FORWARD].path == "mma.sync"
    assert verdicts[SIMT_FORWARD].ok  # the next path, verified before it served the call
    assert _current_gate().stats["canaries"] == 2  # once per kernel, not per call


def test_a_broken_dq_condemns_the_dq_kernel_alone_and_gradients_stay_right(broken):
    q, k, v = _inputs(grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = na_rtc.na1d(q, k, v, 5, backend="emulator")
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.dtype)
        out.backward(grad)
    messages = _verification_warnings(caught)
    assert [m for m in messages if BROKEN_DQ in m] and not [m for m in messages if GOOD_DKDV in m]
    verdicts = {v.kernel: v for v in broken.recorded()}
    assert not verdicts[BROKEN_DQ].ok and "dq:" in verdicts[BROKEN_DQ].detail
    assert verdicts[GOOD_DKDV].ok
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    na_rtc.na1d(q64, k64, v64, 5, backend="reference").backward(grad.double())
    for got, want, name in ((q.grad, q64.grad, "dq"), (k.grad, k64.grad, "dk"), (v.grad, v64.grad, "dv")):
        assert_close(got, want, "float16", "grad", name)


def test_verification_off_runs_the_broken_kernel_unchecked(broken, monkeypatch):
    """NA_RTC_VERIFY=0: no canary, no warning, and the broken kernel serves the call (its wrong numbers show
    that the test's kernel really is broken, and that the setting really turns the check off)."""
    monkeypatch.setenv("NA_RTC_VERIFY", "0")
    q, k, v = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", gate.KernelVerificationWarning)
        out = na_rtc.na1d(q, k, v, 5, backend="emulator")
    torch.testing.assert_close(out, v)  # the broken kernel's output: each query's own value row
    assert _current_gate().stats["canaries"] == 0 and broken.recorded() == []


def test_the_emulator_does_not_verify_unless_a_test_asks(verdict_store):
    with gate.verify_automatically_on("cuda"):  # the default set, without the emulator
        pass
    gate._AUTOMATIC.discard("emulator")
    try:
        na_rtc.na1d(*_inputs(), 5, backend="emulator")
    finally:
        gate._AUTOMATIC.add("emulator")
    assert _current_gate().stats["canaries"] == 0 and verdict_store.recorded() == []


SECOND_PROCESS = textwrap.dedent("""
    import json, sys, warnings
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import torch
    import test_verify as t
    from na_rtc.verify import gate
    from na_rtc.verify.verdicts import VerdictStore

    gate._store = VerdictStore(Path({verdicts!r}))
    t._install_broken_families(Path({folder!r}), t.registry.replace)
    with gate.verify_automatically_on("emulator"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q, k, v = t._inputs(seed=3)
        out = t.na_rtc.na1d(q, k, v, 5, backend="emulator")
    error = (out.double() - t._reference(q, k, v, 5)).abs().max().item()
    print(json.dumps({{"stats": t._current_gate().stats, "warnings": t._verification_warnings(caught),
                      "error": error}}))
""")


def test_a_second_process_reads_the_recorded_verdict(broken, broken_sources, tmp_path):
    with pytest.warns(gate.KernelVerificationWarning):
        na_rtc.na1d(*_inputs(), 5, backend="emulator")  # records both verdicts
    script = SECOND_PROCESS.format(tests=str(TESTS), verdicts=str(broken.folder), folder=str(broken_sources))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NA_RTC_VERIFY": "1"})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["stats"]["canaries"] == 0 and report["stats"]["recorded_verdicts_read"] >= 2
    assert len(report["warnings"]) == 1 and BROKEN_FORWARD in report["warnings"][0]
    assert report["error"] < 2e-2


# ---------------------------------------------------------------- when every path fails


@pytest.fixture
def everything_wrong(verdict_store, monkeypatch):
    """Every canary reports a wrong output (as on a GPU whose tensor cores and SIMT units both misbehave)."""
    def wrong(op, problem, run):
        return {name: f"{name}: wrong on purpose" for name in canary.OUTPUTS[op]}

    monkeypatch.setattr(canary, "check", wrong)
    return verdict_store


def test_with_every_path_wrong_a_strided_call_says_why_and_what_to_do(everything_wrong):
    with pytest.warns(gate.KernelVerificationWarning):
        with pytest.raises(RuntimeError) as error:
            na_rtc.na1d(*_inputs(), 5, stride=2, backend="emulator")
    text = str(error.value)
    assert "no kernel that passed first-use verification" in text and "no stride" in text
    assert "python -m na_rtc selftest" in text and "use_backend('reference')" in text
    assert SIMT_FORWARD in text and "na_fused_tc_fwd<" in text


def test_with_every_path_wrong_the_split_kernels_are_verified_too(everything_wrong):
    with pytest.warns(gate.KernelVerificationWarning):
        with pytest.raises(RuntimeError, match="composed split kernels gave wrong results too"):
            na_rtc.na1d(*_inputs(), 5, backend="emulator")


def test_with_the_fused_paths_wrong_the_verified_split_kernels_serve(verdict_store, monkeypatch):
    real = canary.check

    def fused_wrong(op, problem, run):
        results = real(op, problem, run)
        if getattr(run, "__qualname__", "").startswith("composed_candidates"):  # the composed split path
            return results
        return {name: f"{name}: wrong on purpose" for name in results}

    monkeypatch.setattr(canary, "check", fused_wrong)
    q, k, v = _inputs()
    with pytest.warns(gate.KernelVerificationWarning):
        out = na_rtc.na1d(q, k, v, 5, backend="emulator")
    assert_close(out, _reference(q, k, v, 5), "float16", "forward")
    split = [v for v in verdict_store.recorded() if v.path == "split"]
    assert len(split) == 1 and split[0].ok


def test_a_launch_error_in_a_canary_is_raised_not_recorded(verdict_store, monkeypatch):
    def crash(op, problem, run):
        raise RuntimeError("cudaErrorLaunchFailure: unspecified launch failure")

    monkeypatch.setattr(canary, "check", crash)
    with pytest.raises(RuntimeError, match="unspecified launch failure"):
        na_rtc.na1d(*_inputs(), 5, backend="emulator")
    assert verdict_store.recorded() == []


def test_no_canary_under_graph_capture_or_tracing(verdict_store, monkeypatch):
    monkeypatch.setattr(gate, "_capturing", lambda problem: True)
    na_rtc.na1d(*_inputs(), 5, backend="emulator")
    monkeypatch.setattr(gate, "_capturing", lambda problem: False)
    monkeypatch.setattr(gate, "_tracing", lambda: True)
    na_rtc.na1d(*_inputs(), 5, backend="emulator")
    assert _current_gate().stats["canaries"] == 0 and verdict_store.recorded() == []


# ---------------------------------------------------------------- canaries


def _problem(ndim, dtype, head_dim):
    axes = {1: (Axis(64, 5),), 2: (Axis(24, 5), Axis(24, 5)), 3: (Axis(12, 5), Axis(12, 5), Axis(12, 5))}[ndim]
    return Problem("fused", axes, 2, 4, head_dim, dtype, "numpy", "cpu", True, head_dim**-0.5)


def _largest_box(axes, tile) -> int:
    """The most keys the windows of one tile (``tile`` queries per axis, tiles from position 0) cover."""
    size = 1
    for axis, extent in zip(axes, tile):
        widest = 0
        for first in range(0, axis.length, extent):
            start, end = window(axis, np.arange(first, min(first + extent, axis.length)))
            widest = max(widest, int(end.max() - start.min()))
        size *= widest
    return size


CASES = [(ndim, dtype, hd) for ndim in (1, 2, 3) for dtype in ("float32", "float16", "bfloat16")
         for hd in (32, 64, 128)]


@pytest.mark.parametrize("ndim, dtype, head_dim", CASES, ids=[f"{n}d-{d}-hd{h}" for n, d, h in CASES])
@pytest.mark.parametrize("warpgroups", ["1", "2"])
def test_every_canary_runs_the_instantiation_it_vouches_for(ndim, dtype, head_dim, warpgroups, monkeypatch):
    """For every path the dispatchers can pick (wgmma with one and two warpgroups, mma.sync, SIMT; forward and
    each (dq, dK/dV) pair), the canary problem maps to the same kernels as the call."""
    monkeypatch.setenv("NA_RTC_WGMMA_WARPGROUPS", warpgroups)
    problem = _problem(ndim, dtype, head_dim)
    test = canary.canary_problem(problem)
    dispatcher = Dispatcher(None, kernel_policy(tensor_cores=True, wgmma=True))
    forward = dispatcher.candidates("forward", problem)
    assert [path for path, _ in forward] == [path for path, _ in dispatcher.candidates("forward", test)]
    for path, candidate in forward:
        assert candidate.kernels(test) == candidate.kernels(problem)
    backward = dispatcher.candidates("backward", problem)
    for path, candidate in backward:
        assert candidate.kernels(test) == candidate.kernels(problem)
    tensor_core_pairs = 0 if dtype == "float32" else 4  # (wgmma, mma.sync)^2
    assert len(backward) == tensor_core_pairs + 1  # and SIMT


def _tiles_and_chunks(ndim):
    """(query or key tile, keys or queries per staged chunk) of every kernel the dispatchers can pick."""
    out = []
    for hd in fused_tc.HEAD_DIMS:
        configs = (fused_tc.FORWARD_3D[hd],) if ndim == 3 else fused_tc.configs_of(hd)
        for cfg in configs:
            out.append((fused_tc.TILES[ndim, cfg.mma_tiles], cfg.chunk_keys))
        out.append((fused_tc.TILES[ndim, 1], fused_tc_bwd.DQ_CHUNK[hd]))
        out.append((fused_tc.TILES[ndim, 1], fused_tc_bwd.DKDV_CHUNK[ndim, hd]))
        for wg in (1, 2):
            tile = fused_wg.BLOCK_TILES[ndim, wg]
            out += [(tile, fused_wg.table_chunk_keys(hd, ndim)), (tile, fused_wg_bwd.DQ_CHUNK_KEYS),
                    (tile, fused_wg_bwd.DKDV_CHUNK_QUERIES[hd])]
            out += [(tile, kc) for kc in fused_wg.OTHER_CHUNK_KEYS]
    for (n, hd, dtype), tile in fused.TILES.items():
        if n == ndim:
            out.append((tile, fused.chunk_keys(hd, ndim)))
    for (n, hd, dtype), cfg in fused_bwd.TABLE.items():
        if n == ndim:
            out += [(cfg["dq"][:-1], cfg["dq"][-1]), (cfg["dkdv"][:-1], cfg["dkdv"][-1])]  # (*tile, chunk)
    return sorted(set(out))


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_every_canary_has_a_partial_tile_and_a_box_of_three_chunks(ndim):
    """What the canary's docstring promises, for every tile and chunk size in the tables (a key tile's query
    box is a query tile's key box: the windows are symmetric in non-causal problems)."""
    axes = canary.AXES[ndim]
    for tile, chunk in _tiles_and_chunks(ndim):
        tile = tile[:ndim]
        assert any(axis.length % extent for axis, extent in zip(axes, tile)), f"no partial tile for {tile}"
        box = _largest_box(axes, tile)
        assert box >= 3 * chunk, f"tile {tile}: at most a box of {box} keys, chunks of {chunk}"


def test_a_canary_reports_the_worst_mismatch():
    want = np.zeros((2, 3))
    got = want.copy()
    got[1, 2] = 0.5
    got[0, 0] = 0.011
    text = canary.mismatch("dq", got, want, "float16", "grad")
    assert text.startswith("dq: 1 of 6 values") and "worst at (1, 2): got 0.5, expected 0" in text
    assert canary.mismatch("dq", want, want, "float16", "grad") is None
    nan = want.copy()
    nan[0, 1] = np.nan
    assert "got nan" in canary.mismatch("out", nan, want, "float32", "forward")


# ---------------------------------------------------------------- the verdict store


def _verdict(ok=True):
    return Verdict("k<float>", ok, "GPU 0 (X, sm_90)", "out, lse within tolerance", "forward", "simt", "now")


def test_verdicts_survive_a_new_store_and_damaged_files_are_ignored(tmp_path):
    store = VerdictStore(tmp_path)
    key = verdict_key("program", "device", "k<float>")
    store.put(key, _verdict(False))
    assert VerdictStore(tmp_path).get(key) == _verdict(False)
    path = tmp_path / f"{key}.json"
    data = json.loads(path.read_text())
    data["verdict"]["ok"] = True  # a flipped verdict, checksum unchanged
    path.write_text(json.dumps(data))
    with pytest.warns(VerdictStoreWarning, match="unusable"):
        assert VerdictStore(tmp_path).get(key) is None
    path.write_text("{not json")
    with pytest.warns(VerdictStoreWarning, match="unusable"):
        assert VerdictStore(tmp_path).get(key) is None


def test_a_read_only_verdict_folder_keeps_verdicts_in_memory(tmp_path):
    folder = tmp_path / "verdicts"
    folder.write_text("a file where the folder should be")
    store = VerdictStore(folder)
    with pytest.warns(VerdictStoreWarning, match="not writable"):
        assert store.put("a", _verdict()) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.put("b", _verdict()) is False  # warned once per folder
    assert store.get("a") == _verdict() and len(store.recorded()) == 2


def test_the_verdict_key_covers_program_device_and_kernel():
    keys = {verdict_key(p, d, k) for p in ("p1", "p2") for d in ("H100|driver 13000", "H100|driver 13010")
            for k in ("a<1>", "a<2>")}
    assert len(keys) == 8


def test_the_program_identity_changes_with_the_kernel_sources(tmp_path, monkeypatch):
    from na_rtc import _resources

    folder = _broken_folder(tmp_path)
    monkeypatch.setattr(_resources, "cuda_src_dir", lambda: folder)
    problem = _problem(1, "float16", 32)
    original = gate.program_identity("emulator", problem, SIMT_FORWARD)
    assert original == gate.program_identity("emulator", problem, SIMT_FORWARD)
    assert original != gate.program_identity("emulator", problem, "na_fused_fwd<float, 32, 64, 1>")
    with open(folder / "na_window.cuh", "a") as header:  # any file a kernel can include
        header.write("\n// edited\n")
    assert gate.program_identity("emulator", problem, SIMT_FORWARD) != original


# ---------------------------------------------------------------- python -m na_rtc selftest


def test_selftest_reports_a_broken_kernel_and_exits_non_zero(broken, monkeypatch, tmp_path, capsys):
    """The 1D float16 canaries of ``selftest --quick`` (with the broken tensor-core kernels): every other
    kernel passes, the two broken ones fail with their mismatch, the exit status is 1 and the JSON holds
    every verdict; the verdicts are recorded as a first use would record them."""
    import argparse

    from na_rtc.verify import selftest

    every = selftest.units

    def one_dtype(where, mode):
        return [unit for unit in every(where, mode) if unit.problem.ndim == 1 and unit.problem.dtype == "float16"]

    monkeypatch.setattr(selftest, "units", one_dtype)
    monkeypatch.setattr(selftest, "_primitives", lambda where: [
        {"name": "mma.sync (float16)", "ok": True, "detail": "", "seconds": 0.1}])
    report = tmp_path / "selftest.json"
    status = selftest.run(argparse.Namespace(device=None, quick=True, full=False, json=str(report)))
    out = capsys.readouterr().out
    assert status == 1
    assert "on the emulator" in out and f"FAIL  forward     mma.sync  float16  1D hd32   {BROKEN_FORWARD}" in out
    kernels = {row["kernel"]: row for row in json.loads(report.read_text())["kernels"]}
    assert {name for name, row in kernels.items() if not row["ok"]} == {BROKEN_FORWARD, BROKEN_DQ}
    assert kernels[GOOD_DKDV]["ok"] and kernels[SIMT_FORWARD]["ok"]
    assert any(name.startswith("na_fused_wg_fwd<fp16_t, 32") for name in kernels)  # wgmma too on the emulator
    assert any(name.startswith("composed split kernels (backward") for name in kernels)
    recorded = {v.kernel: v.ok for v in broken.recorded()}
    assert recorded[BROKEN_FORWARD] is False and recorded[GOOD_DKDV] is True


def test_selftest_quick_and_full_pick_their_canaries():
    """--quick: one canary per family, dtype and rank at head dim 32; --full: every head-dim bucket and the
    instantiations the settings pick, each kernel once."""
    from na_rtc.verify import selftest

    where = selftest.Target("emulator", "cpu", None, "torch", "the emulator")
    quick, full = selftest.units(where, "quick"), selftest.units(where, "full")
    assert {unit.problem.head_dim for unit in quick} == {32}
    families = {(unit.family, unit.problem.dtype, unit.problem.ndim) for unit in quick}
    # every rank: SIMT (2) and split (2 composed + 4 split ops) x 3 dtypes, mma.sync and wgmma (2 each) x 2 dtypes
    assert len(families) == len(quick) == 3 * (3 * 8 + 2 * 4)
    assert {unit.problem.ndim for unit in quick} == {1, 2, 3}
    names = []
    for unit in full:
        with selftest._settings(unit.settings):
            names += list(unit.candidate.kernels(unit.problem))
    assert len(names) == len(set(names))  # each kernel once
    assert {unit.problem.head_dim for unit in full} == {32, 64, 128, 256}
    assert any(unit.settings for unit in full)
    alternative = fused_tc.kernel_name_of(32, "float16", 1, fused_tc.config(32, Policy.of(tc_warp_rows=16)))
    assert alternative in names
    sm80 = selftest.Target("cuda", "cuda:0", 80, "torch", "GPU 0 (sm_80)")
    assert not [unit for unit in selftest.units(sm80, "quick") if "wgmma" in unit.family]
    sm75 = selftest.Target("cuda", "cuda:0", 75, "torch", "GPU 0 (sm_75)")
    assert {unit.family.split()[1] for unit in selftest.units(sm75, "quick")} == {"simt", "split"}


# ---------------------------------------------------------------- on the GPU launch path's stand-in


@pytest.mark.parametrize("kind", ["torch", "cupy"])
def test_on_a_gpu_the_gate_reads_the_device_and_capture_without_touching_another_gpu(kind, monkeypatch):
    """What the gate asks the GPU (name, compute capability, driver, the kernel's program key, whether the
    call's stream captures) is asked of the call's GPU only, without a device switch or a context anywhere;
    capture of that GPU's launch stream stops a canary."""
    from fake_cuda import install, torch_use_stream

    machine = install(monkeypatch, archs=(80, 90))
    problem = Problem("fused", (Axis(64, 5),), 1, 2, 32, "float16", kind, "cuda:1", True, 32**-0.5)
    key, description = gate.device_identity("cuda", problem)
    assert "Fake GPU" in key and "sm_90" in key and "driver 13000" in key and description == "GPU 1 (Fake GPU, sm_90)"
    program = gate.program_identity("cuda", problem, SIMT_FORWARD)
    assert program != gate.program_identity("cuda", dataclasses.replace(problem, device="cuda:0"), SIMT_FORWARD)
    assert not gate._capturing(problem)
    for index in (0, 1):  # streams of their own (the legacy stream counts as capturing beside any capture)
        stream = torch_use_stream(machine, index) if kind == "torch" else machine.cupy_stream(index).ptr
    machine.begin_capture(stream)
    assert gate._capturing(problem) and not gate._capturing(dataclasses.replace(problem, device="cuda:0"))
    machine.end_capture(stream)
    assert machine.contexts == set() and machine.set_device_calls == []


# ---------------------------------------------------------------- the canaries' reference


DENSE_CASES = {
    "canary-1d": canary.AXES[1],
    "canary-2d": canary.AXES[2],
    "dilated-causal-strided-2d": (Axis(13, 3, 2, 2, True), Axis(11, 4, 1, 2, False)),
    "strided-1d": (Axis(30, 7, 3, 1, False),),
    "dilated-strided-2d-with-bias": (Axis(13, 3, 1, 2, False), Axis(11, 5, 2, 2, False)),
}


@pytest.mark.parametrize("axes", DENSE_CASES.values(), ids=DENSE_CASES.keys())
def test_dense_masked_attention_equals_the_reference_backend(axes):
    """The canaries' reference (dense masked attention) against the reference backend, forward and every
    gradient, in float64: two formulations of one definition."""
    from na_rtc import reference
    from na_rtc.verify import dense

    rng = np.random.default_rng(3)
    shape = (2, *(a.length for a in axes), 3, 8)
    q, k, v, grad = (rng.standard_normal(shape) for _ in range(4))
    has_rpb = not any(a.causal for a in axes)
    rpb = rng.standard_normal((3, *(2 * a.kernel_size - 1 for a in axes))) if has_rpb else None
    problem = Problem("fused", axes, 2, 3, 8, "float64", "numpy", "cpu", has_rpb, 0.7)
    for got, want in zip(dense.forward(problem, q, k, v, rpb), reference.fused_forward(problem, q, k, v, rpb)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    wants = reference.fused_backward(problem, grad, q, k, v, rpb)
    for got, want in zip(dense.backward(problem, grad, q, k, v, rpb), wants):
        if want is None:
            assert got is None
        else:
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- the split ops


def _split_problem(op, ndim, dtype, head_dim, kernel, dilation=1, causal=False):
    lengths = {1: (200,), 2: (40, 36), 3: (30, 28, 29)}[ndim]
    axes = tuple(Axis(length, kernel, 1, dilation, causal) for length in lengths)
    return Problem(op, axes, 2, 3, head_dim, dtype, "numpy", "cpu", op != "av" and not causal, None)


SPLIT_KERNELS = {1: (3, 9, 31, 63), 2: (3, 7, 13), 3: (3, 7, 13)}
SPLIT_CASES = [(ndim, dtype, hd, k, d, causal) for ndim in (1, 2, 3) for dtype in ("float32", "float16", "float64")
               for hd in (32, 64, 128, 200) for k in SPLIT_KERNELS[ndim] for d, causal in ((1, False), (2, True))]


def test_a_split_canary_runs_the_kernels_of_the_call():
    """The split kernels are picked by the window (shared memory grows with it): each op's canary keeps the
    call's windows, so it picks the tiled or straightforward kernels the call picks, for every op."""
    dispatcher, picked = Dispatcher(), set()

    def choice(problem, role, weights):  # the first kernel the role launches with weights of that dtype
        args = (weights, problem.dtype) if role == "inverse" else (weights,)
        return dispatcher.choose(role, problem, *args).kernels[0]

    for ndim, dtype, hd, k, d, causal in SPLIT_CASES:
        for op in ("fused", "qk", "av"):
            problem = _split_problem(op, ndim, dtype, hd, k, d, causal)
            test = canary.split_canary_problem(problem)
            assert all(a.length % canary.SPLIT_TILE[ndim] for a in test.axes) or ndim > 1
            for role, weights in (("qk", dtype), ("qk", accumulator_dtype(dtype)), ("av", dtype),
                                    ("av", accumulator_dtype(dtype)), ("inverse", dtype),
                                    ("inverse", accumulator_dtype(dtype)), ("bias_grad", accumulator_dtype(dtype))):
                assert choice(test, role, weights) == choice(problem, role, weights), (problem, role, weights)
                picked.add(choice(problem, role, weights).split("<")[0])
    assert {"na_tiled_qk", "na_qk_fwd", "na_tiled_av", "na_av_fwd", "na_inv_fwd"} <= picked  # both kinds, by window


def test_split_ops_are_verified_once_per_window_and_stay_right(verdict_store):
    q, k = (torch.randn(1, 40, 2, 32, generator=torch.Generator().manual_seed(s)).half() for s in (1, 2))
    for kernel_size in (5, 7, 5):
        got = na_rtc.na1d_qk(q, k, kernel_size, backend="emulator")
        want = na_rtc.na1d_qk(q.double(), k.double(), kernel_size, backend="reference")
        assert_close(got, want, "float16", "forward")
    names = sorted(v.kernel for v in verdict_store.recorded())
    assert names == ["split kernels (qk, float16, 1D, head_dim 32, kernel 5)",
                     "split kernels (qk, float16, 1D, head_dim 32, kernel 7)"]
    assert _current_gate().stats["canaries"] == 2


@pytest.mark.parametrize("op, call", [
    ("qk", lambda q, k, v, a: na_rtc.na1d_qk(q, k, 5, backend="emulator")),
    ("av", lambda q, k, v, a: na_rtc.na1d_av(a, v, 5, backend="emulator")),
    ("qk_backward", lambda q, k, v, a: na_rtc.na1d_qk_backward(a, q, k, 5, backend="emulator")),
    ("av_backward", lambda q, k, v, a: na_rtc.na1d_av_backward(q, a, v, 5, backend="emulator")),
])
def test_a_split_op_whose_kernels_fail_verification_says_what_serves_instead(everything_wrong, op, call):
    q, k, v = _inputs()
    attn = torch.randn(1, 40, 2, 5).half()
    with pytest.warns(gate.KernelVerificationWarning, match=f"split kernels \\({op},"):
        with pytest.raises(RuntimeError) as error:
            call(q, k, v, attn)
    assert "The split ops have no other kernels" in str(error.value) and "selftest" in str(error.value)
