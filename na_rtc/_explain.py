"""``na_rtc.explain``: which kernels a call would run, and why the others were passed over.

``explain("na2d", q, k, v, kernel_size=7, backward=True)`` takes the op's
name (or the function itself) and the call's own arguments, validates them
as the call would, picks the backend as the call would, and asks the
dispatcher (:mod:`na_rtc.runtime.dispatch`, through :mod:`na_rtc.runtime.ops`) for its decisions under the
settings as they are now. Nothing is launched, compiled or verified: on a GPU
a kernel that failed first-use verification earlier is reported as skipped
for that reason, and one that has not been verified yet is marked as to be
verified at its first use.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from . import _args, _arrays

__all__ = ["Explanation", "Step", "explain"]

#: op name -> (rank, kind of op)
_OPS = {f"na{n}d{suffix}": (n, kind) for n in (1, 2, 3) for suffix, kind in (("", _args.FUSED), ("_qk", _args.QK),
                                                                            ("_av", _args.AV))}


@dataclass(frozen=True)
class Step:
    """One op of the call (``forward``, ``backward``, ``qk``, ``av_backward``, ...) and what serves it.

    ``choice``: the fused kernels' decision (None for the split ops, which have no fused kernels);
    ``launches``: the split-kernel decisions, one per launch, where the split kernels serve; ``error``: what
    the call would raise instead."""

    op: str
    choice: object = None
    launches: tuple = ()
    error: str = ""

    def lines(self) -> list[str]:
        out = []
        if self.choice is not None:
            chosen = self.choice.path or ("the split kernels composed" if self.launches else "no kernel serves")
            out.append(f"{self.op}: {chosen}" + (f" ({self.choice.note})" if self.choice.note else ""))
            if self.choice.kernels:
                out.append(f"  launches {', '.join(self.choice.kernels)}")
            out += [f"  skipped {path}: {why}" for path, why in self.choice.skipped]
            indent = "  "
        else:
            out.append(f"{self.op}: the split kernels")
            indent = "  "
        for launch in self.launches:
            out.append(f"{indent}{launch.op}: {launch.path} {', '.join(launch.kernels)}")
            out += [f"{indent}  skipped {path}: {why}" for path, why in launch.skipped]
        if self.error:
            out.append(f"  the call raises: {self.error}")
        return out

    @property
    def kernels(self) -> tuple[str, ...]:
        """Every kernel this step launches, in order."""
        names = tuple(self.choice.kernels) if self.choice is not None and self.choice.path else ()
        return names + tuple(name for launch in self.launches for name in launch.kernels)


@dataclass(frozen=True)
class Explanation:
    """What a call would run: ``str()`` is a readable report; ``steps`` the decisions, in order."""

    call: str
    backend: str
    where: str
    settings: str
    steps: tuple[Step, ...] = field(default_factory=tuple)

    @property
    def kernels(self) -> tuple[str, ...]:
        """Every kernel the call launches, in launch order."""
        return tuple(name for step in self.steps for name in step.kernels)

    def __str__(self) -> str:
        lines = [f"{self.call} on the {self.backend} backend ({self.where})"]
        if self.settings:
            lines.append(f"settings: {self.settings}")
        for step in self.steps:
            lines += step.lines()
        return "\n".join(lines)


def _name_of(op) -> str:
    name = getattr(op, "__name__", op)
    if not isinstance(name, str) or name not in _OPS:
        raise ValueError(f"explain takes one of {', '.join(_OPS)} (a name or the function itself), got {op!r}")
    return name


def _describe(problem: _args.Problem, name: str) -> str:
    window = ", ".join(f"{a.length} (kernel {a.kernel_size}" + (f", stride {a.stride}" if a.stride > 1 else "")
                       + (f", dilation {a.dilation}" if a.dilation > 1 else "") + (", causal" if a.causal else "")
                       + ")" for a in problem.axes)
    bias = ", with a bias" if problem.has_rpb else ""
    heads = f"{problem.heads} heads" + (f" ({problem.kv_heads} key/value heads)" if problem.group > 1 else "")
    head_dim = f"head_dim {problem.head_dim}" + (f" (value {problem.v_dim})" if problem.head_dim_v else "")
    extra = f", {problem.extra_tokens} extra tokens" if problem.extra_tokens else ""
    return f"na_rtc.{name}: {problem.dtype}, batch {problem.batch}, {heads}, {head_dim}, axes {window}{bias}{extra}"


def _problem(name: str, arguments: dict) -> tuple[_args.Problem, str | None]:
    """The call's problem, validated as the call validates it (under torch autocast too), and the dtype of
    its attention weights where it takes them."""
    from . import functional

    ndim, kind = _OPS[name]
    a = arguments
    if kind == _args.FUSED:
        query, key, value = functional._autocast(a["query"], a["key"], a["value"])
        extra_keys, extra_values = functional._autocast(a["additional_keys"], a["additional_values"])
        return _args.fused_problem(ndim, query, key, value, a["kernel_size"], a["stride"], a["dilation"],
                                   a["is_causal"], a["scale"], a["rpb"], extra_keys, extra_values), None
    if kind == _args.QK:
        query, key = functional._autocast(a["query"], a["key"])
        return _args.qk_problem(ndim, query, key, a["kernel_size"], a["dilation"], a["is_causal"], a["rpb"]), None
    attn, value = functional._autocast(a["attn"], a["value"])
    problem = _args.av_problem(ndim, attn, value, a["kernel_size"], a["dilation"], a["is_causal"])
    return problem, _arrays.dtype_name(attn)


def _settings_text(policy) -> str:
    s = policy.settings
    parts = [f"tensor cores {'on' if s.tensor_cores else 'off'}", f"wgmma {'on' if s.wgmma else 'off (opt-in)'}"]
    parts += [f"{label} {value}" for label, value in (("rows per warp", s.tc_warp_rows),
                                                       ("wgmma warpgroups", s.wgmma_warpgroups),
                                                       ("wgmma chunk keys", s.wgmma_chunk_keys)) if value]
    parts.append("first-use verification " + ("on" if policy.verify else "off"))
    return ", ".join(parts)


def explain(op, *args, backward: bool = False, **kwargs) -> Explanation:
    """What ``na_rtc.<op>(*args, **kwargs)`` would run, and with ``backward=True`` its gradient too.

    ``op``: ``"na1d"``, ``"na2d"``, ``"na3d"``, their ``_qk`` and ``_av`` ops (``"na2d_qk"``, ...) or the
    function itself; the arguments are the call's, ``backend=`` included. Returns an :class:`Explanation`: print it
    for the kernels of each launch and, for every candidate passed over, the reason. Launches nothing.
    """
    from . import backends, functional

    name = _name_of(op)
    function = getattr(functional, name)
    try:
        bound = inspect.signature(function).bind(*args, **kwargs)
    except TypeError as error:
        raise TypeError(f"explain({name!r}, ...): {error}") from None
    bound.apply_defaults()
    problem, weights = _problem(name, bound.arguments)
    chosen = backends.select(problem, bound.arguments.get("backend"))
    call = _describe(problem, name)
    if chosen.name not in ("cuda", "emulator"):
        return Explanation(call, chosen.name, chosen.summary, "")
    from .runtime.ops import explain_steps

    policy, decided = explain_steps(chosen.name, problem, backward, weights)
    steps = tuple(Step(op, choice, launches, error) for op, choice, launches, error in decided)
    if chosen.name == "cuda":
        where = f"GPU {problem.device}, sm_{policy.arch}"
    else:
        where = "the CUDA kernels on the CPU: every architecture's kernels, as CI runs them"
    available, reason = chosen.probe()
    if not available:
        where += f"; not available here: {reason}"
    return Explanation(call, chosen.name, where, _settings_text(policy), steps)
