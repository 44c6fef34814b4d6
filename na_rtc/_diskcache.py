"""Bookkeeping shared by na_rtc's two on-disk caches: NVRTC programs
(:mod:`na_rtc.runtime.cache`) and emulator libraries
(:mod:`na_rtc.emulator.build`).

Both caches follow one discipline, kept here so that a fix reaches both:

* a key is a sha256 over labelled, length-prefixed parts (:class:`KeyDigest`),
  so no two different lists of parts can hash alike;
* a process memoizes what it produced, by call arguments and by key, and lets
  one thread per key do the expensive work (:class:`Memo`);
* files appear atomically: written under a temporary name in the target
  folder, then moved into place with ``os.replace`` (:func:`write_atomically`),
  so concurrent writers each leave a whole file and readers never see half of
  one; a folder deleted meanwhile (``rm -r`` of the cache while a process
  runs) is created again;
* processes that miss the same entry at once build it once: the first takes
  an advisory lock (:func:`build_lock`), the others wait for it and then read
  its entry (:func:`file_signature` tells them it appeared). The lock is only
  an economy: where it cannot be taken (read-only folder, no ``flock``) every
  process builds, and the atomic writes keep the cache whole;
* an unwritable folder is reported once per folder, as a warning pointing at
  the caller's code rather than at na_rtc's internals (:meth:`Memo.warn_once`);
* counters of hits, misses and failures (:meth:`Memo.count`), so tests can
  tell a hit from a miss without timing.

The cache-specific parts (entry formats, what goes into a key, how to build)
stay in the two modules.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Hashable, Iterator, Sequence, TypeVar

__all__ = [
    "CacheWarning",
    "KeyDigest",
    "Memo",
    "build_lock",
    "file_signature",
    "na_rtc_version",
    "warn",
    "write_atomically",
]

V = TypeVar("V")

_PACKAGE_DIR = str(Path(__file__).resolve().parent) + os.sep


class CacheWarning(UserWarning):
    """Base of the kernel-cache warnings (a bad entry rebuilt, a folder that cannot be written)."""


def na_rtc_version() -> str:
    from . import __version__

    return __version__


class KeyDigest:
    """sha256 over labelled parts; each part is ``label:length:`` then its bytes
    (bytes as given, anything else as JSON with sorted keys)."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def part(self, label: str, value) -> None:
        data = value if isinstance(value, bytes) else json.dumps(value, sort_keys=True).encode()
        self._digest.update(f"{label}:{len(data)}:".encode())
        self._digest.update(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _library_dirs() -> tuple[str, ...]:
    """na_rtc's folder, and torch's where torch is imported (its custom-op and autograd layers sit between a
    user's call and na_rtc)."""
    torch = sys.modules.get("torch")
    torch_file = getattr(torch, "__file__", None) if torch is not None else None
    return (_PACKAGE_DIR,) + ((str(Path(torch_file).resolve().parent) + os.sep,) if torch_file else ())


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the first frame outside
    na_rtc (and torch): the user's line, however deep inside na_rtc the cache was reached."""
    frame = sys._getframe(1)
    level = 1
    skipped = _library_dirs()
    while frame is not None and frame.f_code.co_filename.startswith(skipped):
        frame = frame.f_back
        level += 1
    return level


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the caller of na_rtc."""
    warnings.warn(message, category, stacklevel=_caller_stacklevel())


class Memo:
    """One cache's in-process state: values by call arguments and by key, a
    lock per key, named counters and the folders already warned about."""

    def __init__(self, stat_names: Sequence[str]) -> None:
        self.lock = threading.Lock()
        self._stat_names = tuple(stat_names)
        self._stats = dict.fromkeys(self._stat_names, 0)
        self._by_key: dict[str, object] = {}
        # by call arguments: a process sees the sources as they were at its
        # first call with those arguments (no file is read again)
        self._by_call: dict[Hashable, object] = {}
        self._key_locks: dict[str, threading.Lock] = {}
        self._warned: set[str] = set()

    # counters

    def count(self, name: str) -> None:
        with self.lock:
            self._stats[name] += 1

    def stats(self) -> dict[str, int]:
        with self.lock:
            return dict(self._stats)

    def reset_stats(self) -> None:
        with self.lock:
            self._stats = dict.fromkeys(self._stat_names, 0)

    def clear(self) -> None:
        """Forget the values and the warned folders (counters stay)."""
        with self.lock:
            self._by_key.clear()
            self._by_call.clear()
            self._warned.clear()

    # values

    def get(self, call: Hashable, key_of: Callable[[], str], produce: Callable[[str], tuple[V, str]]) -> tuple[V, str]:
        """The value for ``call`` and where it came from: ``"memory"``, or the
        origin ``produce(key)`` reports. ``key_of()`` runs only on the first
        call with these arguments; ``produce`` at most once per key among this
        process's threads (the others wait for it and count a memory hit)."""
        with self.lock:
            value = self._by_call.get(call)
        if value is not None:
            self.count("memory_hits")
            return value, "memory"
        key = key_of()
        with self.lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self.lock:
                value = self._by_key.get(key)
            if value is not None:
                self.count("memory_hits")
                origin = "memory"
            else:
                value, origin = produce(key)
            with self.lock:
                self._by_key[key] = value
                self._by_call[call] = value
        return value, origin

    # warnings

    def warn_once(self, folder: Path, message: str, category: type[Warning]) -> None:
        """Warn about ``folder`` unless this process already did (until :meth:`clear`)."""
        with self.lock:
            if str(folder) in self._warned:
                return
            self._warned.add(str(folder))
        warn(message, category)


def _write(fd: int, data: bytes) -> None:
    """Write and close ``fd`` (tests replace this to simulate a full disk)."""
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder
    and ``os.replace``; OSError (nothing left behind) when the folder cannot
    be written. A folder that vanishes on the way is created again, once."""
    for attempt in (1, 2):
        try:
            _write_once(path, data, mode)
            return
        except FileNotFoundError:
            if attempt == 2 or path.parent.is_dir():  # not a deleted folder: report it
                raise


def _write_once(path: Path, data: bytes, mode: int) -> None:
    folder = path.parent
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
        _write(fd, data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        tmp = None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def file_signature(path: Path) -> tuple[int, ...] | None:
    """What identifies this version of a file (None when there is none): a
    change means another process replaced it."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_ino, stat.st_dev, stat.st_size, stat.st_mtime_ns)


#: how long a process waits for another one building the same entry before
#: building it itself (a stuck process must not stall the others forever)
LOCK_TIMEOUT_SECONDS = 600.0


@contextlib.contextmanager
def build_lock(path: Path, timeout: float | None = None) -> Iterator[bool]:
    """Hold the advisory lock of entry ``path`` (a hidden ``.<name>.lock``
    beside it) for the duration; yields whether it is held. Best effort: a
    lock that cannot be created, or a wait past ``timeout`` seconds, yields
    False and the caller builds unlocked."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield False
        return
    lock_path = path.with_name(f".{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # read-only or vanished folder: nothing to coordinate through
        yield False
        return
    held = False
    try:
        deadline = time.monotonic() + (LOCK_TIMEOUT_SECONDS if timeout is None else timeout)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.02)
            except OSError:  # a file system without flock
                break
        yield held
    finally:
        if held:
            # the entry exists now (or the build failed): later processes read it
            # without locking, so the lock file can go; a process that opened it
            # before this unlink and locks it afterwards finds the entry and builds nothing
            with contextlib.suppress(OSError):
                os.unlink(lock_path)
        os.close(fd)  # releases the lock
