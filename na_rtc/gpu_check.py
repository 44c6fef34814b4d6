"""``make gpu-check``: everything a GPU machine should run, in one command.

0. every kernel family compiled for this machine's GPUs, in parallel, into the
   kernel cache (``python -m na_rtc precompile``), so that the tests and the
   benchmark below load kernels instead of compiling them one at a time,
1. ``python -m na_rtc selftest --quick``: the primitive self-tests (inline
   PTX) and a canary per kernel family, dtype and rank against the float64
   reference, recording the verdicts first-use verification reads,
2. every ``gpu``-marked test,
3. one slice of the benchmark harness (``python -m na_rtc bench``, default
   preset ``gpu-check``: the shapes the performance targets are set on and
   one 3D video problem, every entry side by side), writing its JSON,
   markdown and (with matplotlib) chart beside the rest, then the targets
   from it, met or not (``bench --targets``),

then one JSON file under ``--results`` (default ``benchmarks/results``) and a
summary. Made for a bare GPU machine without network: it uses the python it
is started with and the package from the checkout, and installs nothing;
matplotlib and FlexAttention are optional (the harness says what it skipped).

Lent GPU machines take one command of at most ten minutes, so the whole run
keeps to ``--deadline`` seconds: every step runs with the time left as its
limit, the benchmark slice gets what the tests left it, and the JSON report is
rewritten after every step, so a run cut short still says how far it got.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from na_rtc.bench.cli import INCOMPLETE
from na_rtc.bench.presets import PRESET_ALIASES, PRESETS, preset_name
from na_rtc.bench.report import environment

ROOT = Path(__file__).resolve().parent.parent
#: the benchmark preset of the slice: the target shapes, and one 3D problem after the FlexAttention targets
DEFAULT_BENCH_PRESET = "gpu-check"


#: What a step that ran past its limit reports as its exit status (as timeout(1) does).
TIMED_OUT = 124
#: The whole run fits one ten-minute command on a lent GPU machine, with room for its start.
DEFAULT_DEADLINE_S = 560.0
#: The least the tests leave to the benchmark slice (less when --bench-budget asks for less).
MIN_BENCH_S = 200.0
#: Seconds kept back from the benchmark slice for its process start and the last write.
BENCH_RESERVE_S = 20.0


class Deadline:
    """The seconds left of the run's time limit (``None``: no limit)."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.perf_counter() + seconds

    def left(self) -> float | None:
        return None if self.end is None else max(0.0, self.end - time.perf_counter())


def _captured(command: list[str], limit: float | None) -> tuple[int, str]:
    """Run ``command`` in the checkout; (exit status, stdout+stderr), TIMED_OUT when it ran past ``limit``."""
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as expired:
        text = "".join(part.decode(errors="replace") if isinstance(part, bytes) else (part or "")
                       for part in (expired.stdout, expired.stderr))
        return TIMED_OUT, text + f"\n(stopped: ran past its limit of {limit:.0f} s)"
    return done.returncode, done.stdout + done.stderr


#: the most pytest-xdist workers the gpu-marked tests get: they share one GPU, and their float64
#: references run on the CPU, which is where the time goes
MAX_TEST_WORKERS = 8
#: seconds one test may take where pytest-timeout is installed (a hung kernel fails that test, not the run)
TEST_TIMEOUT_S = 300


def _plugin_args() -> list[str]:
    """Parallel workers and a per-test timeout, where the machine's python has the plugins (the lent GPU
    machines' image has pytest-xdist and pytest-timeout; CI's .venv need not)."""
    args = []
    workers = max(1, min(MAX_TEST_WORKERS, (os.cpu_count() or 1) // 2))
    if workers > 1 and importlib.util.find_spec("xdist") is not None:
        args += ["-n", str(workers)]
    if importlib.util.find_spec("pytest_timeout") is not None:
        args += [f"--timeout={TEST_TIMEOUT_S}"]
    return args


def _pytest(args: list[str], junit: Path, limit: float | None = None) -> dict:
    started = time.perf_counter()
    returncode, text = _captured(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *args], limit)
    tail = text.strip().splitlines()[-15:]
    print("\n".join(tail))
    return {"args": args, "returncode": returncode, "seconds": round(time.perf_counter() - started, 1),
            "summary": tail[-1] if tail else ""}


def _selftest(results: Path, stamp: str, limit: float | None = None) -> dict:
    """``python -m na_rtc selftest --quick`` with its verdicts as JSON beside the report."""
    path = results / f"selftest-{stamp}.json"
    command = [sys.executable, "-m", "na_rtc", "selftest", "--quick", "--json", str(path)]
    started = time.perf_counter()
    returncode, text = _captured(command, limit)
    lines = text.strip().splitlines()
    print("\n".join(lines[-15:]))
    return {"command": " ".join(command[1:]), "returncode": returncode, "json": str(path),
            "seconds": round(time.perf_counter() - started, 1), "lines": lines[-200:]}


def _precompile(jobs: int, limit: float | None = None) -> dict:
    """Fill the kernel cache for this machine's GPUs, ``jobs`` NVRTC compiles at a time.

    Its per-family lines (compile seconds, or why one failed) go into the report:
    they are the compile-time figures of the run, measured once here rather than
    again by the benchmark harness.
    """
    command = [sys.executable, "-m", "na_rtc", "precompile", "--jobs", str(jobs)]
    started = time.perf_counter()
    returncode, text = _captured(command, limit)
    lines = text.strip().splitlines()
    print("\n".join(lines[-3:]))
    return {"command": " ".join(command[1:]), "returncode": returncode,
            "seconds": round(time.perf_counter() - started, 1), "lines": lines[-200:]}


#: the benchmark entries gpu-check runs unless told otherwise: what the performance targets compare (the
#: dispatcher's fused op, its GPU variants, FlexAttention in both token orders), NATTEN where it is importable
#: and the cheap baselines of the table in docs/performance.md. Left out: the SIMT fused kernels, the split ops and the
#: straightforward kernels, slow on the large target shapes, which would cost the slice problems
#: (``--bench-entries all`` runs them too)
BENCH_ENTRIES = ("fused", "fused_tc_rows16", "fused_wgmma", "fused_wgmma_1wg", "fused_wgmma_kc32", "naive_torch",
                 "flex_natural", "flex_tiled", "natten", "sdpa")


def _bench(results: Path, stamp: str, preset: str, budget: float, repeat: int, limit: float | None = None,
           compile_timing: bool = False, entries: tuple[str, ...] | None = BENCH_ENTRIES) -> dict:
    """One slice of the harness in its own process (a crashing kernel cannot take gpu-check down with it).

    The slice stops itself within ``budget``; ``limit`` only stops a slice that hangs.
    """
    path = results / f"bench-{preset}-{stamp}.json"
    command = [sys.executable, "-m", "na_rtc", "bench", "--preset", preset, "--out", str(path), "--budget",
               f"{budget:.0f}", "--repeat", str(repeat), "--plot",
               "--compile-timing" if compile_timing else "--no-compile-timing"]
    if entries:
        command += ["--entries", ",".join(entries)]
    started = time.perf_counter()
    try:
        returncode = subprocess.run(command, cwd=ROOT, timeout=limit).returncode  # streamed: progress shows
    except subprocess.TimeoutExpired:
        returncode = TIMED_OUT  # the JSON holds every problem measured before the stop
    record = {"command": " ".join(command[1:]), "returncode": returncode, "json": str(path),
              "seconds": round(time.perf_counter() - started, 1)}
    if returncode in (INCOMPLETE, TIMED_OUT):
        record["resume"] = f"python -m na_rtc bench --resume {path}"
    return record


def _targets(bench_json: Path) -> dict:
    """The performance targets from the slice's results (printed: the lent machine's output tail shows them)."""
    from na_rtc.bench.cli import targets_report

    if not bench_json.exists():
        return {"skipped": f"{bench_json} was not written"}
    try:
        text = targets_report(json.loads(bench_json.read_text()))
    except (ValueError, KeyError) as error:
        return {"skipped": f"{bench_json} could not be read: {error}"}
    print(text)
    return {"table": text}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m na_rtc.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--repeat", type=int, default=10, help="most timed runs per benchmark measurement")
    parser.add_argument("--bench-preset", default=DEFAULT_BENCH_PRESET, choices=(*PRESETS, *PRESET_ALIASES),
                        metavar="{" + ",".join(PRESETS) + "}",
                        help=f"benchmark preset (default: {DEFAULT_BENCH_PRESET}, the shapes the performance targets "
                             "are set on and one 3D problem)")
    parser.add_argument("--bench-budget", type=float, default=300.0, metavar="S",
                        help="time budget of the benchmark slice; the rest is resumed with --resume (default 300)")
    parser.add_argument("--no-bench", action="store_true", help="only the self-tests and the gpu tests")
    parser.add_argument("--bench-entries", default=",".join(BENCH_ENTRIES), metavar="LIST",
                        help="comma-separated benchmark entries, or 'all' for every entry the machine suits "
                             "(default: the fused kernels against FlexAttention, and the cheap baselines)")
    parser.add_argument("--bench-compile-timing", action="store_true",
                        help="let the benchmark compile every family again into an empty cache to time it "
                             "(step 0 already reports each family's compile time)")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S, metavar="S",
                        help=f"wall-clock limit of the whole run, steps included (default {DEFAULT_DEADLINE_S:.0f}: "
                             "one ten-minute command on a lent machine); 0: none")
    args = parser.parse_args(argv)
    args.bench_preset = preset_name(args.bench_preset)
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
    deadline = Deadline(args.deadline if args.deadline > 0 else None)
    report = {"kind": "gpu-check", "utc": stamp, "environment": environment("cuda:0"), "deadline_s": args.deadline}
    path = results / f"gpu-check-{stamp}.json"

    def save() -> None:  # after every step: a run stopped from outside still leaves what it measured
        path.write_text(json.dumps(report, indent=2))

    def limit(keep: float = 0.0) -> float | None:
        left = deadline.left()
        return None if left is None else max(1.0, left - keep)

    # the tests may not eat the benchmark's share: it is what a lent machine is for
    bench_share = 0.0 if args.no_bench else min(args.bench_budget, MIN_BENCH_S) + BENCH_RESERVE_S
    print(f"== gpu-check on {report['environment']['device']} ==")
    print("-- 0. compile every kernel for this machine's GPUs (in parallel, into the kernel cache)")
    report["precompile"] = _precompile(jobs=max(1, min(16, os.cpu_count() or 1)), limit=limit(bench_share))
    save()
    print("-- 1. selftest --quick: primitives (inline PTX), then a canary per kernel family, dtype and rank")
    report["selftest"] = _selftest(results, stamp, limit(bench_share))
    save()
    print("-- 2. gpu-marked tests")
    report["gpu_tests"] = _pytest([*_plugin_args(), "-m", "gpu", "tests"], results / f"junit-gpu-{stamp}.xml",
                                  limit(bench_share))
    save()
    if not args.no_bench:
        left = deadline.left()
        budget = args.bench_budget if left is None else max(30.0, min(args.bench_budget, left - BENCH_RESERVE_S))
        print(f"-- 3. benchmark harness, preset {args.bench_preset} (one slice of at most {budget:.0f} s)")
        entries = None if args.bench_entries == "all" else tuple(args.bench_entries.split(","))
        report["benchmark"] = _bench(results, stamp, args.bench_preset, budget, args.repeat, limit(),
                                     args.bench_compile_timing, entries)
        if report["benchmark"].get("json"):
            report["targets"] = _targets(Path(report["benchmark"]["json"]))
    save()
    failed = report["selftest"]["returncode"] != 0 or report["gpu_tests"]["returncode"] != 0
    for step in ("precompile", "selftest", "gpu_tests"):
        if report[step]["returncode"] == TIMED_OUT:
            print(f"   {step} ran past the time it was given (--deadline {args.deadline:.0f} s in all)")
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
