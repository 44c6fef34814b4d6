"""The straightforward kernels (``cuda_src/na_naive.cu``): one thread per output element.

They serve every problem the split ops and the composed fused path can pose
(every dtype, head dim, window, stride; float64 too): the last candidate of
every split kernel role, behind the tiled kernels (``tiled.py``,
``tiled_bwd.py``), and the only softmax kernels. Roles: ``qk``, ``av``,
``inverse``, ``bias_grad``, ``softmax``, ``softmax_backward``; each takes the
dtype of the weights (logits, probabilities) it reads or writes.

Two families share the source: ``naive`` (1D and 2D) and its 3D twin
``naive_3d``, whose instantiations name the kernels' RANK parameter (``,
3``); both list every instantiation, since these kernels are the fallback
that serves whatever nothing else does.
"""

from __future__ import annotations

import math

from ..._args import Problem
from .. import launch as L
from .. import plan as P
from ..registry import RANK3_SUFFIX, Family, Launch, Role, register, source_of
from ..tiling import CTYPES, accumulator_dtype

NAME = "naive"
NAME_3D = NAME + RANK3_SUFFIX
SOURCE = "na_naive.cu"
THREADS = 256  # one thread per output element; NA_RPB_THREADS in na_naive.cu matches


def _rank(rank: int) -> str:
    """The template arguments that follow the element types: the RANK parameter, named only for 3D (1D/2D
    instantiations keep their names)."""
    return ", 3" if rank == 3 else ""


def names(rank: int = 2) -> tuple[str, ...]:
    r = _rank(rank)
    names = []
    for dtype, element in CTYPES.items():
        acc = CTYPES[accumulator_dtype(dtype)]
        names += [
            f"na_qk_fwd<{element}, {element}{r}>", f"na_qk_fwd<{element}, {acc}{r}>",
            f"na_av_fwd<{element}, {element}{r}>", f"na_av_fwd<{acc}, {element}{r}>",
            f"na_inv_fwd<{element}, {element}{r}>", f"na_inv_fwd<{acc}, {element}{r}>",
            f"na_rpb_bwd<{element}{r}>",
        ]
    for acc in ("float", "double"):
        names += [f"na_rpb_bwd<{acc}{r}>", f"na_softmax_fwd<{acc}{r}>", f"na_softmax_bwd<{acc}{r}>"]
    return tuple(dict.fromkeys(names))


def one_thread_per_output(name: str, outputs: int, family: str = NAME) -> Launch:
    """The launch of ``name`` (of ``family``) with one thread per output: ``ceil(outputs / THREADS)`` blocks, or
    a ValueError that says what to do where that passes CUDA's grid limit."""
    blocks = -(-outputs // THREADS)
    if blocks > P.MAX_GRID[0]:
        raise ValueError(
            f"the problem needs {blocks} blocks of {THREADS} threads for {name}, more than CUDA's "
            f"grid limit {P.MAX_GRID[0]}; split the batch"
        )
    return Launch(P.Kernel(source_of(family), name), blocks, THREADS, 0)


def _everything(problem: Problem, policy, *args) -> tuple[bool, str]:
    return True, ""


def _roles(family: str, rank: int) -> dict[str, Role]:
    """The roles of ``family``, whose instantiations are those of ``names(rank)``."""
    r = _rank(rank)

    def qk(problem: Problem, policy, out_dtype: str) -> Launch:
        name = f"na_qk_fwd<{CTYPES[problem.dtype]}, {CTYPES[out_dtype]}{r}>"
        return one_thread_per_output(name, math.prod(problem.attn_shape), family)

    def weighted(kernel: str, shape: str):
        def plan(problem: Problem, policy, weights_dtype: str, source_dtype: str | None = None) -> Launch:
            name = f"{kernel}<{CTYPES[weights_dtype]}, {CTYPES[problem.dtype]}{r}>"
            return one_thread_per_output(name, math.prod(getattr(problem, shape)), family)

        return plan

    def bias_grad(problem: Problem, policy, weights_dtype: str) -> Launch:
        """One block per entry of the bias table (its threads sum over the queries)."""
        kernel = P.Kernel(source_of(family), f"na_rpb_bwd<{CTYPES[weights_dtype]}{r}>")
        return Launch(kernel, math.prod(problem.rpb_shape), THREADS, 0)

    def softmax(kernel: str):
        def plan(problem: Problem, policy, weights_dtype: str) -> Launch:
            return one_thread_per_output(f"{kernel}<{CTYPES[weights_dtype]}{r}>", math.prod(problem.lse_shape),
                                         family)

        return plan

    return {
        "qk": Role(_everything, qk, L.qk),
        "av": Role(_everything, weighted("na_av_fwd", "qkv_shape"), L.weighted),
        "inverse": Role(_everything, weighted("na_inv_fwd", "kv_shape"), L.inverse),
        "bias_grad": Role(_everything, bias_grad, L.bias_grad),
        "softmax": Role(_everything, softmax("na_softmax_fwd"), L.softmax),
        "softmax_backward": Role(_everything, softmax("na_softmax_bwd"), L.softmax_backward),
    }


def _family(name: str, rank: int, ranks: frozenset) -> Family:
    kernels = names(rank)
    return Family(SOURCE, kernels, dict.fromkeys(kernels, THREADS), dict.fromkeys(kernels, 0), name=name,
                  roles=_roles(name, rank), ranks=ranks)


FAMILY = register(_family(NAME, 2, frozenset({1, 2})))
FAMILY_3D = register(_family(NAME_3D, 3, frozenset({3})))
