"""The dispatch policy of one call: the GPU architecture and the settings, read once.

The dispatcher (:mod:`na_rtc.runtime.dispatch`) builds one :class:`Policy`
per call and hands it to every coverage rule and planner, so no family module
reads the environment: what ``NA_RTC_TENSOR_CORES``, ``NA_RTC_WGMMA``,
``NA_RTC_TC_WARP_ROWS``, ``NA_RTC_WGMMA_WARPGROUPS``,
``NA_RTC_WGMMA_CHUNK_KEYS`` and ``NA_RTC_VERIFY`` say is read here, once, through
:mod:`na_rtc.config`. Tests and benchmarks build policies directly
(:meth:`Policy.of`) to run a chosen path without touching the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .. import config
from .._args import Problem
from ..verify import gate

__all__ = ["Policy", "Settings"]


@dataclass(frozen=True)
class Settings:
    """The settings that steer dispatch (defaults: the environment's defaults)."""

    #: fp16/bf16 fused ops may run on tensor-core kernels (mma.sync; wgmma where also allowed)
    tensor_cores: bool = True
    #: the Hopper wgmma kernels are opted in
    wgmma: bool = False
    #: query rows per warp of the mma.sync forward (16 or 32), or None: the table's
    tc_warp_rows: int | None = None
    #: warpgroups per block of the wgmma kernels (1 or 2), or None: the table's
    wgmma_warpgroups: int | None = None
    #: keys per staged chunk of the wgmma forward (32 or 64), or None: the table's
    wgmma_chunk_keys: int | None = None
    #: first-use verification is on (where the backend verifies: the GPU)
    verify: bool = True

    @classmethod
    def read(cls) -> "Settings":
        """The environment's settings: each of :mod:`na_rtc.config`'s readers called once."""
        return cls(config.tensor_cores(), config.wgmma(), config.tc_warp_rows(), config.wgmma_warpgroups(),
                   config.wgmma_chunk_keys(), config.verify())


@dataclass(frozen=True)
class Policy:
    """What may run for one call: on ``backend``, on a GPU of compute capability ``arch`` (None: the emulator,
    which runs every family, so CI runs what each GPU runs), under ``settings``; ``verify``: whether kernels
    must pass first-use verification before they serve."""

    backend: str = "emulator"
    arch: int | None = None
    settings: Settings = field(default_factory=Settings)
    verify: bool = False
    #: split kernels may be tiled (off: the straightforward kernels only, which the benchmarks compare)
    tiled: bool = True

    @classmethod
    def for_call(cls, backend: str, problem: Problem) -> "Policy":
        """The policy of a call of ``problem`` on ``backend`` (``cuda`` or ``emulator``): the settings read
        now, the architecture of the problem's GPU."""
        settings = Settings.read()
        arch = None
        if backend == "cuda":
            from . import cuda

            arch = cuda.arch_of(problem.device)
        return cls(backend, arch, settings, settings.verify and gate.verifies_automatically(backend))

    @classmethod
    def of(cls, tensor_cores: bool = False, wgmma: bool = False, *, arch: int | None = None,
           backend: str = "emulator", tiled: bool = True, **settings) -> "Policy":
        """A policy without the environment: tensor cores and wgmma as given (off by default: SIMT only),
        other settings by keyword; no verification."""
        return cls(backend, arch, Settings(tensor_cores=tensor_cores, wgmma=wgmma, verify=False, **settings),
                   tiled=tiled)

    def with_settings(self, **settings) -> "Policy":
        return replace(self, settings=replace(self.settings, **settings))

    def allows(self, family, switches: tuple[str, ...] = ()) -> tuple[bool, str]:
        """``(ok, why)``: may ``family`` run under this policy, on a path that ``switches`` turn on
        (``"tensor_cores"``, ``"wgmma"``, ``"tiled"``); the architecture must be one the family runs on."""
        for switch in switches:
            if not self._switched_on(switch):
                return False, _OFF[switch]
        if self.arch is not None and not family.runs_on(self.arch):
            return False, f"its kernels run on {family.arch_text()}; this GPU is sm_{self.arch}"
        return True, ""

    def _switched_on(self, switch: str) -> bool:
        return self.tiled if switch == "tiled" else getattr(self.settings, switch)


_OFF = {
    "tensor_cores": "tensor cores are off (NA_RTC_TENSOR_CORES=0)",
    "wgmma": "opt-in: NA_RTC_WGMMA=1 turns the wgmma kernels on",
    "tiled": "this dispatch runs the straightforward split kernels only",
}
