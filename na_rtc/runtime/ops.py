"""The backend op table on the kernels, for any executor (``cuda`` or ``emulator``).

Same signatures as :data:`na_rtc.reference.OPS`. Fused ops follow the
fallback rule of the kernel notes (``cuda_src/README.md``): the fused kernel
when one covers the problem, otherwise the split kernels composed (qk,
softmax, av) for stride 1, otherwise an error naming the reason. On the GPU a
kernel path serves a call only once its kernels have passed first-use
verification (:mod:`na_rtc.verify.gate`); one that failed is skipped like one
that does not cover the problem. Split kernel calls go through
:class:`~na_rtc.runtime.kernels.Kernels`, which picks tiled kernels where its
tables cover the problem.
"""

from __future__ import annotations

import math

from .. import _arrays, config
from .._args import Problem
from .families import accumulator_dtype
from . import fused_tc
from .fused import FusedKernels
from .fused_bwd import FusedBackwardKernels
from .kernels import Kernels
from .naive import Executor

SPLIT = "split"  # the composed split kernels, as a path name

def _require_stride_one(problem: Problem, backend: str, what: str) -> None:
    """The composed split-kernel path has no stride: say why and what works instead."""
    if any(axis.stride != 1 for axis in problem.axes):
        raise ValueError(
            f"stride {tuple(a.stride for a in problem.axes)} needs the fused {what} kernels, which do not cover this "
            f"problem on the {backend} backend (dtype {problem.dtype}, head_dim {problem.head_dim}); use stride=1, "
            "a supported dtype / head_dim, or the reference backend (na_rtc.use_backend('reference'))"
        )


def _tensor_core_policy(backend: str):
    """problem -> may the tensor-core kernels run it: sm_80+ GPUs (cuda), always in the emulator
    (so CI runs what such GPUs run); never with NA_RTC_TENSOR_CORES=0."""
    def allowed(problem: Problem) -> bool:
        if not config.tensor_cores():
            return False
        if backend == "cuda":
            from . import cuda

            return cuda.arch_of(problem.device) >= fused_tc.MIN_ARCH
        return True

    return allowed


def _wgmma_policy(backend: str):
    """problem -> may the Hopper wgmma forward run it: with NA_RTC_WGMMA=1, on sm_90 GPUs (cuda) and in
    the emulator (on top of the tensor-core policy)."""
    def allowed(problem: Problem) -> bool:
        if not config.wgmma():
            return False
        if backend == "cuda":
            from . import cuda, fused_wg

            return cuda.arch_of(problem.device) == fused_wg.ARCH
        return True

    return allowed


def _split_kernels(op: str, what: str = "split kernels"):
    """problem -> the split kernels serving ``op`` as one unit of verification. :class:`Kernels` picks tiled or
    straightforward kernels by dtype, rank, head dim and window size, so the unit is named by those, and its
    canary keeps the call's windows (``canary.split_canary_problem``)."""
    from ..verify.canary import OUTPUTS

    def kernels(problem: Problem) -> dict:
        window = "x".join(str(k) for k in problem.kernel_size)
        return {f"{what} ({op}, {problem.dtype}, {problem.ndim}D, head_dim {problem.head_dim}, kernel {window})":
                OUTPUTS[op]}

    return kernels


def _untrusted_error(problem: Problem, what: str, verdicts, why_not_split: str) -> RuntimeError:
    wrong = "; ".join(f"{v.kernel} ({v.path}): {v.detail}" for v in verdicts)
    return RuntimeError(
        f"na_rtc: no kernel that passed first-use verification on {problem.device} serves this {what} "
        f"({problem.dtype}, {problem.ndim}D, head_dim {problem.head_dim}). Kernels that gave wrong results here: "
        f"{wrong}. {why_not_split} `python -m na_rtc selftest` reports every kernel and primitive on this GPU; "
        "the reference backend (na_rtc.use_backend('reference')) computes on the same device without these kernels; "
        "NA_RTC_VERIFY=0 turns verification off (and trusts kernels that gave wrong results)."
    )


def _bias_in_accumulator(problem: Problem, rpb):
    return None if rpb is None else _arrays.cast(rpb, accumulator_dtype(problem.dtype))


def _probabilities(kernels: Kernels, problem: Problem, query, key, rpb, lse=None):
    logits = kernels.qk(problem, query, key, _bias_in_accumulator(problem, rpb), accumulator_dtype(problem.dtype),
                        problem.scale, -math.inf)
    kernels.softmax(problem, logits, lse)
    return logits


def split_candidates(kernels: Kernels):
    """The fused forward and backward as the split kernels composed (qk, softmax, av and their backwards;
    stride 1 only), as :class:`~na_rtc.verify.gate.Candidate` s: the fallback of the fused kernels."""
    from ..verify.canary import split_canary_problem
    from ..verify.gate import Candidate

    def forward(problem, query, key, value, rpb=None):
        lse = _arrays.empty(query, problem.lse_shape, accumulator_dtype(problem.dtype))
        probs = _probabilities(kernels, problem, query, key, rpb, lse)
        return kernels.av(problem, probs, value), lse

    def backward(problem, grad_out, query, key, value, rpb=None, output=None, logsumexp=None):
        acc = accumulator_dtype(problem.dtype)
        probs = _probabilities(kernels, problem, query, key, rpb)  # recomputed: cheaper to store nothing
        grad_logits = kernels.qk(problem, grad_out, value, None, acc, 1.0, 0.0)
        kernels.softmax_backward(problem, probs, grad_logits)
        dq = kernels.av(problem, grad_logits, key, problem.scale)
        dk = kernels.inverse(problem, grad_logits, query, problem.scale)
        dv = kernels.inverse(problem, probs, grad_out)
        drpb = None if rpb is None else _arrays.cast(kernels.bias_grad(problem, grad_logits), _arrays.dtype_name(rpb))
        return dq, dk, dv, drpb

    composed = "composed split kernels"
    return (Candidate("forward", SPLIT, _split_kernels("forward", composed), forward, split_canary_problem),
            Candidate("backward", SPLIT, _split_kernels("backward", composed), backward, split_canary_problem))


def split_op_candidates(kernels: Kernels) -> dict:
    """The split ops (``na*_qk``, ``na*_av`` and their backwards) as :class:`~na_rtc.verify.gate.Candidate` s,
    by op name of ``canary.OPS``: their kernels have no other path, so on the GPU a failed verification is an
    error that says what else serves."""
    from ..verify.canary import split_canary_problem
    from ..verify.gate import Candidate

    def qk(problem, query, key, rpb=None):
        return kernels.qk(problem, query, key, _bias_in_accumulator(problem, rpb), problem.dtype, 1.0, -math.inf)

    def qk_backward(problem, grad_attn, query, key, rpb=None):
        dq = kernels.av(problem, grad_attn, key)
        dk = kernels.inverse(problem, grad_attn, query)
        drpb = None if rpb is None else _arrays.cast(kernels.bias_grad(problem, grad_attn), _arrays.dtype_name(rpb))
        return dq, dk, drpb

    def av(problem, attn, value):
        return kernels.av(problem, attn, value)

    def av_backward(problem, grad_out, attn, value):
        dattn = kernels.qk(problem, grad_out, value, None, problem.dtype, 1.0, 0.0)
        return dattn, kernels.inverse(problem, attn, grad_out)

    runs = {"qk": qk, "qk_backward": qk_backward, "av": av, "av_backward": av_backward}
    return {op: Candidate(op, SPLIT, _split_kernels(op), run, split_canary_problem) for op, run in runs.items()}


def make_ops(run: Executor, backend: str) -> dict:
    """The op table (same signatures as :data:`na_rtc.reference.OPS`) on ``run``."""
    from ..verify.gate import Candidate, Gate

    gate = Gate(backend)
    kernels = Kernels(run)
    fused = FusedKernels(run, _tensor_core_policy(backend), _wgmma_policy(backend), gate.trusted)
    fused_backward_kernels = FusedBackwardKernels(run, _tensor_core_policy(backend), _wgmma_policy(backend),
                                                  gate.trusted)

    def split_path(problem, what: str, fused_candidates, split: Candidate) -> None:
        """May the composed split kernels serve ``problem``? Raises saying why not: a stride they lack, or
        (on the GPU) kernels that failed verification."""
        distrusted = gate.distrusted(problem, fused_candidates)
        if any(axis.stride != 1 for axis in problem.axes):
            if distrusted:
                raise _untrusted_error(problem, f"fused {what}", distrusted,
                                       "The composed split kernels have no stride.")
            _require_stride_one(problem, backend, what)
        if not gate.trusted(problem, split):
            raise _untrusted_error(problem, f"fused {what}", distrusted + gate.distrusted(problem, [split]),
                                   "The composed split kernels gave wrong results too.")

    split_forward, split_backward = split_candidates(kernels)

    def fused_forward(problem, query, key, value, rpb=None):
        path = fused.path(problem)
        if path is not None:
            return fused.forward(problem, query, key, value, _bias_in_accumulator(problem, rpb), path)
        split_path(problem, "forward", [fused.candidate(p) for p in fused.paths(problem)], split_forward)
        return split_forward.run(problem, query, key, value, rpb)

    def fused_backward(problem, grad_out, query, key, value, rpb=None, output=None, logsumexp=None):
        paths = fused_backward_kernels.path(problem)
        if paths is not None:
            if output is None:  # the plain backward functions may be called without the forward's results
                output, logsumexp = fused_forward(problem, query, key, value, rpb)
            lse = _arrays.cast(logsumexp, "float32")  # the kernels read a float32 logsumexp
            dq, dk, dv, drpb = fused_backward_kernels.backward(problem, grad_out, query, key, value,
                                                              _bias_in_accumulator(problem, rpb), output, lse, paths)
            return dq, dk, dv, None if rpb is None else _arrays.cast(drpb, _arrays.dtype_name(rpb))
        candidates = [fused_backward_kernels.candidate(p) for p in fused_backward_kernels.paths(problem)]
        split_path(problem, "backward", candidates, split_backward)
        return split_backward.run(problem, grad_out, query, key, value, rpb)

    split_ops = split_op_candidates(kernels)

    def split_op(op: str, function: str):
        """The split op ``op`` (a name of ``canary.OPS``), refused where its kernels failed verification."""
        candidate = split_ops[op]

        def run(problem, *arrays):
            if not gate.trusted(problem, candidate):
                raise _untrusted_error(problem, f"{function} call", gate.distrusted(problem, [candidate]),
                                       "The split ops have no other kernels; the fused ops (na1d, na2d) compute "
                                       "attention with their own, verified apart.")
            return candidate.run(problem, *arrays)

        return run

    return {
        "fused_forward": fused_forward,
        "fused_backward": fused_backward,
        "qk_forward": split_op("qk", "na*_qk"),
        "qk_backward": split_op("qk_backward", "na*_qk backward"),
        "av_forward": split_op("av", "na*_av"),
        "av_backward": split_op("av_backward", "na*_av backward"),
    }
