"""``make gpu-check``: everything a GPU machine should run, in one command.

0. every kernel family compiled for this machine's GPUs, in parallel, into the
   kernel cache (``python -m na_rtc precompile``), so that the tests and the
   benchmark below load kernels instead of compiling them one at a time,
1. the GPU self-tests of the inline-PTX primitives (tests/test_primitives.py),
2. every ``gpu``-marked test,
3. one slice of the benchmark harness (``python -m na_rtc bench``, default
   preset ``issues``: the issues' target shapes, every entry side by side),
   writing its JSON, markdown and (with matplotlib) chart beside the rest,

then one JSON file under ``--results`` (default ``benchmarks/results``) and a
summary. Made for a bare GPU machine without network: it uses the python it
is started with and the package from the checkout, and installs nothing;
matplotlib and FlexAttention are optional (the harness says what it skipped).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from na_rtc.bench.cli import INCOMPLETE
from na_rtc.bench.presets import PRESETS
from na_rtc.bench.report import environment

ROOT = Path(__file__).resolve().parent.parent


def _pytest(args: list[str], junit: Path) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *args],
                          cwd=ROOT, capture_output=True, text=True)
    tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
    print("\n".join(tail))
    return {"args": args, "returncode": done.returncode, "seconds": round(time.perf_counter() - started, 1),
            "summary": tail[-1] if tail else ""}


def _precompile(jobs: int) -> dict:
    """Fill the kernel cache for this machine's GPUs, ``jobs`` NVRTC compiles at a time."""
    command = [sys.executable, "-m", "na_rtc", "precompile", "--jobs", str(jobs)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
    print("\n".join(tail))
    return {"command": " ".join(command[1:]), "returncode": done.returncode,
            "seconds": round(time.perf_counter() - started, 1)}


def _bench(results: Path, stamp: str, preset: str, budget: float, repeat: int) -> dict:
    """One slice of the harness in its own process (a crashing kernel cannot take gpu-check down with it)."""
    path = results / f"bench-{preset}-{stamp}.json"
    command = [sys.executable, "-m", "na_rtc", "bench", "--preset", preset, "--out", str(path), "--budget", str(budget),
               "--repeat", str(repeat), "--plot"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT)  # streamed: progress shows while it runs
    record = {"command": " ".join(command[1:]), "returncode": done.returncode, "json": str(path),
              "seconds": round(time.perf_counter() - started, 1)}
    if done.returncode == INCOMPLETE:
        record["resume"] = f"python -m na_rtc bench --resume {path}"
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m na_rtc.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--repeat", type=int, default=10, help="most timed runs per benchmark measurement")
    parser.add_argument("--bench-preset", default="issues", choices=tuple(PRESETS),
                        help="benchmark preset (default: issues, the issues' target shapes)")
    parser.add_argument("--bench-budget", type=float, default=300.0, metavar="S",
                        help="time budget of the benchmark slice; the rest is resumed with --resume (default 300)")
    parser.add_argument("--no-bench", action="store_true", help="only the self-tests and the gpu tests")
    args = parser.parse_args(argv)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")

    try:
        import torch
    except ImportError:
        print(f"gpu-check needs torch (and cupy) in the python that runs it; {sys.executable} has no torch. "
              "On a GPU machine run it with the python that holds PyTorch (make gpu-check GPU_PYTHON=...)")
        return 2
    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU visible to torch; none found")
        return 2
    report = {"kind": "gpu-check", "utc": stamp, "environment": environment("cuda:0")}
    print(f"== gpu-check on {report['environment']['device']} ==")
    print("-- 0. compile every kernel for this machine's GPUs (in parallel, into the kernel cache)")
    report["precompile"] = _precompile(jobs=max(1, min(16, os.cpu_count() or 1)))
    print("-- 1. primitive self-tests (inline PTX)")
    report["primitives"] = _pytest(["-m", "gpu", "tests/test_primitives.py"], results / f"junit-primitives-{stamp}.xml")
    print("-- 2. gpu-marked tests")
    report["gpu_tests"] = _pytest(["-m", "gpu", "tests"], results / f"junit-gpu-{stamp}.xml")
    if not args.no_bench:
        print(f"-- 3. benchmark harness, preset {args.bench_preset} (one slice of at most {args.bench_budget:.0f} s)")
        report["benchmark"] = _bench(results, stamp, args.bench_preset, args.bench_budget, args.repeat)
    path = results / f"gpu-check-{stamp}.json"
    path.write_text(json.dumps(report, indent=2))
    failed = report["primitives"]["returncode"] != 0 or report["gpu_tests"]["returncode"] != 0
    bench = report.get("benchmark")
    if bench is not None and bench["returncode"] not in (0, INCOMPLETE):
        failed = True
        print(f"   the benchmark harness exited with status {bench['returncode']}")
    if bench is not None and "resume" in bench:
        print(f"   benchmark: more problems left; continue with: PYTHONPATH={ROOT} {sys.executable} -m "
              f"{bench['resume'].removeprefix('python -m ')}")
    print(f"== wrote {path}; {'FAILED' if failed else 'all GPU tests passed'} ==")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
