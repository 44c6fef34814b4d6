"""``bench --profile``: one problem under ``torch.profiler``, the per-kernel time table.

Each entry is warmed up outside the profile (compile, autotune and cache
loads would drown the kernels), then run a few times inside a
``record_function`` range named after it. On a GPU the table is sorted by
device time and lists every kernel, na_rtc's CuPy launches included (they
run on torch's stream, so CUPTI sees them); on a CPU it is sorted by CPU time.
"""

from __future__ import annotations

from typing import Callable

from .entries import Unavailable, make_inputs
from .presets import Spec
from .runner import Machine, Selection


def profile(spec: Spec, selection: Selection, machine: Machine, mode: str = "forward_backward", steps: int = 5,
            rows: int = 30, log: Callable[[str], None] = print) -> str:
    """Profile ``selection``'s entries on ``spec``; returns (and logs) the table."""
    import torch
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    inputs = make_inputs(spec, machine.device, machine.kernel_backend, machine.kernel_backend_missing)
    runnable = []
    for entry in selection.run:
        try:
            prepared = entry.prepare(spec, inputs)
        except Unavailable as reason:
            log(f"  {entry.label}: not profiled ({reason})")
            continue
        fn = prepared.forward if mode == "forward" else prepared.forward_backward
        if fn is None:
            log(f"  {entry.label}: not profiled ({prepared.no_backward})")
            continue
        try:
            fn()
            fn()
        except Exception as error:  # noqa: BLE001 - one failing entry does not stop the profile
            log(f"  {entry.label}: not profiled ({type(error).__name__}: {str(error).splitlines()[0][:200]})")
            continue
        runnable.append((entry, fn))
    if not runnable:
        raise RuntimeError("no selected entry could run this problem; nothing to profile")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if machine.gpu else [])
    if machine.gpu:
        torch.cuda.synchronize()
    with torch_profile(activities=activities) as prof:
        for entry, fn in runnable:
            with record_function(f"bench:{entry.name}"):
                for _ in range(steps):
                    fn()
            if machine.gpu:
                torch.cuda.synchronize()
    averages = prof.key_averages()
    sort_by = "device_time_total" if machine.gpu else "cpu_time_total"
    try:
        table = averages.table(sort_by=sort_by, row_limit=rows)
    except AttributeError:  # torch before device_time_total (2.3 and older) spells it cuda_time_total
        sort_by = "cuda_time_total"
        table = averages.table(sort_by=sort_by, row_limit=rows)
    header = (f"profile of {spec.label}, {mode}, {steps} steps per entry "
              f"({', '.join(entry.label for entry, _ in runnable)}); sorted by {sort_by}")
    log(header)
    log(table)
    return header + "\n" + table
