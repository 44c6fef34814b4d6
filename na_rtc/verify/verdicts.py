"""Recorded verdicts of first-use kernel verification, on disk beside the kernel cache.

A verdict says whether one kernel instantiation gave correct results on one
kind of device. Its key is a sha256 over the kernel's compiled-program identity
(the kernel cache's key of that kernel alone: sources, options, architecture,
NVRTC and na_rtc versions; the emulator's build key on the CPU), the device's
identity (GPU name and driver version; the compiler on the emulator) and the
name expression. Anything that could change the machine code or the hardware's
reading of it gives a new key, so a verdict is never applied to code it did not
check.

One file per verdict, ``<cache dir>/verdicts/<key>.json``, written like every
cache entry (:mod:`na_rtc._diskcache`): atomically, with a checksum verified on
load. A damaged file is ignored (the kernel is verified again and the file
rewritten); a cache folder that cannot be written keeps verdicts in this
process's memory, with one warning.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import _diskcache, config

FORMAT_VERSION = 1
FOLDER = "verdicts"


class VerdictStoreWarning(_diskcache.CacheWarning):
    """A verdict file was unusable (the kernel is verified again) or the folder is not writable."""


@dataclass(frozen=True)
class Verdict:
    """Whether ``kernel`` gave correct results on ``device``; ``detail`` says what was compared, or the mismatch."""

    kernel: str
    ok: bool
    device: str
    detail: str
    op: str = ""
    path: str = ""
    utc: str = ""


def verdict_key(program: str, device: str, kernel: str) -> str:
    """The sha256 (hex) of one verdict: compiled-program identity, device identity, name expression."""
    digest = _diskcache.KeyDigest()
    digest.part("format", FORMAT_VERSION)
    digest.part("program", program)
    digest.part("device", device)
    digest.part("kernel", kernel)
    return digest.hexdigest()


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _checksum(key: str, body: dict) -> str:
    return hashlib.sha256(json.dumps([key, body], sort_keys=True).encode()).hexdigest()


class VerdictStore:
    """Verdicts by key: in memory, and in ``<folder>`` (default ``<cache dir>/verdicts``, read when asked)."""

    def __init__(self, folder: Path | None = None):
        self._folder = folder
        self._memory: dict[str, Verdict] = {}
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    @property
    def folder(self) -> Path:
        return self._folder if self._folder is not None else config.cache_dir() / FOLDER

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> Verdict | None:
        """The verdict of ``key``: from memory, else from its file (None when absent or unusable)."""
        with self._lock:
            if key in self._memory:
                return self._memory[key]
        path = self._path(key)
        try:
            text = path.read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as error:
            self._warn(path, f"na_rtc: cannot read the verdict file {path} ({error}); verifying the kernel again")
            return None
        verdict = _decode(text, key)
        if verdict is None:
            self._warn(path, f"na_rtc: the verdict file {path} is unusable (damaged or of another version); "
                             "verifying the kernel again")
            return None
        with self._lock:
            self._memory[key] = verdict
        return verdict

    def put(self, key: str, verdict: Verdict) -> bool:
        """Record ``verdict``; False when only memory holds it (the folder cannot be written, warned once)."""
        with self._lock:
            self._memory[key] = verdict
        body = asdict(verdict)
        data = json.dumps({"format": FORMAT_VERSION, "key": key, "verdict": body, "sha256": _checksum(key, body)},
                          indent=1, sort_keys=True)
        path = self._path(key)
        try:
            _diskcache.write_atomically(path, data.encode())
        except OSError as error:
            self._warn(path.parent, f"na_rtc: the verdict folder {path.parent} is not writable "
                                    f"({type(error).__name__}: {error}); verdicts are kept for this process only, "
                                    "so the next process verifies its kernels again. Set NA_RTC_CACHE_DIR to a "
                                    "writable folder to keep them.")
            return False
        return True

    def recorded(self) -> list[Verdict]:
        """Every readable verdict in the folder and in memory (for ``info`` and ``selftest``)."""
        found: dict[str, Verdict] = {}
        try:
            paths = sorted(self.folder.glob("*.json"))
        except OSError:
            paths = []
        for path in paths:
            try:
                verdict = _decode(path.read_text(), path.stem)
            except OSError:
                continue
            if verdict is not None:
                found[path.stem] = verdict
        with self._lock:
            found.update(self._memory)
        return list(found.values())

    def forget(self) -> None:
        """Drop what this process remembers (the files stay)."""
        with self._lock:
            self._memory.clear()
            self._warned.clear()

    def _warn(self, where: Path, message: str) -> None:
        with self._lock:
            if str(where) in self._warned:
                return
            self._warned.add(str(where))
        _diskcache.warn(message, VerdictStoreWarning)


def _decode(text: str, key: str) -> Verdict | None:
    try:
        data = json.loads(text)
        if data["format"] != FORMAT_VERSION or data["key"] != key:
            return None
        body = data["verdict"]
        if data["sha256"] != _checksum(key, body):
            return None
        return Verdict(**{name: body[name] for name in Verdict.__dataclass_fields__})
    except (ValueError, KeyError, TypeError):
        return None
