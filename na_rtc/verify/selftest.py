"""``python -m na_rtc selftest``: the primitive self-tests, then a canary per kernel, on this machine's GPU.

First the inline-PTX primitives the kernels are built from (conversions,
``mma.sync`` and ``ldmatrix``, ``cp.async``, shuffles, ``ex2``, wgmma on
sm_90; :mod:`na_rtc.verify.primitives`), then canaries
(:mod:`na_rtc.verify.canary`): ``--quick`` one per kernel family, dtype and
rank (1D, 2D and 3D) at the smallest head-dim bucket; ``--full`` every instantiation the
dispatcher can pick on this GPU (every head-dim bucket, every setting that
picks another instantiation), forward and every gradient. Each canary records
its verdicts as a first use would (``<cache dir>/verdicts``), so a kernel that
fails here is not used afterwards. Without a GPU everything runs on the
emulator, which checks na_rtc's kernels and the emulator, not a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Iterator

from .. import _arrays
from .._args import AV, FUSED, QK, Problem
from ..window import Axis
from . import canary

#: the settings that pick other instantiations than the tables' (``--full`` checks those too)
ALTERNATIVE_SETTINGS = ({"NA_RTC_TC_WARP_ROWS": "16"}, {"NA_RTC_WGMMA_WARPGROUPS": "1"},
                        {"NA_RTC_WGMMA_CHUNK_KEYS": "32"})
HEAD_DIMS = {"quick": (32,), "full": (32, 64, 128, 256)}
#: (mode, rank) -> window sizes of the split kernels' canaries: they pick tiled or straightforward kernels by
#: the window, so --full also takes one large enough for the straightforward ones at the larger head dims
SPLIT_WINDOWS = {("quick", 1): (7,), ("quick", 2): (7,), ("full", 1): (7, 63), ("full", 2): (7, 13),
                 # 3D canaries have kernel**3 slots per query: --quick keeps them small; --full adds the windows
                 # that pick the other 3D tiles (bias gradient) and the straightforward kernels
                 ("quick", 3): (3,), ("full", 3): (3, 7, 13)}


@dataclass(frozen=True)
class Target:
    """Where the self-test runs: ``backend`` (cuda or emulator), ``device`` ("cuda:0" or "cpu"), the
    compute capability (None on the emulator), the array library and what to tell the user."""

    backend: str
    device: str
    arch: int | None
    kind: str
    description: str

    def policy(self, settings: tuple[tuple[str, str], ...] = ()):
        """The dispatch policy of this target with every kernel path switched on (tensor cores and wgmma where
        the GPU runs them), under ``settings`` (environment values that pick other instantiations)."""
        from ..runtime.policy import Policy, Settings

        with _settings(settings):
            read = Settings.read()
        return Policy(self.backend, self.arch, Settings(True, True, read.tc_warp_rows, read.wgmma_warpgroups,
                                                        read.wgmma_chunk_keys, False))


@dataclass(frozen=True)
class Unit:
    """One canary: a candidate kernel path for one (dtype, rank, head dim), under ``settings``."""

    problem: Problem
    candidate: object
    family: str
    settings: tuple[tuple[str, str], ...] = ()


@dataclass
class Row:
    kernel: str
    op: str
    path: str
    dtype: str
    rank: int
    head_dim: int
    ok: bool
    detail: str
    seconds: float
    settings: str = ""


def target(device: int | None) -> Target:
    """The GPU ``device`` (default 0) when the cuda backend is usable, else the emulator (``device`` given:
    an error saying why there is no GPU)."""
    from .. import backends

    usable, reason = backends.get("cuda").probe()
    if usable:
        from ..runtime import device as devices

        index = device or 0
        arch = devices.compute_capability(index)
        kind = _arrays.TORCH if _importable("torch") else _arrays.CUPY
        return Target("cuda", f"cuda:{index}", arch, kind, f"GPU {index} (sm_{arch})")
    if device is not None:
        raise SystemExit(f"selftest --device {device}: no usable GPU here ({reason})")
    available, why = backends.get("emulator").probe()
    if not available:
        raise SystemExit(f"selftest: no usable GPU ({reason}) and no emulator ({why})")
    kind = _arrays.TORCH if _importable("torch") else _arrays.NUMPY
    return Target("emulator", "cpu", None, kind,
                  f"the emulator: no usable GPU here ({reason}), so this checks na_rtc's kernels on the CPU, not a GPU")


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return False
    return True


def _dtypes(kind: str) -> tuple[str, ...]:
    """bfloat16 needs torch: NumPy and CuPy have no such dtype."""
    return ("float32", "float16", "bfloat16") if kind == _arrays.TORCH else ("float32", "float16")


@contextlib.contextmanager
def _settings(values: tuple[tuple[str, str], ...]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name, _ in values}
    os.environ.update(dict(values))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def units(where: Target, mode: str) -> list[Unit]:
    """The canaries of ``mode`` ("quick" or "full") on ``where``, each kernel set once."""
    from .. import backends
    from ..runtime.dispatch import Dispatcher, composed_candidates

    run = backends.executor(where.backend)
    units_of = composed_candidates(run, where.policy())
    split = [(FUSED if op in ("forward", "backward") else AV if op.startswith("av") else QK, candidate)
             for op, candidate in units_of.items()]
    variants = [()] + ([tuple(s.items()) for s in ALTERNATIVE_SETTINGS] if mode == "full" else [])
    found: list[Unit] = []
    seen: set = set()

    def add(problem, candidate, family, settings=()):
        with _settings(settings):
            names = frozenset(candidate.kernels(problem))
        if names and names not in seen:
            seen.add(names)
            found.append(Unit(problem, candidate, family, settings))

    for ndim in (1, 2, 3):
        for dtype in _dtypes(where.kind):
            for head_dim in HEAD_DIMS[mode]:
                problem = Problem(FUSED, canary.AXES[ndim], canary.BATCH, canary.HEADS, head_dim, dtype, where.kind,
                                  where.device, True, head_dim**-0.5)
                for settings in variants:
                    dispatcher = Dispatcher(run, where.policy(settings))
                    for path, candidate in dispatcher.candidates("forward", problem):
                        add(problem, candidate, f"forward {path}", settings)
                    for path, candidate in dispatcher.candidates("backward", problem):
                        if " dq + " not in path:  # pairs of one path: every kernel once
                            add(problem, candidate, f"backward {path}", settings)
                for window in SPLIT_WINDOWS[mode, ndim]:
                    axes = tuple(Axis(4 * window, window) for _ in range(ndim))
                    for op, candidate in split:
                        call = Problem(op, axes, canary.BATCH, canary.HEADS, head_dim, dtype, where.kind, where.device,
                                       op != AV, head_dim**-0.5 if op == FUSED else None)
                        add(call, candidate, f"{candidate.op} split")
    return found


def run_unit(where: Target, unit: Unit) -> list[Row]:
    from .gate import Gate

    started = time.perf_counter()
    with _settings(unit.settings):
        verdicts = Gate.of(where.backend).verify(unit.problem, unit.candidate)
    seconds = time.perf_counter() - started
    settings = " ".join(f"{name}={value}" for name, value in unit.settings)
    return [Row(name, unit.candidate.op, unit.candidate.path, unit.problem.dtype, unit.problem.ndim,
                unit.problem.head_dim, verdict.ok, verdict.detail, round(seconds, 3), settings)
            for name, verdict in verdicts.items()]


def _primitives(where: Target) -> list[dict]:
    from .primitives import run_primitives

    index = int(where.device.partition(":")[2] or 0)
    return [asdict(result) for result in run_primitives(where.backend, index)]


def _mark(ok) -> str:
    return {True: "ok  ", False: "FAIL", None: "skip"}[ok]


def run(args: argparse.Namespace) -> int:
    if args.quick and args.full:
        print("selftest: choose --quick or --full, not both", file=sys.stderr)
        return 2
    mode = "full" if args.full else "quick"
    where = target(args.device)
    print(f"na_rtc selftest --{mode} on {where.description}")
    started = time.perf_counter()
    print("primitives (inline PTX)")
    primitives = _primitives(where)
    for result in primitives:
        print(f"  {_mark(result['ok'])}  {result['name']}  ({result['seconds']:.2f} s)"
              + ("" if result["ok"] else f"\n        {result['detail']}"))
    found = units(where, mode)
    print(f"kernels: {len(found)} canaries ({mode})")
    rows: list[Row] = []
    for unit in found:
        for row in run_unit(where, unit):
            rows.append(row)
            extra = f" [{row.settings}]" if row.settings else ""
            print(f"  {_mark(row.ok)}  {row.op:<11} {row.path:<9} {row.dtype:<8} {row.rank}D hd{row.head_dim:<4} "
                  f"{row.kernel}{extra}  ({row.seconds:.2f} s)" + ("" if row.ok else f"\n        {row.detail}"))
            sys.stdout.flush()
    failed_primitives = [p for p in primitives if p["ok"] is False]
    failed_kernels = [row for row in rows if not row.ok]
    from .gate import store

    seconds = time.perf_counter() - started
    print(f"{len(rows) - len(failed_kernels)} of {len(rows)} kernels and "
          f"{len([p for p in primitives if p['ok']])} of {len(primitives)} primitives passed in {seconds:.1f} s; "
          f"verdicts recorded in {store().folder}")
    if failed_kernels:
        print("kernels that failed are not used on this device: the dispatcher picks the next one that passed")
    if args.json:
        report = {"target": asdict(where), "mode": mode, "seconds": round(seconds, 1), "primitives": primitives,
                  "kernels": [asdict(row) for row in rows]}
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
        print(f"wrote {args.json}")
    return 1 if failed_primitives or failed_kernels else 0
