"""Command line: ``python -m na_rtc <command>``.

Each command is one function ``(args) -> exit code`` plus one entry in
:data:`COMMANDS` (its help line and its arguments). Heavy imports (torch,
cupy, matplotlib) happen inside the commands, so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, NamedTuple, Sequence


class Arg(NamedTuple):
    """One ``parser.add_argument(*flags, **options)`` call."""

    flags: tuple[str, ...]
    options: dict[str, Any]


def arg(*flags: str, **options: Any) -> Arg:
    return Arg(flags, options)


class Command(NamedTuple):
    run: Callable[[argparse.Namespace], int]
    help: str
    arguments: tuple[Arg, ...] = ()


# ---------------------------------------------------------------- info


def _rows(rows: Sequence[tuple[str, str]], indent: str = "  ") -> str:
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{indent}{label:<{width}}  {text}" for label, text in rows)


def _backend_table(table: Sequence[tuple[str, bool, str]]) -> str:
    rows = [("name", "available", "notes")] + [
        (name, "yes" if available else "no", reason) for name, available, reason in table
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(2)]
    lines = [f"  {name:<{widths[0]}}  {available:<{widths[1]}}  {reason}" for name, available, reason in rows]
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    from na_rtc import _environment as env

    version = env.na_rtc_version()
    print(f"na_rtc {version}")
    print(
        _rows(
            [
                ("Python", str(env.python_version())),
                ("NumPy", str(env.numpy_version())),
                ("torch", str(env.torch_version())),
                ("CuPy", str(env.cupy_version())),
                ("GPU", str(env.gpus())),
                ("NVRTC", str(env.nvrtc_version())),
                ("verdict", str(env.hardware_verdict())),
                ("cache", str(env.cache_dir())),
                ("verified", str(env.verdicts())),
                ("settings", str(env.settings())),
            ]
        )
    )
    print()
    print(f"backends (selected: {env.selected_backend()})")
    backends = env.backends()
    print(_backend_table(backends.value) if backends.ok else f"  {backends}")
    verdicts = env.verdicts()
    if verdicts.ok and verdicts.value:
        print()
        print("kernel verdicts (first-use verification; python -m na_rtc selftest checks them again)")
        shown = verdicts.value if args.verdicts else [v for v in verdicts.value if not v.ok]
        rows = [("WRONG" if not v.ok else "ok", f"{v.kernel} on {v.device} ({v.utc})" + ("" if v.ok else f": {v.detail}"))
                for v in shown]
        if not args.verdicts:
            passed: dict[str, int] = {}
            for verdict in verdicts.value:
                if verdict.ok:
                    passed[verdict.device] = passed.get(verdict.device, 0) + 1
            rows += [("ok", f"{count} kernels on {device} (info --verdicts lists them)")
                     for device, count in passed.items()]
        print(_rows(rows))
    return 0


# ---------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    from na_rtc import demo

    return demo.run_from_args(args)


def _demo_arguments() -> tuple[Arg, ...]:
    from na_rtc.demo import ARGUMENTS

    return tuple(arg(*flags, **options) for flags, options in ARGUMENTS)


# ---------------------------------------------------------------- precompile, check


def cmd_precompile(args: argparse.Namespace) -> int:
    from na_rtc.runtime import check

    return check.run_precompile(args)


def cmd_check(args: argparse.Namespace) -> int:
    from na_rtc.runtime import check

    return check.run_check(args)


def _kernel_arguments(arch_help: str) -> tuple[Arg, ...]:
    return (
        arg("--arch", metavar="LIST", help=arch_help),
        arg("--family", metavar="NAMES", help="only these kernel families (comma-separated; default: all)"),
        arg(
            "--jobs",
            type=int,
            default=min(4, os.cpu_count() or 1),
            metavar="N",
            help="compiles at once, in threads (default: CPU cores, at most 4)",
        ),
        arg(
            "--family-module",
            metavar="MODULE",
            help="module name or .py file defining FAMILIES (default: na_rtc.runtime.families)",
        ),
    )


# ---------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace) -> int:
    from na_rtc.bench import cli

    return cli.run(args)


def _bench_arguments() -> tuple[Arg, ...]:
    from na_rtc.bench.cli import ARGUMENTS  # flags only: no torch import

    return tuple(arg(*flags, **options) for flags, options in ARGUMENTS)


# ---------------------------------------------------------------- selftest


def cmd_selftest(args: argparse.Namespace) -> int:
    from na_rtc.verify import selftest

    return selftest.run(args)


def _selftest_arguments() -> tuple[Arg, ...]:
    return (
        arg("--device", type=int, metavar="N", help="the GPU to check (default: GPU 0; without a GPU: the emulator)"),
        arg("--quick", action="store_true",
            help="one canary per kernel family, dtype and rank at the smallest head dim (the default)"),
        arg("--full", action="store_true",
            help="every kernel instantiation the dispatcher can pick on this GPU, forward and every gradient"),
        arg("--json", metavar="FILE", help="also write the verdicts as JSON"),
    )


# ---------------------------------------------------------------- table


COMMANDS: dict[str, Command] = {
    "info": Command(cmd_info, "versions, backends, GPU, NVRTC, cache directory and the recorded kernel verdicts",
                    (arg("--verdicts", action="store_true", help="list every recorded kernel verdict, not only "
                         "the failures"),)),
    "demo": Command(
        cmd_demo,
        "run 1D/2D/3D neighborhood attention, check it against dense masked attention, time it, draw neighborhoods",
        _demo_arguments(),
    ),
    "precompile": Command(
        cmd_precompile,
        "compile every kernel with NVRTC into the disk cache (no GPU needed), e.g. --arch sm_80,sm_90",
        _kernel_arguments("architectures, e.g. sm_80,sm_90; classes (one GPU of each class the kernels run on) or all "
                          "(default: the GPUs in this machine)"),
    ),
    "check": Command(
        cmd_check,
        "compile every kernel instantiation and check registers, spills and shared memory against its launch",
        _kernel_arguments("architectures, e.g. sm_80,sm_90; classes (one GPU of each class the kernels run on: "
                          "make check-all) or all (default: sm_80,sm_90)")
        + (arg("--json", metavar="PATH", help="also write the report as JSON"),),
    ),
    "selftest": Command(
        cmd_selftest,
        "check the GPU's primitives and every kernel against a float64 reference before trusting them "
        "(on the emulator without a GPU)",
        _selftest_arguments(),
    ),
    "bench": Command(
        cmd_bench,
        "time na_rtc's fused, split and straightforward kernels next to naive torch NA, FlexAttention and SDPA",
        _bench_arguments(),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m na_rtc",
        description="na_rtc: neighborhood attention with run-time compiled CUDA kernels.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="command")
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        for argument in command.arguments:
            sub.add_argument(*argument.flags, **argument.options)
        sub.set_defaults(handler=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 0
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
