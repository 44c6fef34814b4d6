"""Compiled kernels, cached in memory and on disk per GPU architecture.

:func:`get_program` returns the :class:`~na_rtc.runtime.nvrtc.CompiledProgram`
of a kernel family for an architecture, compiling with NVRTC only when neither
the in-process memo nor the disk cache has it.

Key: sha256 over every file the source can include (all ``*.cuh``, ``*.cu``,
``*.h`` of its folder: name and contents), the source's name, the compile
options (NVRTC defaults included), the arch (and whether the target is its
arch-specific ``sm_<arch>a``), the NVRTC version,
``na_rtc.__version__`` and the sorted name expressions. Any edit to
``cuda_src/`` or upgrade therefore gives new entries; old ones stay until the
folder is deleted (``rm -r`` it any time, it is only a cache).

Disk layout: ``<cache dir>/sm_<arch>/<source stem>-<key>.bin`` (``sm_<arch>a/`` for
arch-specific programs), where the cache
dir is ``NA_RTC_CACHE_DIR`` or the user cache dir (:func:`na_rtc.config.cache_dir`).
An entry is one file::

    magic "NARTCKC\\n" | format version u32 | metadata length u32 | payload length u64
    | sha256(metadata + payload) | metadata (JSON, UTF-8) | payload (cubin or PTX)

all little-endian. It is written to a temporary file in the same folder and
moved into place with ``os.replace`` (atomic), so processes compiling the same
kernel at once each leave a whole entry and readers never see half of one. On
load the magic, format, lengths, checksum and the key recorded in the
metadata are verified; anything wrong (truncated, corrupted, renamed, older
format) is a miss: the kernel is recompiled and the entry overwritten, with a
:class:`KernelCacheWarning`. A cache folder that cannot be written (read-only,
not a folder, disk full) still serves the entries it has; new programs are
kept in memory only, with one warning per folder.

In memory, programs are kept per cache key and per call arguments: after its
first use of a family a process reads no file again for it (a lookup costs a
few microseconds), so edits to ``cuda_src/`` made while it runs are seen only
after :func:`clear_memory_cache`. Loaded CuPy modules (per device) are the
``cuda`` backend's business, not this module's.

:func:`cache_stats` counts memory hits, disk hits, compiles, writes and bad
entries, so tests can tell hits from misses without timing.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from pathlib import Path
from typing import Sequence

from .. import _diskcache
from . import nvrtc as _nvrtc
from .nvrtc import CompiledProgram

__all__ = [
    "FORMAT_VERSION",
    "KernelCacheWarning",
    "cache_key",
    "cache_stats",
    "clear_memory_cache",
    "entry_path",
    "get_program",
    "lookup",
    "reset_cache_stats",
    "resolve_source",
]

MAGIC = b"NARTCKC\n"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIQ32s")  # magic, format, metadata length, payload length, sha256


class KernelCacheWarning(_diskcache.CacheWarning):
    """A cache entry was unusable (recompiled) or the cache folder is not writable."""


# programs by cache key and by call arguments: a process sees cuda_src as it
# was at its first use of a family; clear_memory_cache() after editing kernels
_memo = _diskcache.Memo(("memory_hits", "disk_hits", "compiles", "disk_writes", "bad_entries", "write_failures"))
_count = _memo.count


def cache_stats() -> dict[str, int]:
    """Counters since start (or :func:`reset_cache_stats`): ``memory_hits``,
    ``disk_hits``, ``compiles`` (NVRTC runs), ``disk_writes``, ``bad_entries``
    (corrupt/truncated/foreign entries found) and ``write_failures``."""
    return _memo.stats()


def reset_cache_stats() -> None:
    _memo.reset_stats()


def clear_memory_cache() -> None:
    """Forget the in-process programs (the disk cache stays) and the per-folder
    warnings; the next :func:`get_program` reads the sources again."""
    _memo.clear()


# ---------------------------------------------------------------- keys


def resolve_source(source: str | os.PathLike) -> Path:
    """An absolute path as is; a relative one names a file in ``cuda_src/``."""
    path = Path(source)
    if path.is_absolute():
        return path
    from .._resources import cuda_src_dir

    return cuda_src_dir() / path


def cache_key(
    source_path: str | os.PathLike,
    names: Sequence[str],
    arch: int,
    options: Sequence[str] = (),
    include_dir: Path | None = None,
    arch_specific: bool = False,
) -> str:
    """The sha256 (hex) identifying one compiled program; see the module docstring."""
    source_path = resolve_source(source_path).resolve()
    include_dir = Path(include_dir).resolve() if include_dir is not None else source_path.parent
    digest = _diskcache.KeyDigest()
    part = digest.part
    part("format", FORMAT_VERSION)
    part("na_rtc", _diskcache.na_rtc_version())
    part("nvrtc", list(_nvrtc.nvrtc_version()))
    part("arch", _nvrtc.parse_arch(arch))
    if arch_specific:  # sm_90a rather than sm_90 (absent otherwise: the keys of plain targets stay as they were)
        part("arch_specific", True)
    part("options", [*_nvrtc.DEFAULT_OPTIONS, *options])
    part("names", sorted(set(names)))
    part("source", source_path.name)
    files = _nvrtc.include_files(include_dir)
    if source_path not in files:
        files.append(source_path)
    for path in files:
        part("file", path.name)
        part("sha256", _file_digest(path))
    return digest.hexdigest()


_digests: dict[str, tuple[tuple[int, ...], str]] = {}
_RACY_NS = 2_000_000_000  # a file changed this recently may change again within its mtime tick


def _file_digest(path: Path) -> str:
    """sha256 of a file, remembered while its stat is unchanged (and not racily recent)."""
    stat = path.stat()
    signature = (stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size, stat.st_ino, stat.st_dev)
    remembered = _digests.get(str(path))
    if remembered is not None and remembered[0] == signature:
        return remembered[1]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) > _RACY_NS:
        _digests[str(path)] = (signature, digest)
    return digest


def _arch_dir(root: Path, arch: int, arch_specific: bool = False) -> Path:
    return root / f"sm_{arch}{'a' if arch_specific else ''}"


def entry_path(key: str, arch: int, source_name: str, root: Path | None = None, arch_specific: bool = False) -> Path:
    """Where the entry of ``key`` lives on disk."""
    from .. import config

    root = Path(root) if root is not None else config.cache_dir()
    return _arch_dir(root, _nvrtc.parse_arch(arch), arch_specific) / f"{Path(source_name).stem}-{key}.bin"


# ---------------------------------------------------------------- entries


def _encode(program: CompiledProgram, key: str) -> bytes:
    metadata = json.dumps(
        {
            "key": key,
            "kind": program.kind,
            "lowered": program.lowered,
            "log": program.log,
            "arch": program.arch,
            "target": program.target,
            "options": list(program.options),
            "compile_seconds": program.compile_seconds,
            "source": program.source,
            "names": list(program.names),
            "na_rtc": _diskcache.na_rtc_version(),
        },
        sort_keys=True,
    ).encode()
    checksum = hashlib.sha256(metadata + program.binary).digest()
    return _HEADER.pack(MAGIC, FORMAT_VERSION, len(metadata), len(program.binary), checksum) + metadata + program.binary


class _BadEntry(Exception):
    pass


def _decode(data: bytes, key: str) -> CompiledProgram:
    if len(data) < _HEADER.size:
        raise _BadEntry(f"truncated ({len(data)} bytes)")
    magic, version, meta_len, payload_len, checksum = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise _BadEntry("not an na_rtc kernel cache entry")
    if version != FORMAT_VERSION:
        raise _BadEntry(f"format {version}, expected {FORMAT_VERSION}")
    expected = _HEADER.size + meta_len + payload_len
    if len(data) != expected:
        raise _BadEntry(f"truncated ({len(data)} bytes, expected {expected})" if len(data) < expected else "trailing bytes")
    body = data[_HEADER.size :]
    if hashlib.sha256(body).digest() != checksum:
        raise _BadEntry("checksum mismatch")
    try:
        meta = json.loads(body[:meta_len])
        if meta["key"] != key:
            raise _BadEntry("entry belongs to another key (renamed or copied file)")
        return CompiledProgram(
            binary=bytes(body[meta_len:]),
            kind=str(meta["kind"]),
            lowered={str(k): str(v) for k, v in meta["lowered"].items()},
            log=str(meta["log"]),
            compile_seconds=float(meta["compile_seconds"]),
            arch=int(meta["arch"]),
            target=str(meta["target"]),
            options=tuple(meta["options"]),
            source=str(meta["source"]),
            names=tuple(meta["names"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise _BadEntry(f"unreadable metadata ({type(error).__name__}: {error})") from None


def _load(path: Path, key: str, names: Sequence[str], arch: int, arch_specific: bool = False,
          quiet: bool = False) -> CompiledProgram | None:
    """The entry at ``path``, or None: absent, or unusable (with a warning that it is recompiled, unless
    ``quiet``: the caller will not recompile it)."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        if not quiet:
            _diskcache.warn(f"na_rtc: cannot read kernel cache entry {path} ({error}); recompiling",
                            KernelCacheWarning)
        return None
    try:
        program = _decode(data, key)
        missing = [name for name in names if name not in program.lowered]
        if missing:
            raise _BadEntry(f"lacks kernels {missing}")
        # the key covers the arch; this also catches a writer that recorded the wrong one
        kind, target = program.kind, program.target
        cubin_target = f"sm_{arch}a" if arch_specific else f"sm_{arch}"
        if program.arch != arch or not (target == cubin_target if kind == "cubin" else kind == "ptx" and target.startswith("compute_")):
            raise _BadEntry(f"compiled for {target} ({kind}) of sm_{program.arch}, not for sm_{arch}")
    except _BadEntry as error:
        _count("bad_entries")
        if not quiet:
            _diskcache.warn(f"na_rtc: kernel cache entry {path} is unusable ({error}); recompiling it",
                            KernelCacheWarning)
        return None
    return program


def _store(path: Path, program: CompiledProgram, key: str) -> bool:
    """Write the entry atomically; False (with one warning per folder) when the folder is unusable."""
    try:
        _diskcache.write_atomically(path, _encode(program, key))
    except OSError as error:
        _count("write_failures")
        _memo.warn_once(
            path.parent,
            f"na_rtc: kernel cache folder {path.parent} is not writable ({type(error).__name__}: {error}); compiled "
            "kernels are kept in memory only for this process. Set NA_RTC_CACHE_DIR to a writable folder to keep them.",
            KernelCacheWarning,
        )
        return False
    _count("disk_writes")
    return True


# ---------------------------------------------------------------- lookup


def lookup(
    source_path: str | os.PathLike,
    names: Sequence[str],
    arch: int,
    options: Sequence[str] = (),
    *,
    include_dir: Path | None = None,
    cache_root: Path | None = None,
    arch_specific: bool = False,
    compile: bool = True,
) -> tuple[CompiledProgram | None, str]:
    """Like :func:`get_program`, also saying where the program came from:
    ``"memory"``, ``"disk"`` or ``"compiled"``. With ``compile=False`` a program
    neither in memory nor on disk is not compiled: ``(None, "absent")``."""
    names = tuple(dict.fromkeys(names))
    arch = _nvrtc.parse_arch(arch)
    options = tuple(options)
    call = (os.fspath(source_path), names, arch, options, include_dir and os.fspath(include_dir), cache_root and os.fspath(cache_root),
            arch_specific)
    source = None

    def key_of() -> str:  # first call with these arguments in this process: key from the files
        nonlocal source
        source = resolve_source(source_path).resolve()
        return cache_key(source, names, arch, options, include_dir, arch_specific)

    def produce(key: str) -> tuple[CompiledProgram, str]:
        path = entry_path(key, arch, source.name, cache_root, arch_specific)
        seen = _diskcache.file_signature(path)
        program = _load(path, key, names, arch, arch_specific, quiet=not compile)
        if program is None and not compile:
            return None, "absent"  # memoized as a miss: a later call looks again
        if program is None:
            with _diskcache.build_lock(path):  # another process compiling this key finishes first
                if _diskcache.file_signature(path) not in (None, seen):  # ... and left its entry
                    program = _load(path, key, names, arch, arch_specific)
                if program is None:
                    program = _nvrtc.compile_program(source, names, arch, options, include_dir, arch_specific)
                    _count("compiles")
                    _store(path, program, key)
                    return program, "compiled"
        _count("disk_hits")
        return program, "disk"

    return _memo.get(call, key_of, produce)


def get_program(
    source_path: str | os.PathLike,
    names: Sequence[str],
    arch: int,
    options: Sequence[str] = (),
    *,
    include_dir: Path | None = None,
    cache_root: Path | None = None,
    arch_specific: bool = False,
) -> CompiledProgram:
    """The compiled program of ``source_path`` (absolute, or a file name in
    ``cuda_src/``) with kernels ``names`` for ``sm_<arch>``: from memory, from
    the disk cache, or compiled now with NVRTC and stored."""
    return lookup(source_path, names, arch, options, include_dir=include_dir, cache_root=cache_root,
                  arch_specific=arch_specific)[0]
