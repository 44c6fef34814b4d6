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
only), then to an error that names the reason: :mod:`na_rtc.runtime.ops`
runs these decisions as the backends' op table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from .. import _arrays
from .._args import Problem
from ..verify.canary import canary_with_extra_tokens
from ..verify.gate import Candidate, Gate
from . import composed, registry
from . import families  # noqa: F401 - registers every kernel family
from . import launch as L
from .policy import Policy
from .tiling import accumulator_dtype

__all__ = ["BACKWARD", "FORWARD", "SPLIT_KERNELS", "Choice", "Dispatcher", "Route", "composed_candidates",
           "describe_paths", "log_choice", "pair_path", "streams_extra_tokens"]

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
#: the extra tokens' dK/dV kernel, after the pair, where the pair's dq kernel streams the tokens
_TOKENS_DKDV = ("tokens_bwd", "dkdv")


def describe_paths(paths: tuple[str, str]) -> str:
    """``("wgmma", "mma.sync")`` -> "wgmma dq + mma.sync dK/dV"; one name where both are the same."""
    return paths[0] if paths[0] == paths[1] else f"{paths[0]} dq + {paths[1]} dK/dV"


def pair_path(pair) -> str:
    """A (dq, dK/dV) pair of routes in words."""
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


def _family(name: str, ndim: int) -> registry.Family:
    """The family serving ``ndim``-D calls for the table's family ``name`` (a 3D call: its 3D twin); callers
    ask only for routes :meth:`Dispatcher.admits` admitted, which checks that it exists."""
    family = registry.for_rank(name, ndim)
    if family is None:
        raise ValueError(_no_rank(name, ndim))
    return family


def _no_rank(name: str, ndim: int) -> str:
    return f"the {name} kernels serve {'/'.join(f'{r}D' for r in sorted(registry.get(name).ranks))}, not {ndim}D"


def streams_extra_tokens(route: Route) -> bool:
    """Whether ``route``'s forward kernels take the extra key/value tokens as one more key range (the same in
    every rank: a 3D twin has its family's roles)."""
    return registry.get(route.family).roles[route.role].extra_tokens


def _role(route_or_key, ndim: int) -> registry.Role:
    family, role = (route_or_key.family, route_or_key.role) if isinstance(route_or_key, Route) else route_or_key
    return _family(family, ndim).roles[role]


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
        role = _role(key, problem.ndim)
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
            family = registry.for_rank(route.family, problem.ndim)
            known = (False, _no_rank(route.family, problem.ndim)) if family is None else \
                self.policy.allows(family, route.switches)
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
            skipped.append((option.path if isinstance(option, Route) else pair_path(option), why))
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
            return Choice(op, route.path, (self.plan(problem, route).name,), tuple(skipped),
                          self._unverified(problem, self.candidate(route)))
        if op == "backward":
            pair, skipped = self.backward_pair(problem)
            if pair is None:
                return Choice(op, None, (), tuple(skipped))
            names = self.backward_launches(problem, pair).kernel_names(problem.has_rpb)
            return Choice(op, pair_path(pair), names, tuple(skipped), self._unverified(problem, self.candidate(pair)))
        if op not in SPLIT_KERNELS:
            raise ValueError(f"op must be forward, backward or one of {', '.join(SPLIT_KERNELS)}, got {op!r}")
        if not args:
            args = ((problem.dtype,) * (2 if op == "inverse" else 1) if not op.startswith("softmax")
                    else (accumulator_dtype(problem.dtype),))
        route, skipped = self.split_route(op, problem, args)
        launch = _role(route, problem.ndim).plan(problem, self.policy, *args)
        names = (launch.name,) if launch.extra is None else (launch.name, launch.extra.name)
        return Choice(op, route.path, names, tuple(skipped))

    # ------------------------------------------------------------ launching

    def plan(self, problem: Problem, route: Route):
        """The launch ``route``'s family plans for ``problem`` under this dispatch's policy."""
        return _role(route, problem.ndim).plan(problem, self.policy)

    def backward_launches(self, problem: Problem, pair) -> L.BackwardLaunches:
        """The launches of ``pair`` for ``problem``; with extra tokens the kernels take (see
        :meth:`streams_extra_tokens_backward`), the tokens' dK/dV kernel too."""
        dq, dkdv = pair
        ndim = problem.ndim
        reduce = _role(_RPB_REDUCE, ndim).plan(problem, self.policy) if problem.has_rpb else None
        streamed = problem.extra_tokens and self.streams_extra_tokens_backward(problem, pair)[0]
        tokens = _role(_TOKENS_DKDV, ndim).plan(problem, self.policy) if streamed else None
        return L.BackwardLaunches(_role(_DELTA, ndim).plan(problem, self.policy), self.plan(problem, dq),
                                  self.plan(problem, dkdv), reduce, tokens)

    def streams_extra_tokens_backward(self, problem: Problem, pair) -> tuple[bool, str]:
        """Whether the kernels take ``problem``'s extra tokens in its backward on ``pair``: its dq kernel
        streams them and the tokens' dK/dV kernel covers the problem (else their part runs as matrix
        products, :func:`na_rtc.extra_tokens.fused_backward`); ``(ok, why not)``."""
        if not registry.get(pair[0].family).roles[pair[0].role].extra_tokens:
            return False, f"the {pair[0].path} dq kernels do not stream extra tokens"
        return _role(_TOKENS_DKDV, problem.ndim).covers(problem, self.policy)

    def forward(self, problem: Problem, query, key, value, rpb_acc=None, path: str | Route | None = None,
                extra_keys=None, extra_values=None):
        """``(out, lse)`` of the fused forward kernels: on ``path`` (a name of :data:`FORWARD`, unchecked), or
        the first route that serves. ``rpb_acc``: the bias in the accumulator dtype (float32), or None;
        ``extra_keys``/``extra_values``: the extra tokens, for a route that streams them
        (:func:`streams_extra_tokens`), or None."""
        route = _named(FORWARD, path) if path is not None else self.forward_route(problem)[0]
        if route is None:
            raise ValueError(f"no fused kernel covers this problem ({problem.ndim}D, {problem.dtype}, head_dim "
                             f"{problem.head_dim}); see Dispatcher.choose('forward', problem) for why")
        if extra_keys is not None and not streams_extra_tokens(route):
            raise ValueError(f"the {route.path} forward kernels do not stream extra tokens")
        return _role(route, problem.ndim).run(self.run, self.plan(problem, route), problem, query, key, value,
                                              rpb_acc, extra_keys, extra_values)

    def backward(self, problem: Problem, grad_out, query, key, value, rpb_acc, output, lse, paths=None,
                 grad_lse=None, extra_keys=None, extra_values=None):
        """``(dq, dk, dv, drpb)`` of the fused backward kernels, from the forward's ``output`` and ``lse`` (and
        the logsumexp's gradient ``grad_lse``, or None): on ``paths`` (a (dq, dK/dV) pair of path names,
        unchecked) or the first pair that serves. With extra tokens (where
        :meth:`streams_extra_tokens_backward` admits the pair), also their gradients."""
        if paths is not None:
            pair = next((p for p in BACKWARD if (p[0].path, p[1].path) == tuple(paths)), None)
            if pair is None:
                raise ValueError(f"no (dq, dK/dV) pair {paths!r}; pairs: {[pair_path(p) for p in BACKWARD]}")
        else:
            pair = self.backward_pair(problem)[0]
        if pair is None:
            raise ValueError("the fused backward kernels do not cover this problem; see "
                             "Dispatcher.choose('backward', problem) for why")
        if problem.extra_tokens:
            ok, why = self.streams_extra_tokens_backward(problem, pair)
            if not ok:
                raise ValueError(f"the backward kernels do not take these extra tokens: {why}")
        return L.fused_backward(self.run, self.backward_launches(problem, pair), problem, grad_out, query, key, value,
                                rpb_acc, output, lse, grad_lse, extra_keys, extra_values)

    def _split(self, role: str, problem: Problem, args: tuple, *arrays):
        route, skipped = self.split_route(role, problem, args)
        handler = _role(route, problem.ndim)
        launch = handler.plan(problem, self.policy, *args)
        if log.isEnabledFor(logging.DEBUG):
            log_choice(problem, Choice(role, route.path, (launch.name,), tuple(skipped)))
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
        return [(option.path if isinstance(option, Route) else pair_path(option), self.candidate(option))
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
        def kernels(problem):
            return {_role(option, problem.ndim).plan(problem, policy).name: ("out", "lse")}

        def forward(problem, query, key, value, rpb_acc, extra_keys=None, extra_values=None):
            role = _role(option, problem.ndim)
            return role.run(run, role.plan(problem, policy), problem, query, key, value, rpb_acc, extra_keys,
                            extra_values)

        if streams_extra_tokens(option):  # its canary streams extra tokens too
            return Candidate("forward", option.path, kernels, forward, canary_with_extra_tokens)
        return Candidate("forward", option.path, kernels, forward)
    dispatcher = Dispatcher(run, policy)

    def pair_kernels(problem):
        launches = dispatcher.backward_launches(problem, option)
        kernels = {launches.dq.name: ("dq", "drpb"), launches.dkdv.name: ("dk", "dv")}
        if launches.tokens is not None:
            kernels[launches.tokens.name] = ("dxk", "dxv")
        return kernels

    def backward(problem, grad_out, query, key, value, rpb_acc, output, lse, extra_keys=None, extra_values=None):
        return L.fused_backward(run, dispatcher.backward_launches(problem, option), problem, grad_out, query, key,
                                value, rpb_acc, output, lse, None, extra_keys, extra_values)

    if registry.get(option[0].family).roles[option[0].role].extra_tokens:  # its canary streams tokens too
        return Candidate("backward", pair_path(option), pair_kernels, backward, canary_with_extra_tokens)
    return Candidate("backward", pair_path(option), pair_kernels, backward)


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

    def forward(problem, query, key, value, rpb=None, extra_keys=None, extra_values=None):  # its canary has none
        return composed.forward(Dispatcher(run, policy), problem, query, key, value, rpb)

    def backward(problem, grad_out, query, key, value, rpb=None, output=None, logsumexp=None, extra_keys=None,
                 extra_values=None):  # its canary has no extra tokens
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


def log_choice(problem: Problem, choice: Choice) -> None:
    """``choice`` on the ``na_rtc.dispatch`` logger, at debug level (callers check the level first)."""
    log.debug("%s (%dD %s head_dim %d): %s", choice.op, problem.ndim, problem.dtype, problem.head_dim, choice)
