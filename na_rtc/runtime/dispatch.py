"""The dispatch: every op's candidate kernels, in order, and the first that may serve a call.

One table per op (:data:`FORWARD`, :data:`BACKWARD`, :data:`SPLIT_KERNELS`)
lists :class:`Route` s: a path name, and the kernel family and role that
plan its launch (``runtime/families/<family>.py``). A route serves a call
when

1. the call's :class:`~na_rtc.runtime.policy.Policy` allows it (the settings
   that switch its path on; the GPU's architecture among the family's);
2. the role's coverage rule holds (and the rules it requires), each rule
   evaluated at most once per call;
3. on the GPU, its kernels have passed first-use verification
   (:mod:`na_rtc.verify.gate`).

The first route that serves runs; the ones before it are *skipped*, each
with its reason, which :class:`Choice` keeps and ``na_rtc.explain`` and the
``na_rtc.dispatch`` logger (debug level) report. The fused forward falls
back to the split kernels composed (:mod:`na_rtc.runtime.composed`, stride 1
only), then to an error that names the reason. :func:`make_ops` is the
backend op table (same signatures as :data:`na_rtc.reference.OPS`) on any
executor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from .. import _arrays
from .._args import Problem
from ..verify.gate import Candidate, Gate
from . import composed, registry
from . import families  # noqa: F401 - registers every kernel family
from . import launch as L
from .policy import Policy
from .tiling import accumulator_dtype

__all__ = ["BACKWARD", "FORWARD", "SPLIT_KERNELS", "Choice", "Dispatcher", "Route", "describe_paths", "make_ops"]

log = logging.getLogger("na_rtc.dispatch")

WGMMA, MMA_SYNC, SIMT = "wgmma", "mma.sync", "simt"
TILED, STRAIGHTFORWARD = "tiled", "straightforward"
SPLIT = composed.SPLIT


class Route(NamedTuple):
    """One candidate: ``path`` (its name in reports), the ``family`` and ``role`` whose rule and planner serve
    it, and the policy ``switches`` that must be on."""

    path: str
    family: str
    role: str
    switches: tuple[str, ...] = ()


_TC, _WG = ("tensor_cores",), ("tensor_cores", "wgmma")

#: the fused forward, best first; the composed split kernels follow where none serves (stride 1)
FORWARD = (
    Route(WGMMA, "fused_wg", "forward", _WG),
    Route(MMA_SYNC, "fused_tc", "forward", _TC),
    Route(SIMT, "fused", "forward"),
)
_DQ = (Route(WGMMA, "fused_wg_bwd", "dq", _WG), Route(MMA_SYNC, "fused_tc_bwd", "dq", _TC))
_DKDV = (Route(WGMMA, "fused_wg_bwd", "dkdv", _WG), Route(MMA_SYNC, "fused_tc_bwd", "dkdv", _TC))
#: the fused backward: (dq, dK/dV) pairs, best first (each kernel's tensor-core path chosen on its own), then the
#: SIMT pair; the composed split kernels follow
BACKWARD = tuple((dq, dkdv) for dq in _DQ for dkdv in _DKDV) + (
    (Route(SIMT, "fused_bwd", "dq"), Route(SIMT, "fused_bwd", "dkdv")),)
_TILED = ("tiled",)
#: the split kernels per role: tiled where their tables cover the launch, straightforward otherwise
SPLIT_KERNELS = {
    "qk": (Route(TILED, "tiled", "qk", _TILED), Route(STRAIGHTFORWARD, "naive", "qk")),
    "av": (Route(TILED, "tiled", "av", _TILED), Route(STRAIGHTFORWARD, "naive", "av")),
    "inverse": (Route(TILED, "tiled_bwd", "inverse", _TILED), Route(STRAIGHTFORWARD, "naive", "inverse")),
    "bias_grad": (Route(TILED, "tiled_bwd", "bias_grad", _TILED), Route(STRAIGHTFORWARD, "naive", "bias_grad")),
    "softmax": (Route(STRAIGHTFORWARD, "naive", "softmax"),),
    "softmax_backward": (Route(STRAIGHTFORWARD, "naive", "softmax_backward"),),
}
#: the fused backward's delta and bias-reduction kernels, around every (dq, dK/dV) pair
_DELTA, _RPB_REDUCE = ("fused_bwd", "delta"), ("fused_bwd", "rpb_reduce")


def describe_paths(paths: tuple[str, str]) -> str:
    """``("wgmma", "mma.sync")`` -> "wgmma dq + mma.sync dK/dV"; one name where both are the same."""
    return paths[0] if paths[0] == paths[1] else f"{paths[0]} dq + {paths[1]} dK/dV"


def _pair_path(pair) -> str:
    return describe_paths((pair[0].path, pair[1].path))


@dataclass(frozen=True)
class Choice:
    """One decision: for ``op`` (``forward``, ``backward`` or a split kernel role), the ``path`` that serves
    (None: none), the ``kernels`` it launches, and each candidate ``skipped`` before it with the reason;
    ``note``: what else the user should know (a kernel to be verified at its first use)."""

    op: str
    path: str | None
    kernels: tuple[str, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()
    note: str = ""

    def __str__(self) -> str:
        chosen = f"{self.path}: {', '.join(self.kernels)}" if self.path else "no kernel path"
        lines = [f"{self.op}: {chosen}" + (f" ({self.note})" if self.note else "")]
        lines += [f"  skipped {path}: {why}" for path, why in self.skipped]
        return "\n".join(lines)


def _role(route_or_key) -> registry.Role:
    family, role = (route_or_key.family, route_or_key.role) if isinstance(route_or_key, Route) else route_or_key
    return registry.get(family).roles[role]


class Dispatcher:
    """The dispatch of one call (or of a test's calls): kernels launched on ``run`` under ``policy``.

    ``gate``: the first-use verification of the backend's op table; candidates are verified when the policy
    says so. ``verification``: ``"run"`` (a kernel without a verdict runs its canary now) or ``"peek"`` (only
    recorded verdicts count: what ``na_rtc.explain`` does, launching nothing). Coverage rules are remembered
    for the problem last asked about, so each runs at most once per call.
    """

    def __init__(self, run=None, policy: Policy | None = None, gate: Gate | None = None, verification: str = "run"):
        self.run = run
        self.policy = policy or Policy()
        self.gate = gate
        self.verifying = gate is not None and self.policy.verify
        self.verification = verification
        self._problem: Problem | None = None
        self._rules: dict = {}

    # ------------------------------------------------------------ coverage

    def rule(self, problem: Problem, key: tuple[str, str], args: tuple = ()) -> tuple[bool, str]:
        """``(ok, why)`` of the coverage rule of ``key`` = (family, role), its required rules first."""
        if problem is not self._problem:
            self._problem, self._rules = problem, {}
        role = _role(key)
        memo = (role.covers, role.requires, args)
        known = self._rules.get(memo)
        if known is None:
            for required in role.requires:
                known = self.rule(problem, required)
                if not known[0]:
                    break
            else:
                known = role.covers(problem, self.policy, *args)
            self._rules[memo] = known
        return known

    def admits(self, problem: Problem, route: Route, args: tuple = ()) -> tuple[bool, str]:
        """``(ok, why)``: the policy allows ``route`` and its family covers ``problem`` (verification aside).
        Remembered with the rules: a backward's pairs ask about each of their routes twice."""
        if problem is not self._problem:
            self._problem, self._rules = problem, {}
        known = self._rules.get((route, args))
        if known is None:
            known = self.policy.allows(registry.get(route.family), route.switches)
            if known[0]:
                known = self.rule(problem, (route.family, route.role), args)
            self._rules[route, args] = known
        return known

    def _admits_pair(self, problem: Problem, pair) -> tuple[bool, str]:
        for route, kernel in zip(pair, ("dq", "dK/dV")):
            ok, why = self.admits(problem, route)
            if not ok:
                return False, f"{kernel}: {why}"
        return True, ""

    # ------------------------------------------------------------ verification

    def _verified(self, problem: Problem, candidate: Candidate) -> tuple[bool, str]:
        """``(ok, why)`` of first-use verification (running canaries, or in ``"peek"`` mode reading verdicts)."""
        if self.verification == "peek":
            failed = [v for v in self.gate.known(problem, candidate).values() if v is not None and not v.ok]
        elif self.gate.trusted(problem, candidate, active=True):
            return True, ""
        else:
            failed = self.gate.distrusted(problem, [candidate], active=True)
        if not failed:
            return True, ""
        return False, "failed first-use verification: " + "; ".join(f"{v.kernel}: {v.detail}" for v in failed)

    def _unverified(self, problem: Problem, candidate: Candidate) -> str:
        """The note for a chosen candidate whose kernels have no verdict yet (``"peek"`` mode)."""
        if not (self.verifying and self.verification == "peek"):
            return ""
        if any(v is None for v in self.gate.known(problem, candidate).values()):
            return "verified against the reference at its first use on this GPU"
        return ""

    # ------------------------------------------------------------ choosing

    def _first(self, problem: Problem, options, admits, candidate_of):
        """The first option that serves, and the skipped ones with their reasons."""
        skipped = []
        for option in options:
            ok, why = admits(problem, option)
            if ok and self.verifying:
                ok, why = self._verified(problem, candidate_of(option))
            if ok:
                return option, skipped
            skipped.append((option.path if isinstance(option, Route) else _pair_path(option), why))
        return None, skipped

    def forward_route(self, problem: Problem) -> tuple[Route | None, list]:
        return self._first(problem, FORWARD, self.admits, self.candidate)

    def backward_pair(self, problem: Problem) -> tuple[tuple[Route, Route] | None, list]:
        return self._first(problem, BACKWARD, self._admits_pair, self.candidate)

    def split_route(self, role: str, problem: Problem, args: tuple) -> tuple[Route, list]:
        """The split kernel for ``role`` with dtype arguments ``args``: the straightforward kernels cover every
        launch, so one always serves."""
        skipped = []
        for route in SPLIT_KERNELS[role]:
            ok, why = self.admits(problem, route, args)
            if ok:
                return route, skipped
            skipped.append((route.path, why))
        raise ValueError(f"no split kernel serves {role} for this problem: "
                         + "; ".join(f"{p}: {w}" for p, w in skipped))

    def admitted(self, op: str, problem: Problem) -> list:
        """The routes (``forward``) or pairs (``backward``) the policy allows and whose families cover
        ``problem``, best first, verification aside."""
        if op == "forward":
            return [route for route in FORWARD if self.admits(problem, route)[0]]
        if op == "backward":
            return [pair for pair in BACKWARD if self._admits_pair(problem, pair)[0]]
        raise ValueError(f"op must be 'forward' or 'backward', got {op!r}")

    def choose(self, op: str, problem: Problem, *args) -> Choice:
        """The :class:`Choice` for ``op``: ``forward`` / ``backward`` (the fused kernels; path None where the
        composed split kernels would serve), or a split kernel role (``qk``, ``av``, ``inverse``,
        ``bias_grad``, ``softmax``, ``softmax_backward``) with its dtype arguments (default: the problem's
        dtype for each; the softmax kernels' logits are in the accumulator dtype)."""
        if op == "forward":
            route, skipped = self.forward_route(problem)
            if route is None:
                return Choice(op, None, (), tuple(skipped))
            return Choice(op, route.path, (self._plan(problem, route).name,), tuple(skipped),
                          self._unverified(problem, self.candidate(route)))
        if op == "backward":
            pair, skipped = self.backward_pair(problem)
            if pair is None:
                return Choice(op, None, (), tuple(skipped))
            names = self.backward_launches(problem, pair).kernel_names(problem.has_rpb)
            return Choice(op, _pair_path(pair), names, tuple(skipped), self._unverified(problem, self.candidate(pair)))
        if op not in SPLIT_KERNELS:
            raise ValueError(f"op must be forward, backward or one of {', '.join(SPLIT_KERNELS)}, got {op!r}")
        if not args:
            args = ((problem.dtype,) * (2 if op == "inverse" else 1) if not op.startswith("softmax")
                    else (accumulator_dtype(problem.dtype),))
        route, skipped = self.split_route(op, problem, args)
        launch = _role(route).plan(problem, self.policy, *args)
        names = (launch.name,) if launch.extra is None else (launch.name, launch.extra.name)
        return Choice(op, route.path, names, tuple(skipped))

    # ------------------------------------------------------------ launching

    def _plan(self, problem: Problem, route: Route):
        return _role(route).plan(problem, self.policy)

    def backward_launches(self, problem: Problem, pair) -> L.BackwardLaunches:
        dq, dkdv = pair
        reduce = _role(_RPB_REDUCE).plan(problem, self.policy) if problem.has_rpb else None
        return L.BackwardLaunches(_role(_DELTA).plan(problem, self.policy), self._plan(problem, dq),
                                  self._plan(problem, dkdv), reduce)

    def forward(self, problem: Problem, query, key, value, rpb_acc=None, path: str | Route | None = None):
        """``(out, lse)`` of the fused forward kernels: on ``path`` (a name of :data:`FORWARD`, unchecked), or
        the first route that serves. ``rpb_acc``: the bias in the accumulator dtype (float32), or None."""
        route = _named(FORWARD, path) if path is not None else self.forward_route(problem)[0]
        if route is None:
            raise ValueError(f"no fused kernel covers this problem ({problem.ndim}D, {problem.dtype}, head_dim "
                             f"{problem.head_dim}); see Dispatcher.choose('forward', problem) for why")
        return _role(route).run(self.run, self._plan(problem, route), problem, query, key, value, rpb_acc)

    def backward(self, problem: Problem, grad_out, query, key, value, rpb_acc, output, lse, paths=None):
        """``(dq, dk, dv, drpb)`` of the fused backward kernels, from the forward's ``output`` and ``lse``:
        on ``paths`` (a (dq, dK/dV) pair of path names, unchecked) or the first pair that serves."""
        if paths is not None:
            pair = next((p for p in BACKWARD if (p[0].path, p[1].path) == tuple(paths)), None)
            if pair is None:
                raise ValueError(f"no (dq, dK/dV) pair {paths!r}; pairs: {[_pair_path(p) for p in BACKWARD]}")
        else:
            pair = self.backward_pair(problem)[0]
        if pair is None:
            raise ValueError("the fused backward kernels do not cover this problem; see "
                             "Dispatcher.choose('backward', problem) for why")
        return L.fused_backward(self.run, self.backward_launches(problem, pair), problem, grad_out, query, key, value,
                                rpb_acc, output, lse)

    def _split(self, role: str, problem: Problem, args: tuple, *arrays):
        route, skipped = self.split_route(role, problem, args)
        handler = _role(route)
        launch = handler.plan(problem, self.policy, *args)
        if log.isEnabledFor(logging.DEBUG):
            _log(problem, Choice(role, route.path, (launch.name,), tuple(skipped)))
        return handler.run(self.run, launch, problem, *arrays)

    def qk(self, problem: Problem, query, key, bias, out_dtype: str, scale: float, fill: float):
        """Logits ``[b, *spatial, h, slots]`` in ``out_dtype`` (``bias`` in the accumulator dtype or None)."""
        return self._split("qk", problem, (out_dtype,), query, key, bias, out_dtype, scale, fill)

    def av(self, problem: Problem, weights, value, scale: float = 1.0):
        return self._split("av", problem, (_arrays.dtype_name(weights),), weights, value, scale)

    def inverse(self, problem: Problem, weights, source, scale: float = 1.0):
        args = (_arrays.dtype_name(weights), _arrays.dtype_name(source))
        return self._split("inverse", problem, args, weights, source, scale)

    def bias_grad(self, problem: Problem, grad_logits):
        return self._split("bias_grad", problem, (_arrays.dtype_name(grad_logits),), grad_logits)

    def softmax(self, problem: Problem, logits, lse=None) -> None:
        self._split("softmax", problem, (_arrays.dtype_name(logits),), logits, lse)

    def softmax_backward(self, problem: Problem, probs, grad) -> None:
        self._split("softmax_backward", problem, (_arrays.dtype_name(probs),), probs, grad)

    # ------------------------------------------------------------ verification units

    def candidate(self, option) -> Candidate:
        """A route of :data:`FORWARD` or a pair of :data:`BACKWARD` as a :class:`~na_rtc.verify.gate.Candidate`:
        the kernels it launches (each with the outputs it computes) and how to run it alone."""
        return _candidate(option, self.run, self.policy)

    def candidates(self, op: str, problem: Problem) -> list[tuple[str, Candidate]]:
        """``(path, candidate)`` of every admitted route (``forward``) or pair (``backward``), best first."""
        return [(option.path if isinstance(option, Route) else _pair_path(option), self.candidate(option))
                for option in self.admitted(op, problem)]


def _named(routes, path):
    if isinstance(path, Route):
        return path
    route = next((r for r in routes if r.path == path), None)
    if route is None:
        raise ValueError(f"no path {path!r}; paths: {', '.join(r.path for r in routes)}")
    return route


@lru_cache(maxsize=512)  # a warm call that verifies asks for the same few candidates again
def _candidate(option, run, policy: Policy) -> Candidate:
    if isinstance(option, Route):
        role = _role(option)

        def kernels(problem):
            return {role.plan(problem, policy).name: ("out", "lse")}

        def forward(problem, query, key, value, rpb_acc):
            return role.run(run, role.plan(problem, policy), problem, query, key, value, rpb_acc)

        return Candidate("forward", option.path, kernels, forward)
    dispatcher = Dispatcher(run, policy)

    def pair_kernels(problem):
        launches = dispatcher.backward_launches(problem, option)
        return {launches.dq.name: ("dq", "drpb"), launches.dkdv.name: ("dk", "dv")}

    def backward(problem, grad_out, query, key, value, rpb_acc, output, lse):
        return L.fused_backward(run, dispatcher.backward_launches(problem, option), problem, grad_out, query, key,
                                value, rpb_acc, output, lse)

    return Candidate("backward", _pair_path(option), pair_kernels, backward)


def _split_unit(op: str, what: str = "split kernels"):
    """problem -> the split kernels serving ``op`` as one unit of verification. The dispatcher picks tiled or
    straightforward kernels by dtype, rank, head dim and window size, so the unit is named by those, and its
    canary keeps the call's windows (``canary.split_canary_problem``)."""
    from ..verify.canary import OUTPUTS

    def kernels(problem: Problem) -> dict:
        window = "x".join(str(k) for k in problem.kernel_size)
        return {f"{what} ({op}, {problem.dtype}, {problem.ndim}D, head_dim {problem.head_dim}, kernel {window})":
                OUTPUTS[op]}

    return kernels


@lru_cache(maxsize=64)
def composed_candidates(run, policy: Policy) -> dict[str, Candidate]:
    """The ops of :mod:`~na_rtc.runtime.composed` as :class:`~na_rtc.verify.gate.Candidate` s, by op name of
    ``canary.OPS``: the fused forward and backward composed (the fused kernels' fallback) and the split ops
    (which have no other kernels)."""
    from ..verify.canary import split_canary_problem

    def forward(problem, query, key, value, rpb=None):
        return composed.forward(Dispatcher(run, policy), problem, query, key, value, rpb)

    def backward(problem, grad_out, query, key, value, rpb=None, output=None, logsumexp=None):
        return composed.backward(Dispatcher(run, policy), problem, grad_out, query, key, value, rpb)

    def split_op(function):
        def run_op(problem, *arrays):
            return function(Dispatcher(run, policy), problem, *arrays)

        return run_op

    units = {"forward": ("composed split kernels", forward), "backward": ("composed split kernels", backward),
             "qk": ("split kernels", split_op(composed.qk)), "qk_backward": ("split kernels", split_op(composed.qk_backward)),
             "av": ("split kernels", split_op(composed.av)), "av_backward": ("split kernels", split_op(composed.av_backward))}
    return {op: Candidate(op, SPLIT, _split_unit(op, what), runner, split_canary_problem)
            for op, (what, runner) in units.items()}


def _log(problem: Problem, choice: Choice) -> None:
    log.debug("%s (%dD %s head_dim %d): %s", choice.op, problem.ndim, problem.dtype, problem.head_dim, choice)


# ---------------------------------------------------------------- the op table


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

    def fused_forward(self, problem: Problem, query, key, value, rpb=None):
        dispatcher = self.dispatcher(problem)
        route, skipped = dispatcher.forward_route(problem)
        if route is not None:
            if log.isEnabledFor(logging.DEBUG):
                _log(problem, Choice("forward", route.path, (dispatcher._plan(problem, route).name,), tuple(skipped)))
            return dispatcher.forward(problem, query, key, value, composed.bias_in_accumulator(problem, rpb), route)
        return self._composed("forward", dispatcher, problem, skipped, query, key, value, rpb)

    def fused_backward(self, problem: Problem, grad_out, query, key, value, rpb=None, output=None, logsumexp=None):
        dispatcher = self.dispatcher(problem)
        pair, skipped = dispatcher.backward_pair(problem)
        if pair is None:
            return self._composed("backward", dispatcher, problem, skipped, grad_out, query, key, value, rpb)
        launches = dispatcher.backward_launches(problem, pair)
        if log.isEnabledFor(logging.DEBUG):
            _log(problem, Choice("backward", _pair_path(pair), launches.kernel_names(problem.has_rpb), tuple(skipped)))
        if output is None:  # the plain backward functions may be called without the forward's results
            route, skipped = dispatcher.forward_route(problem)  # the same dispatcher: its rules already evaluated
            if route is None:
                output, logsumexp = self._composed("forward", dispatcher, problem, skipped, query, key, value, rpb)
            else:
                output, logsumexp = dispatcher.forward(problem, query, key, value,
                                                       composed.bias_in_accumulator(problem, rpb), route)
        lse = _arrays.cast(logsumexp, "float32")  # the kernels read a float32 logsumexp
        dq, dk, dv, drpb = L.fused_backward(self.run, launches, problem, grad_out, query, key, value,
                                            composed.bias_in_accumulator(problem, rpb), output, lse)
        return dq, dk, dv, None if rpb is None else _arrays.cast(drpb, _arrays.dtype_name(rpb))

    def _composed(self, op: str, dispatcher: Dispatcher, problem: Problem, skipped, *arrays):
        """The fused ``op`` as the split kernels composed, where they may serve (else the error saying why)."""
        refusal = composed_refusal(dispatcher, problem, op)
        if refusal is not None:
            raise refusal
        if log.isEnabledFor(logging.DEBUG):
            _log(problem, Choice(op, SPLIT, (), tuple(skipped)))
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
                            "The split ops have no other kernels; the fused ops (na1d, na2d) compute "
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
            choice = dispatcher.choose(op, problem)
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


def make_ops(run, backend: str, verification: str = "run") -> dict:
    """The op table (same signatures as :data:`na_rtc.reference.OPS`) on executor ``run`` for ``backend``
    (``cuda`` or ``emulator``: which GPU policy and verification apply)."""
    return OpTable(run, backend, verification).ops()
