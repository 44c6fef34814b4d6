"""``python -m na_rtc bench``: the command line of the harness.

Modes: run a preset or one free-form problem (the default), ``--profile``
one problem, ``--list`` presets and entries, or report from an existing JSON
(``--from-json`` for the markdown and chart, ``--readme-table`` for the
performance table of docs/performance.md, ``--targets`` for the performance targets
of the fused kernels against FlexAttention, met or not).

Exit status: 0 done, 2 bad arguments, 3 the slice budget ran out with
problems left (run again with ``--resume FILE`` to continue).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from .presets import DTYPES, PRESET_ALIASES, PRESET_HELP, PRESETS, Spec, preset_name, spec

INCOMPLETE = 3
DEFAULT_BUDGET_S = 450.0  # under 8 minutes per slice, with room for start-up and the report

#: (flags, argparse options) of every argument; ``na_rtc.__main__`` and :func:`build_parser` share them
ARGUMENTS: tuple[tuple[tuple[str, ...], dict], ...] = (
    (("--preset",), {"choices": (*PRESETS, *PRESET_ALIASES), "metavar": "{" + ",".join(PRESETS) + "}",
                     "help": "a named set of problems (default: quick, unless --shape; --list shows them)"}),
    (("--shape",), {"metavar": "N|XxY|XxYxZ", "help": "free-form problem: spatial size, e.g. 4096, 128x128 or "
                                                     "16x32x32"}),
    (("--kernel",), {"metavar": "K|KxK", "help": "kernel size, one value or one per axis (e.g. 13, 13x7 or 3x7x7)"}),
    (("--dilation",), {"metavar": "D|DxD", "default": "1", "help": "dilation (default 1)"}),
    (("--stride",), {"metavar": "S|SxS", "default": "1", "help": "stride (default 1)"}),
    (("--causal",), {"metavar": "AXES", "nargs": "?", "const": "all", "default": None,
                     "help": "causal on every axis, or per axis like 1,0 (or 1,0,0 in 3D)"}),
    (("--dtype",), {"choices": tuple(DTYPES), "default": "fp16", "help": "element type (default fp16)"}),
    (("--heads",), {"type": int, "default": 4, "help": "heads (default 4)"}),
    (("--head-dim",), {"type": int, "default": 32, "help": "head dim (default 32)"}),
    (("--batch",), {"type": int, "default": 1, "help": "batch (default 1)"}),
    (("--entries",), {"metavar": "LIST", "help": "comma-separated entries to run (default: all that suit the "
                                                "machine; --list names them)"}),
    (("--problem",), {"metavar": "INDEX|KEY", "help": "only this problem of the preset (0-based index or key)"}),
    (("--repeat",), {"type": int, "default": 20, "help": "most timed runs per measurement (default 20)"}),
    (("--warmup",), {"type": int, "default": None, "help": "untimed calls after the first (default 2 GPU, 1 CPU)"}),
    (("--min-time",), {"type": float, "default": None, "metavar": "S",
                       "help": "time each measurement about this long (default 0.5 s GPU, 0.1 s CPU)"}),
    (("--threads",), {"type": int, "default": None, "metavar": "N",
                      "help": "torch CPU threads (default: 1 on a CPU-only machine, torch's own on a GPU machine)"}),
    (("--budget",), {"type": float, "default": DEFAULT_BUDGET_S, "metavar": "S",
                     "help": f"slice time budget in seconds (default {DEFAULT_BUDGET_S:.0f}); "
                             "the rest is left for --resume"}),
    (("--out",), {"metavar": "JSON", "help": "results file (default: benchmarks/results/ on a GPU, "
                                             "the temp folder on a CPU)"}),
    (("--resume",), {"metavar": "JSON", "help": "continue this results file: skip the problems it has"}),
    (("--compile-timing",), {"action": argparse.BooleanOptionalAction, "default": None,
                             "help": "time each kernel family's compile (in an empty cache folder) and cached "
                                     "load (default: on a GPU; off on a CPU, where the emulator's C++ builds "
                                     "take most of a minute)"}),
    (("--plot",), {"metavar": "PNG", "nargs": "?", "const": "auto", "default": None,
                   "help": "also draw the chart (default: beside the JSON); needs matplotlib"}),
    (("--from-json",), {"metavar": "JSON", "help": "do not run: print the report of this results file "
                                                  "(and --plot it)"}),
    (("--readme-table",), {"metavar": "JSON", "help": "do not run: print the performance table of docs/performance.md from "
                                                     "this results file"}),
    (("--targets",), {"metavar": "JSON", "help": "do not run: print the performance targets of the fused "
                                                "kernels against FlexAttention, met or not, from this results file"}),
    (("--profile",), {"action": "store_true", "help": "run one problem under torch.profiler and print the "
                                                     "per-kernel time table (default entries: fused)"}),
    (("--profile-mode",), {"choices": ("forward", "forward_backward"), "default": "forward_backward",
                           "help": "what --profile runs (default forward_backward)"}),
    (("--list",), {"action": "store_true", "help": "list presets and entries, then exit"}),
    (("--explain",), {"action": "store_true", "help": "do not run: print, for each problem, which kernels na_rtc's "
                                                    "fused and split ops would launch here and why every other "
                                                    "candidate was passed over (na_rtc.explain)"}),
)

FREE_FORM = ("shape", "kernel")


class UsageError(ValueError):
    """A bad command line: printed with the usage prefix, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m na_rtc bench", description=__doc__.splitlines()[0])
    for flags, options in ARGUMENTS:
        parser.add_argument(*flags, **options)
    return parser


# ---------------------------------------------------------------- the free-form problem


def _ints(text: str, flag: str, ndim: int | None = None) -> tuple[int, ...]:
    parts = [p for p in re.split(r"[x,]", str(text).strip().lower())]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(f"{flag} must be an integer or one per axis like 13x7, got {text!r}") from None
    if ndim is not None:
        if len(values) == 1:
            values = values * ndim
        elif len(values) != ndim:
            raise UsageError(f"{flag} has {len(values)} values but --shape has {ndim} axes: give 1 or {ndim}")
    return values


def _causal(text: str | None, ndim: int) -> tuple[bool, ...]:
    if text is None:
        return (False,) * ndim
    if text.lower() in ("all", "true", "yes"):
        return (True,) * ndim
    flags = {"1": True, "true": True, "0": False, "false": False}
    parts = re.split(r"[x,]", text.lower())
    if any(p not in flags for p in parts):
        raise UsageError(f"--causal takes no value (every axis) or one 0/1 per axis like 1,0, got {text!r}")
    values = tuple(flags[p] for p in parts)
    if len(values) == 1:
        values *= ndim
    if len(values) != ndim:
        raise UsageError(f"--causal has {len(values)} values but --shape has {ndim} axes")
    return values


def free_form_spec(args: argparse.Namespace) -> Spec:
    """The one problem ``--shape/--kernel/...`` describe, validated like ``na1d``/``na2d``/``na3d`` would."""
    from .. import _args

    if args.kernel is None:
        raise UsageError("--shape needs --kernel (the kernel size)")
    spatial = _ints(args.shape, "--shape")
    if len(spatial) not in (1, 2, 3):
        raise UsageError(f"--shape must have 1, 2 or 3 axes (like 4096, 128x128 or 16x32x32), got {args.shape!r}")
    ndim = len(spatial)
    kernel = _ints(args.kernel, "--kernel", ndim)
    dilation = _ints(args.dilation, "--dilation", ndim)
    stride = _ints(args.stride, "--stride", ndim)
    causal = _causal(args.causal, ndim)
    for flag, value in (("--heads", args.heads), ("--head-dim", args.head_dim), ("--batch", args.batch)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if min(spatial) < 1:
        raise UsageError(f"--shape must be positive on every axis, got {args.shape!r}")
    try:
        _args._axes(ndim, spatial, kernel, stride, dilation, causal)  # the public API's checks and messages
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None
    return spec(spatial, kernel, dilation=dilation, stride=stride, causal=causal, batch=args.batch, heads=args.heads,
                head_dim=args.head_dim, dtype=args.dtype, note="free-form")


def plan_from_args(args: argparse.Namespace, resumed: dict | None) -> tuple[str | None, list[Spec]]:
    """(preset name, problems) from the command line, or from the resumed file when it names none."""
    from .runner import spec_from_json

    given = [name for name in FREE_FORM if getattr(args, name) is not None]
    if args.preset and given:
        raise UsageError("give --preset or a free-form problem (--shape/--kernel), not both")
    if given and "shape" not in given:
        raise UsageError("a free-form problem needs --shape (and --kernel)")
    if given:
        preset, plan = None, [free_form_spec(args)]
    elif args.preset:
        preset = preset_name(args.preset)
        plan = list(PRESETS[preset])
    elif resumed is not None:
        preset, plan = resumed.get("preset"), [spec_from_json(record) for record in resumed.get("plan", [])]
    else:
        preset, plan = "quick", list(PRESETS["quick"])
    if args.problem is not None:
        plan = [_pick(plan, args.problem)]
    return preset, plan


def _pick(plan: list[Spec], which: str) -> Spec:
    if which.isdigit():
        index = int(which)
        if index >= len(plan):
            raise UsageError(f"--problem {index}: the plan has {len(plan)} problems (0..{len(plan) - 1})")
        return plan[index]
    for item in plan:
        if item.key == which:
            return item
    raise UsageError(f"--problem {which!r} is not in the plan; keys: {', '.join(p.key for p in plan)}")


# ---------------------------------------------------------------- the modes


def _load(path: str) -> dict:
    try:
        results = json.loads(Path(path).read_text())
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"{path} is not a results JSON ({error})") from None
    if not isinstance(results, dict) or "problems" not in results or "environment" not in results:
        raise UsageError(f"{path} is not a na_rtc bench results file (no 'problems'/'environment')")
    return results


def _list() -> str:
    from .runner import entry_names

    lines = ["presets:"]
    width = max(map(len, PRESETS))
    for name, problems in PRESETS.items():
        lines.append(f"  {name:{width}s} {PRESET_HELP[name]}")
        lines += [" " * (width + 3) + f"- {p.label}" + (f" [{p.note}]" if p.note else "") for p in problems]
    lines += ["entries: " + ", ".join(entry_names())]
    return "\n".join(lines)


def _default_out(preset: str | None, gpu: bool, device: str) -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")[:40] or "device"
    name = f"bench-{preset or 'custom'}-{slug}-{stamp}.json"
    if gpu:  # GPU results are worth committing: benchmarks/results/ in a checkout
        from .report import ROOT

        folder = ROOT / "benchmarks" / "results"
        return (folder if folder.parent.is_dir() else Path.cwd()) / name
    return Path(tempfile.gettempdir()) / name  # CPU figures only check the harness: keep them out of the checkout


def _plot(results: dict, target: str, json_path: Path | None) -> None:
    from .plot import PlotUnavailable, draw

    out = Path(target) if target != "auto" else (json_path.with_suffix(".png") if json_path else Path("bench.png"))
    try:
        print(f"chart: {draw(results, out)}")
    except PlotUnavailable as reason:
        print(f"chart: not drawn: {reason}")


def run(args: argparse.Namespace) -> int:
    """The ``bench`` command; returns the exit status."""
    try:
        return _run(args)
    except UsageError as error:
        print(f"python -m na_rtc bench: error: {error}", file=sys.stderr)
        return 2


def targets_report(results: dict) -> str:
    """The fused-vs-FlexAttention targets from ``results``, with the device they were measured on."""
    from . import report, targets

    text, all_met = targets.table(results)
    device = report.device_summary(results.get("environment", {}))
    verdict = "every target met by the default fused op" if all_met else "not every target met by the default fused op"
    return (f"Performance targets of the fused kernels against FlexAttention (set for an H100), measured on "
            f"{device}: {verdict}\n\n{text}")


def _run(args: argparse.Namespace) -> int:
    from . import report

    if args.list:
        print(_list())
        return 0
    if args.readme_table:
        print(report.readme_table(_load(args.readme_table)), end="")
        return 0
    if args.targets:
        print(targets_report(_load(args.targets)), end="")
        return 0
    if args.from_json:
        results = _load(args.from_json)
        print(report.markdown(results), end="")
        if args.plot:
            _plot(results, args.plot, Path(args.from_json))
        return 0
    for flag, value in (("--repeat", args.repeat), ("--budget", args.budget)):
        if value <= 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    if args.warmup is not None and args.warmup < 0:
        raise UsageError(f"--warmup must be 0 or more, got {args.warmup}")
    if args.min_time is not None and args.min_time < 0:
        raise UsageError(f"--min-time must be 0 or more, got {args.min_time}")
    names = [n.strip() for n in args.entries.split(",") if n.strip()] if args.entries else None
    resumed = _load(args.resume) if args.resume and Path(args.resume).exists() else None
    preset, plan = plan_from_args(args, resumed)
    if args.explain:
        print(explain_plan(plan))
        return 0
    if names is None and resumed is not None:  # a resumed run keeps the entries it started with
        names = resumed.get("settings", {}).get("entries")
    return _measure(args, names, resumed, preset, plan)


def explain_plan(plan: Sequence[Spec]) -> str:
    """For each problem, ``na_rtc.explain`` of the fused op and, at stride 1, of the split ops (``qk``, and
    ``av`` with weights in the problem's dtype), forward and backward, on the backend the harness runs them on:
    this machine's kernel backend, or the reference backend where its kernels lack the problem's rank."""
    import na_rtc

    import torch

    from . import runner
    from .entries import rank_note, served_backend

    try:
        machine = runner.detect_machine()
    except ImportError as error:
        raise UsageError(f"the benchmark needs torch ({error})") from None
    blocks = []
    for problem in plan:
        # explain reads shapes, dtype and device only: one zero broadcast to each shape, so a video problem's
        # inputs (and its attention weights, tokens x window slots) take no memory
        zero = torch.zeros((), dtype=getattr(torch, problem.dtype), device=machine.device)
        q = zero.expand(problem.qkv_shape)
        k = v = zero.expand(problem.kv_shape)
        window = {"dilation": problem.dilation, "is_causal": problem.causal}
        backend = served_backend(problem.ndim, machine.kernel_backend)
        lines = [f"== {problem.label}"]
        if backend != machine.kernel_backend:
            lines.append(f"({rank_note(problem.ndim, machine.kernel_backend)})")
        explained = [na_rtc.explain(f"na{problem.ndim}d", q, k, v, problem.kernel, problem.stride, backward=True,
                                    backend=backend, **window)]
        if all(s == 1 for s in problem.stride):
            attn = zero.expand((*problem.qkv_shape[:-1], math.prod(problem.kernel)))
            explained += [na_rtc.explain(f"na{problem.ndim}d_qk", q, k, problem.kernel, backward=True,
                                         backend=backend, **window),
                          na_rtc.explain(f"na{problem.ndim}d_av", attn, v, problem.kernel, backward=True,
                                         backend=backend, **window)]
        lines += [str(explanation) for explanation in explained]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _set_threads(threads: int | None, gpu: bool) -> int:
    """torch's CPU thread count for this run.

    CPU-only default 1: the emulator runs blocks on its own worker threads,
    and torch's OpenMP pool waiting at barriers against them (and against
    anything else on a small shared machine) turned sub-millisecond torch ops
    into 40 ms scheduler stalls in our measurements.
    """
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    elif not gpu:
        torch.set_num_threads(1)
    return previous


def _measure(args, names, resumed, preset, plan) -> int:
    from . import runner, timing

    try:
        machine = runner.detect_machine()
    except ImportError as error:
        raise UsageError(f"the benchmark needs torch ({error})") from None
    if args.profile and names is None:
        names = ["fused"]
    try:
        selection = runner.select_entries(names, machine)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.profile:
        from .profile import profile

        previous_threads = _set_threads(args.threads, machine.gpu)
        try:
            profile(plan[0], selection, machine, mode=args.profile_mode)
        finally:
            import torch

            torch.set_num_threads(previous_threads)
        return 0
    # a CPU run only checks the harness: fewer, shorter measurements keep the quick preset under a minute
    min_time = args.min_time if args.min_time is not None else (0.5 if machine.gpu else 0.1)
    warmup = args.warmup if args.warmup is not None else (2 if machine.gpu else 1)
    settings = timing.Settings(warmup=warmup, repeat=args.repeat, min_repeat=min(3, args.repeat), min_time=min_time)
    compile_timing = args.compile_timing if args.compile_timing is not None else machine.gpu
    previous_threads = _set_threads(args.threads, machine.gpu)
    try:
        return _run_slice(args, resumed, preset, plan, machine, selection, settings, compile_timing)
    finally:  # a caller in the same process (tests, a notebook) gets its torch back as it was
        import torch

        torch.set_num_threads(previous_threads)


def _run_slice(args, resumed, preset, plan, machine, selection, settings, compile_timing) -> int:
    from . import report, runner

    if resumed is not None:
        here = report.environment(machine.device)["device"]
        if resumed["environment"].get("device") != here:
            raise UsageError(f"{args.resume} was measured on {resumed['environment'].get('device')}; this machine is "
                             f"{here}: start a new file")
        results = resumed
        results["plan"] = [s.to_json() for s in plan]
    else:
        results = runner.new_results(preset, plan, [e.name for e in selection.run], machine, settings)
    import torch

    results["settings"]["torch_threads"] = torch.get_num_threads()
    path = Path(args.resume or args.out or _default_out(preset, machine.gpu, results["environment"]["device"]))
    results["path"] = str(path)
    print(f"na_rtc bench {preset or 'free-form'}: {len(plan)} problem(s) on {results['environment']['device']}; "
          f"entries: {', '.join(e.name for e in selection.run)}")
    for note in results["notes"]:
        print(f"  NOTE: {note}")
    if not compile_timing and "compile" not in results:
        results["compile"] = {"skipped": "not measured in this run (--compile-timing measures it)"}
    runner.run_slice(results, plan, selection, machine, settings, path, args.budget, compile_timing)
    text = report.markdown(results)
    path.with_suffix(".md").write_text(text)
    print()
    print(text, end="")
    print(f"results: {path} (markdown: {path.with_suffix('.md')})")
    if args.plot:
        _plot(results, args.plot, path)
    if not results["complete"]:
        print(f"{len(results['remaining'])} problem(s) left: python -m na_rtc bench --resume {path}")
        return INCOMPLETE
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))
