"""Kernel families: one source file in ``cuda_src/`` and every instantiation of
it the dispatcher can pick (one NVRTC program / emulator library per family).

``check`` and ``precompile`` iterate over :data:`FAMILIES`; the ops modules
take their kernel names from here, so a kernel that is launched is always one
that CI compiles and checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .tiling import CTYPES, accumulator_dtype  # noqa: F401 - re-exported for the launchers


@dataclass(frozen=True)
class Family:
    source: str
    names: tuple[str, ...]
    #: threads per block at launch, per name (for check's fit test)
    launch_threads: dict = field(default_factory=dict)
    #: dynamic shared memory bytes at the largest launch, per name
    launch_shared_bytes: dict = field(default_factory=dict)
    #: the only architectures it is built for (empty: no such list), for arch-specific builds
    archs: tuple[int, ...] = ()
    #: built for the arch-specific target ``sm_<arch>a`` (Hopper's wgmma: sm_90a), whose cubin runs on
    #: exactly that architecture
    arch_specific: bool = False
    #: the oldest architecture the dispatcher sends it to (0: any); newer ones, including those newer than
    #: the installed NVRTC knows (PTX), run it too. The tensor-core kernels need sm_80.
    min_arch: int = 0

    def runs_on(self, arch: int) -> bool:
        """Whether the dispatcher may run this family on ``sm_<arch>``: what ``check`` and ``precompile``
        compile, and what the launcher loads."""
        return arch >= self.min_arch and (not self.archs or arch in self.archs)

    def arch_text(self) -> str:
        """The architectures it runs on, in words: "sm_90", "sm_80 and newer", "every architecture"."""
        if self.archs:
            return ", ".join(f"sm_{a}" for a in self.archs if a >= self.min_arch)
        return f"sm_{self.min_arch} and newer" if self.min_arch else "every architecture"


NAIVE_THREADS = 256  # one thread per output element; NA_RPB_THREADS in na_naive.cu matches


def naive_names() -> tuple[str, ...]:
    names = []
    for dtype, element in CTYPES.items():
        acc = CTYPES[accumulator_dtype(dtype)]
        names += [
            f"na_qk_fwd<{element}, {element}>", f"na_qk_fwd<{element}, {acc}>",
            f"na_av_fwd<{element}, {element}>", f"na_av_fwd<{acc}, {element}>",
            f"na_inv_fwd<{element}, {element}>", f"na_inv_fwd<{acc}, {element}>",
            f"na_rpb_bwd<{element}>",
        ]
    for acc in ("float", "double"):
        names += [f"na_rpb_bwd<{acc}>", f"na_softmax_fwd<{acc}>", f"na_softmax_bwd<{acc}>"]
    return tuple(dict.fromkeys(names))


# tiled split-op forward kernels (cuda_src/na_tiled.cu; dispatch in runtime/tiled.py)
TILED_THREADS = 256
TILED_SHARED_BUDGET = 48 * 1024  # the most dynamic shared memory a launch gets: no opt-in needed
TILED_HEAD_DIMS = (32, 64, 128)  # head-dim buckets: runtime head_dim <= bucket
#: (ndim, head-dim bucket, dtype) -> query tile (TX, TY), group coordinates; 1D tiles have TY = 1
TILED_TILES = {
    (ndim, hd, dtype): tile
    for dtype in ("float32", "float16", "bfloat16")
    for (ndim, hd), tile in {
        (1, 32): (64, 1), (1, 64): (64, 1), (1, 128): (32, 1),
        (2, 32): (8, 8), (2, 64): (4, 4) if dtype == "float32" else (8, 8), (2, 128): (4, 4),
    }.items()
}


def tiled_names() -> tuple[str, ...]:
    names = []
    for (_, hd, dtype), (tx, ty) in TILED_TILES.items():
        element, acc = CTYPES[dtype], CTYPES[accumulator_dtype(dtype)]
        for weights in (element, acc):
            names += [f"na_tiled_qk<{element}, {weights}, {hd}, {tx}, {ty}>",
                      f"na_tiled_av<{weights}, {element}, {hd}, {tx}, {ty}>"]
    return tuple(dict.fromkeys(names))


def tiled_bwd_family() -> Family:
    """Tiled dK/dV and dRPB kernels (cuda_src/na_tiled_bwd.cu; tables and dispatch in runtime/tiled_bwd.py)."""
    from . import tiled_bwd

    return Family(tiled_bwd.SOURCE, tiled_bwd.tiled_bwd_names(), tiled_bwd.tiled_bwd_threads(),
                  tiled_bwd.tiled_bwd_shared())


def fused_family() -> Family:
    """Fused forward kernel (cuda_src/na_fused.cu; tile table and dispatch in runtime/fused.py)."""
    from . import fused

    return Family(fused.SOURCE, fused.fused_names(), fused.fused_threads(), fused.fused_shared())


def fused_tc_family() -> Family:
    """Tensor-core fused forward (cuda_src/na_fused_tc.cu; table and dispatch in runtime/fused_tc.py)."""
    from . import fused_tc

    return Family(fused_tc.SOURCE, fused_tc.names(), fused_tc.family_threads(), fused_tc.family_shared(),
                  min_arch=fused_tc.MIN_ARCH)


def fused_tc_bwd_family() -> Family:
    """Tensor-core fused backward dq/dkdv (cuda_src/na_fused_tc_bwd.cu; tables in runtime/fused_tc.py)."""
    from . import fused_tc

    return Family(fused_tc.BWD_SOURCE, fused_tc.bwd_names(), fused_tc.bwd_family_threads(),
                  fused_tc.bwd_family_shared(), min_arch=fused_tc.MIN_ARCH)


def fused_wg_family() -> Family:
    """Hopper wgmma fused forward (cuda_src/na_fused_wg.cu, sm_90a; table and dispatch in runtime/fused_wg.py)."""
    from . import fused_wg

    return fused_wg.family()


def fused_wg_bwd_family() -> Family:
    """Hopper wgmma fused backward dq/dkdv (cuda_src/na_fused_wg_bwd.cu, sm_90a; tables in runtime/fused_wg.py)."""
    from . import fused_wg

    return fused_wg.bwd_family()


def fused_bwd_family() -> Family:
    """Fused backward kernels (cuda_src/na_fused_bwd.cu; tile table and dispatch in runtime/fused_bwd.py)."""
    from . import fused_bwd

    return Family(fused_bwd.SOURCE, fused_bwd.fused_bwd_names(), fused_bwd.fused_bwd_threads(),
                  fused_bwd.fused_bwd_shared())


#: the primitive self-tests (cuda_src/na_selftest.cu) and their block sizes
SELFTEST_THREADS = {"na_selftest_convert": 256, "na_selftest_mma<fp16_t>": 32, "na_selftest_mma<bf16_t>": 32,
                    "na_selftest_ldmatrix": 32, "na_selftest_shuffle": 64, "na_selftest_divide": 256,
                    "na_selftest_exp2": 256, "na_selftest_cp_async": 128, "na_selftest_group_window": 64}


#: the wgmma self-test (cuda_src/na_selftest_wgmma.cu, sm_90a): element types x N of m64nNk16
SELFTEST_WGMMA_N = (32, 64, 128)


def selftest_wgmma_name(ctype: str, n: int) -> str:
    return f"na_selftest_wgmma<{ctype}, {n}>"


#: the wgmma self-test's largest block: two warpgroups, as the kernels with two
SELFTEST_WGMMA_THREADS = 256


def selftest_wgmma_shared(n: int) -> int:
    """A (64 x 32 per warpgroup, two of them) and two copies of B (32 x n), 16-bit, then room for what a
    misread descriptor reaches (the diagnosis)."""
    return 2 * 64 * 32 * 2 + 2 * 32 * n * 2 + 2 * n * n + 1024


def selftest_wgmma_family() -> Family:
    names = tuple(selftest_wgmma_name(t, n) for t in ("fp16_t", "bf16_t") for n in SELFTEST_WGMMA_N)
    shared = {selftest_wgmma_name(t, n): selftest_wgmma_shared(n) for t in ("fp16_t", "bf16_t") for n in SELFTEST_WGMMA_N}
    return Family("na_selftest_wgmma.cu", names, {n: SELFTEST_WGMMA_THREADS for n in names}, shared, archs=(90,),
                  arch_specific=True)


def _family(source: str, names: tuple[str, ...], threads: int) -> Family:
    return Family(source, names, {n: threads for n in names}, {n: 0 for n in names})


FAMILIES: dict[str, Family] = {
    "naive": _family("na_naive.cu", naive_names(), NAIVE_THREADS),
    "selftest": Family("na_selftest.cu", tuple(SELFTEST_THREADS), SELFTEST_THREADS, {n: 0 for n in SELFTEST_THREADS}),
    "selftest_wgmma": selftest_wgmma_family(),
    "tiled": Family("na_tiled.cu", tiled_names(), {n: TILED_THREADS for n in tiled_names()},
                    {n: TILED_SHARED_BUDGET for n in tiled_names()}),
    "tiled_bwd": tiled_bwd_family(),
    "fused_bwd": fused_bwd_family(),
    "fused": fused_family(),
    "fused_tc": fused_tc_family(),
    "fused_tc_bwd": fused_tc_bwd_family(),
    "fused_wg": fused_wg_family(),
    "fused_wg_bwd": fused_wg_bwd_family(),
}


def family_of(kernel_name: str) -> Family:
    for family in FAMILIES.values():
        if kernel_name in family.names:
            return family
    raise KeyError(f"kernel {kernel_name!r} is in no family of na_rtc.runtime.families")
