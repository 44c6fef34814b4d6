"""Every environment setting na_rtc reads, in one place (all prefixed ``NA_RTC_``).

Settings are read when asked for, not at import, so tests and users can change
them at run time.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Names of every environment variable na_rtc reads, with what it does (Markdown: the documentation
#: site's settings page is generated from this table, docs/_ext/generated.py).
SETTINGS = {
    "NA_RTC_BACKEND": "force a backend: `blocked`, `reference`, `emulator` or `cuda`",
    "NA_RTC_CACHE_DIR": "compiled-kernel cache (default `~/.cache/na_rtc`)",
    "NA_RTC_REFERENCE_CHUNK_MB": "memory budget of one reference query chunk and of one chunk of blocked tiles "
                                 "(default 32)",
    "NA_RTC_SWEEP": "size of the randomized kernel test sweeps: `small` (default) or `large`",
    "NA_RTC_EMULATOR_CHECKED": "`1`: emulator launches run on guarded buffer copies and report out-of-bounds "
                               "accesses",
    "NA_RTC_EMULATOR_THREADS": "OS threads the emulator runs blocks on (default: all cores)",
    "NA_RTC_EMULATOR_SCHEDULE": "`reverse`: the emulator runs each block's threads highest index first (default "
                                "`forward`); a shared-memory race between threads gives wrong results under one of "
                                "the two, so the tests run the tensor-core kernels under both",
    "NA_RTC_TENSOR_CORES": "`0`: fp16/bf16 fused ops on the SIMT kernels (default `1`: tensor cores on sm_80+ GPUs "
                           "and in the emulator)",
    "NA_RTC_TC_WARP_ROWS": "`16` or `32`: query rows per warp of the tensor-core forward where both are built "
                           "(head dims up to 64; default: the table in `na_rtc/runtime/families/fused_tc.py`), for "
                           "benchmarking",
    "NA_RTC_WGMMA": "`1`: fp16/bf16 fused ops on sm_90 GPUs (H100, H200; and in the emulator) use the Hopper "
                    "`wgmma` kernels for the forward and the backward (default `0`: opt-in until GPU runs have "
                    "measured them)",
    "NA_RTC_WGMMA_WARPGROUPS": "`1` or `2`: warpgroups per block of the wgmma kernels (default `2`: a block of 128 "
                               "queries or keys, 16 x 8 in 2D, whose warpgroups share each staged chunk; `1`: 64, "
                               "8 x 8 in 2D); for benchmarking",
    "NA_RTC_WGMMA_CHUNK_KEYS": "`32` or `64`: keys per staged chunk of the wgmma forward with two warpgroups a "
                               "block (default `64`; `32` pads less of a 2D key box but pays the per-chunk rescale "
                               "and barrier twice as often); for benchmarking",
    "NA_RTC_VERIFY": "`0`: no first-use verification of kernels on the GPU (default `1`: see [First run on a "
                     "GPU](getting-started.md#first-run-on-a-gpu))",
    "CXX": "the C++ compiler the emulator builds kernels with (default `g++`, then `clang++`)",
}


def backend_override() -> str | None:
    """The backend forced by ``NA_RTC_BACKEND``, or None when unset/empty."""
    value = os.environ.get("NA_RTC_BACKEND", "").strip().lower()
    return value or None


def cache_dir() -> Path:
    """Root of the compiled-kernel cache (``NA_RTC_CACHE_DIR`` or the user cache dir)."""
    explicit = os.environ.get("NA_RTC_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "na_rtc"


def reference_chunk_bytes() -> int:
    """Budget for the largest gathered tensor of one reference query chunk."""
    raw = os.environ.get("NA_RTC_REFERENCE_CHUNK_MB", "32")
    try:
        megabytes = float(raw)
    except ValueError:
        raise ValueError(f"NA_RTC_REFERENCE_CHUNK_MB must be a number of megabytes, got {raw!r}") from None
    if megabytes <= 0:
        raise ValueError(f"NA_RTC_REFERENCE_CHUNK_MB must be positive, got {raw!r}")
    return int(megabytes * 2**20)


def sweep_size() -> str:
    """``small`` (CI) or ``large`` randomized test sweeps."""
    value = os.environ.get("NA_RTC_SWEEP", "small").strip().lower()
    if value not in ("small", "large"):
        raise ValueError(f"NA_RTC_SWEEP must be 'small' or 'large', got {value!r}")
    return value


def _flag(name: str, default: bool) -> bool:
    """An on/off setting: 1/true/yes/on or 0/false/no/off; unset or empty gives ``default``."""
    raw = os.environ.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 1 or 0, got {raw!r}")


def emulator_checked() -> bool:
    """Whether every emulator launch runs in checked (out-of-bounds detecting) mode."""
    return _flag("NA_RTC_EMULATOR_CHECKED", False)


def tensor_cores() -> bool:
    """Whether fp16/bf16 fused ops may use the tensor-core kernels (``NA_RTC_TENSOR_CORES``, default on)."""
    return _flag("NA_RTC_TENSOR_CORES", True)


def emulator_threads() -> int:
    """Worker threads of an emulator launch (``NA_RTC_EMULATOR_THREADS``); 0 means every available core."""
    raw = os.environ.get("NA_RTC_EMULATOR_THREADS", "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 1:
        raise ValueError(f"NA_RTC_EMULATOR_THREADS must be a positive number of threads, got {raw!r}")
    return value


#: NA_RTC_EMULATOR_SCHEDULE's values
EMULATOR_SCHEDULES = ("forward", "reverse")


def emulator_schedule() -> str:
    """The order the emulator runs the threads of a block in (``NA_RTC_EMULATOR_SCHEDULE``): "forward",
    lowest thread index first (the default), or "reverse"."""
    raw = os.environ.get("NA_RTC_EMULATOR_SCHEDULE", "").strip().lower() or "forward"
    if raw not in EMULATOR_SCHEDULES:
        raise ValueError(f"NA_RTC_EMULATOR_SCHEDULE must be forward or reverse, got {raw!r}")
    return raw


def wgmma() -> bool:
    """Whether fp16/bf16 fused ops on sm_90 GPUs (and in the emulator) use the Hopper wgmma forward and
    backward kernels (``NA_RTC_WGMMA``, default off until GPU runs have measured them)."""
    return _flag("NA_RTC_WGMMA", False)


def wgmma_warpgroups() -> int | None:
    """Warpgroups per block the wgmma kernels should use (``NA_RTC_WGMMA_WARPGROUPS``), or None: the
    table's."""
    raw = os.environ.get("NA_RTC_WGMMA_WARPGROUPS", "").strip()
    if raw == "":
        return None
    if raw in ("1", "2"):
        return int(raw)
    raise ValueError(f"NA_RTC_WGMMA_WARPGROUPS must be 1 or 2, got {raw!r}")


#: NA_RTC_WGMMA_CHUNK_KEYS's values: the keys per chunk built for the wgmma forward (runtime/families/fused_wg.py)
WGMMA_CHUNK_KEYS = (32, 64)


def wgmma_chunk_keys() -> int | None:
    """Keys per staged chunk the wgmma forward should use (``NA_RTC_WGMMA_CHUNK_KEYS``), or None: the table's."""
    raw = os.environ.get("NA_RTC_WGMMA_CHUNK_KEYS", "").strip()
    if raw == "":
        return None
    if raw in tuple(map(str, WGMMA_CHUNK_KEYS)):
        return int(raw)
    raise ValueError(f"NA_RTC_WGMMA_CHUNK_KEYS must be 32 or 64, got {raw!r}")


def tc_warp_rows() -> int | None:
    """Query rows per warp the tensor-core forward should use (``NA_RTC_TC_WARP_ROWS``), or None: the table's."""
    raw = os.environ.get("NA_RTC_TC_WARP_ROWS", "").strip()
    if raw == "":
        return None
    if raw in ("16", "32"):
        return int(raw)
    raise ValueError(f"NA_RTC_TC_WARP_ROWS must be 16 or 32, got {raw!r}")


def verify() -> bool:
    """Whether kernels are verified on the GPU before their first use (``NA_RTC_VERIFY``, default on)."""
    return _flag("NA_RTC_VERIFY", True)
