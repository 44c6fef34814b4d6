"""The straightforward kernels (``cuda_src/na_naive.cu``): one thread per output element.

They serve every problem the split ops and the composed fused path can pose
(every dtype, head dim, window, stride; float64 too): the last candidate of
every split kernel role, behind the tiled kernels (``tiled.py``,
``tiled_bwd.py``), and the only softmax kernels. Roles: ``qk``, ``av``,
``inverse``, ``bias_grad``, ``softmax``, ``softmax_backward``; each takes the
dtype of the weights (logits, probabilities) it reads or writes.
"""

from __future__ import annotations

import math

from ..._args import Problem
from .. import launch as L
from .. import plan as P
from ..registry import Family, Launch, Role, register, source_of
from ..tiling import CTYPES, accumulator_dtype

NAME = "naive"
SOURCE = "na_naive.cu"
THREADS = 256  # one thread per output element; NA_RPB_THREADS in na_naive.cu matches


def names() -> tuple[str, ...]:
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


def one_thread_per_output(name: str, outputs: int) -> Launch:
    """The launch of ``name`` with one thread per output: ``ceil(outputs / THREADS)`` blocks, or a ValueError
    that says what to do where that passes CUDA's grid limit."""
    blocks = -(-outputs // THREADS)
    if blocks > P.MAX_GRID[0]:
        raise ValueError(
            f"the problem needs {blocks} blocks of {THREADS} threads for {name}, more than CUDA's "
            f"grid limit {P.MAX_GRID[0]}; split the batch"
        )
    return Launch(P.Kernel(source_of(NAME), name), blocks, THREADS, 0)


def _everything(problem: Problem, policy, *args) -> tuple[bool, str]:
    return True, ""


def _qk(problem: Problem, policy, out_dtype: str) -> Launch:
    name = f"na_qk_fwd<{CTYPES[problem.dtype]}, {CTYPES[out_dtype]}>"
    return one_thread_per_output(name, math.prod(problem.attn_shape))


def _weighted(kernel: str):
    def plan(problem: Problem, policy, weights_dtype: str, source_dtype: str | None = None) -> Launch:
        name = f"{kernel}<{CTYPES[weights_dtype]}, {CTYPES[problem.dtype]}>"
        return one_thread_per_output(name, math.prod(problem.qkv_shape))

    return plan


def _bias_grad(problem: Problem, policy, weights_dtype: str) -> Launch:
    """One block per entry of the bias table (its threads sum over the queries)."""
    return Launch(P.Kernel(source_of(NAME), f"na_rpb_bwd<{CTYPES[weights_dtype]}>"), math.prod(problem.rpb_shape),
                  THREADS, 0)


def _softmax(kernel: str):
    def plan(problem: Problem, policy, weights_dtype: str) -> Launch:
        return one_thread_per_output(f"{kernel}<{CTYPES[weights_dtype]}>", math.prod(problem.lse_shape))

    return plan


FAMILY = register(Family(
    SOURCE, names(), dict.fromkeys(names(), THREADS), dict.fromkeys(names(), 0), name=NAME,
    roles={
        "qk": Role(_everything, _qk, L.qk),
        "av": Role(_everything, _weighted("na_av_fwd"), L.weighted),
        "inverse": Role(_everything, _weighted("na_inv_fwd"), L.weighted),
        "bias_grad": Role(_everything, _bias_grad, L.bias_grad),
        "softmax": Role(_everything, _softmax("na_softmax_fwd"), L.softmax),
        "softmax_backward": Role(_everything, _softmax("na_softmax_bwd"), L.softmax_backward),
    },
))
