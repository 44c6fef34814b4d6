"""The compiled-kernel cache (``na_rtc.runtime.cache``): keys, disk entries,
damaged entries, unwritable folders and processes compiling at once.

Compiles the test kernels in ``tests/nvrtc_kernels/``; tests that compile
skip when NVRTC is unavailable. Hits and misses are read from
``cache_stats()``, never from timings.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import pytest
from helpers import requires_nvrtc

import na_rtc
from na_rtc import _diskcache
from na_rtc.runtime import cache, nvrtc

KERNELS = Path(__file__).resolve().parent / "nvrtc_kernels"
REPO_ROOT = Path(__file__).resolve().parents[1]
NAMES = ("scale<float, 2>", "na_test::block_sum<float>")




@pytest.fixture
def sources(tmp_path):
    """A private copy of the test kernels, free to edit."""
    folder = tmp_path / "src"
    folder.mkdir()
    for name in ("kernels.cu", "common.cuh"):
        shutil.copy(KERNELS / name, folder / name)
    return folder


def _stats_delta(**expected):
    stats = cache.cache_stats()
    return {name: stats[name] for name in expected}


def _entries(root: Path) -> list[Path]:
    return sorted(root.glob("sm_*/*.bin"))


def _forget_memory():
    cache.clear_memory_cache()


# ---------------------------------------------------------------- keys


@pytest.fixture
def fixed_nvrtc_version(monkeypatch):
    """Keys without the NVRTC library: its version is pinned."""
    monkeypatch.setattr(nvrtc, "nvrtc_version", lambda: (13, 0))


def test_key_depends_on_sources_options_arch_and_names(sources, fixed_nvrtc_version):
    source = sources / "kernels.cu"
    base = cache.cache_key(source, NAMES, 90)
    assert len(base) == 64 and base == cache.cache_key(source, NAMES, 90)
    assert cache.cache_key(source, reversed(NAMES), 90) == base  # order and duplicates do not matter
    assert cache.cache_key(source, NAMES + NAMES[:1], 90) == base
    assert cache.cache_key(source, NAMES[:1], 90) != base
    assert cache.cache_key(source, NAMES, 80) != base
    assert cache.cache_key(source, NAMES, 90, ["-DX=1"]) != base
    assert cache.cache_key(source, NAMES, 90, ["-DX=2"]) != cache.cache_key(source, NAMES, 90, ["-DX=1"])

    seen = {base}
    for edit in (
        lambda: source.write_text(source.read_text() + "\n// edited\n"),
        lambda: (sources / "common.cuh").write_text((sources / "common.cuh").read_text() + "\n"),
        lambda: (sources / "new_header.cuh").write_text("#pragma once\n"),  # anything includable counts
    ):
        edit()
        key = cache.cache_key(source, NAMES, 90)
        assert key not in seen
        seen.add(key)
    (sources / "notes.txt").write_text("not a source")
    assert cache.cache_key(source, NAMES, 90) in seen  # non-source files do not

    other = sources / "other.cu"
    shutil.copy(source, other)
    assert cache.cache_key(other, NAMES, 90) not in seen  # same folder and text, another file


def test_key_depends_on_nvrtc_and_na_rtc_versions(sources, monkeypatch):
    source = sources / "kernels.cu"
    monkeypatch.setattr(nvrtc, "nvrtc_version", lambda: (13, 0))
    base = cache.cache_key(source, NAMES, 90)
    monkeypatch.setattr(nvrtc, "nvrtc_version", lambda: (13, 1))
    newer_nvrtc = cache.cache_key(source, NAMES, 90)
    monkeypatch.setattr(na_rtc, "__version__", "99.0.0")
    newer_na_rtc = cache.cache_key(source, NAMES, 90)
    assert len({base, newer_nvrtc, newer_na_rtc}) == 3


def test_relative_sources_are_files_in_cuda_src():
    from na_rtc._resources import cuda_src_dir

    assert cache.resolve_source("na_types.cuh") == cuda_src_dir() / "na_types.cuh"
    assert cache.resolve_source(KERNELS / "kernels.cu") == KERNELS / "kernels.cu"


def test_entry_path_is_per_arch(tmp_path, monkeypatch):
    monkeypatch.setenv("NA_RTC_CACHE_DIR", str(tmp_path))
    assert cache.entry_path("ab" * 32, 90, "na_naive.cu") == tmp_path / "sm_90" / f"na_naive-{'ab' * 32}.bin"


# ---------------------------------------------------------------- hits and misses


@requires_nvrtc
def test_second_use_hits_memory_then_disk_without_nvrtc(kernel_cache, monkeypatch):
    source = KERNELS / "kernels.cu"
    first, origin = cache.lookup(source, NAMES, 90)
    assert origin == "compiled" and first.kind == "cubin"
    assert _stats_delta(compiles=1, disk_writes=1) == {"compiles": 1, "disk_writes": 1}
    (entry,) = _entries(kernel_cache)
    assert entry.parent.name == "sm_90" and entry.read_bytes()[:8] == cache.MAGIC

    assert cache.get_program(source, NAMES, "sm_90") is first
    assert cache.cache_stats()["memory_hits"] == 1

    def no_nvrtc(*args, **kwargs):
        raise AssertionError("NVRTC called on a cache hit")

    monkeypatch.setattr(nvrtc, "compile_program", no_nvrtc)
    _forget_memory()
    again, origin = cache.lookup(source, list(reversed(NAMES)), 90)
    assert origin == "disk"
    assert (again.binary, again.lowered, again.log, again.kind, again.target) == (
        first.binary, first.lowered, first.log, first.kind, first.target
    )
    assert again.compile_seconds == first.compile_seconds
    stats = cache.cache_stats()
    assert (stats["compiles"], stats["disk_hits"], stats["bad_entries"]) == (1, 1, 0)


@requires_nvrtc
def test_ptx_programs_are_cached_too(kernel_cache):
    program, origin = cache.lookup(KERNELS / "kernels.cu", NAMES, 200)
    assert (origin, program.kind) == ("compiled", "ptx")
    _forget_memory()
    again, origin = cache.lookup(KERNELS / "kernels.cu", NAMES, 200)
    assert (origin, again.kind, again.binary) == ("disk", "ptx", program.binary)
    assert [p.parent.name for p in _entries(kernel_cache)] == ["sm_200"]


@requires_nvrtc
def test_edited_sources_are_seen_after_clear_memory_cache(kernel_cache, sources):
    source = sources / "kernels.cu"
    cache.get_program(source, NAMES, 90)
    source.write_text(source.read_text() + "\n// edited\n")
    assert cache.lookup(source, NAMES, 90)[1] == "memory"  # a process keeps what it compiled
    _forget_memory()
    assert cache.lookup(source, NAMES, 90)[1] == "compiled"
    assert len(_entries(kernel_cache)) == 2


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_payload_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))


def _flip_metadata_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[cache._HEADER.size + 5] ^= 0x01
    path.write_bytes(bytes(data))


def _bad_magic(path: Path) -> None:
    path.write_bytes(b"GARBAGE!" + path.read_bytes()[8:])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _other_format(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:12] = (cache.FORMAT_VERSION + 1).to_bytes(4, "little")
    path.write_bytes(bytes(data))


@requires_nvrtc
@pytest.mark.parametrize(
    "damage", [_truncate, _flip_payload_byte, _flip_metadata_byte, _bad_magic, _empty, _other_format],
    ids=lambda f: f.__name__.strip("_"),
)
def test_damaged_entry_is_recompiled_with_a_warning(kernel_cache, damage):
    source = KERNELS / "kernels.cu"
    good = cache.get_program(source, NAMES, 90)
    (entry,) = _entries(kernel_cache)
    damage(entry)
    _forget_memory()
    with pytest.warns(cache.KernelCacheWarning, match="unusable"):
        program, origin = cache.lookup(source, NAMES, 90)
    assert origin == "compiled" and program.lowered == good.lowered and program.binary[:4] == b"\x7fELF"
    assert cache.cache_stats()["bad_entries"] == 1
    # the entry was overwritten with a good one
    _forget_memory()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.lookup(source, NAMES, 90)[1] == "disk"
    assert _entries(kernel_cache) == [entry]


@requires_nvrtc
def test_entry_of_another_key_is_a_miss(kernel_cache):
    source = KERNELS / "kernels.cu"
    cache.get_program(source, NAMES, 90)
    cache.get_program(source, NAMES, 90, ["-DOTHER=1"])
    first, second = _entries(kernel_cache)
    key_other = cache.cache_key(source, NAMES, 90, ["-DOTHER=1"])
    renamed, target = (first, second) if key_other in second.name else (second, first)
    shutil.copy(renamed, target)  # a file renamed/copied under another key's name
    _forget_memory()
    with pytest.warns(cache.KernelCacheWarning, match="another key"):
        program, origin = cache.lookup(source, NAMES, 90, ["-DOTHER=1"])
    assert origin == "compiled" and "-DOTHER=1" in program.options


@requires_nvrtc
def test_entry_missing_a_name_is_a_miss(kernel_cache, monkeypatch):
    source = KERNELS / "kernels.cu"
    cache.get_program(source, NAMES, 90)
    (entry,) = _entries(kernel_cache)
    # an entry whose metadata lacks a kernel (written by a buggy version) under the right key
    key = cache.cache_key(source, NAMES, 90)
    program = cache._decode(entry.read_bytes(), key)
    broken = nvrtc.CompiledProgram(**{**program.__dict__, "lowered": {NAMES[0]: program.lowered[NAMES[0]]}})
    entry.write_bytes(cache._encode(broken, key))
    _forget_memory()
    with pytest.warns(cache.KernelCacheWarning, match="lacks kernels"):
        assert cache.lookup(source, NAMES, 90)[1] == "compiled"


# ---------------------------------------------------------------- unwritable folders


@requires_nvrtc
def test_unusable_cache_folder_keeps_programs_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("NA_RTC_CACHE_DIR", str(blocker))
    cache.clear_memory_cache()
    cache.reset_cache_stats()
    source = KERNELS / "kernels.cu"
    with pytest.warns(cache.KernelCacheWarning, match="memory only") as caught:
        program = cache.get_program(source, NAMES, 90)
    assert len(caught) == 1 and program.binary[:4] == b"\x7fELF"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per folder, not again
        assert cache.get_program(source, NAMES[:1], 90).lowered == {NAMES[0]: program.lowered[NAMES[0]]}
        assert cache.lookup(source, NAMES, 90)[1] == "memory"
    stats = cache.cache_stats()
    assert (stats["write_failures"], stats["disk_writes"], stats["compiles"]) == (2, 0, 2)
    cache.clear_memory_cache()


@requires_nvrtc
def test_read_only_cache_still_serves_its_entries(kernel_cache, monkeypatch):
    source = KERNELS / "kernels.cu"
    cache.get_program(source, NAMES, 90)  # filled while writable

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkstemp", read_only)  # every way a cache creates a file
    _forget_memory()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.lookup(source, NAMES, 90)[1] == "disk"
    with pytest.warns(cache.KernelCacheWarning, match="not writable"):
        assert cache.lookup(source, NAMES, 80)[1] == "compiled"
    assert len(_entries(kernel_cache)) == 1


def _make_read_only(folder: Path, monkeypatch) -> None:
    """Make ``folder`` and its subfolders read-only: by permissions, or, for
    root (whom permissions do not bind), by refusing every file creation below
    it the way the kernel would."""
    for path in [folder, *folder.rglob("*")]:
        if path.is_dir():
            path.chmod(0o555)
    if os.geteuid() != 0:
        return
    real_open, real_mkdir, real_mkstemp = os.open, os.mkdir, tempfile.mkstemp
    inside = str(folder) + os.sep

    def denied(path) -> bool:
        return str(Path(path).absolute()).startswith(inside)

    def refuse(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def guarded_open(path, flags, *args, **kwargs):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR) and denied(path):
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if denied(path) and not Path(path).is_dir():
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    def guarded_mkstemp(*args, dir=None, **kwargs):
        if dir is not None and denied(Path(dir) / "x"):
            refuse(dir)
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)
    monkeypatch.setattr(tempfile, "mkstemp", guarded_mkstemp)


@requires_nvrtc
@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_read_only_folder_permissions(kernel_cache, monkeypatch):
    """A read-only cache folder (a shared, precompiled cache): its entries are
    served without a warning, new programs are kept in memory with one."""
    source = KERNELS / "kernels.cu"
    cache.get_program(source, NAMES, 90)  # filled while writable
    try:
        _make_read_only(kernel_cache, monkeypatch)
        _forget_memory()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert cache.lookup(source, NAMES, 90)[1] == "disk"
        with pytest.warns(cache.KernelCacheWarning, match="not writable.*memory only") as caught:
            program, origin = cache.lookup(source, NAMES, 80)
            assert cache.lookup(source, NAMES[:1], 80)[1] == "compiled"  # one warning per folder
        assert len(caught) == 1 and (origin, program.kind) == ("compiled", "cubin")
        assert [p.parent.name for p in _entries(kernel_cache)] == ["sm_90"]  # nothing written
    finally:
        monkeypatch.undo()
        for path in [kernel_cache, *kernel_cache.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)


# ---------------------------------------------------------------- other faults


@requires_nvrtc
def test_entry_of_another_arch_is_a_miss(kernel_cache):
    """An sm_80 cubin under sm_90's name (a copied folder, a mixed-up
    NA_RTC_CACHE_DIR) is never handed to an sm_90 device."""
    source = KERNELS / "kernels.cu"
    sm80 = cache.get_program(source, NAMES, 80)
    cache.get_program(source, NAMES, 90)
    (entry80, entry90) = _entries(kernel_cache)
    shutil.copy(entry80, entry90)
    _forget_memory()
    with pytest.warns(cache.KernelCacheWarning, match="another key"):
        program, origin = cache.lookup(source, NAMES, 90)
    assert (origin, program.target, program.arch) == ("compiled", "sm_90", 90)

    # an entry under the right key that records another arch (a buggy writer)
    key = cache.cache_key(source, NAMES, 90)
    entry90.write_bytes(cache._encode(sm80, key))
    _forget_memory()
    with pytest.warns(cache.KernelCacheWarning, match="compiled for sm_80 .*not for sm_90"):
        program, origin = cache.lookup(source, NAMES, 90)
    assert (origin, program.target) == ("compiled", "sm_90")
    _forget_memory()
    assert cache.lookup(source, NAMES, 90)[1] == "disk"  # overwritten with the right one


@requires_nvrtc
def test_entry_from_an_older_na_rtc_is_not_used(kernel_cache, monkeypatch):
    """The key holds na_rtc's version: an upgrade compiles afresh and never
    loads what an older version wrote, even under the new name."""
    source = KERNELS / "kernels.cu"
    with monkeypatch.context() as patch:
        patch.setattr(na_rtc, "__version__", "0.0.1")
        cache.get_program(source, NAMES, 90)
    (old,) = _entries(kernel_cache)
    _forget_memory()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        program, origin = cache.lookup(source, NAMES, 90)
    assert origin == "compiled"
    new = next(p for p in _entries(kernel_cache) if p != old)
    assert cache._decode(new.read_bytes(), cache.cache_key(source, NAMES, 90)).lowered == program.lowered
    shutil.copy(old, new)  # the old entry under the new name
    _forget_memory()
    with pytest.warns(cache.KernelCacheWarning, match="another key"):
        assert cache.lookup(source, NAMES, 90)[1] == "compiled"


@requires_nvrtc
def test_cache_folder_deleted_while_running(kernel_cache):
    source = KERNELS / "kernels.cu"
    first = cache.get_program(source, NAMES, 90)
    shutil.rmtree(kernel_cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.get_program(source, NAMES, 90) is first  # memory still serves
        assert cache.lookup(source, NAMES, 80)[1] == "compiled"  # folder created again
        _forget_memory()
        assert cache.lookup(source, NAMES, 90)[1] == "compiled"
    assert [p.parent.name for p in _entries(kernel_cache)] == ["sm_80", "sm_90"]
    assert cache.cache_stats()["write_failures"] == 0


@requires_nvrtc
def test_cache_folder_deleted_between_mkdir_and_write(kernel_cache, monkeypatch):
    real_mkstemp = tempfile.mkstemp
    deleted = []

    def delete_first(*args, **kwargs):
        if not deleted:
            deleted.append(kwargs["dir"])
            shutil.rmtree(kernel_cache)  # another process's `rm -r` at the worst moment
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr("tempfile.mkstemp", delete_first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.lookup(KERNELS / "kernels.cu", NAMES, 90)[1] == "compiled"
    assert deleted and len(_entries(kernel_cache)) == 1
    assert cache.cache_stats()["disk_writes"] == 1


@requires_nvrtc
def test_full_disk_keeps_the_program_in_memory(kernel_cache, monkeypatch):
    def disk_full(fd, data):
        os.write(fd, data[: len(data) // 3])  # part of it fits, then the disk is full
        os.close(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    source = KERNELS / "kernels.cu"
    with monkeypatch.context() as patch:
        patch.setattr(_diskcache, "_write", disk_full)
        with pytest.warns(cache.KernelCacheWarning, match="No space left on device.*memory only") as caught:
            program, origin = cache.lookup(source, NAMES, 90)
    assert len(caught) == 1 and origin == "compiled"
    assert program.binary[:4] == b"\x7fELF" and set(program.lowered) == set(NAMES)
    assert list(kernel_cache.rglob("*")) == [kernel_cache / "sm_90"]  # no entry, no partial temp file
    assert cache.cache_stats()["write_failures"] == 1
    # space again: the next program is stored
    assert cache.lookup(source, NAMES, 80)[1] == "compiled" and len(_entries(kernel_cache)) == 1


@requires_nvrtc
def test_unreadable_entry_is_recompiled(kernel_cache, monkeypatch):
    source = KERNELS / "kernels.cu"
    cache.get_program(source, NAMES, 90)
    (entry,) = _entries(kernel_cache)
    real_read = Path.read_bytes

    def unreadable(path):
        if path == entry:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", unreadable)
    _forget_memory()
    with pytest.warns(cache.KernelCacheWarning, match="cannot read"):
        program, origin = cache.lookup(source, NAMES, 90)
    assert origin == "compiled" and program.kind == "cubin"


# ---------------------------------------------------------------- processes at once


WORKER = textwrap.dedent(
    """
    import contextlib, sys, time
    from na_rtc import _diskcache
    from na_rtc.runtime import cache
    start, locking, source = float(sys.argv[1]), sys.argv[2], sys.argv[3]
    names = sys.argv[4:]
    if locking == "unlocked":  # as on a file system without flock: only the atomic writes protect
        _diskcache.build_lock = lambda path: contextlib.nullcontext(False)
    while time.time() < start:
        time.sleep(0.001)
    program, origin = cache.lookup(source, names, 90)
    print(origin, program.kind, len(program.binary), program.lowered[names[-1]])
    """
)


def start_workers(code: str, count: int, *args: str, cache_root: Path) -> list[subprocess.Popen]:
    """``count`` interpreters running ``code``, released together ``start`` (argv[1]) seconds from now."""
    environment = dict(os.environ, NA_RTC_CACHE_DIR=str(cache_root))
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    start = time.time() + 2.0  # after every interpreter has started (a late one just runs later)
    return [
        subprocess.Popen([sys.executable, "-c", code, repr(start), *args], env=environment,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(count)
    ]


def finish_workers(workers: list[subprocess.Popen]) -> list[list[str]]:
    results = [worker.communicate(timeout=180) + (worker.returncode,) for worker in workers]
    for out, err, code in results:
        assert code == 0, err
    return [out.split() for out, _, _ in results]


@requires_nvrtc
@pytest.mark.parametrize("locking", ["locked", "unlocked"])
def test_eight_processes_compiling_the_same_kernels_at_once(kernel_cache, locking):
    source = KERNELS / "kernels.cu"
    names = list(NAMES)
    lines = finish_workers(start_workers(WORKER, 8, locking, str(source), *names, cache_root=kernel_cache))
    origins = sorted(line[0] for line in lines)
    if locking == "locked":  # one compiles, the others wait and read its entry
        assert origins == ["compiled"] + ["disk"] * 7
    else:
        assert "compiled" in origins
    assert all(line[1] == "cubin" and line[3] == "_ZN7na_test9block_sumIfEEvPT_PKS1_" for line in lines)
    assert len({line[2] for line in lines}) == 1  # same cubin size everywhere
    # one valid entry, no temporary or lock files left behind
    (entry,) = _entries(kernel_cache)
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]
    key = cache.cache_key(source, names, 90)
    assert set(cache._decode(entry.read_bytes(), key).lowered) == set(names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.lookup(source, names, 90)[1] == "disk"
