"""Compile a kernel source into an emulator library, cached on disk.

One library per (source file, list of name expressions): a generated
translation unit includes ``cuda_emu.h`` and the source, and defines one
``extern "C"`` launch trampoline per name expression (``na_emu_launch_<i>``,
in the order of the list). The system C++ compiler (``CXX``, else ``g++``,
else ``clang++``) builds it with :data:`FLAGS`.

Cache: ``<cache dir>/emulator/<source stem>-<key>.so`` with a
``.so.sha256`` file beside it, where the cache dir is ``NA_RTC_CACHE_DIR`` or
the user cache dir and the key is the sha256 of: the emulator headers, every
``*.cuh``/``*.cu``/``*.h`` file of the source's folder (name and content), the
source's name, the name expressions, the compiler command and its version
line, the flags, ``na_rtc.__version__`` and the machine. Both files are
written to temporary names and moved into place with ``os.replace``. A
library whose checksum does not match, or that fails to load, is rebuilt. A
cache folder that cannot be written gives one warning and a private temporary
folder for this process.

A process remembers each (source, names) it loaded: edit a kernel and call
:func:`clear_memory_cache` (or restart) to pick the edit up.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import functools
import hashlib
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from .. import _diskcache
from .module import EmulatedModule, EmulatorError

__all__ = [
    "FLAGS",
    "HEADER_SUFFIXES",
    "EmulatorBuildError",
    "EmulatorCacheWarning",
    "available",
    "cache_stats",
    "clear_memory_cache",
    "compiler_command",
    "library_path",
    "load_module",
    "reset_cache_stats",
]

#: compiler flags (after the compiler command); contraction off and IEEE math
#: so results do not depend on the optimizer
FLAGS: tuple[str, ...] = (
    "-std=c++20",
    "-O2",
    "-fPIC",
    "-shared",
    "-pthread",
    "-ffp-contract=off",
    "-fno-fast-math",
    "-fno-math-errno",
    "-fno-strict-aliasing",  # kernels may reinterpret buffers (vector loads, 16-bit payloads)
    "-fvisibility=hidden",
    "-U_FORTIFY_SOURCE",
)

#: files of the source folder a kernel can include (all hashed into the key)
HEADER_SUFFIXES = (".cuh", ".cu", ".h")

_HERE = Path(__file__).resolve().parent
_EMULATOR_HEADERS = ("cuda_emu.h", "cuda_emu_runtime.h")
_ABI_VERSION = 1


class EmulatorBuildError(EmulatorError):
    """The C++ compiler rejected a kernel source.

    Attributes: ``source`` (path), ``file`` and ``line`` of the first error
    (None when the output names none), ``log`` (the compiler output).
    """

    def __init__(self, message: str, *, source: Path, log: str, file: str | None, line: int | None):
        super().__init__(message)
        self.source = source
        self.log = log
        self.file = file
        self.line = line


class EmulatorCacheWarning(_diskcache.CacheWarning):
    """A cached emulator library was unusable (rebuilt) or the cache folder is not writable."""


# modules by key and by (source path, names)
_memo = _diskcache.Memo(("memory_hits", "disk_hits", "compiles", "bad_entries", "write_failures"))
_count = _memo.count
_private_dir: Path | None = None


def cache_stats() -> dict[str, int]:
    """Counters since start (or :func:`reset_cache_stats`): ``memory_hits``,
    ``disk_hits``, ``compiles`` (compiler runs), ``bad_entries`` (libraries
    rebuilt because they were corrupt or did not load), ``write_failures``."""
    return _memo.stats()


def reset_cache_stats() -> None:
    _memo.reset_stats()


def clear_memory_cache() -> None:
    """Forget the loaded modules (their libraries stay loaded) and the folder
    warnings: the next :func:`load_module` reads the sources again."""
    _memo.clear()


# ---------------------------------------------------------------- the compiler


def compiler_command() -> list[str]:
    """The compiler command: ``CXX`` (split like a shell would), else the first
    of ``g++``, ``clang++``, ``c++`` on PATH. RuntimeError when there is none."""
    explicit = os.environ.get("CXX", "").strip()
    if explicit:
        parts = shlex.split(explicit)
        if shutil.which(parts[0]) is None:
            raise RuntimeError(
                f"the emulator needs a C++ compiler, but CXX={explicit!r} is not an executable; "
                "set CXX to g++ or clang++ (C++20), or unset it"
            )
        return parts
    for name in ("g++", "clang++", "c++"):
        path = shutil.which(name)
        if path:
            return [path]
    raise RuntimeError(
        "the emulator needs a C++ compiler (g++ or clang++ with C++20) and found none on PATH; "
        "install one (e.g. `apt install g++`) or set CXX to its path"
    )


@functools.lru_cache(maxsize=8)
def _compiler_version(command: tuple[str, ...]) -> str:
    try:
        done = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        raise RuntimeError(f"the emulator's C++ compiler {' '.join(command)!r} does not run: {error}") from None
    lines = (done.stdout or done.stderr).strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the emulator's C++ compiler {' '.join(command)!r} does not run: {done.stderr.strip()}")
    return lines[0].strip()


def available() -> tuple[bool, str]:
    """``(True, compiler description)`` when kernels can be emulated here,
    else ``(False, reason)``."""
    if not sys.platform.startswith("linux"):
        return False, f"the emulator runs on Linux only (this is {sys.platform})"
    try:
        command = compiler_command()
        version = _compiler_version(tuple(command))
    except RuntimeError as error:
        return False, str(error)
    return True, f"{version} ({' '.join(command)})"


# ---------------------------------------------------------------- keys and paths


def _source_files(source: Path) -> list[Path]:
    files = sorted(p for p in source.parent.iterdir() if p.is_file() and p.suffix in HEADER_SUFFIXES)
    if source not in files:
        files.append(source)
    return files


def _key(source: Path, names: tuple[str, ...], command: list[str]) -> str:
    digest = _diskcache.KeyDigest()
    part = digest.part
    part("abi", _ABI_VERSION)
    part("na_rtc", _diskcache.na_rtc_version())
    part("machine", [sys.platform, platform.machine()])
    part("compiler", [command, _compiler_version(tuple(command))])
    part("flags", list(FLAGS))
    for header in _EMULATOR_HEADERS:
        part("emulator", (_HERE / header).read_bytes())
    part("source", source.name)
    part("names", list(names))
    for path in _source_files(source):
        part("file", path.name)
        part("content", path.read_bytes())
    return digest.hexdigest()


def _private_folder() -> Path:
    """This process's temporary build folder (removed at exit)."""
    global _private_dir
    with _memo.lock:
        if _private_dir is None:
            _private_dir = Path(tempfile.mkdtemp(prefix="na_rtc-emulator-"))
            atexit.register(shutil.rmtree, _private_dir, True)
        return _private_dir


def _warn_unwritable(folder: Path, error: BaseException, private: Path) -> None:
    _memo.warn_once(
        folder,
        f"na_rtc: emulator cache folder {folder} is not writable ({type(error).__name__}: {error}); "
        f"building in {private} for this process. Set NA_RTC_CACHE_DIR to a writable folder to keep builds.",
        EmulatorCacheWarning,
    )


def _cache_folder() -> Path:
    """``<cache dir>/emulator``, or a private temporary folder when that is not writable."""
    from .. import config

    folder = config.cache_dir() / "emulator"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"no write permission for {folder}")
        return folder
    except OSError as error:
        _count("write_failures")
        private = _private_folder()
        _warn_unwritable(folder, error, private)
        return private


def library_path(source: str | os.PathLike, names: Sequence[str]) -> Path:
    """Where the library of ``source`` with ``names`` is cached (built or not)."""
    source = Path(source).resolve()
    names = tuple(dict.fromkeys(names))
    return _cache_folder() / f"{source.stem}-{_key(source, names, compiler_command())}.so"


# ---------------------------------------------------------------- building


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _translation_unit(source: Path, names: tuple[str, ...]) -> str:
    lines = [
        "// generated by na_rtc.emulator.build: the emulator library of one kernel source",
        '#include "cuda_emu.h"',
        f"#include {_c_string(str(source))}",
        "",
    ]
    for i, name in enumerate(names):
        lines += [
            f"// kernel {i}: {name}",
            f"NA_EMU_EXPORT int na_emu_launch_{i}(const unsigned* grid, const unsigned* block, size_t shared_bytes,",
            "                                  void** args, char* error, size_t error_len) {",
            f"    return ::na_emu::launch({_c_string(name)}, &{name}, grid, block, shared_bytes, args, error, error_len);",
            "}",
            f"NA_EMU_EXPORT const char* na_emu_signature_{i}(void) {{ return ::na_emu::signature(&{name}); }}",
            "",
        ]
    return "\n".join(lines)


_ERROR_LINE = re.compile(r"^(?P<file>[^\n:]+):(?P<line>\d+):(?:\d+:)? (?:fatal )?error: (?P<message>.*)$", re.M)


def _build_error(source: Path, names: tuple[str, ...], tu_path: Path, log: str, command: list[str]) -> EmulatorBuildError:
    match = _ERROR_LINE.search(log)
    file = line = None
    where = ""
    if match:
        file, line = match["file"], int(match["line"])
        if Path(file).name == tu_path.name:
            tu_lines = tu_path.read_text().splitlines()
            kernel = None
            for number in range(min(line, len(tu_lines)), 0, -1):
                text = tu_lines[number - 1]
                if text.startswith("// kernel "):
                    kernel = text.split(": ", 1)[1]
                    break
            where = (
                f"the name expression {kernel!r} does not name a kernel template instantiation of {source.name} "
                f"({match['message']})"
                if kernel
                else match["message"]
            )
            file, line = None, None
        else:
            where = f"{file}:{line}: {match['message']}"
            try:
                text = Path(file).read_text(errors="replace").splitlines()
                if 1 <= line <= len(text):
                    where += f"\n    {line} | {text[line - 1].strip()}"
            except OSError:
                pass
    tail = log if len(log) <= 12000 else log[:12000] + "\n[... compiler output truncated ...]"
    message = (
        f"{Path(command[0]).name} could not compile {source} for the emulator"
        + (f": {where}" if where else "")
        + f"\n\ncompiler output:\n{tail}"
    )
    return EmulatorBuildError(message, source=source, log=log, file=file, line=line)


def _compile(source: Path, names: tuple[str, ...], target: Path, command: list[str], checksum: bool = True) -> None:
    """Build the library into ``target`` (atomically), with its checksum file."""
    folder = target.parent
    work = Path(tempfile.mkdtemp(prefix=f".{target.stem}.", dir=folder))
    try:
        tu_path = work / f"{target.stem}.cpp"
        tu_path.write_text(_translation_unit(source, names))
        built = work / target.name
        # relative names in the work folder: concurrent builds of one key give identical bytes
        cmd = [*command, *FLAGS, "-I", str(_HERE), "-I", str(source.parent), "-o", built.name, tu_path.name]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
        _count("compiles")
        if done.returncode != 0 or not built.exists():
            log = (done.stderr or "") + (done.stdout or "")
            _raise_if_the_folder_failed(work, log)
            raise _build_error(source, names, tu_path, log, command)
        digest = hashlib.sha256(built.read_bytes()).hexdigest()
        os.chmod(built, 0o755)
        if checksum:
            _diskcache.write_atomically(_checksum_path(target), f"{digest} {_key_of(target)}\n".encode())
        os.replace(built, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


#: compiler messages that blame the disk, not the source
_DISK_ERRORS = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
                "Read-only file system": errno.EROFS}


def _raise_if_the_folder_failed(work: Path, log: str) -> None:
    """OSError when a failed compile was the build folder's fault (deleted,
    full, read-only), so the caller builds elsewhere instead of blaming the source."""
    if not work.is_dir():
        raise FileNotFoundError(errno.ENOENT, "the build folder was deleted during the build", str(work))
    for text, number in _DISK_ERRORS.items():
        if text in log:
            raise OSError(number, f"the compiler could not write its output: {text}", str(work))


def _checksum_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _key_of(target: Path) -> str:
    return target.stem.rpartition("-")[2]


def _verify(target: Path) -> str | None:
    """Why the library ``target`` must not be used, or None when it may.

    Its ``.sha256`` file holds the library's sha256 and the key it was built
    for (files written before the key was recorded hold the digest alone)."""
    try:
        recorded = _checksum_path(target).read_text().split()
        actual = hashlib.sha256(target.read_bytes()).hexdigest()
    except OSError as error:
        return f"its checksum cannot be read ({type(error).__name__})"
    if not recorded or recorded[0] != actual:
        return "its checksum does not match"
    if len(recorded) > 1 and recorded[1] != _key_of(target):
        return "it belongs to another key (renamed or copied file)"
    return None


def _open(target: Path, source: Path, names: tuple[str, ...]) -> EmulatedModule:
    library = ctypes.CDLL(str(target))
    return EmulatedModule(source, names, target, library)


# ---------------------------------------------------------------- loading


def load_module(source: str | os.PathLike, names: Sequence[str]) -> EmulatedModule:
    """The emulator module of kernel source ``source`` with the kernels
    ``names`` (C++ name expressions such as ``na_qk_fwd<float, float>``):
    from this process's memory, from the disk cache, or compiled now.

    Raises :class:`EmulatorBuildError` when the compiler rejects the source and
    RuntimeError when there is no C++ compiler.
    """
    names = tuple(dict.fromkeys(names))
    if not names:
        raise ValueError("load_module needs at least one kernel name expression")
    path = command = None

    def key_of() -> str:
        nonlocal path, command
        path = Path(source).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"kernel source {path} does not exist")
        command = compiler_command()
        return _key(path, names, command)

    def produce(key: str) -> tuple[EmulatedModule, str]:
        return _load_or_build(path, names, key, command)

    return _memo.get((os.fspath(source), names), key_of, produce)[0]


def _load_or_build(source: Path, names: tuple[str, ...], key: str, command: list[str]) -> tuple[EmulatedModule, str]:
    """The module and where it came from: ``"disk"`` or ``"compiled"``."""
    target = _cache_folder() / f"{source.stem}-{key}.so"
    seen = _diskcache.file_signature(target)
    module = _load_built(target, source, names, warn=True)
    if module is None:
        with _diskcache.build_lock(target):  # another process building this key finishes first
            if _diskcache.file_signature(target) not in (None, seen):  # ... and left its library
                module = _load_built(target, source, names, warn=False)
            if module is None:
                return _build(source, names, target, command), "compiled"
    _count("disk_hits")
    return module, "disk"


def _load_built(target: Path, source: Path, names: tuple[str, ...], *, warn: bool) -> EmulatedModule | None:
    """The module of a cached library, or None (with a warning when ``warn``)
    when there is none or it is unusable."""
    if not target.exists():
        return None
    reason = _verify(target)
    if reason is None:
        try:
            return _open(target, source, names)
        except (OSError, EmulatorError) as error:
            reason = f"it does not load ({error})"
    if warn:
        _count("bad_entries")
        _diskcache.warn(f"na_rtc: cached emulator library {target} is unusable ({reason}); rebuilding it", EmulatorCacheWarning)
    return None


def _build(source: Path, names: tuple[str, ...], target: Path, command: list[str]) -> EmulatedModule:
    started = time.perf_counter()
    try:
        _compile(source, names, target, command)
    except OSError as error:  # the folder became unwritable or full: build privately
        _count("write_failures")
        private = _private_folder()
        _warn_unwritable(target.parent, error, private)
        target = private / target.name
        try:  # no checksum file: nothing reads a private library back
            _compile(source, names, target, command, checksum=False)
        except OSError as again:
            raise EmulatorError(
                f"cannot build the emulator library of {source.name}: neither the cache folder {error.filename or ''} "
                f"({error.strerror or error}) nor the private folder {private} ({again.strerror or again}) can take it; "
                "free disk space, or set NA_RTC_CACHE_DIR and TMPDIR to writable folders"
            ) from again
    try:
        module = _open(target, source, names)
    except OSError as error:
        raise EmulatorError(f"the emulator library {target} was built but does not load: {error}") from error
    module.compile_seconds = time.perf_counter() - started
    return module
