"""Run problems x entries, in time-budgeted slices that a later run can resume.

The results JSON is rewritten after every problem, so a slice that is killed
keeps what it measured; ``--resume FILE`` skips the problems already in it.
A slice stops before a problem that would likely not finish inside the
budget (judged by the slowest problem so far), leaving the rest for the next.
"""

from __future__ import annotations

import gc
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import flops, timing
from .entries import Entry, Unavailable, entry_backend, make_inputs, na_rtc_entries
from .peers import peer_entries
from .presets import Spec

SCHEMA = "na_rtc-bench/1"
#: forward FLOPs above which the emulator (CUDA kernels run on the CPU) is not asked: about a second per call
EMULATOR_FLOP_LIMIT = 2e7
#: forward FLOPs above which nothing is run on a CPU-only machine
CPU_FLOP_LIMIT = 2e9
#: forward FLOPs of full attention (all tokens against all) above which it is not run on a CPU-only machine: the
#: NAT-tiny stage (56x56, batch 8, 4 heads, head dim 32: 40 GFLOP) runs, 16384 tokens (137 GFLOP at 4 heads of
#: 32) would take most of a minute per problem
CPU_FULL_ATTENTION_FLOP_LIMIT = 5e10
#: forward FLOPs above which the reference backend is not asked on a GPU: it runs one chunk of queries at a
#: time (as many chunks as queries where a window holds thousands of keys), the spec rather than a kernel
REFERENCE_GPU_FLOP_LIMIT = 1e11
GPU_NOTE = ("CPU-only machine: na_rtc's kernels ran on the emulator (the CUDA C kernels executed on the CPU) at "
            "small sizes. These figures check the harness; they say nothing about GPU speed. GPU figures need a GPU.")
#: the note of a CPU-only run whose entries launch none of na_rtc's kernels (the portable backends, torch)
CPU_NOTE = ("CPU-only machine, no na_rtc kernels among the entries: these are CPU figures of torch on this CPU "
            "(na_rtc's reference and blocked backends, the baselines); they say nothing about GPU speed.")


@dataclass
class Machine:
    """Where this run happens: the torch device and the backend na_rtc's kernels run on."""

    device: str
    kernel_backend: str
    kernel_backend_missing: str | None = None

    @property
    def gpu(self) -> bool:
        return self.device.startswith("cuda")


def detect_machine() -> Machine:
    import torch

    from .. import backends

    if torch.cuda.is_available():
        device, backend = "cuda:0", "cuda"
    else:
        device, backend = "cpu", "emulator"
    available, reason = backends.get(backend).probe()
    return Machine(device, backend, None if available else reason)


@dataclass
class Selection:
    """Entries to run, and entries reported as not run with the reason."""

    run: list[Entry] = field(default_factory=list)
    skipped: dict[str, tuple[Entry, str]] = field(default_factory=dict)


def all_entries() -> list[Entry]:
    """na_rtc's entries, then the other libraries'."""
    return na_rtc_entries() + peer_entries()


def entry_names() -> list[str]:
    return [entry.name for entry in all_entries()]


def select_entries(names: list[str] | None, machine: Machine) -> Selection:
    """The named entries, or the machine's defaults (the others are reported with the reason they are left out)."""
    table = {entry.name: entry for entry in all_entries()}
    unknown = [name for name in names or [] if name not in table]
    if unknown:
        raise ValueError(f"unknown entries {', '.join(unknown)}; choose from {', '.join(table)}")
    selection = Selection()
    for entry in table.values():
        chosen = entry.name in names if names is not None else (entry.default_gpu if machine.gpu else entry.default_cpu)
        if chosen:
            selection.run.append(entry)
        elif not machine.gpu and entry.cpu_note:  # a CPU run says what only a GPU run measures
            selection.skipped[entry.name] = (entry, entry.cpu_note)
    return selection


def _size_limit(entry: Entry, spec: Spec, machine: Machine, forward_flops: int) -> str | None:
    """Why ``entry`` is not run for ``spec`` here (too slow: on a CPU-only machine, or the reference backend on a
    GPU), or None."""
    backend = entry_backend(entry, spec, machine.kernel_backend)
    if machine.gpu:
        if backend == "reference" and forward_flops > REFERENCE_GPU_FLOP_LIMIT:
            return (f"too large for the reference backend ({forward_flops / 1e9:.0f} GFLOP forward, limit "
                    f"{REFERENCE_GPU_FLOP_LIMIT / 1e9:.0f} on a GPU)")
        return None
    if entry.full_attention and flops.full_attention_flops(spec) > CPU_FULL_ATTENTION_FLOP_LIMIT:
        full = flops.full_attention_flops(spec)
        return (f"full attention over {spec.tokens} tokens is too large for a CPU run ({full / 1e9:.0f} GFLOP "
                f"forward, limit {CPU_FULL_ATTENTION_FLOP_LIMIT / 1e9:.0f}); GPU figures need a GPU")
    if backend == "emulator" and forward_flops > EMULATOR_FLOP_LIMIT:
        return (f"too large for the emulator ({forward_flops / 1e6:.0f} MFLOP forward, limit "
                f"{EMULATOR_FLOP_LIMIT / 1e6:.0f}); GPU figures need a GPU")
    if forward_flops > CPU_FLOP_LIMIT:
        return (f"too large for a CPU run ({forward_flops / 1e9:.1f} GFLOP forward, limit "
                f"{CPU_FLOP_LIMIT / 1e9:.0f}); GPU figures need a GPU")
    return None


def _failure(error: BaseException) -> dict:
    """A status and reason for an exception: out-of-memory is told apart, everything else is an error."""
    text = f"{type(error).__name__}: {error}".strip()
    first_line = text.splitlines()[0] if text else type(error).__name__
    if "out of memory" in text.lower() or type(error).__name__ in ("OutOfMemoryError", "MemoryError"):
        return {"status": "oom", "reason": "out of memory: " + first_line[:300]}
    return {"status": "error", "reason": first_line[:400]}


def _release(machine: Machine) -> None:
    gc.collect()
    if machine.gpu:
        import torch

        torch.cuda.empty_cache()


#: the test suite's forward tolerances per dtype (atol = rtol); two low-precision results may each be that far off
FORWARD_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


def compare_output(prepared, spec: Spec, baseline: dict) -> dict | None:
    """Max |difference| of this entry's forward output from the problem's first output (same inputs).

    Catches an entry that is fast because it computes something else. The
    first comparable entry to run becomes the baseline; ``agrees`` allows
    twice the dtype's forward tolerance, since both sides are rounded.
    """
    if not prepared.comparable:
        return None
    import torch

    with torch.no_grad():
        out = prepared.natural_output(prepared.forward()).float()
    if "output" not in baseline:
        baseline["output"], baseline["name"] = out, baseline.get("current")
        return {"vs": "itself (baseline of this problem)", "max_abs_diff": 0.0, "agrees": True}
    reference = baseline["output"]
    difference = float((out - reference).abs().max()) if out.numel() else 0.0
    tolerance = FORWARD_TOLERANCE[spec.dtype]
    allowed = 2 * (tolerance + tolerance * float(reference.abs().max())) if reference.numel() else 0.0
    return {"vs": baseline["name"], "max_abs_diff": difference, "agrees": difference <= allowed}


def _label(entry: Entry, backend: str) -> str:
    """The entry's label, with the backend its na_rtc kernels (or the reference, where they lack the rank) ran on."""
    return f"{entry.label} ({backend})" if entry.uses_kernels else entry.label


def run_entry(entry: Entry, spec: Spec, inputs, machine: Machine, settings: timing.Settings, forward_flops: int,
              memory, baseline: dict | None = None) -> dict:
    record: dict = {"label": _label(entry, machine.kernel_backend)}
    clock = timing.Clock(machine.device)
    try:
        prepared = entry.prepare(spec, inputs)
    except Unavailable as reason:
        return {**record, "status": "unavailable", "reason": str(reason)}
    except Exception as error:  # noqa: BLE001 - reported, the run goes on
        _release(machine)
        return {**record, **_failure(error)}
    record["label"] = _label(entry, prepared.notes.get("backend", machine.kernel_backend))
    record["notes"] = prepared.notes
    modes = (("forward", prepared.forward, 1.0),
             ("forward_backward", prepared.forward_backward, 1.0 + flops.BACKWARD_FACTOR))
    for mode, fn, factor in modes:
        if fn is None:
            record[mode] = {"status": "unavailable", "reason": prepared.no_backward or "no backward"}
            continue
        if mode == "forward_backward" and record["forward"].get("status") == "oom":  # it would only fail slower
            record[mode] = {"status": "oom", "reason": "not tried: the forward alone ran out of memory"}
            continue
        try:
            measured = timing.measure(fn, clock, settings, memory)
            measured["tflops"] = (flops.tflops(forward_flops * factor, measured["median_ms"] / 1e3) if entry.computes
                                  else None)
            record[mode] = measured
        except Exception as error:  # noqa: BLE001
            record[mode] = _failure(error)
            _release(machine)
    if baseline is not None and "median_ms" in record["forward"]:
        baseline["current"] = entry.name
        try:
            check = compare_output(prepared, spec, baseline)
        except Exception as error:  # noqa: BLE001
            check = {"error": _failure(error)["reason"]}
        if check is not None:
            record["output_check"] = check
    statuses = [record[mode].get("status", "ok") for mode, _, _ in modes]
    if all(s == "ok" for s in statuses):
        record["status"] = "ok"
    elif statuses[0] == "ok":
        record["status"] = "partial"
    else:  # the forward failed: say so at the entry level, with the forward's reason
        record["status"], record["reason"] = record["forward"]["status"], record["forward"]["reason"]
    del prepared
    _release(machine)
    return record


def run_problem(spec: Spec, selection: Selection, machine: Machine, settings: timing.Settings,
                log: Callable[[str], None] = print) -> dict:
    from ..demo import PeakMemory

    forward_flops = flops.forward_flops(spec)
    itemsize = 4 if spec.dtype == "float32" else 2
    record = {**spec.to_json(), "flops_forward": forward_flops, "flops_forward_backward": flops.forward_backward_flops(spec),
              "neighbor_pairs": flops.neighbor_pairs(spec), "full_attention_flops_forward": flops.full_attention_flops(spec),
              "output_mb": spec.batch * spec.tokens * spec.heads * spec.head_dim * itemsize / 2**20, "entries": {}}
    memory = PeakMemory(machine.device)
    inputs, baseline = None, {}
    started = time.perf_counter()
    for entry in selection.run:
        limit = _size_limit(entry, spec, machine, forward_flops)
        if limit:
            row = {"label": entry.label, "status": "skipped", "reason": limit}
        else:
            if inputs is None:  # drawn once per problem, shared by every entry
                inputs = make_inputs(spec, machine.device, machine.kernel_backend, machine.kernel_backend_missing)
            row = run_entry(entry, spec, inputs, machine, settings, forward_flops, memory, baseline)
        record["entries"][entry.name] = row
        log(f"    {row['label']:<44s} {_one_line(row)}")
    for name, (entry, reason) in selection.skipped.items():
        # gpu_only: the report lists these on one line instead of a table row each
        record["entries"][name] = {"label": entry.label, "status": "skipped", "reason": reason, "gpu_only": True}
    record["seconds"] = time.perf_counter() - started
    del inputs, baseline
    _release(machine)
    return record


def _one_line(row: dict) -> str:
    if row.get("status") not in ("ok", "partial"):
        return f"{row['status']}: {row.get('reason', '')}"
    parts = []
    for mode, name in (("forward", "fwd"), ("forward_backward", "fwd+bwd")):
        measured = row.get(mode) or {}
        if "median_ms" in measured:
            parts.append(f"{name} {measured['median_ms']:.3g} ms")
        else:
            parts.append(f"{name} {measured.get('status')}: {measured.get('reason', '')}")
    return ", ".join(parts)


# ---------------------------------------------------------------- a run: slices, resume, JSON


def new_results(preset: str | None, plan: list[Spec], selection_names: list[str], machine: Machine,
                settings: timing.Settings) -> dict:
    from .report import environment

    memory_label = _memory_label(machine)
    return {
        "schema": SCHEMA,
        "preset": preset,
        "environment": environment(machine.device),
        "settings": {"warmup": settings.warmup, "repeat": settings.repeat, "min_repeat": settings.min_repeat,
                     "min_time_s": settings.min_time, "clock": timing.Clock(machine.device).method,
                     "memory": memory_label, "entries": selection_names, "kernel_backend": machine.kernel_backend,
                     "flops": "4 * head_dim * batch * heads * sum over queries of exact neighbor count; "
                              "backward 2.5x forward"},
        "notes": [] if machine.gpu else [_cpu_note(selection_names)],
        "plan": [spec.to_json() for spec in plan],
        "problems": [],
        "slices": [],
    }


def _cpu_note(selection_names: list[str]) -> str:
    """What a CPU-only run's figures are: the emulator's harness check where an entry launches na_rtc's kernels."""
    kernels = {entry.name for entry in all_entries() if entry.uses_kernels}
    return GPU_NOTE if kernels & set(selection_names) else CPU_NOTE


def _memory_label(machine: Machine) -> str:
    from ..demo import PeakMemory

    label = PeakMemory(machine.device).label
    return (label.removeprefix("peak memory: ") + ", above the inputs and the entry's prepared buffers (layout "
            "copies, masks, index tables), on a separate untimed call")


def spec_from_json(record: dict) -> Spec:
    return Spec(tuple(record["spatial"]), tuple(record["kernel"]), tuple(record["dilation"]), tuple(record["stride"]),
                tuple(bool(c) for c in record["causal"]), record["batch"], record["heads"], record["head_dim"],
                record["dtype"], record.get("note", ""), record.get("heads_kv"), record.get("extra_tokens", 0))


def write(results: dict, path: Path) -> None:
    """Write atomically: a slice killed mid-write never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(results, indent=1, default=str))
    os.replace(temporary, path)


def run_slice(results: dict, plan: list[Spec], selection: Selection, machine: Machine, settings: timing.Settings,
              path: Path, budget_s: float, compile_timing: bool, log: Callable[[str], None] = print) -> dict:
    """Measure the plan's problems not yet in ``results`` until the budget is spent; returns ``results``."""
    from .compile import measure_families, warm_emulator_families

    started = time.perf_counter()
    done = {problem["key"] for problem in results["problems"]}
    todo = [spec for spec in plan if spec.key not in done]
    slice_record = {"utc_start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "problems": []}
    results["slices"].append(slice_record)
    families = sorted({f for entry in selection.run if entry.uses_kernels for f in entry.families})
    if compile_timing and families and not machine.kernel_backend_missing and "families" not in results.get("compile", {}):
        log(f"  compile: kernel families {', '.join(families)} on {machine.kernel_backend} (empty cache folder)")
        results["compile"] = {"backend": machine.kernel_backend,
                              "families": measure_families(families, machine.kernel_backend)}
        write(results, path)
    elif families and machine.kernel_backend == "emulator" and not machine.kernel_backend_missing and todo:
        warm_emulator_families(families)  # C++ builds in parallel, not inside the first timed entries
    slowest = 0.0
    for spec in todo:
        elapsed = time.perf_counter() - started
        if slice_record["problems"] and elapsed + slowest > budget_s:
            log(f"  slice budget {budget_s:.0f} s reached after {elapsed:.0f} s")
            break
        log(f"  {spec.label}" + (f"  [{spec.note}]" if spec.note else ""))
        record = run_problem(spec, selection, machine, settings, log)
        slowest = max(slowest, record["seconds"])
        results["problems"].append(record)
        slice_record["problems"].append(spec.key)
        slice_record["seconds"] = time.perf_counter() - started
        results["remaining"] = [s.key for s in plan if s.key not in {p["key"] for p in results["problems"]}]
        write(results, path)
    results["remaining"] = [s.key for s in plan if s.key not in {p["key"] for p in results["problems"]}]
    results["complete"] = not results["remaining"]
    slice_record["seconds"] = time.perf_counter() - started
    write(results, path)
    return results
