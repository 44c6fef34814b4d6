"""Canaries: one small problem per kernel instantiation, checked against the float64 reference.

A canary exercises what a kernel does on every problem, not the logic of one
call: the problem has a partial query tile, so the bounds checks run, and a
tile whose key box holds at least three staged chunks (the largest tiles are
128 queries in 1D and 16 x 8 in 2D, the largest chunks 64 keys), so the
pipeline of asynchronous copies wraps around its stages; it carries a positional bias,
so the bias paths of the forward and of the gradients run. It keeps the
dtype, head dim, rank, array library and device of the call it vouches for,
so it runs the same instantiation, on the same GPU.

The split kernels (the split ops, and the fused ops composed of them) pick
tiled or straightforward kernels by the window's size, so their canaries keep
the call's windows (:func:`split_canary_problem`) on a short axis of their
own, with a partial tile.

Inputs are multiples of 1/64 in [-1, 1] (exact in float16 and bfloat16, so the
reference sees exactly what the kernel sees); results are compared, with the
tolerance table of :mod:`na_rtc.verify.tolerances`, against dense masked
attention in float64 on the host (:mod:`na_rtc.verify.dense`; the split ops
against the reference backend). On the GPU a
canary costs a few milliseconds of kernel time and a few tens of
milliseconds on the host.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable

import numpy as np

from .. import _arrays
from .._args import AV, FUSED, Problem
from ..window import Axis
from . import dense
from .tolerances import TOLERANCES

FORWARD, BACKWARD = "forward", "backward"


@dataclasses.dataclass(frozen=True)
class Op:
    """What a candidate's ``run`` takes after the problem, what it returns, and which tolerance applies."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    tolerance: str


#: the ops a canary can check, by name: the fused op (its kernels get the bias in float32) and the split ops
OPS = {
    FORWARD: Op(("q", "k", "v", "rpb", "xk", "xv"), ("out", "lse"), "forward"),
    BACKWARD: Op(("dout", "q", "k", "v", "rpb", "out", "lse", "xk", "xv"), ("dq", "dk", "dv", "drpb", "dxk", "dxv"),
                 "grad"),
    "qk": Op(("q", "k", "rpb"), ("attn",), "forward"),
    "qk_backward": Op(("dattn", "q", "k", "rpb"), ("dq", "dk", "drpb"), "grad"),
    "av": Op(("attn", "v"), ("out",), "forward"),
    "av_backward": Op(("dout", "attn", "v"), ("dattn", "dv"), "grad"),
}
OUTPUTS = {name: op.outputs for name, op in OPS.items()}

#: rank -> the fused kernels' canary axes. 1D: 329 = 2 x 128 + 73 leaves a partial last tile for every tile of
#: up to 128 queries, and a window of 177 gives every tile, down to the 16 keys of a SIMT dK/dV tile, a box of
#: three chunks (16 + 176 queries: three 64-query chunks). 2D: 23 x 21 leaves partial tiles on both axes for
#: every tile of 16 x 8 or smaller, and an 11 x 11 window gives a 4 x 4 tile a box of 14 x 14 = 196 (three
#: 64-row chunks) and an inner 8 x 8 tile one of 18 x 18. 3D, kept small (1170 queries of 125 keys each, so
#: that CI's quick self-test stays quick): 9 x 10 x 13 leaves partial tiles on every axis for tiles of 2, 4 or
#: 8 queries per axis, and a 5 x 5 x 5 window gives even a 2 x 2 x 2 tile a box of 6 x 6 x 6 = 216 (three
#: 64-row chunks). The dK/dV kernels' query boxes are as large as the forward's key boxes (non-causal windows
#: are symmetric).
AXES = {
    1: (Axis(329, 177),),
    2: (Axis(23, 11), Axis(21, 11)),
    3: (Axis(9, 5), Axis(10, 5), Axis(13, 5)),
}
#: rank -> the largest query tile of the split kernels along any axis (runtime/families/tiled.py TILES)
SPLIT_TILE = {1: 64, 2: 8, 3: 4}
#: two query heads reading one key/value head: every canary runs grouped-query attention (a kernel that reads
#: the wrong key/value head, or whose dK/dV misses a query head of the group, fails it); the group size is a
#: runtime argument of every kernel, so one group checks every other
BATCH, HEADS, HEADS_KV = 1, 2, 1
SEED = 20260
#: the extra key/value tokens of the canary of a forward or dq kernel that streams them: more than two of the
#: largest chunks (64 keys) and a partial one, so that their range wraps the pipeline's stages too (and, in a
#: backward, several tiles of the tokens' dK/dV kernel)
EXTRA_TOKENS = 141


def canary_problem(like: Problem) -> Problem:
    """The canary of the fused kernel that serves ``like``: its dtype, rank, library and device, and its head-dim
    bucket: the larger head dim of ``like`` for query and key, and a value head dim of its own below it (the
    kernels take both at run time, so one canary checks both reads of every call in the bucket)."""
    head_dim = like.max_head_dim
    return Problem(FUSED, AXES[like.ndim], BATCH, HEADS, head_dim, like.dtype, like.kind, like.device,
                   has_rpb=True, scale=2.0 * head_dim**-0.5,  # a larger scale: a less uniform softmax
                   heads_kv=HEADS_KV, head_dim_v=_value_head_dim(head_dim))


def canary_with_extra_tokens(like: Problem) -> Problem:
    """The canary of fused kernels that stream extra tokens (a forward, or a backward pair whose dq kernel does):
    :func:`canary_problem` with :data:`EXTRA_TOKENS` of them, so that every instantiation's token range is
    checked with its neighborhood."""
    return dataclasses.replace(canary_problem(like), extra_tokens=EXTRA_TOKENS)


def _value_head_dim(head_dim: int) -> int | None:
    """The canary's value head dim: three quarters of the query's (same bucket; None where that is no other)."""
    smaller = head_dim * 3 // 4
    return smaller if 1 <= smaller < head_dim else None


def split_canary_problem(like: Problem) -> Problem:
    """The canary of the split kernels that serve ``like`` (an op of ``like.op``): the call's windows (the
    kernel size picks tiled or straightforward kernels) with stride 1, on axes long enough for two tiles and a
    partial third; a bias where the windows allow one."""
    axes = []
    for axis in like.axes:
        span = axis.kernel_size * axis.dilation
        length = max(span, 2 * SPLIT_TILE[like.ndim]) + 5
        axes.append(Axis(length, axis.kernel_size, 1, axis.dilation, axis.causal))
    bias = like.op != AV and all(a.kernel_size % 2 == 1 and not a.causal for a in axes)
    return Problem(like.op, tuple(axes), BATCH, HEADS, like.head_dim, like.dtype, like.kind, like.device,
                   has_rpb=bias, scale=2.0 * like.head_dim**-0.5 if like.op == FUSED else None, heads_kv=HEADS_KV)


def _grid(rng: np.random.Generator, shape) -> np.ndarray:
    """Multiples of 1/64 in [-1, 1]: exact in every dtype the kernels take."""
    return rng.integers(-64, 65, size=shape).astype(np.float64) / 64


@dataclasses.dataclass
class Inputs:
    """A canary's host (float64) inputs and their copies on the call's device, in its library and dtype."""

    host: dict[str, np.ndarray | None]
    device: dict[str, object]


def _to_device(x: np.ndarray | None, problem: Problem, dtype: str):
    """``x`` (float64) in ``problem``'s array library, on its device, as ``dtype``."""
    if x is None:
        return None
    if problem.kind == _arrays.TORCH:
        torch = sys.modules["torch"]
        return torch.from_numpy(np.ascontiguousarray(x)).to(device=problem.device, dtype=getattr(torch, dtype))
    if problem.kind == _arrays.CUPY:
        from ..runtime import device

        with device.guard(int(problem.device.partition(":")[2] or 0)):
            return sys.modules["cupy"].asarray(x.astype(dtype))
    return x.astype(dtype)


def to_host64(x) -> np.ndarray | None:
    """A result as float64 NumPy, from any library and device."""
    if x is None:
        return None
    kind = _arrays.kind_of(x)
    if kind == _arrays.TORCH:
        return x.detach().to("cpu").double().numpy()
    if kind == _arrays.CUPY:
        from ..runtime import device

        with device.guard(x):  # ndarray.get() switches to the array's device and back, as Device() does
            return x.get().astype(np.float64)
    return np.asarray(x, dtype=np.float64)


def make_inputs(problem: Problem, op: str) -> Inputs:
    """Deterministic inputs of ``op``, float64 on the host and on the call's device: the bias in float32 (what
    the fused kernels read; the ops cast it), the fused backward's output and logsumexp from the reference,
    rounded as a forward kernel returns them."""
    rng = np.random.default_rng(SEED)
    shapes = {"q": problem.qkv_shape, "k": problem.kv_shape, "v": problem.v_shape, "dout": problem.out_shape,
              "attn": problem.attn_shape, "dattn": problem.attn_shape, "rpb": problem.rpb_shape,
              "xk": problem.extra_keys_shape, "xv": problem.extra_values_shape}
    names = [name for name in OPS[op].inputs if name in shapes]
    host = {name: _grid(rng, shapes[name]) for name in names}
    if "rpb" in host and not problem.has_rpb:
        host["rpb"] = None
    for name in ("xk", "xv"):
        if name in host and not problem.extra_tokens:
            host[name] = None
    if op == BACKWARD:
        host["out"], host["lse"] = dense.forward(problem, host["q"], host["k"], host["v"], host["rpb"], host["xk"],
                                                 host["xv"])
    dtypes = {"rpb": "float32", "lse": "float32"}
    device = {name: _to_device(x, problem, dtypes.get(name, problem.dtype)) for name, x in host.items()}
    return Inputs(host, device)


def reference(op: str, problem: Problem, host: dict) -> tuple:
    """``op``'s results in float64: dense masked attention for the fused op, the reference backend for the
    split ops."""
    args = [host[name] for name in OPS[op].inputs if name not in ("out", "lse")]
    if op == FORWARD:
        return dense.forward(problem, *args)
    if op == BACKWARD:
        return dense.backward(problem, *args)
    from .. import reference as backend

    exact = dataclasses.replace(problem, dtype="float64", kind=_arrays.NUMPY, device="cpu")
    result = backend.OPS[op if op.endswith("_backward") else f"{op}_forward"](exact, *args)
    return result if isinstance(result, tuple) else (result,)


def mismatch(name: str, got: np.ndarray | None, want: np.ndarray | None, dtype: str, kind: str) -> str | None:
    """None when ``got`` is within the tolerance of ``want`` (equal where ``want`` is infinite); otherwise
    what is wrong, for a warning."""
    if got is None or want is None:
        return None if got is None and want is None else f"{name} is {'missing' if got is None else 'unexpected'}"
    atol, rtol = TOLERANCES[dtype][kind]
    if got.shape != want.shape:
        return f"{name} has shape {got.shape}, expected {want.shape}"
    with np.errstate(invalid="ignore"):
        excess = np.abs(got - want) - (atol + rtol * np.abs(want))
    excess = np.where(got == want, 0.0, np.where(np.isnan(excess), np.inf, excess))  # -inf logits match exactly
    bad = excess > 0
    if not bad.any():
        return None
    worst = np.unravel_index(int(np.argmax(excess)), excess.shape)
    return (f"{name}: {int(bad.sum())} of {bad.size} values outside atol {atol:g} + rtol {rtol:g} of the float64 "
            f"reference; worst at {tuple(int(i) for i in worst)}: got {got[worst]:.6g}, expected {want[worst]:.6g}")


#: runs ``op`` on one candidate kernel path: ``(problem, *inputs) -> outputs`` in the order of ``OPS[op]``
Runner = Callable[..., tuple]


def check(op: str, problem: Problem, run: Runner) -> dict[str, str | None]:
    """Run ``op`` on ``problem`` (a canary) through ``run``; per output, None or the mismatch."""
    spec = OPS[op]
    inputs = make_inputs(problem, op)
    got = run(problem, *(inputs.device[name] for name in spec.inputs))
    got = got if isinstance(got, tuple) else (got,)
    want = reference(op, problem, inputs.host)
    return {name: mismatch(name, to_host64(g), None if w is None else np.asarray(w, np.float64), problem.dtype,
                           spec.tolerance)
            for name, g, w in zip(spec.outputs, got, want)}
