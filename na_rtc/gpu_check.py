"""``make gpu-check``: everything a GPU machine should run, in one command.

1. the GPU self-tests of the inline-PTX primitives (tests/test_primitives.py),
2. every ``gpu``-marked test,
3. a quick benchmark of the kernels that exist against the reference on the
   same GPU,

then one JSON file under ``--results`` (default ``benchmarks/results``) and a
summary. Made for a bare GPU machine without network: it uses the python it
is started with and the package from the checkout, and installs nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: (label, spatial, kernel, dilation, causal, heads, head_dim, dtype[, batch])
QUICK_PROBLEMS = [
    ("2D 128x128 b2 h8 D64 k=13 (fused target)", (128, 128), 13, 1, False, 8, 64, "float16", 2),
    ("1D 4096 k=127", (4096,), 127, 1, False, 4, 64, "float16"),
    ("2D 56x56 k=7 (NAT stage 1)", (56, 56), 7, 1, False, 4, 32, "float16"),
    ("2D 128x128 k=13", (128, 128), 13, 1, False, 4, 32, "float16"),
    ("2D 128x128 k=13 dil=2 fp32", (128, 128), 13, 2, False, 4, 32, "float32"),
    ("2D 64x64 k=7 causal bf16", (64, 64), 7, 1, True, 4, 64, "bfloat16"),
]


def _pytest(args: list[str], junit: Path) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *args],
                          cwd=ROOT, capture_output=True, text=True)
    tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
    print("\n".join(tail))
    return {"args": args, "returncode": done.returncode, "seconds": round(time.perf_counter() - started, 1),
            "summary": tail[-1] if tail else ""}


def _time_cuda(fn, repeat: int) -> dict:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def _bench_problem(problem, repeat: int) -> dict:
    import torch

    import na_rtc

    label, spatial, kernel, dilation, causal, heads, head_dim, dtype, *batch = problem
    fused = na_rtc.na1d if len(spatial) == 1 else na_rtc.na2d
    shape = (batch[0] if batch else 1, *spatial, heads, head_dim)
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, device="cuda", dtype=getattr(torch, dtype), requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=q.dtype)
    row = {"problem": label, "shape": list(shape), "kernel_size": kernel, "dilation": dilation, "causal": causal,
           "dtype": dtype}
    for backend in ("cuda", "reference"):
        def forward():
            with torch.no_grad():
                fused(q, k, v, kernel, dilation=dilation, is_causal=causal, backend=backend)

        def forward_backward():
            out = fused(q, k, v, kernel, dilation=dilation, is_causal=causal, backend=backend)
            torch.autograd.grad(out, (q, k, v), grad)

        try:
            torch.cuda.reset_peak_memory_stats()
            row[backend] = {"forward": _time_cuda(forward, repeat), "forward_backward": _time_cuda(forward_backward, repeat),
                            "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20}
        except Exception as error:  # out of memory and the like: reported, not hidden
            row[backend] = {"error": f"{type(error).__name__}: {error}"[:300]}
            torch.cuda.empty_cache()
    return row


#: issue 4's split-op targets: (label, spatial, batch, heads, head_dim, kernel, dtype)
SPLIT_PROBLEMS = [
    ("split 2D 56x56 b8 k=7", (56, 56), 8, 4, 32, 7, "float16"),
    ("split 2D 128x128 b2 h8 k=7", (128, 128), 2, 8, 32, 7, "float16"),
]


def _bench_split(problem, repeat: int) -> dict:
    """QK + AV forward: tiled kernels (the dispatcher), straightforward kernels, torch gather (reference)."""
    import torch

    import na_rtc
    from na_rtc import _args
    from na_rtc.runtime import cuda, naive

    label, spatial, batch, heads, head_dim, kernel, dtype = problem
    shape = (batch, *spatial, heads, head_dim)
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, device="cuda", dtype=getattr(torch, dtype)) for _ in range(3))
    qk_problem = _args.qk_problem(len(spatial), q, k, kernel, 1, False, None)
    av_problem = _args.av_problem(len(spatial), na_rtc.na2d_qk(q, k, kernel), v, kernel, 1, False)
    straightforward = naive.NaiveKernels(cuda.run)

    def split(backend):
        attn = na_rtc.na2d_qk(q, k, kernel, backend=backend).softmax(-1)
        na_rtc.na2d_av(attn, v, kernel, backend=backend)

    def straightforward_split():
        attn = straightforward.qk(qk_problem, q, k, None, dtype, 1.0, float("-inf")).softmax(-1)
        straightforward.av(av_problem, attn, v)

    row = {"problem": label, "shape": list(shape), "kernel_size": kernel, "dtype": dtype}
    for name, fn in (("tiled", lambda: split("cuda")), ("straightforward", straightforward_split),
                     ("torch gather (reference)", lambda: split("reference"))):
        try:
            with torch.no_grad():
                row[name] = _time_cuda(fn, repeat)
        except Exception as error:
            row[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
    return row


def _environment() -> dict:
    import torch

    info = {"device": torch.cuda.get_device_name(), "capability": ".".join(map(str, torch.cuda.get_device_capability())),
            "torch": torch.__version__, "python": platform.python_version()}
    try:
        import cupy

        info["cupy"] = cupy.__version__
        info["driver"] = cupy.cuda.runtime.driverGetVersion()
    except Exception as error:
        info["cupy"] = f"unavailable: {error}"
    try:
        from na_rtc.runtime import nvrtc

        info["nvrtc"] = ".".join(map(str, nvrtc.nvrtc_version()))
    except Exception as error:
        info["nvrtc"] = f"unavailable: {error}"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    info["commit"] = commit.stdout.strip() or "unknown"
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m na_rtc.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args(argv)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")

    import torch

    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU visible to torch; none found")
        return 2
    report = {"kind": "gpu-check", "utc": stamp, "environment": _environment()}
    print(f"== gpu-check on {report['environment']['device']} ==")
    print("-- 1. primitive self-tests (inline PTX)")
    report["primitives"] = _pytest(["-m", "gpu", "tests/test_primitives.py"], results / f"junit-primitives-{stamp}.xml")
    print("-- 2. gpu-marked tests")
    report["gpu_tests"] = _pytest(["-m", "gpu", "tests"], results / f"junit-gpu-{stamp}.xml")
    print("-- 3. quick benchmark (CUDA events, median of", args.repeat, "runs)")
    report["benchmarks"] = []
    for problem in QUICK_PROBLEMS:
        row = _bench_problem(problem, args.repeat)
        report["benchmarks"].append(row)
        cells = []
        for backend in ("cuda", "reference"):
            entry = row[backend]
            cells.append(f"{backend}: " + (entry["error"] if "error" in entry else
                         f"fwd {entry['forward']['median_ms']:.2f} ms, fwd+bwd {entry['forward_backward']['median_ms']:.2f} ms, "
                         f"peak {entry['peak_memory_mb']:.0f} MiB"))
        print(f"  {row['problem']:32s} " + " | ".join(cells))
    print("-- 4. split ops (qk, softmax, av) forward")
    report["split_benchmarks"] = []
    for problem in SPLIT_PROBLEMS:
        row = _bench_split(problem, args.repeat)
        report["split_benchmarks"].append(row)
        cells = [f"{name}: " + (row[name]["error"] if "error" in row[name] else f"{row[name]['median_ms']:.2f} ms")
                 for name in ("tiled", "straightforward", "torch gather (reference)")]
        print(f"  {row['problem']:32s} " + " | ".join(cells))
    path = results / f"gpu-check-{stamp}.json"
    path.write_text(json.dumps(report, indent=2))
    failed = report["primitives"]["returncode"] != 0 or report["gpu_tests"]["returncode"] != 0
    print(f"== wrote {path}; {'FAILED' if failed else 'all GPU tests passed'} ==")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
