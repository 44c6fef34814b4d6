"""The backend op table on the kernels: each call's dispatch run, and what it cannot serve refused with why.

:func:`make_ops` is what :mod:`na_rtc.backends` loads for the ``cuda`` and
``emulator`` backends (same signatures as :data:`na_rtc.reference.OPS`). Per
call it builds the :class:`~na_rtc.runtime.policy.Policy` (the settings,
read once, and the GPU's architecture) and a
:class:`~na_rtc.runtime.dispatch.Dispatcher`, runs the first candidate that
serves, and otherwise the split kernels composed
(:mod:`na_rtc.runtime.composed`, stride 1 only) or an error that names the
reason: a stride the split kernels lack, or kernels that failed first-use
verification on the GPU. :func:`explain_steps` gives the same decisions
without running anything, for ``na_rtc.explain``.
"""

from __future__ import annotations

import dataclasses
import logging

from .. import _arrays, extra_tokens
from .._args import Problem
from ..verify.gate import Gate
from . import composed
from . import launch as L
from .dispatch import (BACKWARD, FORWARD, SPLIT, Choice, Dispatcher, composed_candidates, log, log_choice,
                       pair_path, streams_extra_tokens)
from .policy import Policy

__all__ = ["OpTable", "composed_refusal", "explain_steps", "make_ops", "split_op_refusal"]


def _require_stride_one(problem: Problem, backend: str, what: str) -> None:
    """The composed split-kernel path has no stride: say why and what works instead."""
    if any(axis.stride != 1 for axis in problem.axes):
        raise ValueError(
            f"stride {tuple(a.stride for a in problem.axes)} needs the fused {what} kernels, which do not cover this "
            f"problem on the {backend} backend (dtype {problem.dtype}, head_dim {problem.head_dim}); use stride=1, "
            "a supported dtype / head_dim, or the reference backend (na_rtc.use_backend('reference'))"
        )


def _untrusted_error(problem: Problem, what: str, verdicts, why_not_split: str) -> RuntimeError:
    wrong = "; ".join(f"{v.kernel} ({v.path}): {v.detail}" for v in verdicts)
    return RuntimeError(
        f"na_rtc: no kernel that passed first-use verification on {problem.device} serves this {what} "
        f"({problem.dtype}, {problem.ndim}D, head_dim {problem.head_dim}). Kernels that gave wrong results here: "
        f"{wrong}. {why_not_split} `python -m na_rtc selftest` reports every kernel and primitive on this GPU; "
        "the reference backend (na_rtc.use_backend('reference')) computes on the same device without these kernels; "
        "NA_RTC_VERIFY=0 turns verification off (and trusts kernels that gave wrong results)."
    )


class OpTable:
    """The kernel ops of one backend on one executor: each call builds its :class:`Policy` and
    :class:`Dispatcher`, then runs what they choose (see :func:`make_ops`). ``verification``: as
    :class:`Dispatcher`'s (``"peek"`` never runs a canary: the benchmark's host-overhead entry, whose executor
    launches nothing, must not record verdicts)."""

    def __init__(self, run, backend: str, verification: str = "run"):
        self.run, self.backend, self.verification = run, backend, verification
        self.gate = Gate(backend) if verification == "run" else Gate.of(backend)

    def dispatcher(self, problem: Problem) -> Dispatcher:
        return Dispatcher(self.run, Policy.for_call(self.backend, problem), self.gate, self.verification)

    def fused_forward(self, problem: Problem, query, key, value, rpb=None, extra_keys=None, extra_values=None):
        """``(out, lse)``; with extra tokens, streamed by the forward kernels that take them, else merged
        (:func:`na_rtc.extra_tokens.merged_forward`): the dispatch is the neighborhood's either way."""
        spatial = problem.without_extra_tokens()
        dispatcher = self.dispatcher(spatial)
        route, skipped = dispatcher.forward_route(spatial)
        if problem.extra_tokens and (route is None or not streams_extra_tokens(route)):
            return extra_tokens.merged_forward(self.fused_forward, problem, query, key, value, rpb, extra_keys,
                                               extra_values)
        if route is not None:
            if log.isEnabledFor(logging.DEBUG):
                log_choice(problem, Choice("forward", route.path, (dispatcher.plan(problem, route).name,), tuple(skipped)))
            return dispatcher.forward(problem, query, key, value, composed.bias_in_accumulator(problem, rpb), route,
                                      extra_keys, extra_values)
        return self._composed("forward", dispatcher, problem, skipped, query, key, value, rpb)

    def fused_backward(self, problem: Problem, grad_out, query, key, value, rpb=None, output=None, logsumexp=None,
                       grad_lse=None, extra_keys=None, extra_values=None):
        """``(dq, dk, dv, drpb)``; with extra tokens ``(..., d_extra_keys, d_extra_values)``: in the kernels where
        the chosen dq kernel streams them and the tokens' dK/dV kernel covers them, else the neighborhood's
        kernels and the tokens' part as matrix products (:func:`na_rtc.extra_tokens.fused_backward`)."""
        dispatcher = self.dispatcher(problem)
        pair, skipped = dispatcher.backward_pair(problem)
        if problem.extra_tokens and (pair is None or not dispatcher.streams_extra_tokens_backward(problem, pair)[0]):
            return extra_tokens.fused_backward(self.fused_backward, self.fused_forward, problem, grad_out, query,
                                               key, value, rpb, output, logsumexp, grad_lse, extra_keys,
                                               extra_values)
        if pair is None:
            return self._composed("backward", dispatcher, problem, skipped, grad_out, query, key, value, rpb,
                                  output, logsumexp, grad_lse)
        launches = dispatcher.backward_launches(problem, pair)
        if log.isEnabledFor(logging.DEBUG):
            log_choice(problem, Choice("backward", pair_path(pair), launches.kernel_names(problem.has_rpb), tuple(skipped)))
        if output is None and problem.extra_tokens:
            output, logsumexp = self.fused_forward(problem, query, key, value, rpb, extra_keys, extra_values)
        if output is None:  # the plain backward functions may be called without the forward's results
            route, skipped = dispatcher.forward_route(problem)  # the same dispatcher: its rules already evaluated
            if route is None:
                output, logsumexp = self._composed("forward", dispatcher, problem, skipped, query, key, value, rpb)
            else:
                output, logsumexp = dispatcher.forward(problem, query, key, value,
                                                       composed.bias_in_accumulator(problem, rpb), route)
        lse = _arrays.cast(logsumexp, "float32")  # the kernels read a float32 logsumexp
        dq, dk, dv, drpb, *tokens = L.fused_backward(self.run, launches, problem, grad_out, query, key, value,
                                                     composed.bias_in_accumulator(problem, rpb), output, lse, grad_lse,
                                                     extra_keys, extra_values)
        return dq, dk, dv, None if rpb is None else _arrays.cast(drpb, _arrays.dtype_name(rpb)), *tokens

    def _composed(self, op: str, dispatcher: Dispatcher, problem: Problem, skipped, *arrays):
        """The fused ``op`` as the split kernels composed, where they may serve (else the error saying why)."""
        refusal = composed_refusal(dispatcher, problem, op)
        if refusal is not None:
            raise refusal
        if log.isEnabledFor(logging.DEBUG):
            log_choice(problem, Choice(op, SPLIT, (), tuple(skipped)))
        return getattr(composed, op)(dispatcher, problem, *arrays)

    def split_op(self, op: str):
        """The split op ``op`` (a name of ``canary.OPS``), refused where its kernels failed verification."""
        compose = getattr(composed, op)

        def run(problem: Problem, *arrays):
            dispatcher = self.dispatcher(problem)
            refusal = split_op_refusal(dispatcher, problem, op)
            if refusal is not None:
                raise refusal
            return compose(dispatcher, problem, *arrays)

        return run

    def ops(self) -> dict:
        return {
            "fused_forward": self.fused_forward,
            "fused_backward": self.fused_backward,
            "qk_forward": self.split_op("qk"),
            "qk_backward": self.split_op("qk_backward"),
            "av_forward": self.split_op("av"),
            "av_backward": self.split_op("av_backward"),
        }


def composed_refusal(dispatcher: Dispatcher, problem: Problem, op: str) -> Exception | None:
    """Why the composed split kernels may not serve the fused ``op`` (``forward``/``backward``) where no fused
    kernel does, or None: a stride they lack, or (on the GPU) kernels that failed verification."""
    gate, verify = dispatcher.gate, dispatcher.verifying
    fused = [dispatcher.candidate(option) for option in dispatcher.admitted(op, problem)]
    distrusted = gate.distrusted(problem, fused, active=True) if verify else []
    if any(axis.stride != 1 for axis in problem.axes):
        if distrusted:
            return _untrusted_error(problem, f"fused {op}", distrusted, "The composed split kernels have no stride.")
        try:
            _require_stride_one(problem, dispatcher.policy.backend, op)
        except ValueError as error:
            return error
    if verify:
        unit = composed_candidates(dispatcher.run, dispatcher.policy)[op]
        ok, _ = dispatcher._verified(problem, unit)
        if not ok:
            return _untrusted_error(problem, f"fused {op}", distrusted + gate.distrusted(problem, [unit], True),
                                    "The composed split kernels gave wrong results too.")
    return None


#: split op -> how its calls are named in the error that refuses them
_SPLIT_OP_CALLS = {"qk": "na*_qk", "qk_backward": "na*_qk backward", "av": "na*_av", "av_backward": "na*_av backward"}


def split_op_refusal(dispatcher: Dispatcher, problem: Problem, op: str) -> Exception | None:
    """Why the split op ``op`` may not run (its kernels failed verification on this GPU), or None."""
    if not dispatcher.verifying:
        return None
    unit = composed_candidates(dispatcher.run, dispatcher.policy)[op]
    ok, _ = dispatcher._verified(problem, unit)
    if ok:
        return None
    return _untrusted_error(problem, f"{_SPLIT_OP_CALLS[op]} call", dispatcher.gate.distrusted(problem, [unit], True),
                            "The split ops have no other kernels; the fused ops (na1d, na2d, na3d) compute "
                            "attention with their own, verified apart.")


def explain_steps(backend: str, problem: Problem, backward: bool = False, weights: str | None = None):
    """``(policy, steps)``: what a call of ``problem`` on ``backend`` would run, decided as the call decides it
    now but launching nothing and running no canary (``na_rtc.explain``). A step is ``(op, fused choice or
    None, split-kernel choices, error text)``."""
    policy = Policy.for_call(backend, problem)
    dispatcher = Dispatcher(None, policy, Gate.of(backend), "peek")
    fused = problem.op == "fused"
    first = "forward" if fused else problem.op
    ops = [first, "backward" if fused else f"{first}_backward"] if backward else [first]
    steps = []
    for op in ops:
        choice = None
        if fused:
            choice = _with_extra_tokens_note(op, problem, dispatcher.choose(op, problem), dispatcher)
            if choice.path is not None:
                steps.append((op, choice, (), ""))
                continue
            refusal = composed_refusal(dispatcher, problem, op)
        else:
            refusal = split_op_refusal(dispatcher, problem, op)
        launches = () if refusal else tuple(dispatcher.choose(role, problem, *args)
                                            for role, args in composed.launches(op, problem, weights))
        steps.append((op, choice, launches, "" if refusal is None else str(refusal)))
    return policy, steps


def _with_extra_tokens_note(op: str, problem: Problem, choice: Choice, dispatcher: Dispatcher) -> Choice:
    """``choice`` with a note on where a call's extra tokens go (as :class:`OpTable` runs them)."""
    if not problem.extra_tokens:
        return choice
    if op == "backward":
        pair = next((p for p in BACKWARD if pair_path(p) == choice.path), None)
        streamed, why = (False, "") if pair is None else dispatcher.streams_extra_tokens_backward(problem, pair)
        where = ("its dq kernel streams the extra tokens, their own kernel writes their gradients" if streamed else
                 "the extra tokens' part: matrix products over chunks of queries, added after the kernels"
                 + (f" ({why})" if why else ""))
    elif choice.path is not None and streams_extra_tokens(next(r for r in FORWARD if r.path == choice.path)):
        where = "its forward kernel streams the extra tokens after each tile's neighborhood"
    else:
        where = "dense attention over the extra tokens merged with this result through the logsumexps"
    return dataclasses.replace(choice, note="; ".join(n for n in (choice.note, where) if n))


def make_ops(run, backend: str, verification: str = "run") -> dict:
    """The op table (same signatures as :data:`na_rtc.reference.OPS`) on executor ``run`` for ``backend``
    (``cuda`` or ``emulator``: which GPU policy and verification apply)."""
    return OpTable(run, backend, verification).ops()
