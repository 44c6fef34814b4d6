"""Compile ``cuda_src/`` kernels with NVRTC: no GPU, no driver, no CUDA toolkit.

One call compiles one source file (a kernel family) with every instantiation
asked for (C++ name expressions such as ``na_qk_fwd<float, float>``) into one
cubin for ``sm_XY``, and returns the lowered (mangled) name of each
instantiation, which CuPy's ``RawModule.get_function`` takes.

* Headers: every ``*.cuh`` / ``*.h`` / ``*.cu`` file in the source's folder
  (``include_dir``, by default the source's own folder) is handed to NVRTC
  through ``nvrtcCreateProgram``'s header arrays, under its file name. So
  ``#include "na_types.cuh"`` resolves to exactly the files that the cache key
  hashes, whatever the current directory, and no toolkit header is needed.
  Keep ``cuda_src/`` flat: includes name files of that one folder. (A quoted
  include of a file that is not in the folder falls through to NVRTC's own
  search, which starts in the current directory: don't rely on it.)
* Architectures: ``arch`` (``90`` for sm_90) that the installed NVRTC knows
  gives a cubin. An arch newer than the newest NVRTC knows (or one in a gap of
  its list) gives PTX for the newest ``compute_XY`` below it, which the driver
  JIT-compiles (``kind == "ptx"``). An arch older than the oldest it knows
  (sm_70 with NVRTC 13) raises :class:`ArchUnsupported`: NVRTC 12 serves it.
* Options: :data:`DEFAULT_OPTIONS` (C++17, line info, ptxas resource report,
  IEEE math: no ``--use_fast_math``), then the caller's.
* Errors: :class:`NvrtcUnavailable` when ``cuda.bindings`` or the libnvrtc
  library cannot be loaded (with the install command), and
  :class:`KernelCompileError` with the NVRTC log and the source lines around
  the first error.

Nothing here is imported by ``import na_rtc``; ``cuda.bindings`` is imported
on first use.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .._install import install_command

__all__ = [
    "DEFAULT_OPTIONS",
    "HEADER_SUFFIXES",
    "install_hint",
    "ArchUnsupported",
    "CompiledProgram",
    "KernelCompileError",
    "NvrtcUnavailable",
    "compile_program",
    "include_files",
    "nvrtc_version",
    "parse_arch",
    "supported_archs",
    "target_for",
]

#: options every program is compiled with (before the caller's options)
DEFAULT_OPTIONS: tuple[str, ...] = (
    "--std=c++17",
    "-lineinfo",  # source lines in profilers and sanitizer reports
    "-Xptxas=-v",  # registers, spills and shared memory per kernel in the log
    "-DNA_RTC_NVRTC=1",
)

#: files of the source folder a program can include (and the cache key hashes)
HEADER_SUFFIXES = (".cuh", ".cu", ".h")

def install_hint() -> str:
    """How to install NVRTC, as a command that works for the way na_rtc was installed (checkout or wheel)."""
    return (f"install NVRTC with `{install_command('cuda13')}` (CUDA 13 driver, sm_75 and newer), "
            f"or `{install_command('cuda12')}` for older drivers and sm_70/sm_72 (V100, Xavier)")


class NvrtcUnavailable(RuntimeError):
    """NVRTC cannot be used here: ``cuda.bindings`` or libnvrtc is missing."""


class ArchUnsupported(NvrtcUnavailable):
    """The installed NVRTC cannot compile for this (too old) GPU architecture."""


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message carries the log and source context.

    Attributes: ``source`` (the source path), ``arch``, ``log`` (the NVRTC log
    with file names relative to the source folder), ``file`` and ``line`` of
    the first error (``None`` when the log names none).
    """

    def __init__(self, message: str, *, source: Path, arch: int, log: str, file: str | None, line: int | None):
        super().__init__(message)
        self.source = source
        self.arch = arch
        self.log = log
        self.file = file
        self.line = line

    def __reduce__(self):  # picklable across processes despite keyword-only arguments
        return _rebuild_compile_error, (self.args[0], self.source, self.arch, self.log, self.file, self.line)


def _rebuild_compile_error(message, source, arch, log, file, line) -> KernelCompileError:
    return KernelCompileError(message, source=source, arch=arch, log=log, file=file, line=line)


@dataclass(frozen=True)
class CompiledProgram:
    """What one NVRTC compile produced.

    ``binary`` is a cubin (``kind == "cubin"``) or PTX text (``kind ==
    "ptx"``), ready for ``cupy.RawModule``; ``lowered`` maps each name
    expression to its mangled kernel name; ``target`` is what NVRTC compiled
    for (``"sm_90"`` or ``"compute_120"``) while ``arch`` is what was asked;
    ``options`` are all options NVRTC got (defaults, caller's, ``-arch``).
    """

    binary: bytes
    kind: str
    lowered: dict[str, str]
    log: str
    compile_seconds: float
    arch: int
    target: str
    options: tuple[str, ...]
    source: str = ""  # the source file name, relative to its folder
    names: tuple[str, ...] = field(default=())

    def function_name(self, name: str) -> str:
        """The lowered name of name expression ``name`` (KeyError naming the known ones)."""
        try:
            return self.lowered[name]
        except KeyError:
            known = ", ".join(self.lowered) or "none"
            raise KeyError(f"kernel {name!r} was not compiled into {self.source or 'this program'} (compiled: {known})") from None


# ---------------------------------------------------------------- the library


@functools.lru_cache(maxsize=1)
def _module():
    """``cuda.bindings.nvrtc`` with a working libnvrtc, or NvrtcUnavailable."""
    try:
        from cuda.bindings import nvrtc
    except ImportError as error:
        try:  # cuda-python before 12.6 exposed the bindings here
            from cuda import nvrtc  # type: ignore[no-redef]
        except Exception:  # noqa: BLE001
            raise NvrtcUnavailable(f"NVRTC Python bindings (cuda.bindings) are not installed ({error}); {install_hint()}") from None
    except Exception as error:  # noqa: BLE001
        raise NvrtcUnavailable(f"cuda.bindings is not importable ({type(error).__name__}: {error}); {install_hint()}") from None
    try:
        result = nvrtc.nvrtcVersion()
    except Exception as error:  # noqa: BLE001 - RuntimeError: failed to dlopen libnvrtc
        raise NvrtcUnavailable(f"the NVRTC library (libnvrtc) could not be loaded ({type(error).__name__}: {error}); {install_hint()}") from None
    if int(result[0]) != 0:
        raise NvrtcUnavailable(f"nvrtcVersion failed ({result[0]}); {install_hint()}")
    return nvrtc


def _check(nvrtc, result, what: str):
    """Unpack a ``cuda.bindings`` result tuple ``(error, *values)``; raise on error."""
    error, *values = result
    if int(error) != 0:
        try:
            text = nvrtc.nvrtcGetErrorString(error)[1]
            text = text.decode() if isinstance(text, bytes) else str(text)
        except Exception:  # noqa: BLE001
            text = str(error)
        raise RuntimeError(f"{what} failed: {text}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@functools.lru_cache(maxsize=1)
def nvrtc_version() -> tuple[int, int]:
    """The NVRTC library's version, e.g. ``(13, 0)``."""
    nvrtc = _module()
    major, minor = _check(nvrtc, nvrtc.nvrtcVersion(), "nvrtcVersion")
    return int(major), int(minor)


def supported_archs() -> list[int]:
    """Architectures the NVRTC library compiles cubins for, e.g. ``[75, 80, 86, ..., 120]``."""
    return list(_supported_archs())


@functools.lru_cache(maxsize=1)
def _supported_archs() -> tuple[int, ...]:
    nvrtc = _module()
    return tuple(sorted(int(arch) for arch in _check(nvrtc, nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs")))


def parse_arch(text: str | int) -> int:
    """``"sm_90"``, ``"90"``, ``"compute_90"``, ``"9.0"`` or ``90`` -> ``90``."""
    if isinstance(text, int):
        value = text
    else:
        raw = str(text).strip().lower()
        match = re.fullmatch(r"(?:sm_|compute_)?(\d+)(?:\.(\d))?a?", raw)
        if not match:
            raise ValueError(f"not a GPU architecture: {text!r} (expected e.g. sm_90 or 90)")
        value = int(match.group(1)) * 10 + int(match.group(2)) if match.group(2) is not None else int(match.group(1))
    if not 10 <= value <= 999:
        raise ValueError(f"not a GPU architecture: {text!r} (expected e.g. sm_90 or 90)")
    return value


def target_for(arch: int, archs: Sequence[int] | None = None) -> tuple[str, str]:
    """What NVRTC compiles for device ``arch``: ``("cubin", "sm_90")`` or ``("ptx", "compute_120")``."""
    archs = sorted(archs if archs is not None else supported_archs())
    if not archs:
        raise NvrtcUnavailable(f"NVRTC reports no supported architectures; {install_hint()}")
    if arch in archs:
        return "cubin", f"sm_{arch}"
    if arch < archs[0]:
        try:
            version = "NVRTC {}.{}".format(*nvrtc_version())
        except Exception:  # noqa: BLE001 - only for the message
            version = "the installed NVRTC"
        raise ArchUnsupported(
            f"{version} cannot compile for sm_{arch}: it supports sm_{archs[0]} to sm_{archs[-1]}. "
            f"For sm_70/sm_72 (V100, Xavier) and older drivers use NVRTC 12: {install_command('cuda12')}"
        )
    # newer than NVRTC knows, or a gap in its list: PTX for the newest arch below, JIT-compiled by the driver
    return "ptx", f"compute_{max(a for a in archs if a < arch)}"


# ---------------------------------------------------------------- sources


def include_files(include_dir: Path) -> list[Path]:
    """The files a program in ``include_dir`` can include, sorted by name."""
    return sorted((p for p in include_dir.iterdir() if p.suffix in HEADER_SUFFIXES and p.is_file()), key=lambda p: p.name)


def _source_name(source_path: Path, include_dir: Path) -> str:
    try:
        return source_path.relative_to(include_dir).as_posix()
    except ValueError:
        return source_path.name


_ERROR_LINE = re.compile(r"^(?P<file>[^\s(][^()\n]*)\((?P<line>\d+)\): (?:catastrophic )?error", re.MULTILINE)


def _context(path: Path, line: int, around: int = 3) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    if not 1 <= line <= len(lines):
        return ""
    first, last = max(1, line - around), min(len(lines), line + around)
    width = len(str(last))
    return "\n".join(
        f"{'>' if number == line else ' '} {number:>{width}} | {lines[number - 1]}" for number in range(first, last + 1)
    )


def _first_error(log: str, include_dir: Path, main_name: str, source_path: Path) -> tuple[str | None, int | None, str]:
    """File, line and source context of the first error in ``log`` that is in a real file."""
    for match in _ERROR_LINE.finditer(log):
        name, line = match.group("file"), int(match.group("line"))
        path = source_path if name == main_name else include_dir / name
        if path.is_file():
            return name, line, _context(path, line)
    return None, None, ""


def _out_buffer(size: int) -> bytearray:
    """A fresh writable buffer for NVRTC to fill. Never ``b" " * size``: CPython
    shares every 1-byte bytes object, so NVRTC writing an empty log's NUL into
    one turned ``b" "`` into ``b"\\x00"`` for the whole process (it broke
    torch.save after a PTX compile)."""
    return bytearray(max(int(size), 1))


def _read_log(nvrtc, prog) -> str:
    size = _check(nvrtc, nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
    buffer = _out_buffer(size)
    _check(nvrtc, nvrtc.nvrtcGetProgramLog(prog, buffer), "nvrtcGetProgramLog")
    return bytes(buffer).rstrip(b"\x00 \n").decode(errors="replace")


def compile_program(
    source_path: Path,
    names: Sequence[str],
    arch: int,
    options: Sequence[str] = (),
    include_dir: Path | None = None,
    arch_specific: bool = False,
    ptx: bool = False,
) -> CompiledProgram:
    """Compile ``source_path`` with NVRTC for ``sm_<arch>``, keeping the kernels ``names``.

    ``arch_specific``: for ``sm_<arch>a`` (Hopper's wgmma needs ``sm_90a``), whose cubin runs on
    exactly that architecture; only where NVRTC compiles ``sm_<arch>`` to a cubin. ``ptx``: PTX for
    ``compute_<arch>`` (``compute_<arch>a``) instead of a cubin, to read what the kernels compile to.

    ``names`` are C++ name expressions (``"na_qk_fwd<float, float>"``, or a
    plain ``"kernel"``); each gets its lowered name in the result. Headers
    come from ``include_dir`` (default: the source's folder). Raises
    :class:`KernelCompileError`, :class:`NvrtcUnavailable` or
    :class:`ArchUnsupported`.
    """
    nvrtc = _module()
    source_path = Path(source_path).resolve()
    include_dir = Path(include_dir).resolve() if include_dir is not None else source_path.parent
    arch = parse_arch(arch)
    kind, target = target_for(arch)
    if arch_specific:
        if kind != "cubin":
            raise ArchUnsupported(f"the sm_{arch}a kernels of {Path(source_path).name} need an NVRTC that compiles "
                                  f"sm_{arch}; NVRTC {'.'.join(map(str, nvrtc_version()))} compiles to {target}")
        target += "a"
    if ptx and kind == "cubin":
        kind, target = "ptx", target.replace("sm_", "compute_")
    all_options = (*DEFAULT_OPTIONS, *options, f"-arch={target}")
    main_name = _source_name(source_path, include_dir)
    source = source_path.read_bytes()
    headers = [p for p in include_files(include_dir) if p != source_path]

    started = time.perf_counter()
    prog = _check(
        nvrtc,
        nvrtc.nvrtcCreateProgram(
            source, main_name.encode(), len(headers), [p.read_bytes() for p in headers], [p.name.encode() for p in headers]
        ),
        "nvrtcCreateProgram",
    )
    try:
        for name in names:
            _check(nvrtc, nvrtc.nvrtcAddNameExpression(prog, name.encode()), f"nvrtcAddNameExpression({name!r})")
        encoded = [option.encode() for option in all_options]
        (result,) = nvrtc.nvrtcCompileProgram(prog, len(encoded), encoded)
        log = _read_log(nvrtc, prog).replace(f"{include_dir}/", "")
        if int(result) != 0:
            file, line, context = _first_error(log, include_dir, main_name, source_path)
            where = f"{file}:{line}" if file else main_name
            message = f"NVRTC could not compile {main_name} for {target} (error in {where}).\n\n{log}"
            if context:
                message += f"\n\n{file}, around line {line}:\n{context}"
            if "__nv_name_map" in log:
                message += f"\n\nA name expression may not name a kernel of {main_name}; asked for: {', '.join(names)}"
            message += f"\n\noptions: {' '.join(all_options)}"
            raise KernelCompileError(message, source=source_path, arch=arch, log=log, file=file, line=line)
        lowered = {}
        for name in names:
            mangled = _check(nvrtc, nvrtc.nvrtcGetLoweredName(prog, name.encode()), f"nvrtcGetLoweredName({name!r})")
            lowered[name] = mangled.decode() if isinstance(mangled, bytes) else str(mangled)
        if kind == "cubin":
            size = _check(nvrtc, nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
            buffer = _out_buffer(size)
            _check(nvrtc, nvrtc.nvrtcGetCUBIN(prog, buffer), "nvrtcGetCUBIN")
            binary = bytes(buffer[: int(size)])
        else:
            size = _check(nvrtc, nvrtc.nvrtcGetPTXSize(prog), "nvrtcGetPTXSize")
            buffer = _out_buffer(size)
            _check(nvrtc, nvrtc.nvrtcGetPTX(prog, buffer), "nvrtcGetPTX")
            binary = bytes(buffer).rstrip(b"\x00")  # text, without the C terminator
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return CompiledProgram(
        binary=bytes(binary),
        kind=kind,
        lowered=lowered,
        log=log,
        compile_seconds=time.perf_counter() - started,
        arch=arch,
        target=target,
        options=tuple(all_options),
        source=main_name,
        names=tuple(names),
    )
