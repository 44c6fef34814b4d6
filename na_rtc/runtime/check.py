"""``python -m na_rtc check`` and ``precompile``: every kernel instantiation,
compiled with NVRTC, with the resources ptxas reports.

``check`` compiles (through the cache) every name of every family of
:mod:`na_rtc.runtime.families` for each architecture asked for, reads the
``ptxas -v`` report from the NVRTC log and decides whether each kernel fits
its largest launch (the family's ``launch_threads`` / ``launch_shared_bytes``):

* no spill stores or loads (local memory traffic from register pressure);
* registers: a warp's registers are allocated in units of 256, so a block of
  ``T`` threads needs ``ceil(T / 32) * roundup(32 * regs, 256)`` registers,
  at most 65536 per block on every architecture we support;
* shared memory: static + dynamic at most the per-block opt-in maximum of the
  architecture, static at most 48 KiB (:func:`na_rtc.runtime.archs.fits`, the
  table the families' budgets are tested against; above 48 KiB the launcher
  must opt in with ``cudaFuncAttributeMaxDynamicSharedMemorySize``, as
  ``runtime/cuda.py`` does);
* sm_90a families (wgmma): no ptxas warning that it serialized the wgmma
  instructions (they would run one after another, waiting for each).

A family is compiled only for the architectures the dispatcher may run it on
(``Family.runs_on``): the tensor-core families for sm_80 and newer, the wgmma
families for sm_90 only (as its arch-specific target sm_90a), the others for
every architecture. ``--arch classes`` checks one architecture of each class
of GPU (:data:`na_rtc.runtime.archs.CLASSES`, ``make check-all``).

"max threads" is the largest block the kernel can launch with, given its
registers: ``min(1024, 32 * floor(65536 / roundup(32 * regs, 256)))``.

``precompile`` fills the disk cache for the families and architectures asked
for, for example on a GPU-less login node before a job runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TextIO

from . import archs as _archs
from . import cache as _cache
from . import nvrtc as _nvrtc
from .archs import ArchLimits

__all__ = [
    "ARCH_LIMITS",
    "ArchLimits",
    "FunctionResources",
    "KernelReport",
    "check_families",
    "limits_for",
    "load_families",
    "parse_arch_list",
    "parse_ptxas_log",
    "precompile",
    "render_table",
    "rotation",
    "rotation_arguments",
    "run_check",
    "run_precompile",
    "runs_on",
]

DEFAULT_FAMILY_MODULE = "na_rtc.runtime.families"
DEFAULT_CHECK_ARCHS = _archs.CI_ARCHS  # what CI checks in full on every run

#: the per-architecture limits live in :mod:`na_rtc.runtime.archs` (one table with the families' budgets)
ARCH_LIMITS = _archs.LIMITS
FALLBACK_LIMITS = _archs.FALLBACK_LIMITS
KIB = _archs.KIB
limits_for = _archs.limits_for


def runs_on(family: Any, arch: int) -> bool:
    """Whether ``family`` is compiled for ``sm_<arch>`` (``Family.runs_on``; families of a
    ``--family-module`` may be plain namespaces with ``archs`` / ``min_arch`` or neither)."""
    if hasattr(family, "runs_on"):
        return bool(family.runs_on(arch))
    archs = tuple(getattr(family, "archs", ()) or ())
    return arch >= int(getattr(family, "min_arch", 0) or 0) and (not archs or arch in archs)


def parse_arch_list(text: str | Iterable[str | int]) -> list[int]:
    """``"sm_80,sm_90"`` (or ``"80 90"``; ``"all"``: every arch NVRTC compiles for; ``"classes"``: one of
    each class of GPU the kernels are checked for, :data:`na_rtc.runtime.archs.CLASSES`) -> ``[80, 90]``."""
    items = re.split(r"[,\s]+", text.strip()) if isinstance(text, str) else list(text)
    items = [item for item in items if str(item).strip()]
    if not items:
        raise ValueError("no architecture given (expected e.g. sm_80,sm_90)")
    if len(items) == 1 and str(items[0]).lower() == "all":
        return _nvrtc.supported_archs()
    if len(items) == 1 and str(items[0]).lower() == "classes":
        return list(_archs.CLASSES)
    return list(dict.fromkeys(_nvrtc.parse_arch(item) for item in items))


def rotation(commit: str, families: Mapping[str, Any]) -> tuple[int, list[str]]:
    """The architecture class CI adds to sm_80 and sm_90 for ``commit`` (:func:`archs.rotating_class`) and
    the families it checks there: on a class below sm_80 every family that runs there (the SIMT and split
    kernels, in less shared memory); on the others the families that need sm_80 or newer (the tensor-core
    kernels, at up to 255 registers: where ptxas's register allocation, which differs per architecture,
    decides whether they spill). ``make check-all`` checks every family on every class."""
    arch = _archs.rotating_class(commit)
    if arch < 80:
        names = [name for name, family in families.items() if runs_on(family, arch)]
    else:
        names = [name for name, family in families.items()
                 if runs_on(family, arch) and int(getattr(family, "min_arch", 0) or 0) >= 80]
    return arch, names


def rotation_arguments(commit: str) -> str:
    """``check``'s arguments for :func:`rotation` of ``commit`` (what CI runs, and prints so that a failure
    can be reproduced): ``--arch sm_100 --family fused_tc,fused_tc_bwd``."""
    arch, names = rotation(commit, load_families())
    return f"--arch sm_{arch} --family {','.join(names)}"


# ---------------------------------------------------------------- ptxas report


@dataclass
class FunctionResources:
    """One function's lines of the ``ptxas -v`` report (sizes in bytes)."""

    mangled: str
    entry: bool = False  # a kernel (entry function), not a device function
    registers: int | None = None
    barriers: int | None = None
    static_shared: int = 0
    stack_frame: int = 0
    spill_stores: int = 0
    spill_loads: int = 0


_COMPILING = re.compile(r"Compiling entry function '([^']+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_BARRIERS = re.compile(r"used (\d+) barriers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, FunctionResources]:
    """Resources per mangled function name from an NVRTC log compiled with ``-Xptxas=-v``.

    The format (ptxas 12 and 13)::

        ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
        ptxas info    : Function properties for _Z3fooPf
        ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 10 registers, used 1 barriers, 1024 bytes smem

    Stack and spill lines belong to the function named by the last
    "Function properties" line (device functions get their own); register,
    barrier and shared memory figures to the last entry function compiled.
    """
    functions: dict[str, FunctionResources] = {}
    entry: FunctionResources | None = None
    current: FunctionResources | None = None

    def get(name: str) -> FunctionResources:
        if name not in functions:
            functions[name] = FunctionResources(name)
        return functions[name]

    for line in log.splitlines():
        if match := _COMPILING.search(line):
            entry = current = get(match.group(1))
            entry.entry = True
        elif match := _PROPERTIES.search(line):
            current = get(match.group(1))
        elif match := _FRAME.search(line):
            if current is not None:
                current.stack_frame, current.spill_stores, current.spill_loads = (int(g) for g in match.groups())
        elif match := _USED.search(line):
            if entry is not None:
                entry.registers = int(match.group(1))
                barriers = _BARRIERS.search(line)
                entry.barriers = int(barriers.group(1)) if barriers else None
                smem = _SMEM.search(line)
                entry.static_shared = int(smem.group(1)) if smem else 0
    return functions


# ---------------------------------------------------------------- fit


def _warp_registers(registers: int, limits: ArchLimits) -> int:
    unit = limits.register_unit_per_warp
    return -(-max(registers, 1) * 32 // unit) * unit


def max_threads(registers: int, limits: ArchLimits) -> int:
    """Largest block (a multiple of 32 threads) that ``registers`` per thread allows."""
    warps = limits.registers_per_block // _warp_registers(registers, limits)
    return min(limits.max_threads_per_block, 32 * warps)


@dataclass
class KernelReport:
    """One kernel instantiation on one architecture."""

    family: str
    name: str
    arch: int
    kind: str  # cubin or ptx (ptx: no ptxas report, resources unknown)
    mangled: str | None = None
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack_frame: int | None = None
    static_shared: int | None = None
    dynamic_shared: int | None = None
    launch_threads: int | None = None
    max_threads: int | None = None
    fits: bool | None = None  # None: could not be decided (PTX target)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    compile_seconds: float | None = None
    origin: str | None = None  # compiled, disk or memory

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class FamilyReport:
    family: str
    source: str
    arch: int
    kind: str | None = None
    compile_seconds: float | None = None
    origin: str | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    kernels: list[KernelReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and all(kernel.ok for kernel in self.kernels)


def _kernel_report(name: str, family_name: str, family: Any, program: _nvrtc.CompiledProgram,
                   resources: Mapping[str, FunctionResources], origin: str) -> KernelReport:
    arch = program.arch
    limits = limits_for(arch)
    threads = dict(getattr(family, "launch_threads", {}) or {}).get(name)
    dynamic = dict(getattr(family, "launch_shared_bytes", {}) or {}).get(name, 0)
    report = KernelReport(
        family=family_name, name=name, arch=arch, kind=program.kind, mangled=program.lowered.get(name),
        dynamic_shared=dynamic, launch_threads=threads, compile_seconds=program.compile_seconds, origin=origin,
    )
    fits = True
    if threads is None:
        report.problems.append("no launch size in the family's launch_threads")
    elif not 1 <= threads <= limits.max_threads_per_block:
        fits = False
        report.problems.append(f"launches {threads} threads; 1..{limits.max_threads_per_block} allowed")
    if program.kind != "cubin":  # FamilyReport.notes says so once
        return report
    function = resources.get(report.mangled or "")
    if function is None or function.registers is None:
        report.problems.append("no ptxas report for this kernel in the NVRTC log")
        return report
    report.registers = function.registers
    report.spill_stores, report.spill_loads = function.spill_stores, function.spill_loads
    report.stack_frame = function.stack_frame
    report.static_shared = function.static_shared
    report.max_threads = max_threads(function.registers, limits)
    if function.spill_stores or function.spill_loads:
        report.problems.append(f"spills registers ({function.spill_stores} bytes stored, {function.spill_loads} loaded)")
    if threads is not None:
        needed = -(-threads // 32) * _warp_registers(function.registers, limits)
        if needed > limits.registers_per_block:
            fits = False
            report.problems.append(
                f"{threads} threads x {function.registers} registers need {needed} registers; "
                f"{limits.registers_per_block} per block (at most {report.max_threads} threads)"
            )
    shared = function.static_shared + dynamic
    if not _archs.fits(arch, function.static_shared, dynamic):
        fits = False
        report.problems.append(
            f"{shared} bytes of shared memory ({function.static_shared} static + {dynamic} dynamic); "
            f"sm_{arch} allows {limits.max_shared_per_block} per block, {limits.static_shared_max} of them static"
        )
    elif shared > 48 * KIB:
        report.notes.append("above 48 KiB of shared memory: the launch must opt in (MaxDynamicSharedMemorySize)")
    if function.stack_frame:
        report.notes.append(f"{function.stack_frame} bytes of stack (local arrays)")
    if not limits.known:
        report.notes.append(f"sm_{arch} is not in the limits table: assumed {limits.max_shared_per_block // KIB} KiB shared per block")
    report.fits = fits
    return report


def _serialized_wgmma(log: str) -> list[str]:
    """ptxas's "wgmma.mma_async instructions are serialized" warnings (a kernel that runs, much slower)."""
    return [line.split(":", 1)[-1].strip() for line in log.splitlines() if "wgmma" in line and "serialized" in line]


def _other_functions(resources: Mapping[str, FunctionResources], known: set[str]) -> list[str]:
    """Problems of device functions (not kernels) in the report: spills there count too."""
    return [
        f"device function {name} spills registers ({f.spill_stores} bytes stored, {f.spill_loads} loaded)"
        for name, f in resources.items()
        if not f.entry and name not in known and (f.spill_stores or f.spill_loads)
    ]


# ---------------------------------------------------------------- families


def load_families(module: str | None = None) -> dict[str, Any]:
    """``FAMILIES`` of a module name (default :mod:`na_rtc.runtime.families`) or a ``.py`` file."""
    module = module or DEFAULT_FAMILY_MODULE
    if module.endswith(".py") or "/" in module or "\\" in module:
        path = Path(module).resolve()
        spec = importlib.util.spec_from_file_location(f"_na_rtc_families_{abs(hash(str(path)))}", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load a family module from {path}")
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
    else:
        loaded = importlib.import_module(module)
    families = getattr(loaded, "FAMILIES", None)
    if not isinstance(families, Mapping):
        raise ImportError(f"{module} defines no FAMILIES mapping")
    return dict(families)


def _compile(family_name: str, family: Any, arch: int, cache_root: Path | None):
    """(program, origin, seconds) or (None, error text, seconds)."""
    started = time.perf_counter()
    try:
        program, origin = _cache.lookup(
            family.source, family.names, arch, tuple(getattr(family, "options", ()) or ()), cache_root=cache_root,
            arch_specific=bool(getattr(family, "arch_specific", False)),
        )
    except _nvrtc.NvrtcUnavailable:
        raise
    except Exception as error:  # noqa: BLE001 - KernelCompileError and I/O errors are reported per family
        return None, f"{type(error).__name__}: {error}", time.perf_counter() - started
    return program, origin, time.perf_counter() - started


def _each(families: Mapping[str, Any], archs: Sequence[int], jobs: int, cache_root: Path | None):
    """Compile every (arch, family) the family runs on, ``jobs`` at a time; yields in order."""
    tasks = [(arch, name, family) for arch in archs for name, family in families.items() if runs_on(family, arch)]
    if jobs <= 1 or len(tasks) <= 1:
        for arch, name, family in tasks:
            yield arch, name, family, _compile(name, family, arch, cache_root)
        return
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # NVRTC releases the GIL while it compiles
        futures = [pool.submit(_compile, name, family, arch, cache_root) for arch, name, family in tasks]
        for (arch, name, family), future in zip(tasks, futures):
            yield arch, name, family, future.result()


def check_families(
    families: Mapping[str, Any], archs: Sequence[int], *, jobs: int = 1, cache_root: Path | None = None
) -> list[FamilyReport]:
    """Compile and check every family for every arch; one :class:`FamilyReport` per (arch, family)."""
    reports = []
    for arch, name, family, (program, origin, _) in _each(families, archs, jobs, cache_root):
        report = FamilyReport(family=name, source=str(family.source), arch=arch)
        reports.append(report)
        if program is None:
            report.error = origin
            continue
        report.kind, report.compile_seconds, report.origin = program.kind, program.compile_seconds, origin
        if program.kind != "cubin":
            report.notes.append(
                f"sm_{arch} is newer than NVRTC {'.'.join(map(str, _nvrtc.nvrtc_version()))} knows: compiled to PTX "
                f"for {program.target}; registers and spills are known only after the driver's JIT, not checked"
            )
        if program.target.endswith("a"):
            report.notes.append(f"built for {program.target} (arch-specific: runs on sm_{arch} GPUs only)")
        resources = parse_ptxas_log(program.log)
        report.kernels = [_kernel_report(n, name, family, program, resources, origin) for n in family.names]
        others = _other_functions(resources, set(program.lowered.values()))
        if others and report.kernels:
            report.kernels[0].problems.extend(others)
        for line in _serialized_wgmma(program.log):  # ptxas made the asynchronous wgmma wait on each other
            owner = next((k for k in report.kernels if k.mangled and k.mangled in line), None)
            (owner or report.kernels[0]).problems.append(f"ptxas: {line}")
    return reports


# ---------------------------------------------------------------- output


def _size(value: int | None) -> str:
    return "-" if value is None else str(value)


def render_table(reports: Sequence[FamilyReport]) -> str:
    """The human-readable ``check`` report: one table per architecture."""
    out: list[str] = []
    header = ("kernel", "regs", "spill st/ld", "stack", "smem static", "smem dyn", "threads", "max threads", "fits", "compile")
    for arch in dict.fromkeys(r.arch for r in reports):
        limits = limits_for(arch)
        out.append(
            f"sm_{arch}: limits {limits.registers_per_block} registers and "
            f"{limits.max_shared_per_block // KIB} KiB shared memory per block"
            + ("" if limits.known else " (assumed: sm_{} not in the table)".format(arch))
        )
        rows: list[tuple[str, ...]] = [header]
        errors, details = [], []
        for family in (r for r in reports if r.arch == arch):
            if family.error:
                errors.append(f"  {family.family} ({family.source}): {family.error}")
                continue
            compiled = f"{family.compile_seconds:.2f} s" + ("" if family.origin == "compiled" else " (cached)")
            details += [f"  note {family.family}: {n}" for n in family.notes]
            for k in family.kernels:
                spills = "-" if k.spill_stores is None else f"{k.spill_stores}/{k.spill_loads}"
                fits = "n/a" if k.fits is None else ("yes" if k.fits else "NO")
                rows.append((k.name, _size(k.registers), spills, _size(k.stack_frame), _size(k.static_shared),
                             _size(k.dynamic_shared), _size(k.launch_threads), _size(k.max_threads), fits, compiled))
                details += [f"  FAIL {k.name}: {p}" for p in k.problems]
                details += [f"  note {k.name}: {n}" for n in k.notes]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for row in rows:
            cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
            out.append("  " + "  ".join(cells).rstrip())
        out += errors + details
        out.append("")
    failed = [r for r in reports if not r.ok]
    count = sum(len(r.kernels) for r in reports)
    if failed:
        bad = sum(1 for r in reports for k in r.kernels if not k.ok) + sum(1 for r in reports if r.error)
        out.append(f"FAILED: {bad} problem kernel(s) or family error(s) in {count} instantiation(s)")
    else:
        unchecked = sum(len(r.kernels) for r in reports if r.kind != "cubin")
        out.append(
            f"ok: {count} instantiation(s), no spills, every launch fits"
            + (f" ({unchecked} compiled to PTX: not checked)" if unchecked else "")
        )
    return "\n".join(out)


def report_json(reports: Sequence[FamilyReport]) -> dict[str, Any]:
    """The same data as :func:`render_table`, for ``--json``."""
    from .. import __version__

    archs = list(dict.fromkeys(r.arch for r in reports))
    return {
        "na_rtc": __version__,
        "nvrtc": ".".join(map(str, _nvrtc.nvrtc_version())),
        "ok": all(r.ok for r in reports),
        "limits": {f"sm_{arch}": limits_for(arch)._asdict() for arch in archs},
        "families": [
            {**{k: v for k, v in asdict(r).items() if k != "kernels"}, "arch": f"sm_{r.arch}", "ok": r.ok,
             "kernels": [{**asdict(k), "arch": f"sm_{k.arch}", "ok": k.ok} for k in r.kernels]}
            for r in reports
        ],
    }


# ---------------------------------------------------------------- commands


def _default_archs_from_gpus() -> list[int]:
    from .. import _environment

    probe = _environment.gpus()
    return sorted({_nvrtc.parse_arch(gpu.arch) for gpu in probe.value}) if probe.ok else []


def _select(families: Mapping[str, Any], only: str | None) -> dict[str, Any]:
    if not only:
        return dict(families)
    wanted = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in families]
    if unknown:
        raise ValueError(f"unknown famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; known: {', '.join(families)}")
    return {name: families[name] for name in wanted}


def _setup(args, default_archs: Sequence[int] | None, err: TextIO):
    """(families, archs) from the command's arguments, or an exit code."""
    try:
        families = _select(load_families(getattr(args, "family_module", None)), getattr(args, "family", None))
    except (ImportError, OSError, SyntaxError, ValueError) as error:
        print(f"error: cannot load kernel families: {type(error).__name__}: {error}", file=err)
        return 2
    try:
        if getattr(args, "arch", None):
            archs = parse_arch_list(args.arch)
        else:
            archs = list(default_archs) if default_archs else _default_archs_from_gpus()
        if not archs:
            print("error: no GPU found here; name the architectures, e.g. --arch sm_80,sm_90", file=err)
            return 2
        _nvrtc.nvrtc_version()
    except ValueError as error:
        print(f"error: {error}", file=err)
        return 2
    except _nvrtc.NvrtcUnavailable as error:
        print(f"error: {error}", file=err)
        return 1
    return families, archs


def run_check(args, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``python -m na_rtc check``: 0 when every kernel fits without spills, 1 otherwise."""
    out, err = out or sys.stdout, err or sys.stderr
    setup = _setup(args, DEFAULT_CHECK_ARCHS, err)
    if isinstance(setup, int):
        return setup
    families, archs = setup
    major, minor = _nvrtc.nvrtc_version()
    print(f"NVRTC {major}.{minor}; checking {sum(len(f.names) for f in families.values())} instantiation(s) "
          f"of {len(families)} famil{'y' if len(families) == 1 else 'ies'} for {', '.join(f'sm_{a}' for a in archs)}", file=out)
    try:
        reports = check_families(families, archs, jobs=getattr(args, "jobs", 1) or 1)
    except _nvrtc.NvrtcUnavailable as error:
        print(f"error: {error}", file=err)
        return 1
    print(render_table(reports), file=out)
    if getattr(args, "json", None):
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report_json(reports), indent=2) + "\n")
        print(f"wrote {path}", file=out)
    return 0 if all(r.ok for r in reports) else 1


def precompile(families: Mapping[str, Any], archs: Sequence[int], *, jobs: int = 1,
               cache_root: Path | None = None, out: TextIO | None = None) -> int:
    """Fill the disk cache; prints one line per (arch, family); returns the number of failures."""
    out = out or sys.stdout
    failures = 0
    for arch, name, family, (program, origin, seconds) in _each(families, archs, jobs, cache_root):
        label = f"sm_{arch}  {name} ({family.source}, {len(family.names)} kernels)"
        if program is None:
            failures += 1
            print(f"{label}: FAILED\n{origin}", file=out)
        elif origin == "compiled":
            print(f"{label}: compiled to {program.kind} in {program.compile_seconds:.2f} s", file=out)
        else:
            print(f"{label}: already cached", file=out)
    return failures


def run_precompile(args, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``python -m na_rtc precompile``: 0 when every family compiled (or was cached)."""
    out, err = out or sys.stdout, err or sys.stderr
    setup = _setup(args, None, err)
    if isinstance(setup, int):
        return setup
    families, archs = setup
    from .. import config

    print(f"kernel cache: {config.cache_dir()}", file=out)
    try:
        failures = precompile(families, archs, jobs=getattr(args, "jobs", 1) or 1, out=out)
    except _nvrtc.NvrtcUnavailable as error:
        print(f"error: {error}", file=err)
        return 1
    stats = _cache.cache_stats()
    if stats["write_failures"]:
        print("warning: the cache folder is not writable; nothing was kept (set NA_RTC_CACHE_DIR)", file=err)
        return 1
    return 1 if failures else 0
