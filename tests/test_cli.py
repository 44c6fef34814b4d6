"""``python -m na_rtc``: the command line, its environment probes and the demo."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import na_rtc
from na_rtc import _environment as env
from na_rtc import _install
from na_rtc import demo
from na_rtc.__main__ import COMMANDS, main
from na_rtc._install import install_command

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PROBES = [
    env.na_rtc_version,
    env.python_version,
    env.numpy_version,
    env.torch_version,
    env.cupy_version,
    env.gpus,
    env.nvrtc_version,
    env.backends,
    env.selected_backend,
    env.cache_dir,
    env.verdicts,
    env.settings,
]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m na_rtc ARGS`` in a fresh interpreter that imports this checkout."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    environment.pop("NA_RTC_BACKEND", None)
    return subprocess.run(
        [sys.executable, "-m", "na_rtc", *args],
        cwd=cwd or REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------- the command line


def test_no_arguments_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    for name in COMMANDS:
        assert name in out


def test_info_runs_and_names_version_and_backends():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    assert na_rtc.__version__ in result.stdout
    assert "reference" in result.stdout
    assert "cache" in result.stdout


def test_info_lists_the_recorded_kernel_verdicts(tmp_path, monkeypatch, capsys):
    """What first-use verification recorded in the cache folder, failures first with their mismatch."""
    from na_rtc.verify import gate
    from na_rtc.verify.verdicts import Verdict, VerdictStore

    monkeypatch.setenv("NA_RTC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gate, "_store", VerdictStore())  # the folder follows the setting
    assert main(["info"]) == 0
    assert "none recorded yet" in capsys.readouterr().out
    store = gate.store()
    store.put("a", Verdict("na_fused_fwd<float, 32, 64, 1>", True, "GPU 0 (H100, sm_90)", "out, lse within", "forward",
                           "simt", "2026-12-07T00:00:00Z"))
    store.put("b", Verdict("na_fused_tc_fwd<fp16_t, 32, 128, 1, 64, 2>", False, "GPU 0 (H100, sm_90)",
                           "out: 12 of 99 values outside", "forward", "mma.sync", "2026-12-07T00:00:00Z"))
    store.put("c", Verdict("na_fused_fwd<float, 32, 64, 1>", False, "GPU 0 (H100, sm_90)", "out: wrong",
                           "forward", "simt", "2026-12-01T00:00:00Z"))  # an older build's verdict: replaced
    store.forget()  # read back from the files
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "2 kernels verified, 1 gave wrong results" in out
    lines = [line.strip() for line in out.splitlines() if "na_fused" in line or "kernels on" in line]
    assert lines[0].startswith("WRONG") and "out: 12 of 99 values outside" in lines[0]
    assert lines[1] == "ok     1 kernels on GPU 0 (H100, sm_90) (info --verdicts lists them)"
    assert main(["info", "--verdicts"]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines() if "na_fused" in line]
    assert lines[1].startswith("ok") and "na_fused_fwd<float, 32, 64, 1> on GPU 0 (H100, sm_90)" in lines[1]


@pytest.mark.slow
def test_demo_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    result = run_cli("demo", "--out", "tmp/x.png", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    picture = tmp_path / "tmp" / "x.png"
    assert picture.stat().st_size > 0
    assert picture.read_bytes()[:8] == PNG_SIGNATURE
    assert "x.png" in result.stdout
    assert "FAIL" not in result.stdout


def test_demo_numpy_quick_passes(capsys):
    assert main(["demo", "--quick", "--arrays", "numpy", "--no-png"]) == 0
    out = capsys.readouterr().out
    assert "blocked (numpy)" in out
    assert "full attention" in out and "torch SDPA (cpu)" in out
    assert "FAIL" not in out


@pytest.mark.parametrize("arrays", ["torch", "numpy"])
def test_demo_full_attention_is_torch_sdpa(monkeypatch, arrays):
    """The full-attention row times torch's scaled_dot_product_attention (warmed up like the NA rows), and what
    it computes is full attention: the dense definition without a mask."""
    import numpy as np
    import torch

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: calls.append(args[0].shape) or sdpa(*args, **kwargs))
    runner = demo.make_runner(arrays)
    problem = demo.Problem("2D", (6, 5), 3, heads=2, head_dim=8)
    row = demo.run_full_attention(runner, problem, 2, demo.PeakMemory("cpu"))
    assert row.backend == ("torch SDPA (torch autograd)" if arrays == "torch" else "torch SDPA (cpu)")
    assert row.forward_s > 0 and row.forward_backward_s > 0 and not row.note
    assert calls == [(1, 2, 30, 8)] * 5  # warm-up, 2 timed fwd+bwd, 2 timed fwd; [B, H, tokens, D]
    shape = (1, 30, 2, 8)
    q, k, v, dout = demo._inputs(shape, seed=4)
    got = runner.full_forward_backward(*(runner.to_array(a) for a in (q, k, v, dout)))
    expected = demo.dense_attention(*(a.astype(np.float64) for a in (q, k, v, dout)), 8**-0.5)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(runner.to_numpy(a), b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(runner.to_numpy(runner.full_forward(*(runner.to_array(a) for a in (q, k, v)))),
                               expected[0], rtol=1e-4, atol=1e-5)


def test_demo_without_torch_compares_with_a_dense_softmax(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError: a NumPy-only install
    runner = demo.NumpyRunner()
    assert runner.full_label == "dense softmax (numpy)"
    q, k, v = demo._inputs((1, 7, 1, 4), seed=5)[:3]
    assert runner.full_forward(q, k, v).shape == q.shape


def test_demo_runs_the_backend_it_is_asked_for(capsys):
    """--backend blocked: every row runs (and is checked) on the blocked backend; the choice ends with the run."""
    from na_rtc import backends

    assert main(["demo", "--quick", "--arrays", "numpy", "--no-png", "--backend", "blocked"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.endswith(("pass", "FAIL"))]
    assert len(rows) == len(demo.QUICK_PROBLEMS)
    assert all(" blocked (numpy) " in row and row.endswith("pass") for row in rows), rows
    assert backends.current_backend_name() is None


def test_demo_checks_a_3d_problem(capsys):
    """Both tables hold a 3D problem (na3d against the dense masked definition); on a CPU the blocked backend
    serves it."""
    assert {problem.ndim for problem in demo.PROBLEMS} == {1, 2, 3}
    [problem] = [problem for problem in demo.QUICK_PROBLEMS if problem.ndim == 3]
    assert demo.run(out=None, arrays="numpy", quick=True) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(problem.label + " ")]
    assert rows[0].split()[2:4] == [problem.shape_text(), "blocked"] and rows[0].endswith("pass")
    assert rows[1].startswith(f"{problem.label} vs full attention over {problem.tokens} tokens")


def test_demo_names_the_backend_each_rank_runs_on():
    """On a GPU the cuda kernels serve every rank (automatic selection would give a rank they lacked the
    reference backend, CUDA tensors included); the rows say which."""
    from na_rtc import backends

    gpu = demo.TorchRunner("cuda")
    assert demo.backend_label(gpu, 2) == "cuda (torch CUDA)"
    expected = "cuda" if 3 in backends.get("cuda").ranks else "reference"
    assert demo.backend_label(gpu, 3) == f"{expected} (torch CUDA)"
    with na_rtc.use_backend("emulator"):  # a forced backend is what every call runs on
        assert demo.backend_label(gpu, 3) == "emulator (torch CUDA)"


def test_demo_fails_when_an_output_is_wrong(monkeypatch, capsys):
    """The dense check catches a wrong answer and the exit code says so."""
    correct = na_rtc.na1d

    def off_by_a_little(*args, **kwargs):
        result = correct(*args, **kwargs)
        if isinstance(result, tuple):
            return (result[0] + 1e-3, *result[1:])
        return result + 1e-3

    monkeypatch.setattr(na_rtc, "na1d", off_by_a_little)
    assert demo.run(out=None, arrays="numpy", quick=True) == 1
    assert "FAIL" in capsys.readouterr().out


def test_dense_definition_without_mask_is_full_attention():
    """With k equal to the axis length, NA is full attention (docs/design/definition.md#special-cases)."""
    np = pytest.importorskip("numpy")
    problem = demo.Problem("full", (9,), 9, heads=2, head_dim=4)
    q, k, v, dout = demo._inputs(problem.shape, seed=3)
    masked = demo.dense_attention(q, k, v, dout, 0.5, axes=problem.axes)
    full = demo.dense_attention(q, k, v, dout, 0.5)
    for a, b in zip(masked, full):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_picture_is_skipped_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert demo.draw_neighborhoods(str(tmp_path / "x.png")) is None
    assert "pip install matplotlib" in capsys.readouterr().out
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------- environment probes


@pytest.mark.parametrize("probe", PROBES, ids=lambda probe: probe.__name__)
def test_probe_returns_text(probe):
    result = probe()
    assert isinstance(result, env.Probe)
    assert isinstance(result.text, str) and result.text


def _block_imports(monkeypatch, *names: str) -> None:
    """Make ``import NAME`` fail as if the package were not installed."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("probe", PROBES, ids=lambda probe: probe.__name__)
def test_probes_never_raise_without_optional_packages(monkeypatch, probe):
    _block_imports(monkeypatch, "cupy", "cuda", "cuda.bindings", "cuda.bindings.nvrtc", "torch")
    result = probe()
    assert isinstance(result.text, str) and result.text


def test_missing_cupy_says_how_to_install(monkeypatch):
    _block_imports(monkeypatch, "cupy")
    monkeypatch.setattr(_install, "_libcuda_probe", lambda: (13000, [90]))  # a CUDA 13 driver and an H100, here or not
    gpus = env.gpus()
    assert not gpus.ok
    assert "cupy not installed" in gpus.text
    assert install_command("cuda13") in gpus.text
    assert env.cupy_version().text == "not installed"


def test_missing_nvrtc_says_not_installed(monkeypatch):
    _block_imports(monkeypatch, "cuda", "cuda.bindings", "cuda.bindings.nvrtc")
    nvrtc = env.nvrtc_version()
    assert not nvrtc.ok
    assert "not installed" in nvrtc.text


def test_missing_torch_is_not_an_error(monkeypatch):
    _block_imports(monkeypatch, "torch")
    torch = env.torch_version()
    assert not torch.ok
    assert "not installed" in torch.text


class _CudaRuntimeError(RuntimeError):
    pass


def _fake_cupy(device_count):
    """A cupy stand-in whose runtime reports ``device_count`` (or raises it)."""

    def get_device_count():
        if isinstance(device_count, BaseException):
            raise device_count
        return device_count

    runtime = types.SimpleNamespace(
        CUDARuntimeError=_CudaRuntimeError,
        getDeviceCount=get_device_count,
        driverGetVersion=lambda: 13000,
        getDeviceProperties=lambda index: {
            "name": b"NVIDIA H100 80GB HBM3",
            "major": 9,
            "minor": 0,
            "totalGlobalMem": 80 * 2**30,
        },
    )
    module = types.ModuleType("cupy")
    module.__version__ = "13.6.0"
    module.cuda = types.SimpleNamespace(runtime=runtime)
    return module


def test_no_driver_is_reported_not_raised(monkeypatch):
    error = _CudaRuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(error))
    gpus = env.gpus()
    assert not gpus.ok
    assert "no GPU or no CUDA driver" in gpus.text
    assert "InsufficientDriver" in gpus.text


def test_gpu_is_described_with_its_arch(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(1))
    gpus = env.gpus()
    assert gpus.ok
    assert gpus.value[0].arch == "sm_90"
    assert "NVIDIA H100" in gpus.text and "driver CUDA 13.0" in gpus.text


def test_nvrtc_version_and_archs(monkeypatch):
    nvrtc = types.ModuleType("cuda.bindings.nvrtc")
    nvrtc.nvrtcVersion = lambda: (0, 13, 0)
    nvrtc.nvrtcGetSupportedArchs = lambda: (0, [75, 80, 86, 89, 90, 100, 120])
    bindings = types.ModuleType("cuda.bindings")
    bindings.nvrtc = nvrtc
    cuda = types.ModuleType("cuda")
    cuda.bindings = bindings
    for name, module in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.nvrtc", nvrtc)):
        monkeypatch.setitem(sys.modules, name, module)
    result = env.nvrtc_version()
    assert result.ok and result.value == (13, 0)
    assert result.text == "13.0 (sm_75 .. sm_120)"


def test_nvrtc_library_missing_is_reported(monkeypatch):
    nvrtc = types.ModuleType("cuda.bindings.nvrtc")

    def broken():
        raise RuntimeError("Failed to dlopen libnvrtc.so.13")

    nvrtc.nvrtcVersion = broken
    bindings = types.ModuleType("cuda.bindings")
    bindings.nvrtc = nvrtc
    monkeypatch.setitem(sys.modules, "cuda", types.ModuleType("cuda"))
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.nvrtc", nvrtc)
    result = env.nvrtc_version()
    assert not result.ok
    assert "libnvrtc" in result.text


def test_cache_dir_follows_the_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("NA_RTC_CACHE_DIR", str(tmp_path / "kernels"))
    result = env.cache_dir()
    assert result.value == tmp_path / "kernels"
    assert "not created yet" in result.text
    assert "NA_RTC_CACHE_DIR" in env.settings().text


def test_gpu_check_fills_the_kernel_cache_in_parallel_first(monkeypatch):
    """Step 0 of make gpu-check: python -m na_rtc precompile for this machine's GPUs, many compiles at once."""
    import subprocess

    from na_rtc import gpu_check

    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 3, stdout="sm_90  fused: compiled\n", stderr="")

    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
    record = gpu_check._precompile(jobs=16)
    assert calls and calls[0][1:] == ["-m", "na_rtc", "precompile", "--jobs", "16"]
    assert record["returncode"] == 3 and "precompile --jobs 16" in record["command"]


def test_gpu_check_step_past_its_limit_is_stopped_with_its_output_so_far():
    """A hanging step cannot eat the lent machine's ten minutes: it is stopped at its limit, output kept."""
    from na_rtc import gpu_check

    script = "import time; print('step started', flush=True); time.sleep(60)"
    returncode, text = gpu_check._captured([sys.executable, "-c", script], limit=2.0)
    assert returncode == gpu_check.TIMED_OUT
    assert "step started" in text and "limit of 2 s" in text


def test_gpu_check_keeps_to_its_deadline_and_leaves_the_benchmark_its_share(monkeypatch, tmp_path):
    """Every step gets the time left as its limit, the tests leave the benchmark its share, and the
    report is on disk after every step (a run stopped from outside still says how far it got)."""
    import json

    import torch

    from na_rtc import gpu_check

    limits, reports = {}, []

    def saved_report():
        found = sorted(tmp_path.glob("gpu-check-*.json"))
        return json.loads(found[0].read_text()) if found else {}

    def fake_precompile(jobs, limit=None):
        limits["precompile"] = limit
        return {"returncode": 0, "seconds": 0.0}

    def fake_selftest(results, stamp, limit=None):
        reports.append(sorted(saved_report()))
        limits["selftest"] = limit
        return {"returncode": 0, "seconds": 0.0}

    def fake_pytest(args, junit, limit=None):
        reports.append(sorted(saved_report()))
        limits["tests"] = limit
        return {"returncode": 0, "seconds": 0.0, "summary": "1 passed"}

    def fake_bench(results, stamp, preset, budget, repeat, limit=None, compile_timing=False, entries=None):
        reports.append(sorted(saved_report()))
        limits["bench"], limits["bench_budget"], limits["compile_timing"] = limit, budget, compile_timing
        limits["entries"] = entries
        return {"returncode": 0, "seconds": 0.0, "json": "bench.json"}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "environment", lambda device: {"device": "test GPU"})
    monkeypatch.setattr(gpu_check, "_precompile", fake_precompile)
    monkeypatch.setattr(gpu_check, "_selftest", fake_selftest)
    monkeypatch.setattr(gpu_check, "_pytest", fake_pytest)
    monkeypatch.setattr(gpu_check, "_bench", fake_bench)
    assert gpu_check.main(["--results", str(tmp_path), "--deadline", "500", "--bench-budget", "300"]) == 0

    share = gpu_check.MIN_BENCH_S + gpu_check.BENCH_RESERVE_S
    for step in ("precompile", "selftest", "tests"):
        assert 500 - share - 5 < limits[step] <= 500 - share
    assert limits["bench_budget"] == 300  # the budget asked for fits in the time left
    assert limits["bench"] <= 500 and limits["compile_timing"] is False  # step 0 timed the compiles
    assert limits["entries"] == gpu_check.BENCH_ENTRIES and "flex_natural" in limits["entries"]
    assert reports[0] == ["deadline_s", "environment", "kind", "precompile", "utc"]
    assert "gpu_tests" in reports[-1] and "benchmark" in saved_report()


def test_gpu_check_bench_budget_shrinks_to_the_time_the_tests_left(monkeypatch, tmp_path):
    import torch

    from na_rtc import gpu_check

    budgets = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "environment", lambda device: {"device": "test GPU"})
    monkeypatch.setattr(gpu_check, "_precompile", lambda jobs, limit=None: {"returncode": 0, "seconds": 0.0})
    monkeypatch.setattr(gpu_check, "_selftest", lambda results, stamp, limit=None: {"returncode": 0})
    monkeypatch.setattr(gpu_check, "_pytest", lambda args, junit, limit=None: {"returncode": 0, "summary": ""})
    monkeypatch.setattr(gpu_check, "_bench", lambda *args, **kwargs: budgets.append(args[3]) or {"returncode": 0})
    clock = iter([0.0, 400.0, 400.0, 400.0, 400.0, 400.0, 400.0, 400.0, 400.0])
    monkeypatch.setattr(gpu_check.time, "perf_counter", lambda: next(clock, 400.0))
    assert gpu_check.main(["--results", str(tmp_path), "--deadline", "500", "--bench-budget", "300"]) == 0
    assert budgets == [500 - 400 - gpu_check.BENCH_RESERVE_S]


def test_gpu_check_runs_the_gpu_tests_in_parallel_with_a_timeout_where_the_plugins_are(monkeypatch):
    """The lent GPU machines' python has pytest-xdist and pytest-timeout; CI's .venv need not have them."""
    import importlib.util

    from na_rtc import gpu_check

    monkeypatch.setattr(gpu_check.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert gpu_check._plugin_args() == ["-n", str(gpu_check.MAX_TEST_WORKERS), f"--timeout={gpu_check.TEST_TIMEOUT_S}"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert gpu_check._plugin_args() == []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(gpu_check.os, "cpu_count", lambda: 2)
    assert gpu_check._plugin_args() == [f"--timeout={gpu_check.TEST_TIMEOUT_S}"]  # one worker: no xdist


def test_gpu_check_asks_the_harness_for_its_entries(monkeypatch, tmp_path):
    """The slice runs the targets' comparison by default (the slow SIMT, split and straightforward entries would
    cost the slice problems); --bench-entries all leaves the choice to the harness."""
    import subprocess

    from na_rtc import gpu_check
    from na_rtc.bench.runner import all_entries

    assert set(gpu_check.BENCH_ENTRIES) <= {entry.name for entry in all_entries()}
    commands = []
    monkeypatch.setattr(gpu_check.subprocess, "run",
                        lambda command, **kwargs: commands.append(command) or subprocess.CompletedProcess(command, 0))
    gpu_check._bench(tmp_path, "stamp", "targets", 100.0, 5)
    gpu_check._bench(tmp_path, "stamp", "targets", 100.0, 5, entries=None)
    assert commands[0][-2:] == ["--entries", ",".join(gpu_check.BENCH_ENTRIES)]
    assert "--entries" not in commands[1]
