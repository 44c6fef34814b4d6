"""What a results JSON says about where it was measured, and its markdown tables.

The tables are drawn from the JSON alone (never from live objects), so a
results file from a GPU machine can be turned into the performance table of docs/performance.md anywhere.
"""

from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent

#: entries a speedup is reported against, in the order shown
BASELINES = ("naive_torch", "flex", "sdpa")
FLEX = ("flex_natural", "flex_tiled")


# ---------------------------------------------------------------- environment


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git() -> dict:
    def git(*args):
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return done.stdout.strip() if done.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        commit = dirty = None
    if not commit:
        return {"commit": "unknown (not a git checkout)"}
    return {"commit": commit, "dirty": bool(dirty)}


def _nvidia_smi_driver() -> str | None:
    """The driver's own version (e.g. 570.124.06), which CUDA's API does not give; None without nvidia-smi."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None


def environment(device: str) -> dict:
    """Device, driver and library versions, git commit and command line (never raises)."""
    from .. import _environment as env

    info = {
        "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(["python -m na_rtc", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("__main__.py")
        else " ".join(sys.argv),
        "device_type": "cuda" if device.startswith("cuda") else "cpu",
        "cpu": f"{_cpu_name()} ({__import__('os').cpu_count()} cores visible)",
        "python": platform.python_version(),
        "numpy": env.numpy_version().text,
        "torch": env.torch_version().text,
        "cupy": env.cupy_version().text,
        "nvrtc": env.nvrtc_version().text,
        "na_rtc": env.na_rtc_version().text,
        **_git(),
    }
    if device.startswith("cuda"):
        try:
            import torch

            index = torch.device(device).index or 0
            info["device"] = torch.cuda.get_device_name(index)
            info["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(index)
            info["cuda"] = f"torch built with CUDA {torch.version.cuda}"
        except Exception as error:  # noqa: BLE001
            info["device"] = f"unknown GPU ({type(error).__name__}: {error})"
        gpus = env.gpus()
        supported = gpus.text.rsplit("(", 1)[-1].rstrip(")") if gpus.ok else gpus.text  # "driver CUDA 12.8"
        version = _nvidia_smi_driver()
        info["driver"] = f"driver {version} ({supported.removeprefix('driver ')})" if version else supported
    else:
        info["device"] = f"CPU: {info['cpu']}"
        info["driver"] = "n/a (no GPU)"
        info["cuda"] = "n/a (no GPU)"
    return info


def device_summary(environment: dict) -> str:
    """One line naming the hardware and software a results file comes from."""
    text = environment.get("device", "unknown device")
    if environment.get("device_type") == "cuda":
        text += (f" ({environment.get('capability', '?')}; {environment.get('driver', '?')}; "
                 f"{environment.get('cuda', '?')}; NVRTC {environment.get('nvrtc', '?')})")
    torch_version = str(environment.get("torch", "?")).split(" ")[0]
    commit = str(environment.get("commit", "?"))[:10]
    dirty = " + local changes" if environment.get("dirty") else ""
    return f"{text}; torch {torch_version}; na_rtc {environment.get('na_rtc', '?')} at {commit}{dirty}"


# ---------------------------------------------------------------- numbers


def _median(entry: dict | None, mode: str) -> float | None:
    if not entry:
        return None
    measured = entry.get(mode) or {}
    return measured.get("median_ms")


def best_flex(problem: dict, mode: str) -> tuple[str | None, float | None]:
    """The faster FlexAttention token order for ``mode`` (name, median ms)."""
    found = [(name, _median(problem["entries"].get(name), mode)) for name in FLEX]
    found = [(name, ms) for name, ms in found if ms is not None]
    return min(found, key=lambda item: item[1]) if found else (None, None)


def baseline_ms(problem: dict, baseline: str, mode: str) -> float | None:
    if baseline == "flex":
        return best_flex(problem, mode)[1]
    return _median(problem["entries"].get(baseline), mode)


def speedup(problem: dict, entry: str, baseline: str, mode: str) -> float | None:
    """How many times faster ``entry`` is than ``baseline`` on ``mode`` (None when either did not run)."""
    ours, theirs = _median(problem["entries"].get(entry), mode), baseline_ms(problem, baseline, mode)
    if not ours or not theirs:
        return None
    return theirs / ours


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _mode_cells(entry: dict, mode: str) -> tuple[str, str]:
    measured = entry.get(mode)
    if not measured:
        return "-", "-"
    if "median_ms" not in measured:
        return f"{measured.get('status', 'error')}: {measured.get('reason', '')}", "-"
    spread = f"{_ms(measured['median_ms'])} [{_ms(measured['min_ms'])}-{_ms(measured['max_ms'])}]"
    return spread, _number(measured.get("tflops"))


def _memory_cell(entry: dict) -> str:
    values = [(entry.get(mode) or {}).get("peak_extra_mb") for mode in ("forward", "forward_backward")]
    if all(v is None for v in values):
        return "n/a"
    return " / ".join("-" if v is None else f"{v:.3g}" for v in values)


# ---------------------------------------------------------------- the full markdown report


def problem_table(problem: dict) -> str:
    gflop = problem["flops_forward"] / 1e9
    lines = [f"#### {problem['label']}" + (f" ({problem['note']})" if problem.get("note") else ""),
             "",
             f"{gflop:.4g} GFLOP forward (exact neighbor counts; fwd+bwd counts 3.5x); "
             f"output {problem['output_mb']:.3g} MB",
             "",
             "| entry | fwd ms [min-max] | fwd TFLOP/s | fwd+bwd ms [min-max] | fwd+bwd TFLOP/s "
             "| peak extra MB (fwd / fwd+bwd) | first call ms | vs naive torch (fwd / fwd+bwd) "
             "| vs FlexAttention (fwd / fwd+bwd) | output max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    gpu_only = [name for name, entry in problem["entries"].items() if entry.get("gpu_only")]
    for name, entry in problem["entries"].items():
        label = entry.get("label", name)
        if entry.get("gpu_only"):
            continue
        if entry.get("status") in ("skipped", "unavailable", "error", "oom"):
            lines.append(f"| {label} | {entry['status']}: {entry.get('reason', '')} | | | | | | | | |")
            continue
        fwd, fwd_t = _mode_cells(entry, "forward")
        both, both_t = _mode_cells(entry, "forward_backward")
        first = _ms((entry.get("forward") or {}).get("first_call_ms"))
        vs = [" / ".join(_x(speedup(problem, name, baseline, mode)) for mode in ("forward", "forward_backward"))
              for baseline in ("naive_torch", "flex")]
        lines.append(f"| {label} | {fwd} | {fwd_t} | {both} | {both_t} | {_memory_cell(entry)} | {first} | {vs[0]} "
                     f"| {vs[1]} | {_check_cell(entry.get('output_check'))} |")
    if gpu_only:
        lines += ["", f"Not run on a CPU-only machine: {len(gpu_only)} GPU comparisons ({', '.join(gpu_only)}; the "
                      "JSON says why for each, and `--entries NAME` runs one here anyway)."]
    notes = [f"{entry.get('label', name)}: " + ", ".join(f"{k} {_note(v)}" for k, v in entry["notes"].items())
             for name, entry in problem["entries"].items() if entry.get("notes")]
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines)


def _check_cell(check: dict | None) -> str:
    """The forward output against the problem's first entry (the baseline of the comparison)."""
    if not check:
        return "-"
    if "error" in check:
        return f"not compared ({check['error']})"
    if check["vs"].startswith("itself"):
        return "baseline"
    verdict = "" if check["agrees"] else " MISMATCH"
    return f"{check['max_abs_diff']:.2g} vs {check['vs']}{verdict}"


def _note(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def compile_table(results: dict) -> str:
    compiled = results.get("compile") or {}
    families = compiled.get("families") or {}
    if not families:
        return f"Kernel compile and cached-load times: {compiled['skipped']}." if "skipped" in compiled else ""
    backend = results["compile"].get("backend", "?")
    lines = [f"Kernel families on the {backend} backend (compiled in an empty cache folder, then loaded from it):",
             "", "| family | kernels | compile s (whole family) | cached load s |", "|---|---|---|---|"]
    for name, row in families.items():
        if "error" in row:
            lines.append(f"| {name} | error: {row['error']} | | |")
        else:
            lines.append(f"| {name} | {row.get('kernels', '?')} | {row['compile_s']:.3g} | {row['cached_load_s']:.3g} |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """The whole report: where, how, per-problem tables, compile times, what is left."""
    env = results["environment"]
    settings = results.get("settings", {})
    lines = [f"## na_rtc bench: {results.get('preset') or 'free-form'}", "",
             f"Measured on {device_summary(env)}.",
             f"Timing: {settings.get('clock', '?')}, median of up to {settings.get('repeat', '?')} runs after "
             f"{settings.get('warmup', '?')} warm-up calls (spread: min-max); "
             f"memory: {settings.get('memory', '?')}; torch CPU threads: {settings.get('torch_threads', '?')}."]
    lines += [f"**{note}**" for note in results.get("notes", [])]
    for problem in results.get("problems", []):
        lines += ["", problem_table(problem)]
    table = compile_table(results)
    if table:
        lines += ["", table]
    if results.get("remaining"):
        lines += ["", f"{len(results['remaining'])} problem(s) not measured yet: resume with "
                      f"`python -m na_rtc bench --resume {results.get('path', 'FILE')}`."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the performance table of docs/performance.md


def _problem_cell(problem: dict, fused: dict, settings: dict) -> str:
    """The problem's label, with the backend na_rtc ran on where it is not the run's kernel backend (the
    reference backend, for a rank the kernels lack)."""
    backend = (fused.get("notes") or {}).get("backend")
    if backend and backend != settings.get("kernel_backend", backend):
        return f"{problem['label']} (na_rtc on the {backend} backend)"
    return problem["label"]


def readme_table(results: dict) -> str:
    """The compact table for docs/performance.md (between its ``bench-table`` markers): fused na_rtc against
    each baseline."""
    env = results["environment"]
    settings = results.get("settings", {})
    gpu = env.get("device_type") == "cuda"
    ours = "fused"
    lines = [f"Measured on {device_summary(env)}, {env.get('utc', '?')[:10]}, with "
             f"`{env.get('command', 'python -m na_rtc bench')}`: {settings.get('clock', '?')}, median after warm-up; "
             "speedup = baseline time / na_rtc fused time (higher is better)."]
    if not gpu:
        lines.append("CPU only: na_rtc ran on the emulator (the CUDA kernels executed on the CPU), which says "
                     "nothing about GPU speed; GPU figures need a GPU.")
    lines += ["",
              "| problem | fused fwd ms (TFLOP/s) | fused fwd+bwd ms (TFLOP/s) | vs naive torch fwd / fwd+bwd "
              "| vs FlexAttention fwd / fwd+bwd | vs SDPA fwd / fwd+bwd | peak extra MB fwd+bwd: fused / naive torch |",
              "|---|---|---|---|---|---|---|"]
    for problem in results.get("problems", []):
        entry = problem["entries"].get(ours) or {}
        cells = []
        for mode in ("forward", "forward_backward"):
            measured = entry.get(mode) or {}
            if "median_ms" in measured:
                cells.append(f"{_ms(measured['median_ms'])} ({_number(measured.get('tflops'))})")
            else:
                cells.append(entry.get("reason") or measured.get("reason") or "-")
        for baseline in BASELINES:
            cells.append(" / ".join(_x(speedup(problem, ours, baseline, mode))
                                    for mode in ("forward", "forward_backward")))
        memory = [((problem["entries"].get(name) or {}).get("forward_backward") or {}).get("peak_extra_mb")
                  for name in (ours, "naive_torch")]
        naive = problem["entries"].get("naive_torch") or {}
        if memory[1] is None and naive.get("status") == "oom":
            memory_cell = f"{_number(memory[0])} / out of memory"
        else:
            memory_cell = " / ".join(_number(m) for m in memory)
        cells.append(memory_cell)
        lines.append(f"| {_problem_cell(problem, entry, settings)} | " + " | ".join(cells) + " |")
    lines += ["", "FlexAttention: the faster of natural and tiled token order, block mask built beforehand "
                  "(its build time is in the results JSON). `-`: the entry did not run (the JSON says why)."]
    return "\n".join(lines) + "\n"
